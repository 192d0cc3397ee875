"""Training aids on the Jacobian ``J = d f(z, args) / dz``: a penalty and a spectral radius, VJPs only.

Both are per example: ``f`` is batched over the leading axis of ``z``, and example ``b``'s
number depends only on example ``b``'s slice of ``z`` and of the random vectors. Random
vectors are drawn in ``z``'s structure: for an array ``z`` with ``jax.random.normal(key,
prefix + z.shape, z.dtype)``; for a pytree with several leaves, leaf ``i`` uses
``jax.random.split(key, n_leaves)[i]`` (a one-leaf pytree uses ``key`` itself).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._backend import backend_choices
from ._checks import check_int
from ._solvers._loop import check_problem
from ._tree import batch_ravel


def _check(owner: str, f: Callable, z, args, key, **ints) -> None:
    """Trace-time checks: positive ints, a PRNG key, a floating ``z`` and an ``f`` that maps it to its own kind."""
    check_int(owner, **ints)
    dtype = getattr(key, "dtype", None)
    typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    legacy_shape = jax.eval_shape(jax.random.PRNGKey, 0).shape
    if not (typed and np.shape(key) == ()) and not (dtype == np.uint32 and np.shape(key) == legacy_shape):
        raise TypeError(f"{owner}: key must be one JAX PRNG key (jax.random.key(0), or a legacy "
                        f"uint32{list(legacy_shape)} from jax.random.PRNGKey(0)); got {type(key).__name__} "
                        f"with dtype {dtype} and shape {np.shape(key)}.")
    check_problem(owner, lambda z: f(z, args), z)


def _normal_like(key, z, prefix: tuple = ()):
    """N(0, 1) vectors in ``z``'s structure with extra leading axes ``prefix`` (see the module docstring)."""
    leaves, treedef = jax.tree_util.tree_flatten(z)
    keys = [key] if len(leaves) == 1 else list(jax.random.split(key, len(leaves)))
    return treedef.unflatten([jax.random.normal(k, prefix + jnp.shape(x), jnp.result_type(x))
                              for k, x in zip(keys, leaves)])


def _penalty_from_vectors(f: Callable, z, args, vectors) -> jax.Array:
    """``sum_i ||v_i^T J||^2 / (K D)`` per example for ``vectors`` shaped like ``z`` with a leading ``[K]``."""
    _, pullback = jax.vjp(lambda z: f(z, args), z)
    count = jax.tree_util.tree_leaves(vectors)[0].shape[0]

    def squares_of(vector):
        products = jax.tree_util.tree_leaves(pullback(vector)[0])
        return sum(jnp.sum(jnp.square(p).reshape(p.shape[0], -1), axis=1) for p in products)

    if backend_choices().unrolled_hutchinson:  # see BackendChoices
        squares = sum(squares_of(jax.tree_util.tree_map(lambda v: v[i], vectors)) for i in range(count))
    else:
        squares = jnp.sum(jax.vmap(squares_of)(vectors), axis=0)
    features = sum(int(np.prod(jnp.shape(p)[1:])) for p in jax.tree_util.tree_leaves(z))
    return squares / (count * features)


def jacobian_penalty(f: Callable, z, args, key, num_vectors: int = 1) -> jax.Array:
    """Hutchinson's estimate of ``||J_f(z)||_F^2 / D`` per example, differentiable w.r.t. ``args`` and ``z``.

    With ``v_1..v_K`` ~ N(0, I) drawn as ``jax.random.normal(key, (K,) + z.shape, z.dtype)``
    (pytrees: see the module docstring), returns ``sum_i ||v_i^T J||^2 / (K D)`` per
    example, ``D`` the number of scalars in one example of ``z``. Unbiased: each term has
    mean ``||J||_F^2 / D``. The Jacobian regulariser of Bai et al. (2021); its batch mean
    is torchdeq's ``jac_reg`` (batch total over ``K * z.size``).

    Cost: one linearisation of ``f`` (an f evaluation) and ``K`` VJPs, unrolled (keep
    ``K`` small; for many vectors ``jax.vmap`` over keys). Its gradient differentiates
    those VJPs once more (second order, reverse mode), so ``f`` must be twice
    reverse-differentiable (``loop_friendly_conv``'s and ``GroupNorm``'s rules are). On
    XLA:CPU, for ``ResNetCell(48, 64)`` at batch 100, the penalty costs 2.1 f evaluations
    and its gradient 8.6
    (``python -m experiments.benchmarks.jacobian_cost``).

    Args:
      f: ``f(z, args) -> z``, batched over the leading axis of ``z``.
      z: a floating array, or pytree of arrays sharing a leading batch axis, e.g. ``z*``.
      args: a pytree of arrays ``f`` depends on (parameters, injection).
      key: a JAX PRNG key (``jax.random.key`` or legacy ``jax.random.PRNGKey``).
      num_vectors: ``K``, random vectors per example.

    Returns:
      ``[B]`` in ``z``'s dtype.

    Examples:
      >>> import jax, jax.numpy as jnp, deq_jax as dj
      >>> f = lambda z, w: jnp.tanh(z @ w)
      >>> dj.jacobian_penalty(f, jnp.zeros((2, 3)), 0.5 * jnp.eye(3), jax.random.key(0), num_vectors=4).shape
      (2,)
    """
    _check("jacobian_penalty", f, z, args, key, num_vectors=num_vectors)
    return _penalty_from_vectors(f, z, args, _normal_like(key, z, (num_vectors,)))


