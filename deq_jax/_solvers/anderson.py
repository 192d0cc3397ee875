"""Anderson acceleration, solved independently for every example of a batch."""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .._checks import check_int, check_number
from ._loop import Solver, check_solver_options, history_einsum, select_rows


RIDGES = ("absolute", "relative")


class AndersonHistory(NamedTuple):
    """Ring buffer of the last ``m`` images ``f(x)`` and residuals ``f(x) - x`` ([B, m, D]),
    and the Gram matrix of those residuals ([B, m, m]).

    The Gram matrix is kept up to date one row per step (the new residual against the
    stored ones) instead of being recomputed from ``F - X`` at every step: one pass
    over the history per step instead of a full ``[B, m, m]`` product (the solve's cost
    beyond f is in ``python -m experiments.benchmarks.solver_overhead``).
    """

    fx: jax.Array
    residual: jax.Array
    gram: jax.Array


def mixing_weights(gram: jax.Array, num_valid: jax.Array, lam: float, relative: bool = False) -> jax.Array:
    """Solves ``min ||G alpha||^2 s.t. sum(alpha) = 1`` per example, ``G = F - X``.

    This is the chapter's bordered system ``[[0, 1^T], [1, G G^T + lam I]] [nu; alpha] = [1; 0]``,
    with the ring-buffer slots not yet filled masked out (their ``alpha`` is 0).

    Args:
      gram: ``G G^T``, the Gram matrix of the stored residuals, [B, m, m].
      num_valid: how many slots hold iterates, ``min(k, m)`` (a traced int).
      lam: ridge term added to the Gram matrix.
      relative: whether ``lam`` is relative to the mean diagonal of each example's
        valid Gram matrix (else it is added as it is).

    Returns:
      alpha: [B, m], in ``gram``'s dtype.
    """
    dtype = gram.dtype
    # Solved in at least float32: the bordered system is small but ill-conditioned, and
    # XLA:CPU's LAPACK solve has no bfloat16 kernel.
    gram = gram.astype(jnp.promote_types(dtype, jnp.float32))
    batch, m, _ = gram.shape
    valid = jnp.arange(m) < num_valid
    eye = jnp.eye(m, dtype=gram.dtype)
    if relative:
        diagonal = jnp.where(valid, jnp.diagonal(gram, axis1=1, axis2=2), 0)
        scale = jnp.sum(diagonal, axis=1) / jnp.maximum(num_valid, 1).astype(gram.dtype)
        ridge = lam * jnp.where(scale > 0, scale, 1)[:, None, None] * eye
    else:
        ridge = lam * eye
    gram = jnp.where(valid[:, None] & valid[None, :], gram + ridge, eye)
    border = valid.astype(gram.dtype)
    top = jnp.concatenate([jnp.zeros(1, gram.dtype), border])
    system = jnp.concatenate([border[:, None] * jnp.ones((batch, m, 1), gram.dtype), gram], axis=2)
    system = jnp.concatenate([jnp.broadcast_to(top, (batch, 1, m + 1)), system], axis=1)
    rhs = jnp.zeros((batch, m + 1, 1), gram.dtype).at[:, 0].set(1)
    return jnp.linalg.solve(system, rhs)[:, 1:, 0].astype(dtype)


@dataclasses.dataclass(frozen=True)
class Anderson(Solver):
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
      lam: ridge regularisation of the Gram matrix ``G G^T + lam I``.
      beta: mixing parameter; 1 is undamped, <1 damped, >1 over-projected.
      tol: relative residual ``||f(z)-z|| / (||f(z)|| + 1e-5)`` at which an example stops.
      max_iter: most f evaluations per example; the chapter's ``max_iter`` means the same.
      ridge: ``"absolute"`` (the chapter's): ``lam`` is added as it is, so it must be
        far below the squared residuals near the solution or it slows Anderson down
        -- at tolerances below about 1e-4, lower it or use ``"relative"``:
        ``lam`` times the mean of the Gram matrix's diagonal, per example, which
        does not depend on the residuals' scale.

    Examples:
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
    ridge: str = "absolute"

    def __post_init__(self):
        check_solver_options(self)
        check_int("Anderson", m=self.m)
        check_number("Anderson", "beta", self.beta)
        check_number("Anderson", "lam", self.lam, low_open=False)
        if self.ridge not in RIDGES:
            raise ValueError(f"Anderson: ridge must be one of {RIDGES}, got {self.ridge!r}.")

    def init(self, batch, features, dtype) -> AndersonHistory:
        """Empty ``[B, m, D]`` buffers and a zero Gram matrix (see ``deq_jax.Solver``)."""
        empty = jnp.zeros((batch, self.m, features), dtype)
        return AndersonHistory(empty, empty, jnp.zeros((batch, self.m, self.m), dtype))

    def propose(self, history: AndersonHistory, k) -> jax.Array:
        """``beta F alpha + (1 - beta) X alpha`` over the stored pairs; ``f(z0)`` at ``k = 1``."""
        m = self.m
        # The chapter's second iterate is plain f(z0), whatever beta is: alpha = e_0 and no
        # X term at k = 1 (cheaper than selecting between two [B, D] iterates).
        alpha = jnp.where(k == 1, jnp.eye(1, m, dtype=history.gram.dtype),
                          mixing_weights(history.gram, jnp.minimum(k, m), self.lam, self.ridge == "relative"))
        # beta F alpha + (1 - beta) X alpha, with X = F - G.
        mixed = history_einsum("bi,bid->bd", alpha, history.fx)
        if self.beta != 1.0:
            mixed -= jnp.where(k == 1, 0, 1 - self.beta) * history_einsum("bi,bid->bd", alpha, history.residual)
        return mixed

    def record(self, history: AndersonHistory, k, x, fx, active) -> AndersonHistory:
        """Writes ``(f(x), f(x) - x)`` over slot ``k % m`` and updates the Gram matrix's row and column."""
        slot = k % self.m
        new = fx - x
        residual = history.residual.at[:, slot].set(select_rows(active, new, lambda: history.residual[:, slot]))
        # The new residual against every stored one (itself included): row and column `slot`.
        row = jnp.where(active[:, None], history_einsum("bd,bjd->bj", new, residual), history.gram[:, slot])
        return AndersonHistory(
            fx=history.fx.at[:, slot].set(select_rows(active, fx, lambda: history.fx[:, slot])),
            residual=residual,
            gram=history.gram.at[:, slot, :].set(row).at[:, :, slot].set(row),
        )
