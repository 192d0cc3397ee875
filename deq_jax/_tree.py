"""Pytree helpers: flattening a batched pytree to one ``[batch, features]`` matrix and back, the damped step."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def batch_ravel(tree) -> tuple[jax.Array, Callable[[jax.Array], object]]:
    """Flattens every leaf of ``tree`` to ``[B, -1]`` and concatenates them.

    Args:
      tree: a pytree of arrays that all share the leading batch dimension ``B``.

    Returns:
      ``(flat, unravel)``: ``flat`` is ``[B, D]`` in the leaves' common dtype, and
      ``unravel(flat)`` rebuilds a tree with the original shapes and dtypes.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    batch = leaves[0].shape[0]
    dtype = jnp.result_type(*leaves)
    shapes = [leaf.shape for leaf in leaves]
    dtypes = [leaf.dtype for leaf in leaves]
    splits = np.cumsum([int(np.prod(s[1:])) for s in shapes])[:-1]
    flat = jnp.concatenate([leaf.reshape(batch, -1).astype(dtype) for leaf in leaves], axis=1)

    def unravel(matrix):
        parts = jnp.split(matrix, splits, axis=1)
        return jax.tree_util.tree_unflatten(
            treedef, [p.reshape(s).astype(d) for p, s, d in zip(parts, shapes, dtypes)]
        )

    return flat, unravel


def damped_step(fz, z, damping: float):
    """``damping * fz + (1 - damping) * z`` leaf by leaf; ``fz`` itself (no arithmetic) when ``damping`` is 1.

    The relaxed step of ``deq_jax.ForwardIteration`` and of ``deq_jax.Phantom``.
    """
    if damping == 1:
        return fz
    return jax.tree_util.tree_map(lambda a, b: damping * a + (1 - damping) * b, fz, z)


def add_system_axis(tree):
    """Every leaf with a new leading axis of size 1: a coupled batch (or an unbatched state) as one example."""
    return jax.tree_util.tree_map(lambda leaf: jnp.expand_dims(leaf, 0), tree)


def drop_system_axis(tree):
    """Inverse of ``add_system_axis``."""
    return jax.tree_util.tree_map(lambda leaf: leaf[0], tree)


def as_one_example(f: Callable) -> Callable:
    """``f(z, args)`` on states carrying ``add_system_axis``'s leading axis: all of ``z`` is one example."""
    return lambda z, args: add_system_axis(f(drop_system_axis(z), args))
