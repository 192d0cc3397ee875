"""The chapter's residual cell ``f(z, x)``."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .conv import default_conv
from .conv import loop_friendly_conv as loop_friendly_conv  # importable from here, where it used to live
from .group_norm import GroupNorm
from .spectral_norm import apply_norm

TORCH_GROUPNORM_EPS = 1e-5  # PyTorch's default, so numbers match the chapter's code


class ResNetCell(nnx.Module):
    """``f(z, x) = norm3(relu(z + norm2(x + conv2(norm1(relu(conv1(z)))))))``.

    The chapter's ``ResNetLayer`` on NHWC arrays: two bias-free convolutions with
    weights drawn from N(0, 0.01) (standard deviation 0.01, as the chapter's
    ``normal_(0, 0.01)``), "same" padding ``kernel_size // 2``, and three GroupNorms
    with PyTorch's epsilon 1e-5 (``deq_jax.nn.GroupNorm``: ``nnx.GroupNorm``'s
    values, faster reductions and VJP).

    Args:
      n_channels: channels of ``z`` and ``x``.
      n_inner_channels: channels between the two convolutions.
      kernel_size: convolution size (odd sizes keep the spatial shape).
      num_groups: GroupNorm groups; must divide both channel counts.
      dtype: computation dtype, e.g. ``jnp.bfloat16`` for mixed precision: ``z`` and
        ``x`` are cast to it on entry, the convolutions run in it (kernels cast from
        ``param_dtype``) and so does every GroupNorm's input and output (its
        statistics use at least float32); the output is in ``dtype``. None follows
        the inputs. ``deq_jax.nn.DEQ`` casts the output back to its float32 state.
      param_dtype: dtype of the parameters; gradients arrive in it.
      conv_general_dilated: the convolution both convs call (``nnx.Conv``'s argument).
        None (the default) takes ``deq_jax.nn.default_conv`` for
        ``jax.default_backend()`` when the cell is built: ``loop_friendly_conv`` on
        CPU, which keeps the backward solve's VJPs fast but has no forward-mode
        derivative; ``jax.lax.conv_general_dilated`` has one.
      norm: the kernel normalisation of both convolutions, one of ``deq_jax.nn.NORMS``.
        ``"weight"``, as torchdeq does by default: each conv becomes a
        ``deq_jax.nn.WeightNorm`` (kernel ``w = g * v / ||v||`` per output channel;
        parameters ``convN.layer.kernel`` = ``v``, ``convN.scale`` = ``g``), with ``g =
        ||v||`` at initialisation, so the cell's function is unchanged. ``"spectral"``:
        a ``deq_jax.nn.SpectralNorm`` (each kernel divided by its largest singular
        value, which changes the function: the N(0, 0.01) kernels grow to norm 1).
        ``"none"`` (the default): the chapter's plain convolutions.
      rngs: ``nnx.Rngs`` for the convolution weights (and spectral norm's vectors).

    Examples:
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
        conv_general_dilated=None,
        norm: str = "none",
        rngs: nnx.Rngs,
    ):
        for channels in (n_channels, n_inner_channels):
            if channels % num_groups:
                raise ValueError(f"ResNetCell: num_groups={num_groups} must divide the channel count {channels}.")
        pad = kernel_size // 2
        conv_general_dilated = conv_general_dilated or default_conv()
        self.dtype = dtype

        def conv(cin, cout):
            layer = nnx.Conv(
                cin, cout, (kernel_size, kernel_size), padding=[(pad, pad), (pad, pad)], use_bias=False,
                kernel_init=nnx.initializers.normal(0.01), dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                conv_general_dilated=conv_general_dilated,
            )
            return apply_norm(layer, norm, rngs=rngs)

        def group_norm(channels):
            return GroupNorm(channels, num_groups, TORCH_GROUPNORM_EPS, dtype=dtype, param_dtype=param_dtype)

        self.conv1 = conv(n_channels, n_inner_channels)
        self.conv2 = conv(n_inner_channels, n_channels)
        self.norm1 = group_norm(n_inner_channels)
        self.norm2 = group_norm(n_channels)
        self.norm3 = group_norm(n_channels)

    def __call__(self, z: jax.Array, x: jax.Array) -> jax.Array:
        """Applies the cell to the hidden state ``z`` with injection ``x`` (both NHWC), in ``dtype``."""
        if self.dtype is not None:
            # Otherwise a float32 z would promote the residual sum z + norm2(...) to float32.
            z, x = z.astype(self.dtype), x.astype(self.dtype)
        y = self.norm1(nnx.relu(self.conv1(z)))
        return self.norm3(nnx.relu(z + self.norm2(x + self.conv2(y))))
