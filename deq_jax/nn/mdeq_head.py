"""The stem and the classification head around ``deq_jax.nn.MDEQCell``, as the official ``MDEQClsNet``.

Layer for layer ``MDEQNet.downsample``/``stage0`` (``MDEQ-Vision/lib/models/mdeq_core.py``) and
``MDEQClsNet``'s ``incre_modules``, ``downsamp_modules``, ``final_layer`` and ``classifier``
(``mdeq.py``) of locuslab/deq, on NHWC arrays. BatchNorms are ``TorchBatchNorm``: PyTorch's
``BatchNorm2d`` with its settings (momentum 0.1, i.e. flax's ``momentum=0.9``, epsilon 1e-5,
two-pass variance, the running variance updated with the unbiased batch variance), so a
training step updates the running statistics as the official one does
(``tests/test_mdeq_training.py``).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from .._checks import check_int
from .mdeq import TORCH_DEFAULT_INIT

BOTTLENECK_EXPANSION = 4  # the official Bottleneck.expansion
SMALL_NORMAL = nnx.initializers.normal(0.01)  # the official init_weights, for conv kernels and biases


def _torch_uniform_bias(fan_in: int):
    """PyTorch's default bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = fan_in ** -0.5
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class _Options:
    """The dtypes and rngs every layer of the stem and head shares (not stored in them)."""

    def __init__(self, dtype, param_dtype, rngs):
        self.dtype, self.param_dtype, self.rngs = dtype, param_dtype, rngs

    def conv(self, cin: int, cout: int, kernel: int, *, stride: int = 1, bias: bool = False):
        """A ``kernel x kernel`` conv with padding ``kernel // 2``, weights (and bias) N(0, 0.01)."""
        pad = kernel // 2
        return nnx.Conv(cin, cout, (kernel, kernel), strides=(stride, stride), padding=[(pad, pad), (pad, pad)],
                        use_bias=bias, kernel_init=SMALL_NORMAL, bias_init=SMALL_NORMAL, dtype=self.dtype,
                        param_dtype=self.param_dtype, rngs=self.rngs)

    def batch_norm(self, channels: int, affine: bool = True):
        """PyTorch's ``BatchNorm2d(momentum=0.1, affine=affine)`` (``TorchBatchNorm``); scale 1, bias 0;
        running statistics in ``param_dtype`` promoted to at least float32 (``nnx.BatchNorm`` keeps them in float32)."""
        norm = TorchBatchNorm(channels, momentum=0.9, epsilon=1e-5, use_scale=affine, use_bias=affine,
                             use_fast_variance=False, dtype=self.dtype, param_dtype=self.param_dtype, rngs=self.rngs)
        stats_dtype = jnp.promote_types(self.param_dtype, jnp.float32)
        for stat in (norm.mean, norm.var):
            stat.set_value(stat.get_value().astype(stats_dtype))
        return norm


class TorchBatchNorm(nnx.BatchNorm):
    """``nnx.BatchNorm`` that updates its running variance as PyTorch's ``BatchNorm2d`` does.

    Both normalise a batch by its biased variance; PyTorch mixes the *unbiased* one,
    ``n / (n - 1)`` times it (``n`` values per channel: ``B * H * W``), into the running
    variance, flax the biased one. The difference is small (``n = 128 * 16 * 16`` in
    MDEQ-tiny's head: 3e-5 of the update) but it is the one thing that kept the running
    statistics of a training step from the official code's in float64. Constructor and
    call as ``nnx.BatchNorm``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> norm = TorchBatchNorm(1, momentum=0.0, rngs=nnx.Rngs(0))
      >>> _ = norm(jnp.array([[0.0], [2.0]]), use_running_average=False)
      >>> float(norm.var[...][0])  # the unbiased variance of (0, 2)
      2.0
    """

    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        """Normalises ``x`` (``[..., C]``) as ``nnx.BatchNorm``; in training mode updates the statistics too."""
        previous = self.var[...]
        y = super().__call__(x, use_running_average)
        updated = not (self.use_running_average if use_running_average is None else use_running_average)
        if updated:
            n = x.size // x.shape[-1]
            # super() mixed (1 - momentum) times the biased variance into the old value; rescale that share.
            mixed_in = self.var[...] - self.momentum * previous
            self.var[...] = self.momentum * previous + mixed_in * (n / max(n - 1, 1))
        return y


