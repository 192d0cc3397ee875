"""The gradient-strategy protocol ``Gradient`` of ``deq_jax.fixed_point``, and the phantom gradient."""
from __future__ import annotations

import abc
import dataclasses
import functools
from typing import Callable

import jax
from jax import lax
import jax.numpy as jnp

from ._solution import Solution
from ._solvers import Broyden
from ._solvers._loop import history_einsum, iterate
from ._backend import backend_choices
from ._checks import check_int, check_number
from ._tree import batch_ravel, damped_step


class Gradient(abc.ABC):
    """The protocol of a gradient strategy: how ``fixed_point`` differentiates a solve.

    A strategy is a frozen, hashable dataclass (so that a ``DEQ`` holding one can be a
    static part of a jitted function) with one method, ``solve``, which runs the
    forward solve and attaches the strategy's derivative rule to its value. The
    built-in ``Implicit``, ``Phantom``, ``Neumann``, ``Backprop``, ``GDEQ`` and
    ``ReversibleBackprop`` are subclasses; a new one gets
    from ``fixed_point`` (and so from ``deq_jax.nn.DEQ``, ``fixed_point_states`` and the
    CIFAR-10 experiment's model) everything the others get: the checks of ``f``,
    ``z0`` and ``budget``, coupled batches (``examples="coupled"``), and a budget
    turned into one cap per example.

    Examples:
      A Jacobian-free gradient (Fung et al. 2022) in four lines:

      >>> import dataclasses, jax, jax.numpy as jnp, deq_jax as dj
      >>> @dataclasses.dataclass(frozen=True)
      ... class JacobianFree(dj.Gradient):
      ...     def solve(self, f, z0, args, solver, budget, backward_stats_probe):
      ...         frozen = jax.lax.stop_gradient(args)
      ...         solution = solver(lambda z: f(z, frozen), z0, budget)
      ...         return dataclasses.replace(solution, value=f(jax.lax.stop_gradient(solution.value), args))
      >>> f = lambda z, a: jnp.tanh(a * z + 1.0)
      >>> loss = lambda a: dj.fixed_point(f, jnp.zeros((2, 3)), a, gradient=JacobianFree()).value.sum()
      >>> round(float(jax.grad(loss)(0.5)), 3)  # the implicit gradient is 1.184
      1.067
    """

    @abc.abstractmethod
    def solve(self, f: Callable, z0, args, solver, budget: jax.Array, backward_stats_probe: jax.Array) -> Solution:
        """Solves ``z = f(z, args)`` and returns the ``Solution`` whose ``value`` this strategy differentiates.

        Args:
          f: ``f(z, args) -> z``, batched over the leading axis of ``z`` (one example per
            row; a coupled batch arrives as one example).
          z0: the initial estimate, a floating pytree with a leading batch axis ``B``.
          args: the pytree of arrays to differentiate ``value`` against.
          solver: the forward ``deq_jax.Solver``; ``solver(g, z0, budget)`` solves ``z = g(z)``.
          budget: int32[B], each example's cap on f evaluations (at most ``solver.max_iter``).
          backward_stats_probe: float32[len(SolveStats._fields)], whose value is ignored. A
            strategy that solves something backward may make its gradient that solve's
            ``SolveStats`` (see ``fixed_point``); one that does not leaves it unused, and
            its gradient is zero.

        Returns:
          The forward solve's ``Solution``, ``value`` differentiable w.r.t. ``args``.
        """


@dataclasses.dataclass(frozen=True)
class Phantom(Gradient):
    """Phantom gradients (Geng et al. 2021): backprop through a few damped steps from ``z*``.

    The forward solve is not differentiated. From its ``z*``, ``steps`` damped steps
    ``z <- damping * f(z, args) + (1 - damping) * z`` are unrolled and differentiated by
    ordinary backprop; the value returned is the last of them. ``Phantom(1, 1.0)`` is
    the Jacobian-free gradient (Fung et al. 2022): the value is ``f(z*)`` and the
    gradient ignores ``J_f``'s feedback. With ``damping < 1`` on a contractive ``f``,
    the gradient approaches the implicit one as ``steps`` grows. The steps are
    unrolled in the graph where ``unrolled_phantom`` of ``deq_jax.backend_choices``
    says so (XLA:CPU, where a convolution's kernel gradient is far slower inside a
    loop; compile time then grows with ``steps``), else run by ``lax.fori_loop``.

    Cost: ``steps`` f evaluations beyond the solve, ``steps`` VJPs backward, and the
    activations of ``steps`` evaluations in memory. Reverse mode only: ``jax.jvp`` and
    ``jax.jacfwd`` through it raise a ``TypeError`` naming ``Implicit`` instead;
    ``jax.hessian`` (forward over reverse) differentiates the same unrolled steps twice.

    Args:
      steps: unrolled steps, an int >= 1.
      damping: in (0, 1]; 1 is undamped.

    Examples:
      >>> import deq_jax as dj
      >>> dj.Phantom(steps=5, damping=0.8)
      Phantom(steps=5, damping=0.8)
    """

    steps: int = 1
    damping: float = 1.0

    def __post_init__(self):
        check_int("Phantom", steps=self.steps)
        check_number("Phantom", "damping", self.damping, high=1.0, high_open=False)

    def solve(self, f, z0, args, solver, budget, backward_stats_probe):
        """The forward solve without gradient, then ``steps`` differentiated damped steps from its ``z*``."""
        del backward_stats_probe  # nothing is solved backward
        args = refuse_forward_mode(args, "Phantom")
        frozen_args = lax.stop_gradient(args)
        solution = solver(lambda z: f(z, frozen_args), lax.stop_gradient(z0), budget)

        def step(_, z):
            return damped_step(f(z, args), z, self.damping)

        return dataclasses.replace(solution, value=apply_steps(step, lax.stop_gradient(solution.value), self.steps))


