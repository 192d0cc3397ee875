"""``fixed_point``: a solver in the forward pass, the implicit function theorem in the backward."""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from ._gradients import Implicit, Phantom, check_gradient, phantom_solve
from ._solution import NUM_STATS, Solution
from ._solvers import Anderson, check_solver
from ._solvers._loop import budget_per_example, check_f_output, check_z0
from ._checks import check_examples
from ._tree import add_system_axis, as_one_example, drop_system_axis
from ._tracing import tracing_tangents


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
    ``Phantom``).

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
      solver: the forward solver, ``Anderson``, ``Broyden`` or ``ForwardIteration``.
      gradient: ``Implicit`` (exact; its ``solver`` solves the backward system, the
        forward one if None) or ``Phantom`` (inexact, cheaper).
      backward_stats_probe: optional float vector of length ``len(SolveStats._fields)``.
        Its value is ignored; with ``Implicit`` its gradient is the
        ``SolveStats`` of the backward solve (summed over every call that shares
        the probe), which is how backward statistics leave a jitted ``grad``
        (``SolveStats.from_array(grad)``); with ``Phantom``, which solves
        nothing backward, its gradient is zero.
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
    if isinstance(gradient, Phantom):
        return phantom_solve(f, z0, args, solver, gradient, limit)
    backward_solver = solver if gradient.solver is None else gradient.solver
    closed_f, consts = jax.closure_convert(f, z0, args)
    # Checked on closed_f's jaxpr, not by tracing f once more (f's trace is most of the step's).
    check_f_output("fixed_point", jax.eval_shape(lambda z: closed_f(z, args, *consts), z0), z0)
    # f once more for its JVPs, traced so that every operation has one (see _tracing.py); a new
    # function object, since closure_convert caches its trace by function. (Retracing f itself in
    # the rule instead, where it closes over nothing, made tracing slower -- the rule traces it thrice:
    # jax.jit(jax.grad(loss)).trace of an MDEQ-tiny DEQ, 0.57 -> 0.82 s.)
    with tracing_tangents():
        tangent_f, tangent_consts = jax.closure_convert(lambda z, a: f(z, a), z0, args)

    def explicit_f(z, all_args):
        return closed_f(z, all_args[0], *all_args[1])

    def explicit_tangent_f(z, all_args):
        return tangent_f(z, all_args[0], *all_args[2])

    return _implicit_solve((explicit_f, explicit_tangent_f), solver, backward_solver, z0,
                           (args, consts, tangent_consts), backward_stats_probe, limit)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _implicit_solve(fs, solver, linear_solver, z0, args, probe, limit):
    """The forward solve of ``fs[0]``; ``fs[1]`` is the same ``f`` in its differentiable-in-forward-mode form."""
    del linear_solver, probe
    return solver(lambda z: fs[0](z, args), z0, limit)


def _batch_norms(tree) -> jax.Array:
    """Per-example 2-norm over every leaf of a batched pytree, [B]."""
    leaves = jax.tree_util.tree_leaves(tree)
    batch = leaves[0].shape[0]
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf.reshape(batch, -1)), axis=1) for leaf in leaves))


def _scale_rows(tree, factor: jax.Array):
    """Multiplies each example of a batched pytree by its entry of ``factor`` [B]."""
    return jax.tree_util.tree_map(
        lambda leaf: leaf * factor.astype(leaf.dtype).reshape(factor.shape + (1,) * (leaf.ndim - 1)), tree)


def solve_linear(apply_j: Callable, y, z_star, solver) -> Solution:
    """Solves a linear fixed point ``u = J u + y`` per example, with ``y`` at the scale of ``z*``.

    The implicit gradient's two systems have this form: the backward one with
    ``apply_j = J_f(z*)^T`` (VJPs), forward mode's tangent one with ``apply_j = J_f(z*)``
    (JVPs). The system is linear, so it is solved for ``y`` rescaled to each example's
    ``||z*||`` and the solution scaled back: the same answer, and every stopping rule
    is unchanged (the residual is relative), but Anderson's ridge ``lam``, an absolute
    number, then weighs on these iterates as it does on the forward ones. On the raw
    backward ``y`` of the chapter's CIFAR-10 model (per-example norm 2.3e-3 against
    ``||z*||`` = 222, batch 32 of CIFAR-10 images at initialisation) the ridge swamps
    the Gram matrix: Anderson ends all 25 steps at residual 0.029 (mean), worse than
    forward iteration (16.6 steps, 94% converged); on the rescaled ``y`` it needs 7.0
    steps (12 at most) to 1e-2 (``python -m experiments.benchmarks.backward_scale``).
    On the chapter's demo problem ``||y|| ~ ||z*||`` already, and nothing changes.

    Args:
      apply_j: ``u -> J u``, linear, batched like ``z*``.
      y: the right-hand side, a pytree with a leading batch axis.
      z_star: the fixed point, whose per-example norms set the scale.
      solver: the linear system's solver.

    Returns:
      The ``Solution`` of the linear system; ``value`` is ``u`` for the original ``y``.
    """
    y_norm, z_norm = _batch_norms(y), _batch_norms(z_star)
    # y = 0 has u = 0 at any scale; z* = 0 gives no scale to match.
    factor = jnp.where(z_norm > 0, z_norm, 1) / jnp.where(y_norm > 0, y_norm, 1)
    scaled_y = _scale_rows(y, factor)
    solution = solver(lambda u: jax.tree_util.tree_map(jnp.add, apply_j(u), scaled_y), scaled_y)
    return dataclasses.replace(solution, value=_scale_rows(solution.value, 1 / factor))


