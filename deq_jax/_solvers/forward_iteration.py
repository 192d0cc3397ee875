"""Fixed-point iteration ``z <- f(z)``, plain or relaxed, per example."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .._checks import check_number
from .._tree import damped_step
from ._loop import Solver, check_solver_options, select_rows


@dataclasses.dataclass(frozen=True)
class ForwardIteration(Solver):
    """Forward iteration ``z_{k+1} = damping * f(z_k) + (1 - damping) * z_k``, stopping each example on its own.

    With ``damping=1`` (the default) plain iteration: converges when ``f`` is a
    contraction near the fixed point; slower than ``Anderson`` but needs no
    history. A smaller ``damping`` (relaxed, or Krasnosel'skii-Mann, iteration, as in
    banax) trades speed for stability: it converges for some ``f`` that plain iteration
    overshoots, e.g. where ``J_f`` has eigenvalues near -1. ``value`` is ``f(z)`` at each example's
    lowest-residual iterate ``z`` (for a converged example, the last one), as the
    chapter's ``forward_iteration`` returns ``f(z)``.

    Args:
      tol: relative residual ``||f(z)-z|| / (||f(z)|| + 1e-5)`` at which an example stops.
      max_iter: most f evaluations per example (the chapter's function makes
        ``max_iter + 1``).
      damping: the weight of ``f(z)`` in each step, in (0, 1].

    Examples:
      >>> import jax.numpy as jnp, deq_jax as dj
      >>> sol = dj.ForwardIteration(tol=1e-6, max_iter=100)(lambda z: 0.5 * z + 1.0, jnp.zeros((2, 3)))
      >>> bool(sol.converged.all()), int(sol.num_steps[0]) > 10
      (True, True)
      >>> sol = dj.ForwardIteration(tol=1e-6, max_iter=100, damping=0.5)(lambda z: -0.9 * z + 1.0, jnp.zeros((1, 1)))
      >>> round(float(sol.value[0, 0]), 4)
      0.5263
    """

    tol: float = 1e-2
    max_iter: int = 50
    damping: float = 1.0

    def __post_init__(self):
        check_solver_options(self)
        check_number("ForwardIteration", "damping", self.damping, high=1.0, high_open=False)

    def init(self, batch, features, dtype) -> jax.Array:
        """The next iterate, ``[B, D]`` (see ``deq_jax.Solver``)."""
        return jnp.zeros((batch, features), dtype)

    def propose(self, next_x, k) -> jax.Array:
        """The iterate ``record`` stored."""
        return next_x

    def record(self, next_x, k, x, fx, active) -> jax.Array:
        """Stores the running examples' next iterate: ``f(x)``, or the damped step."""
        return select_rows(active, damped_step(fx, x, self.damping), lambda: next_x)
