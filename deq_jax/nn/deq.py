"""The DEQ layer: a cell's fixed point with implicit gradients."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .._correction import fixed_point_states
from .._fixed_point import fixed_point
from .._checks import check_examples, check_int
from .._gradients import apply_steps
from .._implicit import Implicit
from .._jacobian import jacobian_penalty, spectral_radius
from .._solution import NUM_STATS, Solution, SolveStats
from .._solvers import Anderson
from .._tree import add_system_axis, as_one_example


class BackwardStatsProbe(nnx.Variable):
    """Zeros whose *gradient* is the backward solve's ``SolveStats`` vector.

    Users need not touch it: differentiate with ``WITH_BACKWARD_STATS`` and read the
    statistics with ``split_backward_stats``.
    """


WITH_BACKWARD_STATS = nnx.Any(nnx.Param, BackwardStatsProbe)
"""The filter to differentiate by to get the backward statistics: parameters and every DEQ's probe."""


def split_backward_stats(grads: nnx.State) -> tuple[nnx.State, dict[str, SolveStats]]:
    """Separates the backward solves' statistics from the parameter gradients.

    Args:
      grads: gradients taken w.r.t. ``WITH_BACKWARD_STATS`` (an ``nnx.State``).

    Returns:
      ``(param_grads, stats)``: the gradients without the probes (ready for an
      optimizer), and each DEQ layer's backward ``deq_jax.SolveStats`` keyed by
      the layer's path (``"deq"``, ``"encoder/deq"``; ``""`` for a DEQ differentiated
      itself). With ``deq_jax.Phantom``, which solves nothing backward, the
      statistics are zeros.

    Examples:
      >>> import jax.numpy as jnp, deq_jax as dj
      >>> from flax import nnx
      >>> deq = dj.nn.DEQ(dj.nn.ResNetCell(8, 16, num_groups=4, rngs=nnx.Rngs(0)))
      >>> x = jnp.ones((2, 6, 6, 8))
      >>> diff = nnx.DiffState(0, dj.nn.WITH_BACKWARD_STATS)
      >>> grads = nnx.grad(lambda deq: jnp.mean(deq(x) ** 2), argnums=diff)(deq)
      >>> grads, stats = dj.nn.split_backward_stats(grads)
      >>> bool(stats[""].mean_steps > 0)
      True
    """
    probes, params = nnx.split_state(grads, BackwardStatsProbe, ...)
    stats = {"/".join(map(str, path[:-1])): SolveStats.from_array(variable[...])
             for path, variable in nnx.to_flat_state(probes)}
    return params, stats


def explicit_cell(cell: nnx.Module, has_aux: bool = False):
    """A cell as a pure function of explicit arrays: ``(f, state)`` with ``f(z, (state, x)) = cell(z, x)``.

    The adapter at the solver boundary (``deq_jax.fixed_point`` needs every array
    ``f`` depends on as an argument): ``state`` is the cell's whole ``nnx.State``, its
    parameters and every other variable (RNG streams, statistics). Each call of ``f``
    starts from ``state`` as given and keeps no update, so whatever the cell draws
    from its RNG streams -- a dropout mask, say -- is the same at every solver
    iteration and in the backward solve.

    ``f``'s output is cast to ``z``'s dtype (leaf by leaf for a tuple state such as
    ``deq_jax.nn.MDEQCell``'s): the cast keeps a solver state in float32
    when the cell computes in bfloat16, and its transpose keeps the backward solve there.

    Args:
      cell: an NNX module called as ``cell(z, x)``.
      has_aux: the cell returns ``(z, aux)``; only ``z`` is cast.

    Returns:
      ``(f, state)``.

    Examples:
      >>> import jax, jax.numpy as jnp, deq_jax as dj
      >>> from flax import nnx
      >>> f, state = dj.nn.explicit_cell(dj.nn.ResNetCell(8, 16, num_groups=4, rngs=nnx.Rngs(0)))
      >>> x = jnp.ones((2, 6, 6, 8))
      >>> dj.fixed_point(f, jnp.zeros_like(x), (state, x)).value.shape
      (2, 6, 6, 8)
    """
    graphdef, state = nnx.split(cell)

    def f(z, args):
        state, x = args
        # copy=True: the state may hold Variables of an outer trace, which NNX would refuse to update here.
        out = nnx.merge(graphdef, state, copy=True)(z, x)
        if has_aux:
            return jax.tree.map(lambda o, zi: o.astype(zi.dtype), out[0], z), out[1]
        return jax.tree.map(lambda o, zi: o.astype(zi.dtype), out, z)

    return f, state


