"""The chapter's residual cell ``f(z, x)``."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from .group_norm import GroupNorm
from .weight_norm import WeightNorm

TORCH_GROUPNORM_EPS = 1e-5  # PyTorch's default, so numbers match the chapter's code


def _plain_conv(lhs, rhs, padding, dimension_numbers, precision):
    return lax.conv_general_dilated(
        lhs, rhs, (1,) * len(padding), padding, dimension_numbers=dimension_numbers, precision=precision
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(lhs, rhs, padding, dimension_numbers, precision):
    return _plain_conv(lhs, rhs, padding, dimension_numbers, precision)


def _conv_fwd(lhs, rhs, padding, dimension_numbers, precision):
    return _plain_conv(lhs, rhs, padding, dimension_numbers, precision), (lhs, rhs)


def _conv_bwd(padding, dimension_numbers, precision, residuals, cotangent):
    lhs, rhs = residuals
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    kernel_sizes = [rhs.shape[d] for d in rhs_spec[2:]]
    # The input gradient of a stride-1 convolution is the convolution of the cotangent
    # with the kernel flipped in space and with in/out features swapped, here in memory.
    flipped = jnp.swapaxes(jnp.flip(rhs, rhs_spec[2:]), rhs_spec[0], rhs_spec[1])
    transposed_padding = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(kernel_sizes, padding))
    lhs_bar = _plain_conv(
        cotangent, flipped, transposed_padding, lax.ConvDimensionNumbers(out_spec, rhs_spec, lhs_spec), precision
    )
    # The kernel gradient keeps JAX's rule: it is needed once per training step, outside
    # any loop, where it is the fastest form we found; inside the backward solve nothing
    # uses it and XLA drops it. (Inside a loop -- backprop through unrolled cells -- XLA:CPU
    # runs it far slower; nine per-tap matmuls would avoid that but are slower outside.)
    _, rhs_vjp = jax.vjp(lambda r: _plain_conv(lhs, r, padding, dimension_numbers, precision), rhs)
    return lhs_bar, rhs_vjp(cotangent)[0]


_conv.defvjp(_conv_fwd, _conv_bwd)


def loop_friendly_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                       dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """``lax.conv_general_dilated`` (stride 1, explicit padding) whose input gradient stays fast in loops.

    Same values and gradients as ``lax.conv_general_dilated`` (bit for bit: the input
    gradient is the transposed convolution JAX itself builds), but that convolution
    uses a kernel flipped and transposed *in memory* instead of one relabelled ``01oi``.
    Inside a ``lax.while_loop`` -- where a DEQ's backward solve applies it at every
    step -- XLA:CPU (jax 0.10.2) does not rewrite the relabelled form to its fast
    convolution kernels: the input gradient of ``ResNetCell(48, 64)``'s conv2 at batch
    100 takes 1452 ms per application in a loop with ``lax.conv_general_dilated`` and
    44 ms with this function (``python -m experiments.benchmarks.ops``, 2 cores).

    The kernel gradient keeps JAX's rule, which is fast outside loops (once per training
    step) but slow on XLA:CPU inside one: backprop through many unrolled cells, where
    every step needs it, is slow on CPU either way.

    It is a ``jax.custom_vjp``: reverse mode and ``vmap`` work, forward mode
    (``jax.jvp``, ``jax.jacfwd``, optimistix's ``ImplicitAdjoint``) does not; give such
    code a cell built with ``conv_general_dilated=jax.lax.conv_general_dilated``.

    Args:
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, precision: as ``lax.conv_general_dilated``; strides and
        dilations must be 1, padding a sequence of ``(low, high)`` pairs, one group.
      **kwargs: ``out_sharding`` and ``preferred_element_type`` (what ``nnx.Conv``
        passes) must be None.

    Returns:
      The convolution, as ``lax.conv_general_dilated`` returns it.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> conv = nnx.Conv(2, 3, (3, 3), padding=[(1, 1), (1, 1)], conv_general_dilated=loop_friendly_conv,
      ...                 rngs=nnx.Rngs(0))
      >>> conv(jnp.ones((1, 4, 4, 2))).shape
      (1, 4, 4, 3)
    """
    ones = (1,) * (lhs.ndim - 2)
    unsupported = {k: v for k, v in kwargs.items() if v is not None}
    if (tuple(window_strides) != ones or tuple(lhs_dilation or ones) != ones or tuple(rhs_dilation or ones) != ones
            or feature_group_count != 1 or isinstance(padding, str) or unsupported):
        raise NotImplementedError(
            "loop_friendly_conv supports stride 1, no dilation, one feature group and explicit (low, high) padding "
            f"only; got strides {window_strides}, dilations {lhs_dilation}/{rhs_dilation}, groups "
            f"{feature_group_count}, padding {padding!r}, {unsupported}. Use jax.lax.conv_general_dilated."
        )
    dimension_numbers = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _conv(lhs, rhs, padding, dimension_numbers, precision)


class ResNetCell(nnx.Module):
    """``f(z, x) = norm3(relu(z + norm2(x + conv2(norm1(relu(conv1(z)))))))``.

    The chapter's ``ResNetLayer`` on NHWC arrays: two bias-free convolutions with
    weights drawn from N(0, 0.01) (standard deviation 0.01, as the chapter's
    ``normal_(0, 0.01)``), "same" padding ``kernel_size // 2``, and three GroupNorms
    with PyTorch's epsilon 1e-5 (:class:`deq_jax.nn.GroupNorm`: ``nnx.GroupNorm``'s
    values, faster reductions and VJP).

    Args:
      n_channels: channels of ``z`` and ``x``.
      n_inner_channels: channels between the two convolutions.
      kernel_size: convolution size (odd sizes keep the spatial shape).
      num_groups: GroupNorm groups; must divide both channel counts.
      dtype: computation dtype (e.g. ``jnp.bfloat16``); None follows the inputs.
      param_dtype: dtype of the parameters.
      conv_general_dilated: the convolution both convs call (``nnx.Conv``'s argument);
        the default, :func:`loop_friendly_conv`, keeps the backward solve's VJPs fast
        but has no forward-mode derivative; ``jax.lax.conv_general_dilated`` has one.
      weight_norm: weight-normalise both convolutions, as torchdeq does by default:
        each becomes a :class:`deq_jax.nn.WeightNorm` (kernel ``w = g * v / ||v||`` per
        output channel; parameters ``convN.layer.kernel`` = ``v``, ``convN.scale`` =
        ``g``), with ``g = ||v||`` at initialisation, so the cell's function is unchanged.
      rngs: ``nnx.Rngs`` for the convolution weights.

    Example:
      >>> import jax.numpy as jnp, deq_jax as dj
      >>> from flax import nnx
      >>> cell = dj.nn.ResNetCell(8, 16, num_groups=4, rngs=nnx.Rngs(0))
      >>> cell(jnp.zeros((2, 5, 5, 8)), jnp.ones((2, 5, 5, 8))).shape
      (2, 5, 5, 8)
    """

    def __init__(
        self,
        n_channels: int,
        n_inner_channels: int,
        kernel_size: int = 3,
        num_groups: int = 8,
        *,
        dtype=None,
        param_dtype=jnp.float32,
        conv_general_dilated=loop_friendly_conv,
        weight_norm: bool = False,
        rngs: nnx.Rngs,
    ):
        for channels in (n_channels, n_inner_channels):
            if channels % num_groups:
                raise ValueError(f"ResNetCell: num_groups={num_groups} must divide the channel count {channels}.")
        pad = kernel_size // 2

        def conv(cin, cout):
            layer = nnx.Conv(
                cin, cout, (kernel_size, kernel_size), padding=[(pad, pad), (pad, pad)], use_bias=False,
                kernel_init=nnx.initializers.normal(0.01), dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                conv_general_dilated=conv_general_dilated,
            )
            return WeightNorm(layer) if weight_norm else layer

        def norm(channels):
            return GroupNorm(channels, num_groups, TORCH_GROUPNORM_EPS, dtype=dtype, param_dtype=param_dtype)

        self.conv1 = conv(n_channels, n_inner_channels)
        self.conv2 = conv(n_inner_channels, n_channels)
        self.norm1 = norm(n_inner_channels)
        self.norm2 = norm(n_channels)
        self.norm3 = norm(n_channels)

    def __call__(self, z: jax.Array, x: jax.Array) -> jax.Array:
        """Applies the cell to the hidden state ``z`` with injection ``x`` (both NHWC)."""
        y = self.norm1(nnx.relu(self.conv1(z)))
        return self.norm3(nnx.relu(z + self.norm2(x + self.conv2(y))))
