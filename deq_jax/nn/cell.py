"""The chapter's residual cell ``f(z, x)``."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

TORCH_GROUPNORM_EPS = 1e-5  # PyTorch's default, so numbers match the chapter's code


class ResNetCell(nnx.Module):
    """``f(z, x) = norm3(relu(z + norm2(x + conv2(norm1(relu(conv1(z)))))))``.

    The chapter's ``ResNetLayer`` on NHWC arrays: two bias-free convolutions with
    weights drawn from N(0, 0.01) (standard deviation 0.01, as the chapter's
    ``normal_(0, 0.01)``), "same" padding ``kernel_size // 2``, and three GroupNorms
    with PyTorch's epsilon 1e-5.

    Args:
      n_channels: channels of ``z`` and ``x``.
      n_inner_channels: channels between the two convolutions.
      kernel_size: convolution size (odd sizes keep the spatial shape).
      num_groups: GroupNorm groups; must divide both channel counts.
      dtype: computation dtype (e.g. ``jnp.bfloat16``); None follows the inputs.
      param_dtype: dtype of the parameters.
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
        rngs: nnx.Rngs,
    ):
        for channels in (n_channels, n_inner_channels):
            if channels % num_groups:
                raise ValueError(f"ResNetCell: num_groups={num_groups} must divide the channel count {channels}.")
        pad = kernel_size // 2

        def conv(cin, cout):
            return nnx.Conv(
                cin, cout, (kernel_size, kernel_size), padding=[(pad, pad), (pad, pad)], use_bias=False,
                kernel_init=nnx.initializers.normal(0.01), dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            )

        def norm(channels):
            return nnx.GroupNorm(
                channels, num_groups=num_groups, epsilon=TORCH_GROUPNORM_EPS, use_fast_variance=False,
                dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            )

        self.conv1 = conv(n_channels, n_inner_channels)
        self.conv2 = conv(n_inner_channels, n_channels)
        self.norm1 = norm(n_inner_channels)
        self.norm2 = norm(n_channels)
        self.norm3 = norm(n_channels)

    def __call__(self, z: jax.Array, x: jax.Array) -> jax.Array:
        """Applies the cell to the hidden state ``z`` with injection ``x`` (both NHWC)."""
        y = self.norm1(nnx.relu(self.conv1(z)))
        return self.norm3(nnx.relu(z + self.norm2(x + self.conv2(y))))