def _zero_tangent_like(primal):
    """A zero tangent for ``primal``: zeros of its dtype, or float0 for an integer or bool array."""
    if jnp.issubdtype(jnp.result_type(primal), jnp.inexact):
        return jnp.zeros(jnp.shape(primal), jnp.result_type(primal))
    return np.zeros(jnp.shape(primal), jax.dtypes.float0)


def _concrete(tangents, primals):
    """``tangents`` with every ``SymbolicZero`` made a concrete zero tangent."""
    return jax.tree_util.tree_map(lambda t, p: _zero_tangent_like(p) if isinstance(t, SymbolicZero) else t,
                                  tangents, primals, is_leaf=lambda t: isinstance(t, SymbolicZero))


@functools.partial(_implicit_solve.defjvp, symbolic_zeros=True)
def _implicit_solve_jvp(fs, solver, linear_solver, primals, tangents):
    """``z*``'s tangent ``t`` solves ``t = J_f(z*) t + (df/dargs) args_dot``, a ``lax.custom_linear_solve``.

    Forward mode runs ``tangent_solve``: JVPs of ``f``'s tangent form ``fs[1]`` (traced with
    ``tracing_tangents``, so that every operation has a JVP), rescaled like the
    backward system. Reverse mode transposes this rule: the right-hand side becomes one VJP
    w.r.t. the arguments, and the linear solve becomes ``backward_solve``, the backward
    solve ``g = J_f(z*)^T g + y`` with VJPs of ``fs[0]`` (fast reverse-mode forms). The
    right-hand side, the backward solve and the operator's transpose each evaluate ``f`` at
    ``z*``: the same operations on the same operands, which XLA merges into one or drops
    (``tests/test_fixed_point.py`` counts the compiled convolutions). The probe's tangent
    rides along as a second, identity block of the system, whose transpose returns the
    backward solve's statistics: the probe's gradient.
    """
    z0, args, probe, limit = primals
    _, args_dot, probe_dot, _ = tangents
    f, tangent_f = fs
    solution = _implicit_solve(fs, solver, linear_solver, z0, args, probe, limit)
    z_star = solution.value
    if not all(isinstance(t, SymbolicZero) for t in jax.tree_util.tree_leaves(args_dot)):
        _, rhs = jax.jvp(lambda a: tangent_f(z_star, a), (args,), (_concrete(args_dot, args),))
    elif not isinstance(probe_dot, SymbolicZero):
        # z* does not move, but the probe's gradient is still the backward solve's statistics: a
        # zero right-hand side that is linear in the probe's tangent, as a transposable one must be.
        rhs = jax.tree_util.tree_map(lambda z: jnp.zeros_like(z) * probe_dot[0].astype(z.dtype), z_star)
    else:
        return solution, jax.tree_util.tree_map(_zero_tangent_like, solution)  # only z0 moves

    def tangent_solve(_, b):  # linearised here, not in the rule: reverse mode never runs it
        _, linear_f = jax.linearize(lambda z: tangent_f(z, args), z_star)
        return solve_linear(linear_f, b, z_star, linear_solver).value

    def backward_solve(_, y):
        _, vjp_z = jax.vjp(lambda z: f(z, args), z_star)  # the one f evaluation of the backward pass
        return solve_linear(lambda g: vjp_z(g)[0], y, z_star, linear_solver)

    def operator(t):  # (I - J_f(z*)) t, the system's matrix in custom_linear_solve's A x = b
        return jax.tree_util.tree_map(jnp.subtract, t, jax.jvp(lambda z: tangent_f(z, args), (z_star,), (t,))[1])

    if isinstance(probe_dot, SymbolicZero):
        t = lax.custom_linear_solve(operator, rhs, tangent_solve, lambda _, y: backward_solve(_, y).value)
    else:
        def backward_solve_with_stats(_, b):
            g = backward_solve(_, b[0])
            return g.value, g.stats().to_array().astype(probe.dtype)

        t, _ = lax.custom_linear_solve(lambda b: (operator(b[0]), b[1]), (rhs, probe_dot),
                                       lambda _, b: (tangent_solve(_, b[0]), b[1]), backward_solve_with_stats)
    return solution, dataclasses.replace(jax.tree_util.tree_map(_zero_tangent_like, solution), value=t)
