"""Strategies whose derivative is one linear map: ``Implicit`` (the exact inverse) and ``Neumann`` (a truncated series).

Both linearise ``f`` at ``z*`` and apply a linear map ``M ~ (I - J_f(z*))^-1``: forward mode
to ``(df/dargs) v``, reverse mode its transpose to the cotangent, as one
``lax.custom_linear_solve`` whose transpose is the backward solve.
"""
from __future__ import annotations

import abc
import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from ._checks import check_int, check_number
from ._gradients import Gradient
from ._solution import NUM_STATS, Solution, SolveStats
from ._solvers import check_solver
from ._solvers._loop import check_f_output
from ._tracing import tracing_tangents


class _Linearised(Gradient):
    """A strategy defined by ``linear_solve``: ``u ~ (I - J)^-1 y`` for a linear ``J`` (JVPs or VJPs of f at z*)."""

    @abc.abstractmethod
    def linear_solve(self, apply_j: Callable, y, z_star, solver) -> tuple[object, SolveStats | None]:
        """``(u, stats)``: ``u ~ (I - J)^-1 y`` with ``apply_j = J``, and its statistics (None: none to report).

        ``solver`` is the forward solver; ``z_star`` the fixed point, batched like ``y``.
        """

    def solve(self, f, z0, args, solver, budget, backward_stats_probe):
        """The forward solve; its ``value`` is differentiated by ``linear_solve`` in either mode."""
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

        linear_solve = functools.partial(self.linear_solve, solver=solver)
        return _implicit_solve((explicit_f, explicit_tangent_f), solver, linear_solve, z0,
                               (args, consts, tangent_consts), backward_stats_probe, budget)


@dataclasses.dataclass(frozen=True)
class Implicit(_Linearised):
    """Exact gradients by the implicit function theorem (the default).

    Reverse mode (``jax.grad``, ``jax.vjp``) solves ``g = J_f(z*)^T g + y`` with
    ``solver`` (VJPs only, one linearisation of ``f`` at ``z*``), then takes one VJP
    w.r.t. the arguments. Forward mode (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``)
    solves the tangent system ``t = J_f(z*) t + (df/dargs) v`` with ``solver`` (JVPs) at
    the same cost. The backward solve's statistics are the gradient of
    ``fixed_point``'s ``backward_stats_probe``.

    Args:
      solver: the backward solver; None uses the forward one.

    Examples:
      >>> import deq_jax as dj
      >>> dj.Implicit(dj.ForwardIteration(tol=1e-3, max_iter=40)).solver.max_iter
      40
    """

    solver: object = None

    def __post_init__(self):
        if self.solver is not None:
            check_solver("Implicit: solver", self.solver)

    def linear_solve(self, apply_j, y, z_star, solver):
        solution = solve_linear(apply_j, y, z_star, solver if self.solver is None else self.solver)
        return solution.value, solution.stats()


@dataclasses.dataclass(frozen=True)
class Neumann(_Linearised):
    """The Neumann-series phantom gradient (Geng et al. 2021): ``(I - J)^-1 ~ damping * sum_{k<terms} A^k``.

    ``A = damping * J_f(z*) + (1 - damping) * I`` is the Jacobian of the damped step
    ``z <- damping * f(z) + (1 - damping) * z``; ``damping = 1`` gives the plain series
    ``sum_{k<terms} J^k``. The series is what backprop through ``terms`` damped steps from
    ``z*`` computes when the steps stay at ``z*`` (``Phantom`` unrolls them, moving away
    from ``z*`` and storing each step's activations); here it costs ``terms - 1``
    products with ``J_f(z*)^T`` (VJPs at one linearisation) and one VJP w.r.t. the
    arguments, and keeps no unrolled graph. It converges to the implicit gradient as
    ``terms`` grows when the damped step contracts. Both modes: forward mode sums the
    same series with JVPs. Nothing is solved to a tolerance, so no backward statistics
    are reported (``backward_stats_probe``'s gradient is zero).

    Args:
      terms: ``K``, the number of terms, an int >= 1 (1: the Jacobian-free gradient
        scaled by ``damping``).
      damping: in (0, 1].

    Examples:
      >>> import jax, jax.numpy as jnp, deq_jax as dj
      >>> f = lambda z, a: 0.5 * z + a       # J = 0.5: the exact d z*/d a is 2
      >>> slope = lambda n: jax.grad(lambda a: dj.fixed_point(f, jnp.zeros((1, 1)), a, gradient=n).value.sum())(1.0)
      >>> [round(float(slope(dj.Neumann(k))), 4) for k in (1, 2, 4)]
      [1.0, 1.5, 1.875]
    """

    terms: int = 5
    damping: float = 1.0

    def __post_init__(self):
        check_int("Neumann", terms=self.terms)
        check_number("Neumann", "damping", self.damping, high=1.0, high_open=False)

    def linear_solve(self, apply_j, y, z_star, solver):
        del z_star, solver
        return neumann_series(apply_j, y, self.terms, self.damping), None


