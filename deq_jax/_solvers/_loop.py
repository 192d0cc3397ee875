"""The per-example iteration loop shared by every solver, and the public solver protocol ``Solver``.

A solver supplies three pure functions over its own ``history`` pytree (see
``Solver``); the loop does the rest: one f evaluation per iteration,
per-example residuals, stops and the lowest-residual estimate.
"""
from __future__ import annotations

import abc
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .._backend import backend_choices
from .._checks import check_int, check_number
from .._solution import Solution
from .._tree import batch_ravel

RESIDUAL_EPS = 1e-5  # the chapter's guard against ||f(z)|| = 0


def history_einsum(subscripts: str, *operands: jax.Array) -> jax.Array:
    """``jnp.einsum`` at full precision, for the solvers' products with their history.

    At default precision a float32 product may run in TF32 (a 10-bit mantissa) on
    recent NVIDIA GPUs, or in bfloat16 passes on TPUs; Anderson's Gram matrix and
    mixing then stall well above a float32 tolerance. These products are small next to
    f, so full precision costs little.
    """
    return jnp.einsum(subscripts, *operands, precision=lax.Precision.HIGHEST)


class Solver(abc.ABC):
    """The protocol of a fixed-point solver: subclass it to get everything the built-in ones get.

    A solver is a frozen, hashable dataclass (so it can be a static argument of
    ``jit``) with two fields, ``tol`` and ``max_iter``, and three pure methods over its
    own ``history`` (any pytree of arrays). Iterates are flattened to ``[B, D]``: one row
    per example. The shared loop calls ``init`` once, then ``record`` with the pair
    ``(z0, f(z0))`` and, while some example is running, ``propose`` for the next
    iterate of every example, one f evaluation, and ``record`` of the new pair. The
    loop -- not the solver -- stops each example once its relative residual
    ``||f(x) - x|| / (||f(x)|| + 1e-5)`` is below ``tol`` (or not finite: it is then
    reported ``diverged``), freezes it,
    keeps each example's lowest-residual iterate and counts steps, so a new solver
    gets per-example stopping, the ``deq_jax.Solution`` statistics and both
    gradient strategies of ``deq_jax.fixed_point`` (its backward solve included)
    for free.

    ``record`` must leave the rows of examples outside ``active`` unchanged, so that a
    stopped example stays frozen and an example solved alone or in a batch gets the
    same iterates.

    Examples:
      >>> import dataclasses, jax.numpy as jnp, deq_jax as dj
      >>> @dataclasses.dataclass(frozen=True)
      ... class Damped(dj.Solver):
      ...     tol: float = 1e-2
      ...     max_iter: int = 50
      ...     def init(self, batch, features, dtype):
      ...         return jnp.zeros((batch, features), dtype)
      ...     def propose(self, history, k):
      ...         return history  # the next iterate, stored by record
      ...     def record(self, history, k, x, fx, active):
      ...         return jnp.where(active[:, None], 0.5 * (x + fx), history)
      >>> sol = Damped(tol=1e-6)(lambda z: 0.5 * z + 1.0, jnp.zeros((2, 3)))
      >>> bool(sol.converged.all()), round(float(sol.value[0, 0]), 4)
      (True, 2.0)
    """

    tol: float
    max_iter: int

    @abc.abstractmethod
    def init(self, batch: int, features: int, dtype) -> Any:
        """The empty history for ``batch`` examples of ``features`` scalars in ``dtype``."""

    @abc.abstractmethod
    def propose(self, history: Any, k: jax.Array) -> jax.Array:
        """The next iterate ``[B, D]`` of every example; ``k`` (traced int) is the f evaluations so far."""

    @abc.abstractmethod
    def record(self, history: Any, k: jax.Array, x: jax.Array, fx: jax.Array, active: jax.Array) -> Any:
        """The history after the ``k``-th f evaluation ``fx = f(x)`` (``[B, D]`` each; ``k = 0`` is ``z0``).

        Rows where ``active`` (bool[B]) is False must stay unchanged.
        """

    def __call__(self, f: Callable, z0, budget=None) -> Solution:
        """Solves ``z = f(z)`` from ``z0``.

        Args:
          f: batched map, ``f(z)`` has the structure, shape and dtype of ``z``.
          z0: initial estimate, a floating array (or pytree) with a leading batch axis.
          budget: optional run-time cap on the f evaluations (see ``iterate``).

        Returns:
          A ``deq_jax.Solution``.
        """
        return iterate(self, f, z0, budget)


