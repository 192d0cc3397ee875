"""Gradient strategies of ``deq_jax.fixed_point``: how the backward pass treats the solve."""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
from jax import lax
import jax.numpy as jnp

from ._solution import Solution
from ._solvers import check_solver
from ._backend import backend_choices
from ._checks import check_int, check_number
from ._tree import damped_step


@dataclasses.dataclass(frozen=True)
class Implicit:
    """Exact gradients by the implicit function theorem (the default).

    Reverse mode (``jax.grad``, ``jax.vjp``) solves ``g = J_f(z*)^T g + y`` with
    ``solver`` (VJPs only, one linearisation of ``f`` at ``z*``), then takes one VJP
    w.r.t. the arguments. Forward mode (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``)
    solves the tangent system ``t = J_f(z*) t + (df/dargs) v`` with ``solver`` (JVPs) at
    the same cost.

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


@dataclasses.dataclass(frozen=True)
class Phantom:
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


GRADIENTS = (Implicit, Phantom)


def check_gradient(gradient) -> None:
    """Raises ``TypeError`` unless ``gradient`` is an ``Implicit`` or ``Phantom`` instance."""
    if not isinstance(gradient, GRADIENTS):
        raise TypeError(
            f"fixed_point: gradient must be one of {[g.__name__ for g in GRADIENTS]} (an instance), got {gradient!r}."
        )


@jax.custom_vjp
def _reverse_mode_only(leaves: list) -> list:
    """The identity, as a ``jax.custom_vjp``: JAX refuses to take it through forward mode."""
    return leaves


_reverse_mode_only.defvjp(lambda leaves: (leaves, None), lambda _, cotangents: (cotangents,))


def refuse_forward_mode(args):
    """``args`` unchanged; raises a ``TypeError`` naming ``Implicit`` under ``jax.jvp`` or ``jax.jacfwd``.

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
            "fixed_point: Phantom gradients are reverse-mode only (jax.grad, jax.vjp, jax.jacrev); for "
            "jax.jvp or jax.jacfwd use gradient=Implicit()."
        ) from error
    for i, leaf in zip(floating, guarded):
        leaves[i] = leaf
    return jax.tree_util.tree_unflatten(treedef, leaves)


def phantom_solve(f: Callable, z0, args, solver, gradient: Phantom, budget=None) -> Solution:
    """The forward solve (under ``budget``) without gradient, then ``gradient.steps`` differentiated damped steps.

    Returns:
      The solver's ``Solution`` with ``value`` replaced by the last unrolled state.
    """
    args = refuse_forward_mode(args)
    frozen_args = lax.stop_gradient(args)
    solution = solver(lambda z: f(z, frozen_args), lax.stop_gradient(z0), budget)
    z = lax.stop_gradient(solution.value)

    def step(_, z):
        return damped_step(f(z, args), z, gradient.damping)

    return dataclasses.replace(solution, value=apply_steps(step, z, gradient.steps))


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