class DEQ(nnx.Module):
    """Deep equilibrium layer: returns ``z* = cell(z*, x)``.

    The cell is split into explicit arrays (``explicit_cell``) and passed to
    ``deq_jax.fixed_point`` with the injection ``x``, so every parameter receives its
    gradient and nothing traced is closed over. The training aids
    ``jacobian_penalty`` and ``spectral_radius`` apply to the same cell
    without rebuilding ``f``.

    Statistics leave by return values only: ``solve`` returns the forward
    ``deq_jax.Solution``; the backward solve's statistics arrive with the
    gradients (``split_backward_stats``).

    The cell's non-parameter state (RNG streams, counters, statistics): every solver
    iteration, the backward solve and the training aids see it as it was before the
    call -- a dropout mask drawn from the cell's rngs is the same throughout one
    solve, the variational dropout of the DEQ papers -- and after the solve it
    advances as one application of the cell at the fixed point would advance it (so
    the next call draws a new mask). Under ``jit`` that application costs nothing
    when only RNG counters change: its output is unused and XLA removes it.

    Mixed precision: the solver state ``z`` -- iterates, solver history, residuals --
    and the backward solve stay in ``z0``'s dtype, float32 by default, whatever the
    cell computes in. The layer casts the cell's output to ``z``'s dtype, so a cell
    built with ``dtype=jnp.bfloat16`` runs its convolutions in bfloat16 on every
    solver step while the solver (and the backward linear solve, whose VJPs run
    through the same casts) accumulates in float32. Rounding ``f(z)`` to bfloat16 at
    every step limits the residual a solve can reach, but far below the usual
    ``tol=1e-2``: Anderson took a 16/32-channel CIFAR-10 DEQ's bfloat16 cell to 1e-4.

    Args:
      cell: an NNX module called as ``cell(z, x)``, returning an array (or pytree)
        shaped like ``z``. ``z`` has ``x``'s shape unless the cell says otherwise with a
        method ``initial_state(x)`` returning the zero state (a tuple of per-resolution
        arrays for ``deq_jax.nn.MDEQCell``).
      solver: forward solver (the chapter's settings by default: Anderson, m=5,
        tol=1e-2, max_iter=25).
      gradient: ``deq_jax.Implicit`` (default; its ``solver`` solves the backward
        system, the forward one if None) or ``deq_jax.Phantom``.
      examples: ``"independent"`` (default) when the cell treats every example of the
        batch on its own -- convolutions, GroupNorm, LayerNorm; ``"coupled"`` when
        examples interact inside the cell -- ``nnx.BatchNorm`` in training mode,
        batch-wide statistics or attention across the batch: the batch is then solved
        as one system, which its gradients need (see ``deq_jax.fixed_point``).
      has_aux: the cell returns ``(z, aux)``: ``aux`` (any pytree of arrays) rides beside
        the state, and the layer returns ``(z*, aux at z*)``; ``solve`` puts it in the
        ``Solution``'s ``aux`` (see ``deq_jax.fixed_point``). The training aids and
        ``unrolled`` use the state alone.

    Attributes:
      backward_stats: ``BackwardStatsProbe``, whose gradient holds the backward
        solve's statistics.

    Examples:
      >>> import jax.numpy as jnp, deq_jax as dj
      >>> from flax import nnx
      >>> deq = dj.nn.DEQ(dj.nn.ResNetCell(8, 16, num_groups=4, rngs=nnx.Rngs(0)))
      >>> solution = deq.solve(jnp.ones((2, 6, 6, 8)))
      >>> solution.value.shape, bool(solution.stats().mean_steps > 0)
      ((2, 6, 6, 8), True)
    """

    def __init__(self, cell: nnx.Module, *, solver=Anderson(tol=1e-2, max_iter=25, m=5), gradient=Implicit(),
                 examples: str = "independent", has_aux: bool = False):
        check_examples("DEQ", examples)
        self.cell = cell
        self.has_aux = has_aux
        self.solver = solver
        self.gradient = gradient
        self.examples = examples
        self.backward_stats = BackwardStatsProbe(jnp.zeros(NUM_STATS, jnp.float32))

    def __call__(self, x: jax.Array, z0=None, budget=None):
        """The fixed point ``z*``: ``self.solve(x, z0, budget).value`` (and its ``aux``, with ``has_aux``)."""
        solution = self.solve(x, z0, budget)
        return (solution.value, solution.aux) if self.has_aux else solution.value

    def solve(self, x: jax.Array, z0=None, budget=None) -> Solution:
        """Solves for the equilibrium of ``cell(., x)``.

        Args:
          x: the injection, e.g. NHWC; also fixes the shape of ``z``. It reaches the
            cell in its own dtype (bfloat16 from a bfloat16 stem, say).
          z0: initial estimate (an array or the cell's pytree) and the dtype of the
            solver state; if None, the cell's ``initial_state(x)`` where it has one, else
            zeros shaped like ``x`` in its dtype promoted to at least float32 (float32
            for a bfloat16 ``x``).
          budget: optional cap on the forward solve's f evaluations per example, the
            test-time compute dial: an int or an integer array (``()`` or ``[B]``),
            possibly traced, so a jitted caller that takes it as an argument compiles
            once for every budget; clamped to the solver's ``max_iter``. See
            ``deq_jax.fixed_point``.

        Returns:
          The forward ``deq_jax.Solution``; its ``value``, shaped like ``z0`` in its
          dtype, is differentiable w.r.t. the cell and ``x``.
        """
        if z0 is None:
            z0 = self.initial_state(x)
        f, state = explicit_cell(self.cell, self.has_aux)
        solution = fixed_point(
            f, z0, (state, x), solver=self.solver, gradient=self.gradient,
            backward_stats_probe=self.backward_stats[...], budget=budget, examples=self.examples, has_aux=self.has_aux,
        )
        self._advance_state(solution.value, x)
        return solution

    def solve_states(self, x: jax.Array, num_states: int, z0=None) -> tuple[Solution, ...]:
        """``num_states`` states along the solve, each differentiable, for fixed-point correction.

        ``deq_jax.fixed_point_states`` on this layer's cell and settings: the
        solver's ``max_iter`` split into ``num_states`` segments, each state
        differentiated by the layer's gradient strategy as if it were the fixed point;
        the last is ``solve``'s answer (up to the restarts between segments). The
        cell's state advances once, at the last state. Weigh the states' losses with
        ``deq_jax.fp_correction``.

        Args:
          x: the injection.
          num_states: states, an int in ``[1, solver.max_iter]``.
          z0: as ``solve``.

        Returns:
          A tuple of ``deq_jax.Solution``, earliest first.

        Examples:
          >>> import jax.numpy as jnp, deq_jax as dj
          >>> from flax import nnx
          >>> deq = dj.nn.DEQ(dj.nn.ResNetCell(8, 16, num_groups=4, rngs=nnx.Rngs(0)))
          >>> x = jnp.ones((2, 6, 6, 8))
          >>> loss = lambda deq: dj.fp_correction([jnp.mean(s.value ** 2) for s in deq.solve_states(x, 2)], gamma=0.8)
          >>> grads = nnx.grad(loss)(deq)
        """
        f, state = self._state_map()
        states = fixed_point_states(
            f, self.initial_state(x) if z0 is None else z0, (state, x), num_states, solver=self.solver,
            gradient=self.gradient, backward_stats_probe=self.backward_stats[...], examples=self.examples,
        )
        self._advance_state(states[-1].value, x)
        return states

    def unrolled(self, x: jax.Array, depth: int, z0=None):
        """The weight-tied network of depth ``depth``: the cell applied ``depth`` times, no solve.

        The MDEQ recipe's warm-up (``PRETRAIN_STEPS`` training steps on ``NUM_LAYERS``
        applications from zeros before the switch to the equilibrium): the result is
        differentiated by plain backprop through every application. As in a solve, every
        application sees the cell's non-parameter state as it was before the call (one
        dropout mask for all of them), and the state then advances once.

        Args:
          x: the injection.
          depth: applications of the cell, an int >= 1.
          z0: the starting state; None: as ``solve``'s default.

        Returns:
          ``cell^depth(z0)``, shaped like ``z0`` in its dtype.

        Examples:
          >>> import jax.numpy as jnp, deq_jax as dj
          >>> from flax import nnx
          >>> deq = dj.nn.DEQ(dj.nn.ResNetCell(8, 16, num_groups=4, rngs=nnx.Rngs(0)))
          >>> deq.unrolled(jnp.ones((2, 6, 6, 8)), depth=3).shape
          (2, 6, 6, 8)
        """
        check_int("DEQ.unrolled", depth=depth)
        f, state = self._state_map()
        z0 = self.initial_state(x) if z0 is None else z0
        z = apply_steps(lambda _, z: f(z, (state, x)), z0, depth)
        self._advance_state(z, x)
        return z

    def _state_map(self):
        """``explicit_cell`` of the cell, its ``aux`` dropped: ``(f, state)`` with ``f(z, (state, x))`` the next state."""
        f, state = explicit_cell(self.cell, self.has_aux)
        return ((lambda z, args: f(z, args)[0]) if self.has_aux else f), state

    def initial_state(self, x: jax.Array):
        """The default ``z0``: the cell's ``initial_state(x)`` if it has one, else zeros like ``x`` (>= float32)."""
        if hasattr(self.cell, "initial_state"):
            return self.cell.initial_state(x)
        return jnp.zeros(x.shape, jnp.promote_types(x.dtype, jnp.float32))

    def _advance_state(self, z, x: jax.Array) -> None:
        """Updates the cell's non-parameter state as one application at ``z`` would (nothing if it has none)."""
        if not jax.tree.leaves(nnx.state(self.cell, nnx.Not(nnx.Param))):
            return
        self.cell(*jax.lax.stop_gradient((z, x)))

    def jacobian_penalty(self, x: jax.Array, z: jax.Array, key: jax.Array, num_vectors: int = 1, *,
                         cell_state: nnx.State | None = None) -> jax.Array:
        """``deq_jax.jacobian_penalty`` of ``cell(., x)`` at ``z``: ``||J||_F^2 / D`` per example.

        Differentiable w.r.t. the cell's parameters and ``x`` (and ``z``). For Bai et
        al.'s Jacobian regularisation, evaluate it at the fixed point without a gradient
        through the solve, ``jax.lax.stop_gradient(z)``, and add ``weight * mean`` to the loss.

        A solve (or ``unrolled``) advances the cell's non-parameter state, so a dropout
        mask drawn now is not the one that solve used. To penalise the ``f`` whose fixed
        point ``z`` is -- same mask, same statistics -- pass a copy of the cell's state taken
        before the solve: ``cell_state = nnx.clone(nnx.state(deq.cell))`` (``nnx.state`` alone
        refers to the cell's variables, which the solve then advances).

        Args:
          x: the injection the fixed point was solved for.
          z: the point, usually the fixed point ``self(x)``.
          key: a JAX PRNG key for the random vectors.
          num_vectors: Hutchinson vectors (VJPs) per example.
          cell_state: the cell's ``nnx.State`` to evaluate ``f`` with; None: its current state.

        Returns:
          float [B].

        Examples:
          >>> import jax, jax.numpy as jnp, deq_jax as dj
          >>> from flax import nnx
          >>> deq = dj.nn.DEQ(dj.nn.ResNetCell(8, 16, num_groups=4, rngs=nnx.Rngs(0)))
          >>> x = jnp.ones((2, 6, 6, 8))
          >>> def loss(deq):
          ...     solved_with = nnx.clone(nnx.state(deq.cell))
          ...     z = jax.lax.stop_gradient(deq(x))
          ...     return jnp.mean(z ** 2) + 0.1 * deq.jacobian_penalty(x, z, jax.random.key(0),
          ...                                                          cell_state=solved_with).mean()
          >>> grads = nnx.grad(loss)(deq)
        """
        f, state = self._state_map()
        return jacobian_penalty(f, z, (state if cell_state is None else cell_state, x), key, num_vectors)

    def spectral_radius(self, x: jax.Array, z: jax.Array, key: jax.Array, num_iters: int = 100) -> jax.Array:
        """``deq_jax.spectral_radius`` of ``cell(., x)``'s Jacobian at ``z``, per example.

        Args:
          x: the injection.
          z: the point, usually the fixed point ``self(x)``.
          key: a JAX PRNG key for the starting vector.
          num_iters: power iterations (VJPs).

        Returns:
          float [B], not differentiated; [1] (the whole batch's Jacobian) for a layer
          with ``examples="coupled"``.

        Examples:
          >>> import jax, jax.numpy as jnp, deq_jax as dj
          >>> from flax import nnx
          >>> deq = dj.nn.DEQ(dj.nn.ResNetCell(8, 16, num_groups=4, rngs=nnx.Rngs(0)))
          >>> x = jnp.ones((2, 6, 6, 8))
          >>> deq.spectral_radius(x, deq(x), jax.random.key(0), num_iters=20).shape
          (2,)
        """
        f, state = self._state_map()
        if self.examples == "coupled":
            return spectral_radius(as_one_example(f), add_system_axis(z), (state, x), key, num_iters)
        return spectral_radius(f, z, (state, x), key, num_iters)
