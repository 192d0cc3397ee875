"""Fixed-point solvers: frozen, hashable dataclasses called as ``solver(f, z0)``."""
from .anderson import Anderson as Anderson
from .broyden import Broyden as Broyden
from .forward_iteration import ForwardIteration as ForwardIteration

SOLVERS = (Anderson, Broyden, ForwardIteration)


def check_solver(owner: str, solver) -> None:
    """Raises ``TypeError`` unless ``solver`` is an instance of one of :data:`SOLVERS`."""
    if not isinstance(solver, SOLVERS):
        raise TypeError(f"{owner} must be one of {[s.__name__ for s in SOLVERS]} (an instance), got {solver!r}.")
