"""Fixed-point solvers: frozen, hashable dataclasses called as ``solver(f, z0)``."""
from .anderson import Anderson as Anderson
from .forward_iteration import ForwardIteration as ForwardIteration
