"""Broyden's method (limited-memory "good" Broyden), solved independently for every example."""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .._checks import check_int
from ._loop import Solver, check_solver_options, history_einsum

# The default memory (see Broyden's docstring for the measurements behind both numbers):
# as many updates as fit in this many bytes of buffers per example, but at least
# MIN_DEFAULT_MEMORY (and at most max_iter - 2).
DEFAULT_BUFFER_BYTES = 2 ** 20
MIN_DEFAULT_MEMORY = 6


class BroydenHistory(NamedTuple):
    """The next iterate, the step that leads to it and the rank-one updates of ``H``.

    ``H = -I + sum_j u_j v_j^T`` approximates the inverse Jacobian of ``g(z) = f(z) - z``;
    ``u`` and ``v`` are ring buffers of ``[B, memory, D]`` (zero where never written, so
    an unwritten slot adds nothing to ``H``). ``step`` is ``-H g`` at the last recorded
    iterate ``x``, ``x_next = x + step`` (the next proposal costs nothing, and ``step`` is
    the next update's ``dx``) and ``c[:, j] = v_j^T g`` ([B, memory]) for that ``g``: what the
    next update needs of the old residual, so that the residual itself is not kept.
    """

    x_next: jax.Array
    step: jax.Array
    u: jax.Array
    v: jax.Array
    c: jax.Array


@jax.custom_jvp
def _row_sums(*terms: jax.Array) -> tuple[jax.Array, ...]:
    """Per-row sums of several ``[B, D]`` terms in one pass (a variadic reduce), accumulated in >= float32.

    Differentiable (``deq_jax.Backprop`` goes through Broyden's updates): JAX has no
    derivative for a variadic reduce, so the rule sums each tangent on its own.
    """
    dtype = jnp.promote_types(terms[0].dtype, jnp.float32)
    zero = jnp.zeros((), dtype)
    return lax.reduce(tuple(t.astype(dtype) for t in terms), (zero,) * len(terms),
                      lambda x, y: tuple(a + b for a, b in zip(x, y)), (1,))


@_row_sums.defjvp
def _row_sums_jvp(terms, tangents):
    dtype = jnp.promote_types(terms[0].dtype, jnp.float32)
    return _row_sums(*terms), tuple(jnp.sum(t.astype(dtype), axis=1) for t in tangents)