def check_solver_options(solver: Solver) -> None:
    """Checks the two fields every solver has: ``tol > 0`` and ``max_iter >= 1``."""
    owner = type(solver).__name__
    check_int(owner, max_iter=solver.max_iter)
    check_number(owner, "tol", solver.tol)


def check_solver(owner: str, solver) -> None:
    """Raises ``TypeError`` unless ``solver`` is an instance of a ``Solver`` subclass."""
    if not isinstance(solver, Solver):
        raise TypeError(f"{owner} must be a deq_jax.Solver instance (e.g. deq_jax.Anderson()), got {solver!r}.")


class _LoopState(NamedTuple):
    k: jax.Array  # f evaluations so far (the same for every running example)
    history: Any
    active: jax.Array  # bool[B]: still iterating
    num_steps: jax.Array  # int32[B]
    best_fx: jax.Array  # [B, D]: f(z) at the lowest-residual iterate z
    best_residual: jax.Array  # [B]
    diverged: jax.Array  # bool[B]: a non-finite residual was met
    trace: jax.Array  # [max_iter, B]


def select_rows(mask: jax.Array, new: jax.Array, old: Callable[[], jax.Array]) -> jax.Array:
    """``where(mask[:, None], new, old())``, reading ``old`` only when some row keeps it where that pays.

    A select reads both of its operands in full; in the usual case -- every example of
    the batch still running -- a conditional reads only ``new`` (history and
    best-iterate writes of every step). Whether to use it is ``conditional_writes`` of
    ``deq_jax.backend_choices``.

    Args:
      mask: bool[B], rows that take ``new``.
      new: [B, D].
      old: returns the [B, D] rows to keep where ``mask`` is False.
    """
    if not backend_choices().conditional_writes:
        return jnp.where(mask[:, None], new, old())
    return lax.cond(jnp.all(mask), lambda: new, lambda: jnp.where(mask[:, None], new, old()))


def relative_residual(x: jax.Array, fx: jax.Array) -> jax.Array:
    """``||f(x) - x|| / (||f(x)|| + eps)`` per row; ``inf`` where it is not finite.

    Not differentiated: it decides stops and reports, and a norm's derivative at 0 is not
    finite (a zero cotangent times it is NaN), which a differentiated loop would meet.
    """
    x, fx = lax.stop_gradient(x), lax.stop_gradient(fx)
    residual = jnp.linalg.norm(fx - x, axis=1) / (jnp.linalg.norm(fx, axis=1) + RESIDUAL_EPS)
    return jnp.where(jnp.isfinite(residual), residual, jnp.inf)


def check_problem(owner: str, f: Callable, z0) -> None:
    """Trace-time checks on ``z0`` and ``f(z0)``, with messages that name the problem."""
    check_z0(owner, z0)
    check_f_output(owner, jax.eval_shape(f, z0), z0)


def check_z0(owner: str, z0) -> None:
    """Checks that ``z0`` is a pytree of non-empty floating arrays with one leading batch axis."""
    leaves = jax.tree_util.tree_leaves(z0)
    if not leaves:
        raise ValueError(f"{owner}: z0 has no arrays.")
    for leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(
                f"{owner}: z0 must hold floating-point arrays, got dtype {jnp.result_type(leaf)}; "
                "cast it, e.g. z0.astype(jnp.float32)."
            )
        if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != jnp.shape(leaves[0])[0]:
            raise ValueError(
                f"{owner}: every array in z0 needs the same leading batch axis; got shapes "
                f"{[jnp.shape(x) for x in leaves]}."
            )
        if jnp.size(leaf) == 0:
            raise ValueError(f"{owner}: z0 holds an empty array (shape {jnp.shape(leaf)}): there is nothing to solve; "
                             "an empty batch needs no solve.")
        if jnp.ndim(leaf) == 1:
            raise ValueError(
                f"{owner}: z0 has a leaf of shape {jnp.shape(leaf)}, a batch axis without a feature axis: each "
                "entry would be solved as an independent example (its own stop and scale). If f mixes the "
                "entries (e.g. W @ z), solve them as one system: deq_jax.fixed_point(..., examples='coupled'), "
                "or give z0 a leading axis of 1; if they are independent scalars, reshape z0 to (n, 1)."
            )