@dataclasses.dataclass(frozen=True)
class Backprop(Gradient):
    """Backprop through the solve: the exact derivative of the solver's actual, finite iterations.

    The forward solve runs as a differentiable loop (a ``lax.scan`` of ``max_iter - 1``
    guarded steps instead of a ``lax.while_loop``: a step once every example has stopped
    evaluates no f), and ordinary autodiff goes through every iteration the solver took
    -- its mixing or Broyden updates, each example's own stop, the lowest-residual
    estimate it returns -- in both modes. It is the reference against which the bias of
    the other strategies can be measured (the exact derivative of what was computed,
    where ``Implicit`` is the derivative of the exact fixed point), and the gradient of a
    solve stopped far from convergence. Unlike the other strategies, ``z0`` receives a
    gradient too.

    Cost: reverse mode stores every iteration's activations (memory grows with
    ``max_iter``), unless ``checkpoint_every=k``: iterations are then recomputed in
    segments of ``k`` (``jax.checkpoint``), storing one state per segment and one
    segment's activations, for about one more forward solve of f evaluations. Nothing
    is solved backward (``backward_stats_probe``'s gradient is zero).

    Args:
      checkpoint_every: None (store every iteration) or an int >= 1.

    Examples:
      >>> import jax, jax.numpy as jnp, deq_jax as dj
      >>> f = lambda z, a: 0.5 * z + a          # from 0, forward iteration's k-th iterate is (2 - 2^(1-k)) a
      >>> solve = lambda a: dj.fixed_point(f, jnp.zeros((1, 1)), a, solver=dj.ForwardIteration(1e-9, max_iter=3),
      ...                                  gradient=dj.Backprop()).value.sum()
      >>> float(jax.grad(solve)(1.0))           # the third iterate: (2 - 2^-2) a
      1.75
    """

    checkpoint_every: int | None = None

    def __post_init__(self):
        if self.checkpoint_every is not None:
            check_int("Backprop", checkpoint_every=self.checkpoint_every)

    def solve(self, f, z0, args, solver, budget, backward_stats_probe):
        """The forward solve as a differentiable loop."""
        del backward_stats_probe  # nothing is solved backward
        return iterate(solver, lambda z: f(z, args), z0, budget, differentiable=True,
                       checkpoint_every=self.checkpoint_every)


@dataclasses.dataclass(frozen=True)
class GDEQ(Gradient):
    """The Broyden-preconditioned Jacobian-free gradient (GDEQ, Nguyen et al. 2023).

    The implicit gradient's cotangent is ``(I - J_f(z*))^-T y``; the forward Broyden solve
    has already built a low-rank approximation ``H ~ (J_f(z*) - I)^-1`` of that inverse
    (``H = -I + sum_j u_j v_j^T`` per example, see ``Broyden``), so GDEQ takes ``-H^T y =
    y - sum_j v_j (u_j . y)`` instead, then one VJP of f w.r.t. the arguments at ``z*``.
    With no update in ``H`` (``H = -I``) this is the Jacobian-free gradient; each update
    brings it towards the implicit one, for the cost of the Jacobian-free gradient (one f
    evaluation and one VJP) and a product with the factors. The value is the solve's
    ``z*``. Needs a ``Broyden`` forward solver; reverse mode only (``jax.jvp`` raises a
    ``TypeError`` naming ``Implicit``), and nothing is solved backward
    (``backward_stats_probe``'s gradient is zero).

    Examples:
      >>> import jax, jax.numpy as jnp, deq_jax as dj
      >>> f = lambda z, a: jnp.tanh(0.5 * z + a)
      >>> solve = lambda a, g: dj.fixed_point(f, jnp.zeros((1, 2)), a, solver=dj.Broyden(tol=1e-6), gradient=g).value.sum()
      >>> [round(float(jax.grad(solve)(0.3, g)), 3) for g in (dj.Implicit(), dj.GDEQ(), dj.Phantom(1))]
      [2.396, 2.225, 1.498]
    """

    def solve(self, f, z0, args, solver, budget, backward_stats_probe):
        """The Broyden solve without gradient; its ``z*`` differentiated with the preconditioned cotangent."""
        del backward_stats_probe  # nothing is solved backward
        require_solver("GDEQ preconditions the gradient with the forward Broyden solve's inverse Jacobian", solver,
                       Broyden)
        args = refuse_forward_mode(args, "GDEQ")
        frozen_args = lax.stop_gradient(args)
        solution, history = iterate(solver, lambda z: f(z, frozen_args), lax.stop_gradient(z0), budget,
                                    with_history=True)
        z_star = lax.stop_gradient(solution.value)
        closed_f, consts = jax.closure_convert(f, z_star, args)
        value = _preconditioned(closed_f, z_star, (args, consts), lax.stop_gradient((history.u, history.v)))
        return dataclasses.replace(solution, value=value)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _preconditioned(closed_f, z_star, all_args, factors):
    """``z_star``, whose cotangent ``y`` reaches ``all_args`` as ``(df/dargs)^T (-H^T y)`` (``H`` from ``factors``)."""
    del closed_f, all_args, factors
    return z_star


