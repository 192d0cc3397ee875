"""The DEQ layer: a cell's fixed point with implicit gradients."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .._fixed_point import fixed_point
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
    implicit gradient and nothing traced is closed over.

    Args:
      cell: an NNX module called as ``cell(z, x)``, returning an array shaped like ``z``.
      solver: forward solver (the chapter's settings by default: Anderson, m=5,
        tol=1e-2, max_iter=25).
      backward_solver: solver of the backward linear system; ``solver`` if None.

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

    def __init__(self, cell: nnx.Module, *, solver=Anderson(tol=1e-2, max_iter=25, m=5), backward_solver=None):
        self.cell = cell
        self.solver = solver
        self.backward_solver = backward_solver
        self.forward_stats = ForwardStats(jnp.zeros(NUM_STATS, jnp.float32))
        self.backward_stats = BackwardStatsProbe(jnp.zeros(NUM_STATS, jnp.float32))

    def __call__(self, x: jax.Array, z0: jax.Array | None = None) -> jax.Array:
        """Solves for the equilibrium of ``cell(., x)``.

        Args:
          x: the injection, e.g. NHWC; also fixes the shape of ``z``.
          z0: initial estimate, zeros if None.

        Returns:
          The fixed point estimate, shaped like ``x`` (or ``z0``).
        """
        z0 = jnp.zeros_like(x) if z0 is None else z0
        graphdef, cell_state = nnx.split(self.cell)

        def f(z, args):
            state, injection = args
            return nnx.merge(graphdef, state)(z, injection)

        solution = fixed_point(
            f, z0, (cell_state, x), solver=self.solver, backward_solver=self.backward_solver,
            backward_stats_probe=self.backward_stats[...],
        )
        self.forward_stats[...] = solution.stats().to_array()
        return solution.value