def check_f_output(owner: str, got, z0) -> None:
    """Checks that ``got``, ``f(z0)`` or its ``jax.eval_shape``, has ``z0``'s structure, shapes and dtypes."""
    shapes = lambda tree: jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree)
    expected, got = shapes(z0), shapes(got)
    if jax.tree_util.tree_structure(got) != jax.tree_util.tree_structure(expected) or any(
        (a.shape, a.dtype) != (b.shape, b.dtype)
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected))
    ):
        raise ValueError(
            f"{owner}: f(z) must have the structure, shape and dtype of z0; z0 is {expected}, "
            f"f(z0) is {got}. (An f that computes in another dtype, e.g. bfloat16, should cast its "
            "output to z's dtype, as deq_jax.nn.DEQ does, so that the solver state keeps z0's.)"
        )


def budget_per_example(owner: str, budget, batch: int, max_iter: int) -> jax.Array:
    """The f-evaluation cap of each example, int32[B] in ``[1, max_iter]``.

    A concrete budget is checked here (an integer >= 1, a scalar or one per example); a
    traced one cannot be, and is clipped to ``[1, max_iter]`` instead. A budget above
    ``max_iter`` is clamped to it: ``max_iter`` is the compile-time ceiling.

    Args:
      owner: the function, for messages.
      budget: None (``max_iter``), an int, or an integer array of shape ``()`` or ``[B]``.
      batch: ``B``.
      max_iter: the solver's ceiling.
    """
    if budget is None:
        return jnp.full(batch, max_iter, jnp.int32)
    if isinstance(budget, bool) or not jnp.issubdtype(jnp.result_type(budget), jnp.integer):
        raise TypeError(f"{owner}: budget must be an integer (or integer array), got {budget!r}.")
    if jnp.shape(budget) not in ((), (batch,)):
        raise ValueError(f"{owner}: budget must be a scalar or have shape ({batch},), got shape {jnp.shape(budget)}.")
    if not isinstance(budget, jax.core.Tracer) and int(np.min(budget)) < 1:
        raise ValueError(f"{owner}: budget must be >= 1 f evaluation, got {budget!r}.")
    return jnp.broadcast_to(jnp.clip(jnp.asarray(budget, jnp.int32), 1, max_iter), (batch,))