class _ConvBNReLU(nnx.Module):
    """``relu(batch_norm(conv(x)))``."""

    def __init__(self, cin: int, cout: int, kernel: int, options: _Options, *, stride: int = 1, bias: bool = False):
        self.conv = options.conv(cin, cout, kernel, stride=stride, bias=bias)
        self.norm = options.batch_norm(cout)

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.relu(self.norm(self.conv(x)))


class _Bottleneck(nnx.Module):
    """The official ``Bottleneck`` (stride 1): 1x1, 3x3, 1x1 convs to ``4 * planes`` channels, plus a residual."""

    def __init__(self, cin: int, planes: int, options: _Options):
        cout = BOTTLENECK_EXPANSION * planes
        self.conv1, self.norm1 = options.conv(cin, planes, 1), options.batch_norm(planes, affine=False)
        self.conv2, self.norm2 = options.conv(planes, planes, 3), options.batch_norm(planes, affine=False)
        self.conv3, self.norm3 = options.conv(planes, cout, 1), options.batch_norm(cout, affine=False)
        # A projection of the residual where the channel count changes (always, in the official configs).
        self.project = nnx.data(None) if cin == cout else options.conv(cin, cout, 1)
        self.project_norm = nnx.data(None) if cin == cout else options.batch_norm(cout)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.norm1(self.conv1(x)))
        y = nnx.relu(self.norm2(self.conv2(y)))
        y = self.norm3(self.conv3(y))
        residual = x if self.project is None else self.project_norm(self.project(x))
        return nnx.relu(y + residual)


