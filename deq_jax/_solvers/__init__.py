"""Fixed-point solvers: frozen, hashable dataclasses called as ``solver(f, z0)``."""
from ._loop import Solver as Solver
from ._loop import check_solver as check_solver
from .anderson import Anderson as Anderson
from .broyden import Broyden as Broyden
from .forward_iteration import ForwardIteration as ForwardIteration
from .reversible import Reversible as Reversible