def broyden_update(history: BroydenHistory, k, x, g, active: jax.Array) -> BroydenHistory:
    """Records the iterate ``x`` (the ``k``-th f evaluation) with residual ``g = f(x) - x``.

    The update replaces slot ``o = (k - 1) % memory``: its pair is dropped first (a zero
    pair until the ring is full), ``H' = H - u_o v_o^T``, and the good Broyden update of
    ``H'`` is written there: ``v^T = dx^T H'``, ``u = (dx - H' dg) / (v^T dg)``, so the new
    ``H = H' + u v^T`` satisfies the secant condition ``H dg = dx`` (``dx = x - x_prev``,
    taken as the stored step that made ``x``; ``dg = g - g_prev``). The next step is ``-H g``.

    Every step is a full one, ``dx = -H g_prev``, so (exactly, in exact arithmetic):

      - ``H' g_prev = -dx - c_o u_o`` with ``c_o = v_o^T g_prev``, hence
        ``dx - H' dg = -(H' g + c_o u_o)``: no product with ``dg``;
      - ``v^T g_prev = dx^T H' g_prev = -dx^T dx - c_o (u_o^T dx)``, hence
        ``v^T dg = v^T g + dx^T dx + c_o a_o``: ``g_prev`` itself is never needed;
      - ``-H_new g = -H' g - (v^T g) u``: no third product.

    An update thus costs two products with the history, ``dx^T H'`` and ``H' g``, each
    one batched matrix-vector product for the coefficients (``a = U dx``, ``b = V g``) and
    one for the combination, over the ``[B, memory, D]`` buffers (four reads of them);
    the combinations also take out ``u_o`` and ``v_o`` (a one-hot coefficient). The slot
    replaced is read nowhere else: a read of it outside its in-place write would make
    XLA:CPU copy both buffers at every step.

    An example whose denominator ``v^T dg`` is zero or not finite, or whose ``u`` would not
    be finite, keeps ``H`` unchanged for this step (its slot keeps ``u_o, v_o``; the next
    update goes to the next slot all the same).

    Args:
      history: the state before this iterate.
      k: f evaluations before this one (a traced int).
      x, g: [B, D]; ``x`` must be the iterate ``history`` proposed (``history.x_next``).
      active: bool[B], examples that record this iterate.

    Returns:
      The new history; rows outside ``active`` are unchanged.
    """
    memory = history.u.shape[1]
    slot = jnp.maximum(k - 1, 0) % memory
    u_buf, v_buf, dx, c = history.u, history.v, history.step, history.c
    replaced = jnp.arange(memory) == slot
    # The coefficients: dx against every u_j, g against every v_j.
    a = history_einsum("bmd,bd->bm", u_buf, dx)
    b = history_einsum("bmd,bd->bm", v_buf, g)
    a_o, b_o, c_o = (jnp.sum(jnp.where(replaced, t, 0), axis=1, keepdims=True) for t in (a, b, c))
    # The combinations: v^T = -dx + sum_{j != o} a_j v_j, H' g = -g + sum_{j != o} b_j u_j, and v_o, u_o.
    onehot = jnp.broadcast_to(replaced, a.shape).astype(a.dtype)
    sums_v = history_einsum("bkm,bmd->bkd", jnp.stack([jnp.where(replaced, 0, a), onehot], axis=1), v_buf)
    sums_u = history_einsum("bkm,bmd->bkd", jnp.stack([jnp.where(replaced, 0, b), onehot], axis=1), u_buf)
    vt, v_o = sums_v[:, 0] - dx, sums_v[:, 1]
    h_g, u_o = sums_u[:, 0] - g, sums_u[:, 1]
    minus_u_numerator = h_g + c_o * u_o  # H' dg - dx
    r, dx_sq, size = (s[:, None] for s in _row_sums(vt * g, dx * dx, jnp.abs(minus_u_numerator)))
    denominator = r + dx_sq + c_o * a_o  # v^T dg, in >= float32
    # u is finite iff every |u_i| is, which sum_i |u_i| bounds.
    bound = (size / jnp.abs(denominator)).astype(g.dtype)
    r, denominator = r.astype(g.dtype), denominator.astype(g.dtype)
    ok = active[:, None] & (denominator != 0) & jnp.isfinite(denominator) & jnp.isfinite(bound)
    # 1 where unused: u's derivative stays finite there (deq_jax.Backprop differentiates this update).
    u = -minus_u_numerator / jnp.where(ok, denominator, 1)
    # -H_new g = -H' g - (v^T g) u; without an update, -H g = -H' g - (v_o^T g) u_o.
    new_step = -h_g - jnp.where(ok, r, b_o) * jnp.where(ok, u, u_o)
    running = active[:, None]
    return BroydenHistory(
        # x is history.x_next: a stopped example keeps its row.
        x_next=x + jnp.where(running, new_step, 0),
        step=jnp.where(running, new_step, dx),
        u=u_buf.at[:, slot].set(jnp.where(ok, u, u_o)),
        v=v_buf.at[:, slot].set(jnp.where(ok, vt, v_o)),
        c=jnp.where(running, jnp.where(replaced & ok, r, b), c),  # v_j^T g, for the next update
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
    other solvers. Cost per step beyond f: four batched matrix-vector products over the
    two ``[B, memory, D]`` buffers and a few passes over ``[B, D]`` arrays
    (``broyden_update``), no copy of the buffers. Its cost against Anderson's at equal
    work is Q9 of the docs' measurements page.

    Args:
      tol: relative residual ``||f(z)-z|| / (||f(z)|| + 1e-5)`` at which an example stops.
      max_iter: most f evaluations per example (the one at ``z0`` counts).
      memory: rank-one updates kept, a ring buffer. The update made at the ``k``-th f
        evaluation replaces slot ``(k - 1) % memory``: once the ring is full, the oldest
        pair is dropped first and the new one is the Broyden update of what is left, so
        ``H`` always satisfies the latest secant condition ``H dg = dz``. (torchdeq computes
        the new pair with the oldest still in; dropping it first needed fewer steps on the
        tests' small problems at tight tolerances.) A skipped update leaves the slot's pair
        in place; the next update goes to the next slot all the same.
        None (the default): as many as fit the two buffers in 1 MiB per example, at least
        6, at most ``max_iter - 2`` (every update a solve can use): 6 on the CIFAR cell
        (2 x 6 x 192 KiB per example) and every update on small states. Six is the
        smallest memory whose steps to converge stayed close to those with every update
        kept (``python -m experiments.benchmarks.broyden_cost --memory-sweep``; the
        numbers are in Q9 of the docs' measurements page).

    Examples:
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

    def memory_for(self, features: int, dtype) -> int:
        """Rank-one updates kept for states of ``features`` scalars per example in ``dtype``.

        ``memory`` if given; else as many as fit two ``[memory, features]`` buffers in
        1 MiB per example, at least 6 and at most ``max_iter - 2`` (updates made at the last
        two f evaluations are never used by a proposal). It depends on the example's size,
        never on the batch's, so an example solved alone or in a batch keeps as many.

        Examples:
          >>> import jax.numpy as jnp, deq_jax as dj
          >>> dj.Broyden(max_iter=25).memory_for(32 * 32 * 48, jnp.float32)  # the CIFAR cell
          6
          >>> dj.Broyden(max_iter=25).memory_for(100, jnp.float32)
          23
        """
        if self.memory is not None:
            return self.memory
        fits = DEFAULT_BUFFER_BYTES // (2 * features * jnp.dtype(dtype).itemsize)
        return max(1, min(self.max_iter - 2, max(MIN_DEFAULT_MEMORY, fits)))

    def init(self, batch, features, dtype) -> BroydenHistory:
        """Zero vectors and ``[B, memory, D]`` zero buffers (see ``deq_jax.Solver``)."""
        vectors = jnp.zeros((batch, features), dtype)
        memory = self.memory_for(features, dtype)
        buffer = jnp.zeros((batch, memory, features), dtype)
        return BroydenHistory(vectors, vectors, buffer, buffer, jnp.zeros((batch, memory), dtype))

    def propose(self, history: BroydenHistory, k) -> jax.Array:
        """``x - H g``, computed when ``x`` was recorded."""
        return history.x_next

    def record(self, history: BroydenHistory, k, x, fx, active) -> BroydenHistory:
        """The rank-one update for ``(x, f(x))``, see ``broyden_update``.

        At ``k = 0`` the zero history gives ``dx = 0``, a zero denominator and so no
        update: only ``step = -H g = g`` (``H = -I``) is recorded.
        """
        return broyden_update(history, jnp.asarray(k), x, fx - x, active)