def neumann_series(apply_j: Callable, y, terms: int, damping: float = 1.0):
    """``damping * sum_{k<terms} A^k y`` with ``A = damping * J + (1 - damping) * I``: ``terms - 1`` products with J.

    Args:
      apply_j: ``u -> J u``, linear, on pytrees like ``y``.
      y: the right-hand side.
      terms: the number of terms, >= 1.
      damping: in (0, 1].
    """
    def next_term(_, carry):
        term, total = carry
        term = jax.tree_util.tree_map(lambda j, t: damping * j + (1 - damping) * t, apply_j(term), term)
        return term, jax.tree_util.tree_map(jnp.add, total, term)

    _, total = lax.fori_loop(0, terms - 1, next_term, (y, y))
    return jax.tree_util.tree_map(lambda t: damping * t, total)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _implicit_solve(fs, solver, linear_solve, z0, args, probe, limit):
    """The forward solve of ``fs[0]``; ``fs[1]`` is the same ``f`` in its differentiable-in-forward-mode form.

    ``linear_solve(apply_j, y, z_star) -> (u, stats or None)`` is the strategy's ``u ~ (I - J)^-1 y``.
    """
    del linear_solve, probe
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
def _implicit_solve_jvp(fs, solver, linear_solve, primals, tangents):
    """``z*``'s tangent ``t`` solves ``t = J_f(z*) t + (df/dargs) args_dot``, a ``lax.custom_linear_solve``.

    The system is solved by the strategy's ``linear_solve`` (exactly, or by a truncated series).
    Forward mode runs ``tangent_solve``: it with JVPs of ``f``'s tangent form ``fs[1]`` (traced with
    ``tracing_tangents``, so that every operation has a JVP). Reverse mode transposes this rule:
    the right-hand side becomes one VJP w.r.t. the arguments, and the linear solve becomes
    ``backward_solve``, ``linear_solve`` of ``g = J_f(z*)^T g + y`` with VJPs of ``fs[0]``
    (fast reverse-mode forms). The
    right-hand side, the backward solve and the operator's transpose each evaluate ``f`` at
    ``z*``: the same operations on the same operands, which XLA merges into one or drops
    (``tests/test_fixed_point.py`` counts the compiled convolutions). The probe's tangent
    rides along as a second, identity block of the system, whose transpose returns the
    backward solve's statistics (zeros if it reports none): the probe's gradient.
    """
    z0, args, probe, limit = primals
    _, args_dot, probe_dot, _ = tangents
    f, tangent_f = fs
    solution = _implicit_solve(fs, solver, linear_solve, z0, args, probe, limit)
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
        return linear_solve(linear_f, b, z_star)[0]

    def backward_solve(_, y):
        _, vjp_z = jax.vjp(lambda z: f(z, args), z_star)  # the one f evaluation of the backward pass
        return linear_solve(lambda g: vjp_z(g)[0], y, z_star)

    def operator(t):  # (I - J_f(z*)) t, the system's matrix in custom_linear_solve's A x = b
        return jax.tree_util.tree_map(jnp.subtract, t, jax.jvp(lambda z: tangent_f(z, args), (z_star,), (t,))[1])

    if isinstance(probe_dot, SymbolicZero):
        t = lax.custom_linear_solve(operator, rhs, tangent_solve, lambda _, y: backward_solve(_, y)[0])
    else:
        def backward_solve_with_stats(_, b):
            g, stats = backward_solve(_, b[0])
            stats = jnp.zeros(NUM_STATS) if stats is None else stats.to_array()
            return g, stats.astype(probe.dtype)

        t, _ = lax.custom_linear_solve(lambda b: (operator(b[0]), b[1]), (rhs, probe_dot),
                                       lambda _, b: (tangent_solve(_, b[0]), b[1]), backward_solve_with_stats)
    return solution, dataclasses.replace(jax.tree_util.tree_map(_zero_tangent_like, solution), value=t)
