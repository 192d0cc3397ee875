"""The CIFAR-10 models: the chapter's DEQ (conv stem, BatchNorm, DEQ(ResNetCell), BatchNorm, pool, linear)
and the multiscale DEQ of the official CIFAR-10 configurations (stem, DEQ(MDEQCell), classifier head)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

import deq_jax as dj

# PyTorch's BatchNorm2d defaults: eps 1e-5 and momentum 0.1, i.e. Flax's momentum 0.9
# (Flax keeps 0.9 of the old running statistics, PyTorch mixes in 0.1 of the new).
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9


def torch_default_init(fan_in: int):
    """PyTorch's default Conv2d/Linear initialisation, so training starts as the chapter's.

    Weights are ``kaiming_uniform_(a=sqrt(5))``, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    a third of the variance of Flax's default lecun_normal; biases have the same bound
    (Flax's default is zero).

    Args:
      fan_in: inputs per output unit (``in_channels * kernel_h * kernel_w`` for a conv).

    Returns:
      ``(kernel_init, bias_init)`` for ``nnx.Conv`` / ``nnx.Linear``.
    """
    bound = 1.0 / math.sqrt(fan_in)

    def uniform(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return uniform, uniform


def set_mode(module: nnx.Module, train: bool) -> None:
    """Puts ``module``'s layers that keep their mode as an attribute (dropout, BatchNorm, spectral norm) in
    training mode or evaluation mode."""
    if train:
        module.train()
    else:
        module.eval()


class CifarDEQ(nnx.Module):
    """conv 3->48 -> BN -> DEQ(ResNetCell(48, 64)) -> BN -> AvgPool 8x8 -> Linear 768->10.

    The chapter's model (64,842 trainable parameters) on NHWC images. Flattening the
    pooled ``[B, 4, 4, 48]`` map is in HWC order, not PyTorch's CHW; the linear layer
    learns either order equally well.

    With ``dtype=jnp.bfloat16`` every layer computes in bfloat16 -- the stem
    convolution and its BatchNorm (so the injection ``x`` is bfloat16), the cell, the
    output BatchNorm, pooling and the linear head -- while parameters and BatchNorm
    statistics stay float32 (BatchNorm also computes its statistics in float32). The
    DEQ's solver state, fixed point and backward solve stay float32 (see
    :class:`deq_jax.nn.DEQ`), and the logits are returned in float32, so the loss is
    computed in float32.

    Args:
      solver: the DEQ's forward solver.
      gradient: its gradient strategy, ``dj.Implicit(backward_solver)`` or ``dj.Phantom(...)``.
      rngs: ``nnx.Rngs`` for the initial weights.
      norm: the cell's kernel normalisation, one of ``dj.nn.NORMS``.
      channels: channels of the equilibrium state.
      inner_channels: channels inside the cell.
      num_classes: outputs of the classifier.
      dtype: computation dtype of every layer, e.g. ``jnp.bfloat16``; None computes in
        the parameters' float32.

    Example:
      >>> model = CifarDEQ(solver=dj.Anderson(max_iter=4), gradient=dj.Implicit(), rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((2, 32, 32, 3)), train=False).shape
      (2, 10)
    """

    def __init__(self, *, solver, gradient, rngs: nnx.Rngs, norm="none", channels=48, inner_channels=64,
                 num_classes=10, dtype=None):
        kernel_init, bias_init = torch_default_init(3 * 3 * 3)
        self.stem = nnx.Conv(
            3, channels, (3, 3), padding=[(1, 1), (1, 1)], use_bias=True,
            kernel_init=kernel_init, bias_init=bias_init, dtype=dtype, rngs=rngs,
        )
        self.norm_in = nnx.BatchNorm(channels, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype, rngs=rngs)
        self.deq = dj.nn.DEQ(
            dj.nn.ResNetCell(channels, inner_channels, kernel_size=3, norm=norm, dtype=dtype, rngs=rngs),
            solver=solver, gradient=gradient,
        )
        self.norm_out = nnx.BatchNorm(channels, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype, rngs=rngs)
        kernel_init, bias_init = torch_default_init(channels * 4 * 4)
        self.head = nnx.Linear(channels * 4 * 4, num_classes, kernel_init=kernel_init, bias_init=bias_init,
                               dtype=dtype, rngs=rngs)

    def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
        """Classifies a batch.

        Args:
          images: float [B, 32, 32, 3].
          train: BatchNorm uses (and updates) batch statistics if True, running ones if False.

        Returns:
          logits [B, num_classes], float32 whatever ``dtype`` is.
        """
        return self.classify(self.deq(self.inject(images, train=train)), train=train)

    def inject(self, images: jax.Array, *, train: bool) -> jax.Array:
        """The DEQ's input ``x``: stem convolution and BatchNorm, [B, 32, 32, channels].

        Also puts the cell in ``train`` mode or not (a spectral norm's power iteration runs in training only).
        """
        set_mode(self.deq, train)
        return self.norm_in(self.stem(images), use_running_average=not train)

    def classify(self, z: jax.Array, *, train: bool) -> jax.Array:
        """Logits from the equilibrium state ``z``: BatchNorm, 8x8 average pool, linear; float32 logits."""
        z = nnx.avg_pool(self.norm_out(z, use_running_average=not train), (8, 8), strides=(8, 8))
        # At least float32, so that softmax and the loss never run in bfloat16.
        logits = self.head(z.reshape(z.shape[0], -1))
        return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


# The official CIFAR-10 configurations (locuslab/deq, MDEQ-Vision/experiments/cifar/cls_mdeq_{TINY,LARGE}.yaml).
# Both also set NUM_GROUPS 8, EXPANSION_FACTOR 5, WNORM true, POST_GN_AFFINE false, DOWNSAMPLE_TIMES 0,
# one 3x3 BASIC block per branch (MDEQ_SHARED). The official MDEQNet has a stage0 unless
# DOWNSAMPLE_TIMES is 0 with at most 2 branches: TINY has none, LARGE one.
MDEQ_PRESETS = {
    "mdeq-tiny": dict(channels=(24, 24), head_channels=(8, 16), final_channels=200, dropout=0.25, stage0=False),
    "mdeq-large": dict(channels=(32, 64, 128, 256), head_channels=(14, 28, 56, 112), final_channels=1680,
                       dropout=0.3, stage0=True),
}
MDEQ_SHARED = dict(num_groups=8, expansion=5, norm="weight", post_affine=False)


class CifarMDEQ(nnx.Module):
    """The official CIFAR-10 MDEQ: ``MDEQStem`` -> DEQ(``MDEQCell``) -> ``MDEQClassifierHead``.

    The same interface as :class:`CifarDEQ` (``inject``, ``deq``, ``classify``), so the
    experiment's steps run either. The equilibrium state is the cell's tuple of
    per-resolution states; dropout (one variational mask per example and pass, see
    :class:`deq_jax.nn.VariationalDropout`) and the BatchNorms follow ``train``.
    Parameter counts equal the official ``MDEQClsNet``'s: 158,890 (``mdeq-tiny``) and
    11,097,438 (``mdeq-large``), weight norm's g and v both counted (tests/test_mdeq.py).

    Args:
      preset: a key of :data:`MDEQ_PRESETS`.
      solver: the DEQ's forward solver.
      gradient: its gradient strategy.
      rngs: ``nnx.Rngs`` for the weights and the dropout masks (its ``dropout`` stream, else ``default``).
      dropout: the cell's dropout rate; None: the preset's.
      norm: the cell's kernel normalisation, one of ``dj.nn.NORMS`` (the official configurations: ``"weight"``).
      num_classes: outputs of the classifier.
      dtype: computation dtype of every layer, e.g. ``jnp.bfloat16``; None: float32.

    Example:
      >>> model = CifarMDEQ("mdeq-tiny", solver=dj.Broyden(max_iter=4), gradient=dj.Implicit(), rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((2, 32, 32, 3)), train=False).shape
      (2, 10)
    """

    def __init__(self, preset: str, *, solver, gradient, rngs: nnx.Rngs, dropout: float | None = None,
                 norm: str = "weight", num_classes: int = 10, dtype=None):
        if preset not in MDEQ_PRESETS:
            raise ValueError(f"CifarMDEQ: preset must be one of {tuple(MDEQ_PRESETS)}, got {preset!r}.")
        spec = MDEQ_PRESETS[preset]
        channels = spec["channels"]
        options = {**MDEQ_SHARED, "norm": norm}
        self.stem = dj.nn.MDEQStem(channels[0], stage0=spec["stage0"], dtype=dtype, rngs=rngs)
        cell = dj.nn.MDEQCell(channels, dropout=spec["dropout"] if dropout is None else dropout, dtype=dtype,
                              rngs=rngs, **options)
        self.deq = dj.nn.DEQ(cell, solver=solver, gradient=gradient)
        self.head = dj.nn.MDEQClassifierHead(channels, spec["head_channels"], spec["final_channels"], num_classes,
                                             dtype=dtype, rngs=rngs)

    def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
        """Logits ``[B, num_classes]`` (float32) of images ``[B, 32, 32, 3]``; see :meth:`CifarDEQ.__call__`."""
        return self.classify(self.deq(self.inject(images, train=train)), train=train)

    def inject(self, images: jax.Array, *, train: bool) -> jax.Array:
        """The DEQ's input ``x``, ``[B, 32, 32, channels[0]]``."""
        set_mode(self, train)
        return self.stem(images)

    def classify(self, z, *, train: bool) -> jax.Array:
        """Float32 logits from the equilibrium tuple ``z``."""
        set_mode(self, train)
        logits = self.head(z)
        return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def param_count(params) -> int:
    """Number of trainable scalars in a ``nnx.State`` of parameters."""
    return sum(x.size for x in jax.tree.leaves(params))
