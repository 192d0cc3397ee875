"""``fixed_point``: a solver in the forward pass, the implicit function theorem in the backward."""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from ._gradients import check_gradient
from ._implicit import Implicit
from ._solution import NUM_STATS, Solution
from ._solvers import Anderson, check_solver
from ._solvers._loop import budget_per_example, check_z0
from ._checks import check_examples
from ._tree import add_system_axis, as_one_example, drop_system_axis


def fixed_point(
    f: Callable,
    z0,
    args,
    *,
    solver=Anderson(),
    gradient=Implicit(),
    backward_stats_probe: jax.Array | None = None,
    budget=None,
    examples: str = "independent",
    has_aux: bool = False,
) -> Solution:
    """Solves ``z* = f(z*, args)``, differentiable w.r.t. ``args`` by the chosen gradient strategy.

    The forward pass runs ``solver`` without recording a tape. With
    ``gradient=Implicit(backward_solver)`` (the default) the backward pass linearises
    ``f`` once at ``z*`` (one f evaluation), solves the transposed linear fixed point
    ``g = J_f(z*)^T g + y`` with the backward solver (each step is one VJP, no f
    evaluation; solved for ``y`` rescaled to the size of ``z*``, so that Anderson's
    absolute ridge does not depend on the loss's scale), and returns
    ``(d f / d args)^T g``. The chapter's layer spends two f evaluations beyond its
    solver; this spends one. Forward mode (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``)
    solves the tangent system ``t = J_f(z*) t + (d f / d args) v`` the same way, with
    JVPs. With ``gradient=Phantom(steps, damping)`` the value is the last of ``steps``
    damped steps from ``z*``, differentiated by backprop through those steps only (see
    ``Phantom``); ``Neumann(terms)`` replaces the inverse by a truncated series. A
    strategy of one's own subclasses ``deq_jax.Gradient``.

    Args:
      f: ``f(z, args) -> z``, batched over the leading axis of ``z``, returning ``z``'s
        dtype. It may compute in a narrower one (bfloat16 convolutions, say) if it
        casts its output back, as ``deq_jax.nn.DEQ`` does: the solver's state
        and the backward solve then stay in ``z0``'s dtype, and the backward VJPs go
        through the same casts, so they too run in the narrow dtype.
      z0: initial estimate, a floating array (or pytree) with a leading batch axis;
        its dtype is the solver state's. It does not change the fixed point, so its
        gradient is zero.
      args: a pytree of arrays: everything ``f`` depends on that should receive
        gradients (parameters, injected input). Arrays ``f`` closes over are found
        with ``jax.closure_convert`` and differentiated too.
      solver: the forward solver, a ``deq_jax.Solver`` (``Anderson``, ``Broyden``,
        ``ForwardIteration`` or one's own).
      gradient: a ``deq_jax.Gradient``: ``Implicit`` (exact; its ``solver`` solves the
        backward system, the forward one if None), ``Phantom``, ``Neumann`` or ``GDEQ``
        (inexact, cheaper), ``Backprop`` or ``ReversibleBackprop`` (the finite solve's
        exact gradient), or one's own.
      backward_stats_probe: optional float vector of length ``len(SolveStats._fields)``.
        Its value is ignored; with ``Implicit`` its gradient is the
        ``SolveStats`` of the backward solve (summed over every call that shares
        the probe), which is how backward statistics leave a jitted ``grad``
        (``SolveStats.from_array(grad)``); with the other built-in strategies, which
        solve nothing backward, its gradient is zero.
      budget: optional run-time cap on the forward solve's f evaluations per example
        (an int, or an integer array of shape ``()`` or ``[B]``, counted as
        ``max_iter`` counts them), clamped to the solver's ``max_iter``, the
        compile-time ceiling. It may be traced: a jitted caller that takes it as an
        argument compiles once for every budget. The backward solve keeps its own
        ``max_iter``.
      examples: how ``f`` treats the leading axis. ``"independent"`` (default): row
        ``b`` of ``f(z)`` depends on row ``b`` of ``z`` only, so every example gets its
        own stop, mixing weights and backward scale -- exact, and the fastest. Choose
        ``"coupled"`` when rows interact -- a cell with ``nnx.BatchNorm`` in training
        mode, a batch-mean term, attention across the batch, or a state without a batch
        axis at all (a single vector ``z`` with ``f(z) = tanh(W z + x)``): the whole of
        ``z`` is then solved as one system, with one stop and one scale, and its
        ``Solution`` fields have a leading axis of 1. With ``"independent"`` on a
        coupled ``f`` the solve still converges, but its gradients are wrong (each row
        is rescaled and stopped as if it stood alone); a 1-D ``z0`` is refused there,
        since a vector's entries are rarely independent examples.
      has_aux: ``f`` returns a pair ``(z, aux)``, ``aux`` any pytree of arrays beside the
        state (a loss term, a log-determinant, an intermediate activation). The solve
        uses ``z``; the ``Solution``'s ``aux`` is ``f``'s ``aux`` at the returned
        ``value`` (one more f evaluation), differentiable w.r.t. ``args`` through
        ``value`` by the gradient strategy and directly through ``f``.

    Returns:
      The forward ``Solution`` (for ``Phantom``, ``value`` is the last unrolled
      state); ``value`` is differentiable w.r.t. ``args``.

    Examples:
      >>> import jax, jax.numpy as jnp, deq_jax as dj
      >>> f = lambda z, a: jnp.tanh(a * z + 1.0)
      >>> loss = lambda a: dj.fixed_point(f, jnp.zeros((2, 3)), a, solver=dj.Anderson(tol=1e-6)).value.sum()
      >>> jax.grad(loss)(0.5).dtype
      dtype('float32')
    """
    check_solver("fixed_point: solver", solver)
    check_gradient(gradient)
    check_examples("fixed_point", examples)
    if has_aux:
        solution = fixed_point(lambda z, a: _state_and_aux(f, z, a)[0], z0, args, solver=solver, gradient=gradient,
                               backward_stats_probe=backward_stats_probe, budget=budget, examples=examples)
        return dataclasses.replace(solution, aux=_state_and_aux(f, solution.value, args)[1])
    if examples == "coupled":
        if budget is not None and jnp.shape(budget) != ():
            raise ValueError(f"fixed_point: with examples='coupled' the batch is one solve, so budget must be "
                             f"a scalar; got shape {jnp.shape(budget)}.")
        solution = fixed_point(as_one_example(f), add_system_axis(z0), args, solver=solver, gradient=gradient,
                               backward_stats_probe=backward_stats_probe, budget=budget)
        return dataclasses.replace(solution, value=drop_system_axis(solution.value))
    check_z0("fixed_point", z0)
    if backward_stats_probe is None:
        backward_stats_probe = jnp.zeros(NUM_STATS, jnp.float32)
    elif jnp.shape(backward_stats_probe) != (NUM_STATS,):
        raise ValueError(
            f"fixed_point: backward_stats_probe must have shape ({NUM_STATS},), "
            f"got {jnp.shape(backward_stats_probe)}."
        )
    limit = budget_per_example("fixed_point", budget, jax.tree_util.tree_leaves(z0)[0].shape[0], solver.max_iter)
    return gradient.solve(f, z0, args, solver, limit, backward_stats_probe)


def _state_and_aux(f: Callable, z, args):
    """``f(z, args)``, checked to be the pair ``(z, aux)`` that ``has_aux=True`` asks for."""
    out = f(z, args)
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError(f"fixed_point: with has_aux=True, f must return a pair (z, aux); got {type(out).__name__}"
                        f"{f' of length {len(out)}' if isinstance(out, (tuple, list)) else ''}.")
    return out
