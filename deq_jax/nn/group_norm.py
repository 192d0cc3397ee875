"""Channels-last GroupNorm with per-channel reductions and a closed-form derivative."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def _normalize(x: jax.Array, num_groups: int, epsilon: float):
    """``(x_hat, inv_std, group_mean)`` of GroupNorm, per example and group.

    ``x_hat = (x - mean) * inv_std`` with ``inv_std = 1/sqrt(var + eps)`` broadcast per
    channel as ``[B, 1.., C]``; ``group_mean(v)`` is the same per-group mean for any
    ``v`` shaped like ``x`` (the derivative reuses it). Sums run over the spatial axes
    first, with channels minor (vectorised), then over the few channels of a group;
    the variance is the exact two-pass one.
    """
    batch, channels = x.shape[0], x.shape[-1]
    spatial = tuple(range(1, x.ndim - 1))
    count = x[0].size // num_groups

    def group_mean(v):
        grouped = jnp.sum(v, axis=spatial).reshape(batch, num_groups, channels // num_groups)
        mean = jnp.broadcast_to(jnp.sum(grouped, axis=2, keepdims=True) / count, grouped.shape)
        return mean.reshape((batch,) + (1,) * len(spatial) + (channels,))

    centred = x - group_mean(x)
    inv_std = jax.lax.rsqrt(group_mean(jnp.square(centred)) + epsilon)
    return centred * inv_std, inv_std, group_mean


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int, epsilon: float) -> jax.Array:
    """GroupNorm of a channels-last batch: ``(x - mean) / sqrt(var + eps) * scale + bias``.

    Statistics are per example and per group of ``C // num_groups`` consecutive
    channels, over every non-batch axis, with the exact (two-pass) variance, as
    PyTorch's ``GroupNorm`` and ``nnx.GroupNorm(use_fast_variance=False)`` compute
    them. Same values as ``nnx.GroupNorm``, but the reductions run over the spatial
    axes with channels minor, and the derivative is the closed form (a
    ``jax.custom_jvp``, so forward and reverse mode both work): on XLA:CPU (jax
    0.10.2, 2 cores, ``[100, 32, 32, 64]``, 8 groups, in a loop) 5.1 ms instead of
    11.7 ms forward and 9.7 instead of 14.2 ms for the VJP w.r.t. ``x``
    (``python -m experiments.benchmarks.ops``).

    Args:
      x: ``[B, ..., C]``; computed in at least float32.
      scale, bias: ``[C]``.
      num_groups: number of groups; must divide ``C``.
      epsilon: added to the variance.

    Returns:
      An array of ``x``'s shape and dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> y = group_norm(jnp.arange(8.0).reshape(1, 2, 4), jnp.ones(4), jnp.zeros(4), 2, 1e-5)
      >>> [round(float(v), 3) for v in y[0, 0]]
      [-1.213, -0.728, -1.213, -0.728]
    """
    return _forward(x, scale, bias, num_groups, epsilon)[0]


def _forward(x, scale, bias, num_groups, epsilon):
    """The output, plus ``x_hat``, ``inv_std`` and the group-mean map the derivative reuses."""
    compute = jnp.promote_types(x.dtype, jnp.float32)
    x_hat, inv_std, group_mean = _normalize(x.astype(compute), num_groups, epsilon)
    out = (x_hat * scale.astype(compute) + bias.astype(compute)).astype(x.dtype)
    return out, x_hat, inv_std, group_mean


@group_norm.defjvp
def _group_norm_jvp(num_groups, epsilon, primals, tangents):
    x, scale, bias = primals
    out, x_hat, inv_std, group_mean = _forward(x, scale, bias, num_groups, epsilon)
    dx, d_scale, d_bias = (t.astype(x_hat.dtype) for t in tangents)
    # d x_hat: dx without its group mean and without its group component along x_hat.
    d_hat = inv_std * (dx - group_mean(dx) - x_hat * group_mean(dx * x_hat))
    d_out = d_hat * scale.astype(x_hat.dtype) + x_hat * d_scale + d_bias
    return out, d_out.astype(x.dtype)


class GroupNorm(nnx.Module):
    """``nnx.GroupNorm`` for channels-last inputs, computed by ``group_norm``.

    Same parameters (``scale`` ones, ``bias`` zeros, both ``[C]``) and values as
    ``nnx.GroupNorm(num_features, num_groups, epsilon, use_fast_variance=False)``.

    Args:
      num_features: channels ``C`` (the last axis).
      num_groups: groups; must divide ``num_features``.
      epsilon: added to the variance (PyTorch's default 1e-5).
      dtype: output dtype; None keeps the input's. Statistics use at least float32.
      param_dtype: dtype of ``scale`` and ``bias``.

    Examples:
      >>> import jax.numpy as jnp
      >>> GroupNorm(4, num_groups=2)(jnp.ones((3, 5, 4))).shape
      (3, 5, 4)
    """

    def __init__(self, num_features: int, num_groups: int, epsilon: float = 1e-5, *, dtype=None,
                 param_dtype=jnp.float32):
        if num_features % num_groups:
            raise ValueError(f"GroupNorm: num_groups={num_groups} must divide num_features={num_features}.")
        self.num_features, self.num_groups, self.epsilon, self.dtype = num_features, num_groups, epsilon, dtype
        self.scale = nnx.Param(jnp.ones(num_features, param_dtype))
        self.bias = nnx.Param(jnp.zeros(num_features, param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalizes ``x`` of shape ``[B, ..., num_features]``."""
        if x.ndim < 2 or x.shape[-1] != self.num_features:
            raise ValueError(f"GroupNorm: expected [batch, ..., {self.num_features}], got shape {x.shape}.")
        if self.dtype is not None:
            x = x.astype(self.dtype)
        return group_norm(x, self.scale[...], self.bias[...], self.num_groups, self.epsilon)
