"""Plain fixed-point iteration ``z <- f(z)``, per example."""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp

from .._solution import Solution
from ._loop import check_int, check_positive, iterate, select_rows


@dataclasses.dataclass(frozen=True)
class ForwardIteration:
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
        check_int("ForwardIteration", max_iter=self.max_iter)
        check_positive("ForwardIteration", tol=self.tol)

    def __call__(self, f: Callable, z0) -> Solution:
        """Solves ``z = f(z)`` from ``z0``; see :meth:`deq_jax.Anderson.__call__`."""

        def record(last_fx, k, x, fx, active):
            return select_rows(active, fx, lambda: last_fx)

        return iterate(
            "ForwardIteration", f, z0, tol=self.tol, max_iter=self.max_iter,
            init_history=lambda batch, features, dtype: jnp.zeros((batch, features), dtype),
            propose=lambda last_fx, k: last_fx,
            record=record,
        )