def _power_iteration(f: Callable, z, args, v0, num_iters: int) -> jax.Array:
    """``|Rayleigh quotient|`` per example after ``num_iters`` steps ``v <- v^T J / ||v^T J||`` from ``v0``."""
    x, unravel = batch_ravel(z)
    _, pullback = jax.vjp(lambda x: batch_ravel(f(unravel(x), args))[0], x)

    def step(_, carry):
        v, _, bad = carry
        w = pullback(v)[0]
        vv = jnp.sum(v * v, axis=1)
        lam = jnp.sum(w * v, axis=1) / jnp.where(vv > 0, vv, 1)
        norm = jnp.linalg.norm(w, axis=1)
        ok = (norm > 0) & jnp.isfinite(norm)
        # A vanished or non-finite product stops its example (v = 0 from then on) and
        # never reaches the others: the next VJP sees a finite vector.
        v = jnp.where(ok[:, None], w / jnp.where(ok, norm, 1)[:, None], 0)
        return v, lam, bad | ~jnp.isfinite(lam)

    v = batch_ravel(v0)[0]
    init = (v, jnp.zeros(v.shape[:1], v.dtype), jnp.zeros(v.shape[:1], bool))
    _, lam, bad = lax.fori_loop(0, num_iters, step, init)
    return jnp.where(bad, jnp.nan, jnp.abs(lam))


def spectral_radius(f: Callable, z, args, key, num_iters: int = 100) -> jax.Array:
    """The spectral radius of ``J_f(z)`` per example, by power iteration on ``J^T`` with VJPs.

    From ``v = jax.random.normal(key, z.shape, z.dtype)``, repeats ``num_iters`` times:
    ``w = v^T J``, ``lam = <w, v> / <v, v>``, ``v = w / ||w||`` (per example), and returns
    ``|lam|`` of the last step -- torchdeq's ``power_method``. Use it to monitor a DEQ
    (a contraction has radius < 1), not as a loss: no gradient flows through it.

    Trustworthy only when the dominant eigenvalue is real and well separated: the error
    shrinks like ``|lam2 / lam1|`` per step. For a complex-conjugate dominant pair, or
    near ties, the Rayleigh quotient oscillates and can read below the true radius;
    compare two values of ``num_iters`` before relying on it. An example whose ``w``
    vanishes reads 0; one whose ``w`` is not finite reads NaN; the others are unaffected.

    Cost: one linearisation of ``f`` and ``num_iters`` VJPs, under ``lax.fori_loop`` (on
    XLA:CPU, ``ResNetCell(48, 64)`` at batch 100: 0.8 f evaluation per iteration).

    Args:
      f: ``f(z, args) -> z``, batched over the leading axis of ``z``.
      z: a floating array, or pytree of arrays sharing a leading batch axis.
      args: a pytree of arrays ``f`` depends on.
      key: a JAX PRNG key (``jax.random.key`` or legacy ``jax.random.PRNGKey``).
      num_iters: power iterations (VJPs).

    Returns:
      ``[B]``, the estimated ``max |eigenvalue|`` of each example's Jacobian.

    Examples:
      >>> import jax, jax.numpy as jnp, deq_jax as dj
      >>> f = lambda z, w: jnp.tanh(z @ w)
      >>> r = dj.spectral_radius(f, jnp.zeros((2, 3)), jnp.diag(jnp.array([0.9, 0.5, 0.1])), jax.random.key(0))
      >>> [round(float(v), 4) for v in r]
      [0.9, 0.9]
    """
    _check("spectral_radius", f, z, args, key, num_iters=num_iters)
    z, args = lax.stop_gradient((z, args))
    return _power_iteration(f, z, args, _normal_like(key, z), num_iters)
