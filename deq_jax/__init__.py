"""deq_jax: deep equilibrium models in JAX.

Per-example fixed-point solvers that compile end to end, a fixed-point function with
exact implicit or phantom gradients, Jacobian regularisation, and Flax NNX layers (see ``deq_jax.nn``).
"""
from . import nn as nn
from ._backend import BACKEND_CHOICES as BACKEND_CHOICES
from ._backend import BackendChoices as BackendChoices
from ._backend import backend_choices as backend_choices
from ._correction import fixed_point_states as fixed_point_states
from ._correction import fp_correction as fp_correction
from ._fixed_point import fixed_point as fixed_point
from ._gradients import Backprop as Backprop
from ._gradients import GDEQ as GDEQ
from ._gradients import Gradient as Gradient
from ._gradients import Phantom as Phantom
from ._implicit import Implicit as Implicit
from ._implicit import Neumann as Neumann
from ._reversible import ReversibleBackprop as ReversibleBackprop
from ._solution import Solution as Solution
from ._solution import SolveStats as SolveStats
from ._solvers import Anderson as Anderson
from ._solvers import Broyden as Broyden
from ._solvers import ForwardIteration as ForwardIteration
from ._solvers import Reversible as Reversible
from ._solvers import Solver as Solver
from ._jacobian import jacobian_penalty as jacobian_penalty
from ._jacobian import spectral_radius as spectral_radius

__version__ = "0.1.0"
