"""The reversible paired-iterate relaxation of McCallum et al. (2025), per example."""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .._checks import check_number
from ._loop import Solver, check_solver_options, select_rows


class ReversiblePair(NamedTuple):
    """The two iterates, ``[B, D]`` each."""

    y: jax.Array
    z: jax.Array


@dataclasses.dataclass(frozen=True)
class Reversible(Solver):
    """The reversible DEQ solver: ``y <- (1 - beta) y + beta f(z)``, then ``z <- (1 - beta) z + beta f(y)``.

    From ``y = z = z0``, each f evaluation updates one of the pair, alternately: the
    ``k``-th evaluation (from 0) is at ``z`` and updates ``y`` when ``k`` is even, at
    ``y`` and updates ``z`` when it is odd. Each update is algebraically invertible
    (``y_prev = (y - beta f(z)) / (1 - beta)``), so ``deq_jax.ReversibleBackprop`` can
    backpropagate through the finite solve by reconstructing it backwards from the
    last pair, storing nothing per step. As a plain solver it is a relaxed fixed-point
    iteration (``value`` is ``f`` at the lowest-residual iterate, as for the others);
    per-example stopping, budgets and statistics come from the shared loop.

    Args:
      tol: relative residual at which an example stops.
      max_iter: most f evaluations per example.
      beta: the relaxation, in [1/2, 1) (the range McCallum et al. analyse). Undoing an
        update multiplies a rounding error by ``1 / (1 - beta)`` or more, so the larger
        ``beta``, the fewer updates ``ReversibleBackprop`` reconstructs accurately.

    Examples:
      >>> import jax.numpy as jnp, deq_jax as dj
      >>> sol = dj.Reversible(tol=1e-6, max_iter=200)(lambda z: 0.5 * z + 1.0, jnp.zeros((2, 3)))
      >>> bool(sol.converged.all()), round(float(sol.value[0, 0]), 4)
      (True, 2.0)
    """

    tol: float = 1e-2
    max_iter: int = 50
    beta: float = 0.5

    def __post_init__(self):
        check_solver_options(self)
        check_number("Reversible", "beta", self.beta, low=0.5, high=1.0, low_open=False)

    def init(self, batch, features, dtype) -> ReversiblePair:
        """Zeros; the first ``record`` (at ``z0``) sets both."""
        return ReversiblePair(jnp.zeros((batch, features), dtype), jnp.zeros((batch, features), dtype))

    def propose(self, pair: ReversiblePair, k) -> jax.Array:
        """``z`` for an even evaluation, ``y`` for an odd one."""
        return jnp.where(k % 2 == 0, pair.z, pair.y)

    def record(self, pair: ReversiblePair, k, x, fx, active) -> ReversiblePair:
        """Relaxes the member that ``x`` was not towards ``f(x)``; ``z0`` at the first evaluation."""
        beta = self.beta
        first = k == 0
        y = jnp.where(first, x, pair.y)  # y0 = z0
        z = jnp.where(first, x, pair.z)
        even = k % 2 == 0
        new_y = jnp.where(even, (1 - beta) * y + beta * fx, y)
        new_z = jnp.where(even, z, (1 - beta) * z + beta * fx)
        return ReversiblePair(select_rows(active, new_y, lambda: pair.y), select_rows(active, new_z, lambda: pair.z))