def iterate(solver: Solver, f: Callable, z0, budget=None, *, differentiable: bool = False,
            checkpoint_every: int | None = None, with_history: bool = False):
    """Runs ``solver``'s ``init``/``propose``/``record`` under ``lax.while_loop``, per example.

    Args:
      solver: the ``Solver`` (its ``tol``, ``max_iter`` and update rule).
      f: batched map from a pytree like ``z0`` to the same.
      z0: initial estimate; a pytree of floating arrays with a leading batch axis.
      budget: optional cap on each example's f evaluations, counted as ``max_iter``
        counts them (``f(z0)`` is the first): an int, or an integer array of shape
        ``()`` or ``[B]``, and it may be traced, so changing it does not recompile.
        ``max_iter`` stays the compile-time ceiling; a larger budget is clamped to it.
      differentiable: run the iterations as a ``lax.scan`` of ``max_iter - 1`` guarded
        steps (a step once every example has stopped changes nothing and evaluates no f),
        which reverse mode can differentiate, instead of a ``lax.while_loop``.
      checkpoint_every: with ``differentiable``, rematerialise the iterations in segments
        of this many steps (``jax.checkpoint``): reverse mode then stores one state per
        segment and one segment's iterations, not every iteration.
      with_history: also return the solver's final ``history`` (each example's as it
        stopped), e.g. Broyden's inverse-Jacobian factors for ``deq_jax.GDEQ``.

    Returns:
      The ``Solution`` (and, with ``with_history``, ``(solution, history)``); ``value``
      is ``f(z)`` at each example's lowest-residual iterate ``z``.
    """
    owner, tol, max_iter = type(solver).__name__, solver.tol, solver.max_iter
    f_in_cond = backend_choices().f_in_cond
    check_z0(owner, z0)
    fz0 = f(z0)  # checked as it is computed: no extra trace of f
    check_f_output(owner, fz0, z0)
    x0, unravel = batch_ravel(z0)

    def f_flat(x):
        return batch_ravel(f(unravel(x)))[0]

    fx0 = batch_ravel(fz0)[0]
    residual0 = relative_residual(x0, fx0)
    batch = x0.shape[0]
    limit = budget_per_example(owner, budget, batch, max_iter)
    running = jnp.isfinite(residual0) & (residual0 >= tol) & (limit > 1)
    trace = jnp.full((max_iter, batch), jnp.nan, x0.dtype).at[0].set(residual0)
    state = _LoopState(
        k=jnp.asarray(1, jnp.int32),
        history=solver.record(solver.init(*x0.shape, x0.dtype), jnp.asarray(0, jnp.int32), x0, fx0,
                              jnp.ones(batch, bool)),
        active=running,
        num_steps=jnp.ones(batch, jnp.int32),
        best_fx=fx0,
        best_residual=residual0,
        diverged=jnp.isinf(residual0),
        trace=trace,
    )

    def cond(s: _LoopState):
        return (s.k < max_iter) & jnp.any(s.active)

    def body(s: _LoopState) -> _LoopState:
        x = solver.propose(s.history, s.k)
        # With f_in_cond, f runs as a branch of a conditional (always taken: the loop only
        # runs while some example is active) so that its output is written once (see
        # BackendChoices.f_in_cond).
        fx = lax.cond(jnp.any(s.active), f_flat, lambda x: x, x) if f_in_cond else f_flat(x)
        residual = relative_residual(x, fx)
        improved = s.active & (residual < s.best_residual)
        return _LoopState(
            k=s.k + 1,
            history=solver.record(s.history, s.k, x, fx, s.active),
            active=s.active & (residual >= tol) & jnp.isfinite(residual) & (s.num_steps + 1 < limit),
            num_steps=s.num_steps + s.active,
            best_fx=select_rows(improved, fx, lambda: s.best_fx),
            best_residual=jnp.where(improved, residual, s.best_residual),
            diverged=s.diverged | (s.active & jnp.isinf(residual)),
            trace=s.trace.at[s.k].set(jnp.where(s.active, residual, jnp.nan)),
        )

    if differentiable:
        final = _guarded_scan(cond, body, state, max_iter - 1, checkpoint_every)
    else:
        final = lax.while_loop(cond, body, state)
    solution = Solution(
        value=unravel(final.best_fx),
        num_steps=final.num_steps,
        residual=final.best_residual,
        trace=final.trace,
        converged=final.best_residual < tol,
        diverged=final.diverged,
    )
    return (solution, final.history) if with_history else solution


def _guarded_scan(cond: Callable, body: Callable, state, steps: int, checkpoint_every: int | None):
    """``lax.while_loop(cond, body, state)`` for at most ``steps`` steps, as a reverse-differentiable scan."""
    def step(s, _):
        return lax.cond(cond(s), body, lambda s: s, s), None

    if checkpoint_every is None:
        return lax.scan(step, state, length=steps)[0]

    @jax.checkpoint
    def segment(s, _):
        return lax.scan(step, s, length=checkpoint_every)[0], None

    return lax.scan(segment, state, length=-(-steps // checkpoint_every))[0]