class MDEQClassifierHead(nnx.Module):
    """The official CIFAR/ImageNet classification head of ``MDEQClsNet``: logits from the equilibrium tuple.

    Branch ``i``'s state goes through a bottleneck block (the official ``Bottleneck``)
    to ``4 * head_channels[i]`` channels (BatchNorms without affine parameters inside
    it; a 1x1 conv and an affine BatchNorm project the residual where the channel count
    changes). From the highest resolution down, the running
    features are downsampled (3x3 stride-2 conv with bias, BatchNorm, ReLU) and added
    to the next branch's; then a 1x1 conv with bias to ``final_channels``, BatchNorm,
    ReLU, global average pooling and a linear layer. Initialisation as the official
    ``get_cls_net``: conv kernels and biases N(0, 0.01), BatchNorm scale 1 and bias 0,
    the linear layer PyTorch's default U(+-1/sqrt(final_channels)). Call ``.eval()`` to
    use the running statistics (``.train()``, the default, uses the batch's).

    CIFAR-10 yamls: TINY ``head_channels=(8, 16)``, ``final_channels=200``; LARGE
    ``(14, 28, 56, 112)``, 1680; the defaults of ``lib/config/models.py`` are (32, 64,
    128, 256), 2048.

    Args:
      channels: the cell's ``c_i`` per branch, highest resolution first.
      head_channels: ``HEAD_CHANNELS``, one per branch.
      final_channels: ``FINAL_CHANSIZE``.
      num_classes: outputs.
      dtype, param_dtype: computation and parameter dtypes (None: the inputs').
      rngs: ``nnx.Rngs`` for the weights.

    Examples:
      >>> import jax.numpy as jnp, deq_jax as dj
      >>> from flax import nnx
      >>> head = dj.nn.MDEQClassifierHead((8, 16), (4, 8), 32, 10, rngs=nnx.Rngs(0))
      >>> head((jnp.ones((2, 8, 8, 8)), jnp.ones((2, 4, 4, 16)))).shape
      (2, 10)
    """

    def __init__(self, channels: Sequence[int], head_channels: Sequence[int], final_channels: int, num_classes: int,
                 *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        channels, head_channels = tuple(channels), tuple(head_channels)
        if len(channels) != len(head_channels) or not channels:
            raise ValueError(f"MDEQClassifierHead: expected one head channel count per branch, got channels "
                             f"{channels} and head_channels {head_channels}.")
        options = _Options(dtype, param_dtype, rngs)
        self.channels = channels
        widths = [BOTTLENECK_EXPANSION * h for h in head_channels]
        self.increase = nnx.List([_Bottleneck(c, h, options) for c, h in zip(channels, head_channels)])
        self.downsample = nnx.List([_ConvBNReLU(a, b, 3, options, stride=2, bias=True)
                                    for a, b in zip(widths[:-1], widths[1:])])
        self.final = _ConvBNReLU(widths[-1], final_channels, 1, options, bias=True)
        self.classifier = nnx.Linear(final_channels, num_classes, kernel_init=TORCH_DEFAULT_INIT,
                                     bias_init=_torch_uniform_bias(final_channels), dtype=dtype,
                                     param_dtype=param_dtype, rngs=rngs)

    def __call__(self, ys: Sequence[jax.Array]) -> jax.Array:
        """Logits ``[B, num_classes]`` for the per-branch states ``ys`` (NHWC, as ``MDEQCell`` gives them)."""
        shapes = [getattr(y, "shape", ()) for y in ys] if isinstance(ys, (tuple, list)) else None
        if shapes is None or [len(s) == 4 and s[-1] for s in shapes] != list(self.channels):
            raise ValueError(f"MDEQClassifierHead: expected a tuple of {len(self.channels)} NHWC arrays with "
                             f"channels {list(self.channels)}, got {type(ys).__name__ if shapes is None else shapes}.")
        features = self.increase[0](ys[0])
        for increase, down, y in zip(self.increase[1:], self.downsample, ys[1:]):
            features = increase(y) + down(features)
        pooled = jnp.mean(self.final(features), axis=(1, 2))
        return self.classifier(pooled)


class MDEQStem(nnx.Module):
    """The official input layers of ``MDEQNet``: ``downsample`` and, when present, ``stage0``.

    Two 3x3 bias-free convs ``in_channels -> channels -> channels`` (stride 2 for the
    first when ``downsample_times >= 1``, for the second when ``>= 2``), then one more
    stride-2 conv per time beyond 2; each conv followed by an affine BatchNorm and ReLU.
    ``stage0`` adds a 1x1 bias-free conv, BatchNorm and ReLU; the official code has it
    unless ``DOWNSAMPLE_TIMES == 0`` and ``NUM_BRANCHES <= 2`` (so the CIFAR TINY yaml
    has none, LARGE one; both have ``DOWNSAMPLE_TIMES: 0``, the ImageNet yamls 2). Its
    output is the cell's injection ``x``. Conv kernels N(0, 0.01), as ``init_weights``.

    Args:
      channels: the cell's ``channels[0]``.
      in_channels: image channels.
      downsample_times: ``DOWNSAMPLE_TIMES``, halvings of the resolution.
      stage0: whether to add ``stage0``.
      dtype, param_dtype: computation and parameter dtypes.
      rngs: ``nnx.Rngs`` for the weights.

    Examples:
      >>> import jax.numpy as jnp, deq_jax as dj
      >>> from flax import nnx
      >>> stem = dj.nn.MDEQStem(8, downsample_times=1, stage0=True, rngs=nnx.Rngs(0))
      >>> stem(jnp.ones((2, 16, 16, 3))).shape
      (2, 8, 8, 8)
    """

    def __init__(self, channels: int, *, in_channels: int = 3, downsample_times: int = 0, stage0: bool = False,
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        check_int("MDEQStem", minimum=0, downsample_times=downsample_times)
        options = _Options(dtype, param_dtype, rngs)
        strides = [2 if downsample_times >= 1 else 1, 2 if downsample_times >= 2 else 1]
        strides += [2] * max(downsample_times - 2, 0)
        self.layers = nnx.List([_ConvBNReLU(in_channels if k == 0 else channels, channels, 3, options, stride=s)
                                for k, s in enumerate(strides)])
        self.stage0 = _ConvBNReLU(channels, channels, 1, options) if stage0 else nnx.data(None)

    def __call__(self, images: jax.Array) -> jax.Array:
        """The injection ``x`` for images ``[B, H, W, in_channels]``: ``[B, H / 2^t, W / 2^t, channels]``."""
        x = images
        for layer in self.layers:
            x = layer(x)
        return x if self.stage0 is None else self.stage0(x)
