"""``ReversibleBackprop``: the exact gradient of a ``Reversible`` solve, its trajectory reconstructed backwards."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from ._gradients import Gradient, refuse_forward_mode, require_solver
from ._solvers._loop import iterate
from ._solvers.reversible import Reversible
from ._tree import batch_ravel


@dataclasses.dataclass(frozen=True)
class ReversibleBackprop(Gradient):
    """Backprop through a ``Reversible`` solve at constant memory (McCallum et al. 2025).

    The value is each example's newest iterate (the member of the pair its last f
    evaluation updated). Its gradient is the exact derivative of the finite solve --
    what ``Backprop`` would give for the same iterations -- but nothing is stored per
    step: the backward pass undoes the updates one by one from the last pair
    (``y_prev = (y - beta f(z)) / (1 - beta)``), each example its own number of them,
    and takes the VJP of each update at the point it reconstructs. Cost: one f
    evaluation and one VJP per forward f evaluation; memory: a few states, flat in
    ``max_iter``. ``z0`` receives its gradient too.

    The reconstruction is exact in exact arithmetic only: undoing an update multiplies
    a rounding error by ``1 / (1 - beta)`` or more, so the gradient's error grows
    geometrically with the number of f evaluations -- small for a dozen at
    ``beta = 1/2`` in float32, large for hundreds (the measurements page's Q15, and
    ``tests/test_strategies.py``). Needs a ``deq_jax.Reversible`` forward solver;
    reverse mode only (``jax.jvp`` raises a ``TypeError`` naming ``Implicit``).

    Examples:
      >>> import jax, jax.numpy as jnp, deq_jax as dj
      >>> f = lambda z, a: jnp.tanh(0.5 * z + a)
      >>> solve = lambda a: dj.fixed_point(f, jnp.zeros((1, 2)), a, solver=dj.Reversible(tol=1e-6),
      ...                                  gradient=dj.ReversibleBackprop()).value.sum()
      >>> round(float(jax.grad(solve)(0.3)), 3)  # the implicit gradient is 2.396
      2.395
    """

    def solve(self, f, z0, args, solver, budget, backward_stats_probe):
        """The ``Reversible`` solve, its newest iterate differentiated by reconstruction."""
        del backward_stats_probe  # nothing is solved backward
        require_solver("ReversibleBackprop reconstructs the forward solve's iterations", solver, Reversible)
        args = refuse_forward_mode(args, "ReversibleBackprop")
        closed_f, consts = jax.closure_convert(f, z0, args)
        solution, value = _reversible_solve(closed_f, solver, z0, (args, consts), budget)
        return dataclasses.replace(solution, value=value)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _reversible_solve(closed_f, solver, z0, all_args, budget):
    return _forward(closed_f, solver, z0, all_args, budget)[:2]


def _forward(closed_f, solver, z0, all_args, budget):
    """``(solution, newest iterate, (final pair, evaluations per example))``."""
    f = lambda z: closed_f(z, all_args[0], *all_args[1])
    solution, pair = iterate(solver, f, z0, budget, with_history=True)
    _, unravel = batch_ravel(z0)
    newest = jnp.where((solution.num_steps % 2 == 1)[:, None], pair.y, pair.z)
    return solution, unravel(newest), (pair, solution.num_steps)


def _reversible_fwd(closed_f, solver, z0, all_args, budget):
    solution, value, (pair, num_steps) = _forward(closed_f, solver, z0, all_args, budget)
    return (solution, value), (pair, num_steps, z0, all_args, budget)


def _reversible_bwd(closed_f, solver, residuals, cotangents):
    (pair, num_steps, z0, all_args, budget) = residuals
    _, value_bar = cotangents
    beta = solver.beta
    flat_bar, unravel = batch_ravel(value_bar)
    last_is_y = (num_steps % 2 == 1)[:, None]
    y_bar, z_bar = jnp.where(last_is_y, flat_bar, 0), jnp.where(last_is_y, 0, flat_bar)
    args_bar = jax.tree.map(jnp.zeros_like, all_args)

    def f_flat(x, all_args):
        return batch_ravel(closed_f(unravel(x), all_args[0], *all_args[1]))[0]

    evaluations = jnp.max(num_steps)  # the longest example's; the others skip the steps they did not take

    def undo(j, carry):
        """Undoes evaluation ``k = evaluations - 1 - j``: the ``y`` update (at ``z``) if even, else the ``z`` one."""
        y, z, y_bar, z_bar, args_bar = carry
        k = evaluations - 1 - j
        ran = (k < num_steps)[:, None]  # examples that made evaluation k
        even = k % 2 == 0
        at, updated, updated_bar = jnp.where(even, z, y), jnp.where(even, y, z), jnp.where(even, y_bar, z_bar)
        f_at, vjp = jax.vjp(f_flat, at, all_args)
        at_bar, step_args_bar = vjp(jnp.where(ran, beta * updated_bar, 0))
        previous = jnp.where(ran, (updated - beta * f_at) / (1 - beta), updated)
        previous_bar = jnp.where(ran, (1 - beta) * updated_bar, updated_bar)
        y, z = jnp.where(even, previous, y), jnp.where(even, z, previous)
        y_bar = jnp.where(even, previous_bar, y_bar + at_bar)
        z_bar = jnp.where(even, z_bar + at_bar, previous_bar)
        return y, z, y_bar, z_bar, jax.tree.map(jnp.add, args_bar, step_args_bar)

    *_, y_bar, z_bar, args_bar = lax.fori_loop(0, evaluations, undo, (pair.y, pair.z, y_bar, z_bar, args_bar))
    budget_bar = None if budget is None else jnp.zeros(jnp.shape(budget), jax.dtypes.float0)
    return unravel(y_bar + z_bar), args_bar, budget_bar  # y0 = z0


_reversible_solve.defvjp(_reversible_fwd, _reversible_bwd)
