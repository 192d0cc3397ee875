"""Plain fixed-point iteration ``z <- f(z)``, per example."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ._loop import Solver, check_solver_options, select_rows


@dataclasses.dataclass(frozen=True)
class ForwardIteration(Solver):
    """Forward iteration ``z_{k+1} = f(z_k)``, stopping each example on its own.

    Converges when ``f`` is a contraction near the fixed point; slower than
    :class:`Anderson` but needs no history. ``value`` is ``f(z)`` at each example's
    lowest-residual iterate ``z`` (for a converged example, the last one), as the
    chapter's ``forward_iteration`` returns ``f(z)``.

    Args:
      tol: relative residual ``||f(z)-z|| / (||f(z)|| + 1e-5)`` at which an example stops.
      max_iter: most f evaluations per example (the chapter's function makes
        ``max_iter + 1``).

    Example:
      >>> import jax.numpy as jnp, deq_jax as dj
      >>> sol = dj.ForwardIteration(tol=1e-6, max_iter=100)(lambda z: 0.5 * z + 1.0, jnp.zeros((2, 3)))
      >>> bool(sol.converged.all()), int(sol.num_steps[0]) > 10
      (True, True)
    """

    tol: float = 1e-2
    max_iter: int = 50

    def __post_init__(self):
        check_solver_options(self)

    def init(self, batch, features, dtype) -> jax.Array:
        """The last image ``f(x)``, ``[B, D]`` (see :class:`deq_jax.Solver`)."""
        return jnp.zeros((batch, features), dtype)

    def propose(self, last_fx, k) -> jax.Array:
        """``f`` of the last iterate."""
        return last_fx

    def record(self, last_fx, k, x, fx, active) -> jax.Array:
        """Keeps ``f(x)`` of the running examples."""
        return select_rows(active, fx, lambda: last_fx)
