"""Broyden's method (limited-memory "good" Broyden), solved independently for every example."""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .._checks import check_int
from ._loop import Solver, check_solver_options, select_rows


class BroydenHistory(NamedTuple):
    """The last iterate, its residual, the next step and the rank-one updates of ``H``.

    ``H = -I + sum_j u_j v_j^T`` approximates the inverse Jacobian of ``g(z) = f(z) - z``;
    ``u`` and ``v`` are ring buffers of ``[memory, B, D]`` (slot-major, so a slot is one
    contiguous block; zero where never written, so an unwritten slot adds nothing to
    ``H``). ``step`` is ``-H g`` for the current ``H`` and ``g``, computed while
    recording, so the next iterate costs one addition.
    """

    x: jax.Array
    g: jax.Array
    step: jax.Array
    u: jax.Array
    v: jax.Array


def _products(u, v, used, dx, dg, g, slot):
    """``dx^T H + dx``, ``H dg + dg`` and ``-(H - u_slot v_slot^T) g - g`` for ``H = -I + sum_j u_j v_j^T``.

    A loop over the ``used`` slots written so far, one ``[B, D]`` slot of ``u`` and ``v``
    at a time: the cost grows with the updates made, not with ``memory``, and each
    slot is a contiguous block (XLA:CPU reads a strided or transposed ``[B, memory, D]``
    buffer many times slower).
    """

    def accumulate(j, sums):
        uj, vj = u[j], v[j]
        dots = jnp.stack([jnp.sum(uj * dx, axis=1), jnp.sum(vj * dg, axis=1),
                          jnp.where(j == slot, 0, jnp.sum(vj * g, axis=1))])[:, :, None]  # the replaced slot left out
        return sums[0] + dots[0] * vj, sums[1] + dots[1] * uj, sums[2] - dots[2] * uj

    zeros = jnp.zeros_like(dx)
    return jax.lax.fori_loop(0, used, accumulate, (zeros, zeros, zeros))


def broyden_update(history: BroydenHistory, k, x, g, active: jax.Array) -> BroydenHistory:
    """Records the iterate ``x`` (the ``k``-th f evaluation) with residual ``g = f(x) - x``.

    With ``dx = x - x_prev`` and ``dg = g - g_prev``: ``v^T = dx^T H``,
    ``u = (dx - H dg) / (v^T dg)``, written over slot ``(k - 1) % memory``; the new step
    is ``-H g`` with the new ``H``. Both products with the old ``H`` use every kept
    update, the one in that slot included (it is overwritten only afterwards), as
    torchdeq does. Examples whose denominator is zero or whose ``u, v`` are not finite
    keep ``H`` unchanged; at ``k = 0`` there is no ``dx`` and only ``x, g`` and
    ``step = g`` are recorded.

    The products read only the slots written so far: a solve that stops after a few
    steps never touches the rest of the buffers.

    Args:
      history: the state before this iterate.
      k: f evaluations before this one (a traced int).
      x, g: [B, D].
      active: bool[B], examples that record this iterate.

    Returns:
      The new history; rows outside ``active`` are unchanged.
    """
    slots = history.u.shape[0]
    slot = jnp.maximum(k - 1, 0) % slots
    dx, dg = x - history.x, g - history.g
    used = jnp.minimum(jnp.maximum(k - 1, 0), slots)  # slots written before this update
    vt, h_dg, minus_h_g = _products(history.u, history.v, used, dx, dg, g, slot)
    vt, h_dg = vt - dx, h_dg - dg
    denominator = jnp.sum(vt * dg, axis=1, keepdims=True)
    u = (dx - h_dg) / denominator
    ok = active & (k > 0) & (denominator[:, 0] != 0) & jnp.all(jnp.isfinite(u), axis=1) & jnp.all(jnp.isfinite(vt), axis=1)
    # Not select_rows: a conditional that reads the buffers would copy them whole.
    u = jnp.where(ok[:, None], u, history.u[slot])
    vt = jnp.where(ok[:, None], vt, history.v[slot])
    # -H_new g = g - sum_{j != slot} (v_j^T g) u_j - (v_new^T g) u_new.
    step = g + minus_h_g - jnp.sum(vt * g, axis=1, keepdims=True) * u
    return BroydenHistory(
        x=select_rows(active, x, lambda: history.x),
        g=select_rows(active, g, lambda: history.g),
        step=select_rows(active, step, lambda: history.step),
        u=history.u.at[slot].set(u),
        v=history.v.at[slot].set(vt),
    )


@dataclasses.dataclass(frozen=True)
class Broyden(Solver):
    """Broyden's method on ``g(z) = f(z) - z``, per example (the DEQ papers' and torchdeq's solver).

    The inverse Jacobian of ``g`` is approximated by ``H = -I + U V^T``, a sum of
    rank-one "good Broyden" updates in Sherman-Morrison form, starting from ``-I``
    (so the second iterate is ``f(z0)``). Each step is ``z <- z - H g(z)`` with no line
    search; after it, ``v^T = dz^T H``, ``u = (dz - H dg) / (v^T dg)`` and ``H <- H + u v^T``.
    Each example has its own ``H``, residual and stop, and is frozen once it stops;
    an example whose update has a zero or non-finite denominator keeps its old ``H``
    for that step, and NaN/Inf in one example never reaches the others. Solving an
    example alone or in a batch gives the same iterates.

    ``value`` is ``f(z)`` at each example's lowest-residual iterate ``z``, as for the
    other solvers. Memory: two ``[memory, B, D]`` buffers; each step reads the slots written
    so far once.

    Args:
      tol: relative residual ``||f(z)-z|| / (||f(z)|| + 1e-5)`` at which an example stops.
      max_iter: most f evaluations per example (the one at ``z0`` counts).
      memory: rank-one updates kept (a ring buffer: each new ``u, v`` is computed with
        every kept update, then overwrites the oldest); None keeps all of them, i.e.
        ``max_iter - 2``, the most a solve can make use of.

    Example:
      >>> import jax.numpy as jnp, deq_jax as dj
      >>> sol = dj.Broyden(tol=1e-6)(lambda z: jnp.cos(z), jnp.zeros((2, 3)))
      >>> bool(sol.converged.all()), round(float(sol.value[0, 0]), 4)
      (True, 0.7391)
    """

    tol: float = 1e-2
    max_iter: int = 50
    memory: int | None = None

    def __post_init__(self):
        check_solver_options(self)
        if self.memory is not None:
            check_int("Broyden", memory=self.memory)

    @property
    def slots(self) -> int:
        """Rank-one updates kept: ``memory``, or ``max_iter - 2`` (updates made at the last two
        f evaluations are never used by a proposal)."""
        return max(1, self.max_iter - 2) if self.memory is None else self.memory

    def init(self, batch, features, dtype) -> BroydenHistory:
        """Zero vectors and ``[memory, B, D]`` zero buffers (see :class:`deq_jax.Solver`)."""
        vectors = jnp.zeros((batch, features), dtype)
        buffer = jnp.zeros((self.slots, batch, features), dtype)
        return BroydenHistory(vectors, vectors, vectors, buffer, buffer)

    def propose(self, history: BroydenHistory, k) -> jax.Array:
        """``x - H g``, the step computed when ``x`` was recorded."""
        return history.x + history.step

    def record(self, history: BroydenHistory, k, x, fx, active) -> BroydenHistory:
        """The rank-one update for ``(x, f(x))``, see :func:`broyden_update`."""
        return broyden_update(history, jnp.asarray(k), x, fx - x, active)
