"""Fixed-point correction: supervising several states along the solve, as torchdeq's sliced DEQ core does."""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from ._checks import check_int, check_number
from ._fixed_point import fixed_point
from ._implicit import Implicit
from ._solution import Solution, SolveStats
from ._solvers import Anderson


def segment_budgets(max_iter: int, num_states: int) -> list[int]:
    """``max_iter`` f evaluations split into ``num_states`` near-equal segments, the longer ones first."""
    check_int("fixed_point_states", num_states=num_states)
    if num_states > max_iter:
        raise ValueError(f"fixed_point_states: num_states ({num_states}) must be at most the solver's "
                         f"max_iter ({max_iter}): each state needs at least one f evaluation.")
    size, extra = divmod(max_iter, num_states)
    return [size + (i < extra) for i in range(num_states)]


def fixed_point_states(
    f: Callable,
    z0,
    args,
    num_states: int,
    *,
    solver=Anderson(),
    gradient=Implicit(),
    backward_stats_probe: jax.Array | None = None,
    examples: str = "independent",
) -> tuple[Solution, ...]:
    """``num_states`` states along the solve of ``z = f(z, args)``, each with its own gradient.

    torchdeq's sliced core (``n_states``), the states of fixed-point correction (Bai et
    al. 2022, DEQ-Flow): the solver's ``max_iter`` f evaluations are split into
    ``num_states`` segments (``segment_budgets``); segment ``k`` is one call of
    ``deq_jax.fixed_point`` from the previous state's value (its gradient stopped),
    capped at its share, and its result is state ``k`` -- an estimate of ``z*`` that
    ``gradient`` differentiates as if it were the fixed point (the implicit function
    theorem at that state, or phantom steps from it). The last state is the solve's
    answer. Each segment starts the solver afresh (an Anderson or Broyden history does
    not carry over) from the previous state's ``value`` -- with ``deq_jax.Phantom``
    the last phantom step, where torchdeq continues from the solver's own estimate --
    and an example that has converged spends one f evaluation per later segment. Supervise the states with ``fp_correction``.

    Cost: the forward f evaluations of one solve (plus one per extra segment for
    converged examples); with ``deq_jax.Implicit``, one backward solve per state.
    ``backward_stats_probe``'s gradient combines their statistics (see
    ``combine_backward_stats``): steps add up, residuals and fractions are over all
    the states' solves.

    Args:
      f, z0, args, solver, gradient, backward_stats_probe, examples: as ``deq_jax.fixed_point``.
      num_states: states to return, an int in ``[1, solver.max_iter]``.

    Returns:
      A tuple of ``num_states`` ``deq_jax.Solution``, earliest first; each ``value``
      is differentiable w.r.t. ``args``.

    Examples:
      >>> import jax.numpy as jnp, deq_jax as dj
      >>> f = lambda z, a: jnp.tanh(a * z + 1.0)
      >>> states = dj.fixed_point_states(f, jnp.zeros((2, 3)), 0.5, 3, solver=dj.Anderson(max_iter=12))
      >>> [int(s.num_steps.max()) <= 4 for s in states]
      [True, True, True]
    """
    budgets = segment_budgets(solver.max_iter, num_states)
    probes = [None] * num_states if backward_stats_probe is None else _probe_per_state(backward_stats_probe, num_states)
    states, z = [], z0
    for budget, probe in zip(budgets, probes):
        state = fixed_point(f, jax.lax.stop_gradient(z), args, solver=solver, gradient=gradient,
                            backward_stats_probe=probe, budget=budget, examples=examples)
        states.append(state)
        z = state.value
    return tuple(states)


def combine_backward_stats(stats: Sequence[jax.Array]) -> jax.Array:
    """One ``SolveStats`` vector for the backward solves of several states of one solve.

    ``mean_steps`` and ``max_steps`` add up (VJPs per example over all the solves, and
    how many times the batched VJP ran); ``mean_residual``, ``converged_fraction`` and
    ``diverged_fraction`` are means, ``max_residual`` the maximum, over the states whose
    backward solve ran (a state the loss does not use has none: its vector is zero).

    Args:
      stats: each state's ``SolveStats.to_array()`` vector.

    Returns:
      The combined vector.
    """
    rows = SolveStats.from_array(jnp.stack(stats).T)
    ran = rows.mean_steps > 0
    count = jnp.maximum(jnp.sum(ran), 1).astype(rows.mean_steps.dtype)
    mean = lambda v: jnp.sum(jnp.where(ran, v, 0)) / count
    return SolveStats(
        mean_steps=jnp.sum(rows.mean_steps), max_steps=jnp.sum(rows.max_steps),
        mean_residual=mean(rows.mean_residual), max_residual=jnp.max(jnp.where(ran, rows.max_residual, 0)),
        converged_fraction=mean(rows.converged_fraction), diverged_fraction=mean(rows.diverged_fraction),
    ).to_array().astype(stats[0].dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _probe_per_state(probe: jax.Array, num_states: int) -> tuple[jax.Array, ...]:
    """``num_states`` copies of the probe whose gradients combine (``combine_backward_stats``) instead of adding."""
    return (probe,) * num_states


def _probe_per_state_fwd(probe, num_states):
    return _probe_per_state(probe, num_states), None


def _probe_per_state_bwd(num_states, _, cotangents):
    return (combine_backward_stats(cotangents),)


_probe_per_state.defvjp(_probe_per_state_fwd, _probe_per_state_bwd)


def fp_correction(losses: Sequence, gamma: float = 0.8):
    """torchdeq's fixed-point correction loss: ``sum_k gamma^(N-1-k) * losses[k]`` over ``N`` states.

    The last state (the solve's answer) has weight 1, earlier ones geometrically less
    (torchdeq's default ``'exp'`` weights).

    Args:
      losses: the loss of each state of ``fixed_point_states``, earliest first.
      gamma: the decay, in (0, 1].

    Returns:
      The weighted sum.

    Examples:
      >>> float(fp_correction([1.0, 1.0, 1.0], gamma=0.5))
      1.75
    """
    check_number("fp_correction", "gamma", gamma, high=1.0, high_open=False)
    if len(losses) == 0:
        raise ValueError("fp_correction: losses is empty; pass one loss per state.")
    n = len(losses)
    return sum(gamma ** (n - 1 - k) * loss for k, loss in enumerate(losses))
