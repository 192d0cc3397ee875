"""Anderson acceleration, solved independently for every example of a batch."""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from .._solution import Solution
from ._loop import check_int, check_positive, iterate


class AndersonHistory(NamedTuple):
    """Ring buffer of the last ``m`` iterates ``x`` and their images ``f(x)``: [B, m, D]."""

    x: jax.Array
    fx: jax.Array


def mixing_weights(history: AndersonHistory, num_valid: jax.Array, lam: float) -> jax.Array:
    """Solves ``min ||G alpha||^2 s.t. sum(alpha) = 1`` per example, ``G = F - X``.

    This is the chapter's bordered system ``[[0, 1^T], [1, G G^T + lam I]] [nu; alpha] = [1; 0]``,
    with the ring-buffer slots not yet filled masked out (their ``alpha`` is 0).

    Args:
      history: the ring buffer, [B, m, D].
      num_valid: how many slots hold iterates, ``min(k, m)`` (a traced int).
      lam: ridge term added to the Gram matrix.

    Returns:
      alpha: [B, m].
    """
    batch, m, _ = history.x.shape
    residuals = history.fx - history.x
    valid = jnp.arange(m) < num_valid
    eye = jnp.eye(m, dtype=residuals.dtype)
    gram = jnp.einsum("bid,bjd->bij", residuals, residuals) + lam * eye
    gram = jnp.where(valid[:, None] & valid[None, :], gram, eye)
    border = valid.astype(residuals.dtype)
    top = jnp.concatenate([jnp.zeros(1, residuals.dtype), border])
    system = jnp.concatenate([border[:, None] * jnp.ones((batch, m, 1), residuals.dtype), gram], axis=2)
    system = jnp.concatenate([jnp.broadcast_to(top, (batch, 1, m + 1)), system], axis=1)
    rhs = jnp.zeros((batch, m + 1, 1), residuals.dtype).at[:, 0].set(1)
    return jnp.linalg.solve(system, rhs)[:, 1:, 0]


@dataclasses.dataclass(frozen=True)
class Anderson:
    """Anderson acceleration (the chapter's algorithm), per example.

    Each example has its own mixing coefficients, residual and stop: an example whose
    relative residual falls below ``tol`` (or becomes NaN/Inf) is frozen while the
    others go on; the loop ends when all have stopped or after ``max_iter`` f
    evaluations. As in the chapter, the second iterate is ``f(z0)`` and later iterates
    mix the last ``m`` pairs: ``z = beta * F alpha + (1 - beta) * X alpha``.

    The returned ``value`` is ``f(z)`` at each example's lowest-residual iterate ``z``:
    Anderson is not monotone, so when it stalls at ``max_iter`` the best iterate beats
    the last; for a converged example both are the same one. ``f(z)`` is already
    computed, so this costs nothing, and it is what the chapter's DEQ layer outputs
    (it applies ``f`` once more after the solve).

    Args:
      m: history size (number of past iterates mixed).
      lam: ridge regularisation of the Gram matrix.
      beta: mixing parameter; 1 is undamped, <1 damped, >1 over-projected.
      tol: relative residual ``||f(z)-z|| / (||f(z)|| + 1e-5)`` at which an example stops.
      max_iter: most f evaluations per example; the chapter's ``max_iter`` means the same.

    Example:
      >>> import jax.numpy as jnp, deq_jax as dj
      >>> sol = dj.Anderson(tol=1e-6)(lambda z: 0.5 * z + 1.0, jnp.zeros((3, 4)))
      >>> bool(sol.converged.all()), round(float(sol.value[0, 0]), 4)
      (True, 2.0)
    """

    m: int = 5
    lam: float = 1e-4
    beta: float = 1.0
    tol: float = 1e-2
    max_iter: int = 50

    def __post_init__(self):
        check_int("Anderson", m=self.m, max_iter=self.max_iter)
        check_positive("Anderson", tol=self.tol, beta=self.beta)
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or self.lam < 0:
            raise ValueError(f"Anderson: lam must be a number >= 0, got {self.lam!r}.")

    def __call__(self, f: Callable, z0) -> Solution:
        """Solves ``z = f(z)`` from ``z0``.

        Args:
          f: batched map, ``f(z)`` has the structure, shape and dtype of ``z``.
          z0: initial estimate, a floating array (or pytree) with a leading batch axis.

        Returns:
          A :class:`deq_jax.Solution`.
        """
        m = self.m

        def init_history(batch, features, dtype):
            empty = jnp.zeros((batch, m, features), dtype)
            return AndersonHistory(empty, empty)

        def propose(history, k):
            alpha = mixing_weights(history, jnp.minimum(k, m), self.lam)
            mixed = self.beta * jnp.einsum("bi,bid->bd", alpha, history.fx)
            if self.beta != 1.0:
                mixed += (1 - self.beta) * jnp.einsum("bi,bid->bd", alpha, history.x)
            # The chapter's second iterate is plain f(z0), whatever beta is.
            return jnp.where(k == 1, history.fx[:, 0], mixed)

        def record(history, k, x, fx, active):
            slot = k % m
            keep = active[:, None]
            return AndersonHistory(
                x=history.x.at[:, slot].set(jnp.where(keep, x, history.x[:, slot])),
                fx=history.fx.at[:, slot].set(jnp.where(keep, fx, history.fx[:, slot])),
            )

        return iterate(
            "Anderson", f, z0, tol=self.tol, max_iter=self.max_iter,
            init_history=init_history, propose=propose, record=record,
        )
