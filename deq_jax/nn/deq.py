"""The DEQ layer: a cell's fixed point with implicit gradients."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .._fixed_point import fixed_point
from .._gradients import Implicit
from .._jacobian import jacobian_penalty, spectral_radius
from .._solution import NUM_STATS
from .._solvers import Anderson


class ForwardStats(nnx.Variable):
    """The last forward solve's ``SolveStats`` as a vector (see ``SolveStats.from_array``)."""


class BackwardStatsProbe(nnx.Variable):
    """Zeros whose *gradient* is the backward solve's ``SolveStats`` vector.

    Differentiate w.r.t. it beside the parameters to read the backward statistics
    inside a jitted step: ``nnx.DiffState(0, nnx.Any(nnx.Param, BackwardStatsProbe))``.
    """


class DEQ(nnx.Module):
    """Deep equilibrium layer: returns ``z* = cell(z*, x)``.

    The cell's whole state is split off and passed to :func:`deq_jax.fixed_point` as an
    explicit argument (with the injection ``x``), so every parameter receives its
    gradient and nothing traced is closed over. The training aids
    :meth:`jacobian_penalty` and :meth:`spectral_radius` apply to the same cell
    without rebuilding ``f``.

    Mixed precision: the solver state ``z`` -- iterates, solver history, residuals --
    and the backward solve stay in ``z0``'s dtype, float32 by default, whatever the
    cell computes in. The layer casts the cell's output to ``z``'s dtype, so a cell
    built with ``dtype=jnp.bfloat16`` runs its convolutions in bfloat16 on every
    solver step while the solver (and the backward linear solve, whose VJPs run
    through the same casts) accumulates in float32. Rounding ``f(z)`` to bfloat16 at
    every step limits the residual a solve can reach, but far below the usual
    ``tol=1e-2``: Anderson took a 16/32-channel CIFAR-10 DEQ's bfloat16 cell to 1e-4.

    Args:
      cell: an NNX module called as ``cell(z, x)``, returning an array shaped like ``z``.
      solver: forward solver (the chapter's settings by default: Anderson, m=5,
        tol=1e-2, max_iter=25).
      gradient: :class:`deq_jax.Implicit` (default; its ``solver`` solves the backward
        system, the forward one if None) or :class:`deq_jax.Phantom`.

    Attributes:
      forward_stats: :class:`ForwardStats`, updated on every call.
      backward_stats: :class:`BackwardStatsProbe`, whose gradient holds the backward
        solve's statistics.

    Example:
      >>> import jax.numpy as jnp, deq_jax as dj
      >>> from flax import nnx
      >>> deq = dj.nn.DEQ(dj.nn.ResNetCell(8, 16, num_groups=4, rngs=nnx.Rngs(0)))
      >>> z = deq(jnp.ones((2, 6, 6, 8)))
      >>> z.shape, dj.SolveStats.from_array(deq.forward_stats[...]).mean_steps > 0
      ((2, 6, 6, 8), Array(True, dtype=bool))
    """

    def __init__(self, cell: nnx.Module, *, solver=Anderson(tol=1e-2, max_iter=25, m=5), gradient=Implicit()):
        self.cell = cell
        self.solver = solver
        self.gradient = gradient
        self.forward_stats = ForwardStats(jnp.zeros(NUM_STATS, jnp.float32))
        self.backward_stats = BackwardStatsProbe(jnp.zeros(NUM_STATS, jnp.float32))

    def __call__(self, x: jax.Array, z0: jax.Array | None = None) -> jax.Array:
        """Solves for the equilibrium of ``cell(., x)``.

        Args:
          x: the injection, e.g. NHWC; also fixes the shape of ``z``. It reaches the
            cell in its own dtype (bfloat16 from a bfloat16 stem, say).
          z0: initial estimate and the dtype of the solver state; if None, zeros in
            ``x``'s dtype promoted to at least float32 (float32 for a bfloat16 ``x``).

        Returns:
          The fixed point estimate, shaped like ``x`` (or ``z0``), in ``z0``'s dtype.
        """
        if z0 is None:
            z0 = jnp.zeros(x.shape, jnp.promote_types(x.dtype, jnp.float32))
        f, cell_state = self._explicit_cell()
        solution = fixed_point(
            f, z0, (cell_state, x), solver=self.solver, gradient=self.gradient,
            backward_stats_probe=self.backward_stats[...],
        )
        self.forward_stats[...] = solution.stats().to_array()
        return solution.value

    def jacobian_penalty(self, x: jax.Array, z: jax.Array, key: jax.Array, num_vectors: int = 1) -> jax.Array:
        """:func:`deq_jax.jacobian_penalty` of ``cell(., x)`` at ``z``: ``||J||_F^2 / D`` per example.

        Differentiable w.r.t. the cell's parameters and ``x`` (and ``z``). For Bai et
        al.'s Jacobian regularisation, evaluate it at the fixed point without a gradient
        through the solve, ``jax.lax.stop_gradient(z)``, and add ``weight * mean`` to the loss.

        Args:
          x: the injection the fixed point was solved for.
          z: the point, usually the fixed point ``self(x)``.
          key: a JAX PRNG key for the random vectors.
          num_vectors: Hutchinson vectors (VJPs) per example.

        Returns:
          float [B].

        Example:
          >>> import jax, jax.numpy as jnp, deq_jax as dj
          >>> from flax import nnx
          >>> deq = dj.nn.DEQ(dj.nn.ResNetCell(8, 16, num_groups=4, rngs=nnx.Rngs(0)))
          >>> x = jnp.ones((2, 6, 6, 8))
          >>> def loss(deq):
          ...     z = deq(x)
          ...     return jnp.mean(z ** 2) + 0.1 * deq.jacobian_penalty(x, jax.lax.stop_gradient(z), jax.random.key(0)).mean()
          >>> grads = nnx.grad(loss)(deq)
        """
        f, cell_state = self._explicit_cell()
        return jacobian_penalty(f, z, (cell_state, x), key, num_vectors)

    def spectral_radius(self, x: jax.Array, z: jax.Array, key: jax.Array, num_iters: int = 100) -> jax.Array:
        """:func:`deq_jax.spectral_radius` of ``cell(., x)``'s Jacobian at ``z``, per example.

        Args:
          x: the injection.
          z: the point, usually the fixed point ``self(x)``.
          key: a JAX PRNG key for the starting vector.
          num_iters: power iterations (VJPs).

        Returns:
          float [B], not differentiated.

        Example:
          >>> import jax, jax.numpy as jnp, deq_jax as dj
          >>> from flax import nnx
          >>> deq = dj.nn.DEQ(dj.nn.ResNetCell(8, 16, num_groups=4, rngs=nnx.Rngs(0)))
          >>> x = jnp.ones((2, 6, 6, 8))
          >>> deq.spectral_radius(x, deq(x), jax.random.key(0), num_iters=20).shape
          (2,)
        """
        f, cell_state = self._explicit_cell()
        return spectral_radius(f, z, (cell_state, x), key, num_iters)

    def _explicit_cell(self):
        """``(f, cell_state)``: the cell as a pure function, ``f(z, (cell_state, x)) = self.cell(z, x)``.

        ``f``'s output is cast to ``z``'s dtype. The cast is what keeps the solvers' state in ``z``'s dtype when the cell
        computes in a narrower one; its transpose keeps the backward solve there too.
        """
        graphdef, cell_state = nnx.split(self.cell)

        def f(z, args):
            state, injection = args
            return nnx.merge(graphdef, state)(z, injection).astype(z.dtype)

        return f, cell_state