def _preconditioned_fwd(closed_f, z_star, all_args, factors):
    return z_star, (z_star, all_args, factors)


def _preconditioned_bwd(closed_f, residuals, y):
    z_star, all_args, (u, v) = residuals
    flat_y, unravel = batch_ravel(y)
    g = flat_y - history_einsum("bm,bmd->bd", history_einsum("bmd,bd->bm", u, flat_y), v)  # -H^T y
    _, vjp = jax.vjp(lambda a: closed_f(z_star, a[0], *a[1]), all_args)
    zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
    return zeros(z_star), vjp(unravel(g.astype(flat_y.dtype)))[0], zeros((u, v))


_preconditioned.defvjp(_preconditioned_fwd, _preconditioned_bwd)


def require_solver(reason: str, solver, kind: type) -> None:
    """Raises ``TypeError`` unless ``solver`` is a ``kind``, for a strategy that needs one (``reason`` says why)."""
    if not isinstance(solver, kind):
        raise TypeError(f"fixed_point: {reason}, so the solver must be a deq_jax.{kind.__name__}; got {solver!r}.")


def check_gradient(gradient) -> None:
    """Raises ``TypeError`` unless ``gradient`` is an instance of a ``Gradient`` subclass."""
    if not isinstance(gradient, Gradient):
        raise TypeError(f"fixed_point: gradient must be a deq_jax.Gradient instance (e.g. deq_jax.Implicit()), "
                        f"got {gradient!r}.")


@jax.custom_vjp
def _reverse_mode_only(leaves: list) -> list:
    """The identity, as a ``jax.custom_vjp``: JAX refuses to take it through forward mode."""
    return leaves


_reverse_mode_only.defvjp(lambda leaves: (leaves, None), lambda _, cotangents: (cotangents,))


def refuse_forward_mode(args, owner: str):
    """``args`` unchanged; raises a ``TypeError`` naming ``owner`` and ``Implicit`` under ``jax.jvp`` or ``jax.jacfwd``.

    The floating leaves pass through a ``custom_vjp`` identity, which JAX differentiates in
    reverse mode (``jax.grad``, ``jax.vjp``, ``jax.jacrev``) and refuses in forward mode,
    at this call: the error is JAX's own, re-raised with the way out.
    """
    leaves, treedef = jax.tree_util.tree_flatten(args)
    floating = [i for i, leaf in enumerate(leaves) if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
    try:
        guarded = _reverse_mode_only([leaves[i] for i in floating])
    except TypeError as error:
        raise TypeError(
            f"fixed_point: {owner} gradients are reverse-mode only (jax.grad, jax.vjp, jax.jacrev); for "
            "jax.jvp or jax.jacfwd use gradient=Implicit()."
        ) from error
    for i, leaf in zip(floating, guarded):
        leaves[i] = leaf
    return jax.tree_util.tree_unflatten(treedef, leaves)


def apply_steps(step: Callable, z, count: int):
    """``count`` applications ``z <- step(i, z)``, differentiable by plain backprop.

    Unrolled in the graph where ``unrolled_phantom`` of ``deq_jax.backend_choices``
    says so (XLA:CPU runs a convolution's kernel gradient far slower inside a loop),
    else a ``lax.fori_loop``.
    """
    if backend_choices().unrolled_phantom:
        for i in range(count):
            z = step(i, z)
        return z
    return lax.fori_loop(0, count, step, z)
