"""The multiscale DEQ cell of Bai et al. (2020), "Multiscale Deep Equilibrium Models", on NHWC arrays.

Layer for layer the ``MDEQModule`` (one module, ``BASIC`` blocks) of the official code
(locuslab/deq, ``MDEQ-Vision/lib/models/mdeq_core.py``): per-resolution residual blocks,
then a multiscale fusion in which every branch receives every other one.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from .._checks import check_int, check_number
from .cell import TORCH_GROUPNORM_EPS
from .conv import default_conv, loop_friendly_conv
from .group_norm import GroupNorm, group_norm
from .spectral_norm import apply_norm

TORCH_DEFAULT_INIT = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
"""PyTorch's default ``nn.Conv2d``/``nn.Linear`` weight init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""


class VariationalDropout(nnx.Module):
    """Dropout with one mask per example and channel, shared by every spatial position.

    The official ``VariationalHidDropout2d`` (``spatial=True``): a Bernoulli(1 - rate)
    mask of shape ``[B, 1, .., 1, C]``, scaled by ``1 / (1 - rate)``. The official code
    draws the mask once per forward pass and reuses it at every solver iteration; here
    each call draws a new mask from the ``rng_collection`` stream, and
    ``deq_jax.nn.DEQ`` freezes the cell's RNG state during a solve (forward,
    backward and training aids), so every iteration of one solve sees the same mask
    and the next solve a new one. Outside a DEQ, two calls give two masks.

    Args:
      rate: probability of dropping a channel, in [0, 1).
      deterministic: identity when True; ``nnx.Module.eval()``/``train()`` set it.
      rng_collection: the ``nnx.Rngs`` stream the masks come from.
      rngs: ``nnx.Rngs`` (a stream is forked from it); needed for ``rate > 0`` in training.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> drop = VariationalDropout(0.5, rngs=nnx.Rngs(0))
      >>> y = drop(jnp.ones((2, 4, 4, 3)))
      >>> bool((y == y[:, :1, :1]).all()), sorted({float(v) for v in y.ravel()})
      (True, [0.0, 2.0])
    """

    def __init__(self, rate: float, *, deterministic: bool = False, rng_collection: str = "dropout",
                 rngs: nnx.Rngs | None = None):
        check_number("VariationalDropout", "rate", rate, low=0.0, high=1.0, low_open=False)
        self.rate, self.deterministic, self.rng_collection = rate, deterministic, rng_collection
        self.rngs = rngs[rng_collection].fork() if rngs is not None and rate > 0 else nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x`` (``[B, ..., C]``) times a fresh mask in training mode; ``x`` itself in eval mode or at rate 0."""
        if self.deterministic or self.rate == 0:
            return x
        if self.rngs is None:
            raise ValueError("VariationalDropout: rate > 0 in training mode needs rngs at construction.")
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],)
        mask = jax.random.bernoulli(self.rngs(), keep, shape)
        return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))

    def set_view(self, deterministic: bool | None = None):
        """For ``nnx.view``: sets ``deterministic`` when given."""
        if deterministic is not None:
            self.deterministic = deterministic


class _PlainGroupNorm(nnx.Module):
    """GroupNorm without scale and bias (PyTorch's ``affine=False``): no parameters."""

    def __init__(self, num_features: int, num_groups: int, *, dtype=None):
        self.num_features, self.num_groups, self.dtype = num_features, num_groups, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x if self.dtype is None else x.astype(self.dtype)
        ones, zeros = jnp.ones(self.num_features, x.dtype), jnp.zeros(self.num_features, x.dtype)
        return group_norm(x, ones, zeros, self.num_groups, TORCH_GROUPNORM_EPS)


class _Layers:
    """Builds the cell's convolutions and norms with its shared options (not stored in the cell)."""

    def __init__(self, dtype, param_dtype, conv_general_dilated, rngs):
        self.dtype, self.param_dtype, self.rngs = dtype, param_dtype, rngs
        self.conv_fn = conv_general_dilated or default_conv()
        # loop_friendly_conv supports stride 1 only; strided convolutions use lax's.
        self.strided_fn = jax.lax.conv_general_dilated if self.conv_fn is loop_friendly_conv else self.conv_fn

    def conv(self, cin: int, cout: int, kernel: int, *, stride: int = 1, norm: str = "none"):
        """A bias-free ``kernel x kernel`` conv, padding ``kernel // 2``, normalised by ``norm``.

        Kernel N(0, 0.01); weight-normalised, PyTorch's default init (see ``MDEQCell``).
        """
        pad = kernel // 2
        layer = nnx.Conv(
            cin, cout, (kernel, kernel), strides=(stride, stride), padding=[(pad, pad), (pad, pad)], use_bias=False,
            kernel_init=TORCH_DEFAULT_INIT if norm == "weight" else nnx.initializers.normal(0.01),
            conv_general_dilated=self.conv_fn if stride == 1 else self.strided_fn,
            dtype=self.dtype, param_dtype=self.param_dtype, rngs=self.rngs,
        )
        return apply_norm(layer, norm, rngs=self.rngs)

    def norm(self, channels: int, groups: int, affine: bool):
        """GroupNorm with PyTorch's epsilon; without parameters unless ``affine``."""
        if affine:
            return GroupNorm(channels, groups, TORCH_GROUPNORM_EPS, dtype=self.dtype, param_dtype=self.param_dtype)
        return _PlainGroupNorm(channels, groups, dtype=self.dtype)


class _Block(nnx.Module):
    """The official ``BasicBlock``: ``norm3(relu(z + norm2(drop(conv2(relu(norm1(conv1(z))))) + injection)))``.

    Built by ``MDEQCell`` (see there for the options).
    """

    def __init__(self, channels: int, inner: int, big_kernels: int, groups: int, affine: bool, dropout: float,
                 norm: str, layers: _Layers):
        k1, k2 = (5 if big_kernels >= 1 else 3), (5 if big_kernels >= 2 else 3)
        self.conv1 = layers.conv(channels, inner, k1, norm=norm)
        self.norm1 = layers.norm(inner, groups, affine)
        self.conv2 = layers.conv(inner, channels, k2, norm=norm)
        self.dropout = VariationalDropout(dropout, rngs=layers.rngs)
        self.norm2 = layers.norm(channels, groups, affine)
        self.norm3 = layers.norm(channels, groups, affine)

    def __call__(self, z: jax.Array, injection: jax.Array | None = None) -> jax.Array:
        """The block applied to ``z``, adding ``injection`` (shaped like ``z``) when given."""
        y = self.dropout(self.conv2(nnx.relu(self.norm1(self.conv1(z)))))
        if injection is not None:
            y = y + injection
        return self.norm3(nnx.relu(z + self.norm2(y)))


class _Downsample(nnx.Module):
    """``steps`` stride-2 3x3 convs, each followed by a GroupNorm, with ReLUs between them."""

    def __init__(self, cin: int, cout: int, steps: int, groups: int, affine: bool, layers: _Layers):
        outs = [cin] * (steps - 1) + [cout]
        self.convs = nnx.List([layers.conv(cin, c, 3, stride=2) for c in outs])
        self.norms = nnx.List([layers.norm(c, groups, affine) for c in outs])

    def __call__(self, z: jax.Array) -> jax.Array:
        for k, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            z = norm(conv(z)) if k == 0 else norm(conv(nnx.relu(z)))
        return z


class _Upsample(nnx.Module):
    """A 1x1 conv, a GroupNorm, then nearest-neighbour upsampling by ``factor``."""

    def __init__(self, cin: int, cout: int, factor: int, groups: int, affine: bool, layers: _Layers):
        self.conv = layers.conv(cin, cout, 1)
        self.norm = layers.norm(cout, groups, affine)
        self.factor = factor

    def __call__(self, z: jax.Array) -> jax.Array:
        y = self.norm(self.conv(z))
        return jnp.repeat(jnp.repeat(y, self.factor, axis=1), self.factor, axis=2)


class _PostFusion(nnx.Module):
    """``norm(conv(relu(y)))`` with a 1x1 conv (weight-normalised with the blocks)."""

    def __init__(self, channels: int, groups: int, affine: bool, norm: str, layers: _Layers):
        self.conv = layers.conv(channels, channels, 1, norm=norm)
        self.norm = layers.norm(channels, groups, affine)

    def __call__(self, y: jax.Array) -> jax.Array:
        return self.norm(self.conv(nnx.relu(y)))


def _check_options(channels, num_blocks, big_kernels, expansion, num_groups, dropout) -> list[int]:
    """Raises ``ValueError`` for inconsistent options; returns each branch's inner channel count."""
    owner = "MDEQCell"
    if not len(channels) == len(num_blocks) == len(big_kernels) >= 1:
        raise ValueError(f"{owner}: channels, num_blocks and big_kernels must be non-empty and of one length (one "
                         f"entry per branch), got lengths {len(channels)}, {len(num_blocks)}, {len(big_kernels)}.")
    check_int(owner, num_groups=num_groups)
    check_number(owner, "expansion", expansion)
    check_number(owner, "dropout", dropout, low=0.0, high=1.0, low_open=False)
    for i, (c, n, k) in enumerate(zip(channels, num_blocks, big_kernels)):
        check_int(owner, **{f"channels[{i}]": c, f"num_blocks[{i}]": n})
        if k not in (0, 1, 2):
            raise ValueError(f"{owner}: big_kernels[{i}] must be 0, 1 or 2, got {k!r}.")
    inner = [int(expansion * c) for c in channels]
    if min(inner) < 1:
        raise ValueError(f"{owner}: expansion={expansion} gives no inner channels int(expansion * c) for {channels}.")
    checks = [("channels", channels, num_groups), ("inner channels int(expansion * c)", inner, num_groups)]
    if len(channels) > 1:  # one branch has no fusion, hence no post-fusion norm
        checks.append(("channels for the post-fusion norm (num_groups // 2 groups)", channels, num_groups // 2))
    for name, counts, groups in checks:
        if groups < 1 or any(c % groups for c in counts):
            raise ValueError(f"{owner}: {groups} GroupNorm groups must divide the {name}; got {list(counts)} "
                             f"(num_groups={num_groups}).")
    return inner


class MDEQCell(nnx.Module):
    """The multiscale DEQ cell ``f(z, x)``: a tuple of per-resolution states in, one out.

    ``z = (z_0, z_1, ...)``, ``z_i`` of shape ``[B, H/2^i, W/2^i, channels[i]]``; ``x``
    is the injection at the highest resolution (shaped like ``z_0``). As the official
    ``MDEQModule``:

    1. Branch ``i`` applies ``num_blocks[i]`` residual blocks (the official
       ``BasicBlock``: ``conv1`` to ``int(expansion * c)`` channels, GroupNorm, ReLU,
       ``conv2`` back to ``c``, ``VariationalDropout``, ``+ x`` in the first block
       of branch 0 only, GroupNorm, ``+`` the block's input, ReLU, GroupNorm); kernels
       3x3, or 5x5 for ``conv1`` when ``big_kernels[i] >= 1`` and for ``conv2`` when it is 2.
    2. Fusion into branch ``i``: the sum over ``j`` of block output ``j`` itself
       (``j == i``), after ``i - j`` stride-2 3x3 convs (``j < i``; GroupNorm after
       each, ReLU between; channels ``channels[j]`` until the last, which gives
       ``channels[i]``), or after a 1x1 conv, GroupNorm and nearest upsampling by
       ``2^(j - i)`` (``j > i``); then ReLU, 1x1 conv, GroupNorm with ``num_groups // 2``
       groups. With one branch there is no fusion (the official code then returns the
       block output).

    Every conv is bias-free; GroupNorms use PyTorch's epsilon 1e-5. Weight norm covers
    the blocks' convs and the post-fusion convs, not the fusion convs (as the official
    ``_wnorm``); its parameters ``conv.layer.kernel`` (``v``) and ``conv.scale`` (``g``)
    count twice, as the official ``weight_g``/``weight_v`` do. Initialisation is what the
    official ``get_cls_net`` leaves: N(0, 0.01) for every conv (its ``init_weights``),
    except weight-normalised ones, where ``init_weights`` writes into a derived tensor
    that is recomputed from ``g, v``, so PyTorch's default U(+-1/sqrt(fan_in)) stays
    (``TORCH_DEFAULT_INIT``), with ``g = ||v||``. GroupNorm scales 1, biases 0.

    Official defaults (``lib/config/default.py``) and the CIFAR-10 yamls
    (``experiments/cifar/cls_mdeq_{TINY,LARGE}.yaml``): ``EXPANSION_FACTOR`` 5 (both
    yamls 5); ``NUM_GROUPS`` 4 (yamls 8); ``DROPOUT`` 0 (TINY 0.25, LARGE 0.3); ``WNORM``
    False (yamls True); ``BLOCK_GN_AFFINE``/``FUSE_GN_AFFINE`` True (yamls keep them);
    ``POST_GN_AFFINE`` True (yamls False); ``NUM_CHANNELS`` TINY (24, 24), LARGE (32,
    64, 128, 256); ``NUM_BLOCKS`` ones; ``BIG_KERNELS`` zeros.

    Args:
      channels: ``c_i`` per branch, highest resolution first.
      num_blocks: residual blocks per branch (None: one each).
      expansion: inner channels of a block are ``int(expansion * c_i)``.
      num_groups: GroupNorm groups of blocks and fusion; ``num_groups // 2`` post fusion.
      big_kernels: 0, 1 or 2 per branch (None: zeros), the number of 5x5 convs in a block.
      dropout: ``VariationalDropout`` rate after each block's ``conv2``, in [0, 1).
      norm: the kernel normalisation of block and post-fusion convs, one of
        ``deq_jax.nn.NORMS``: ``"none"``, ``"weight"`` (``deq_jax.nn.WeightNorm``,
        the official ``WNORM``) or ``"spectral"`` (``deq_jax.nn.SpectralNorm``).
      block_affine, fuse_affine, post_affine: GroupNorm scale and bias in the blocks,
        the fusion and post fusion (``*_GN_AFFINE``); without them a norm has no parameters.
      dtype, param_dtype: as ``deq_jax.nn.ResNetCell`` (states and ``x`` are cast
        to ``dtype`` on entry).
      conv_general_dilated: as ``deq_jax.nn.ResNetCell``, for every conv; when it
        is ``deq_jax.nn.loop_friendly_conv`` (the CPU default), which has stride 1
        only, the stride-2 fusion convs use ``jax.lax.conv_general_dilated``.
      rngs: ``nnx.Rngs`` for the weights and (``'dropout'`` stream, falling back to
        ``'default'``) the dropout masks.

    Examples:
      >>> import jax.numpy as jnp, deq_jax as dj
      >>> from flax import nnx
      >>> cell = dj.nn.MDEQCell((8, 16), num_groups=4, rngs=nnx.Rngs(0))
      >>> x = jnp.ones((2, 8, 8, 8))
      >>> [z.shape for z in cell(cell.initial_state(x), x)]
      [(2, 8, 8, 8), (2, 4, 4, 16)]
    """

    def __init__(
        self,
        channels: Sequence[int],
        num_blocks: Sequence[int] | None = None,
        *,
        expansion: float = 5,
        num_groups: int = 4,
        big_kernels: Sequence[int] | None = None,
        dropout: float = 0.0,
        norm: str = "none",
        block_affine: bool = True,
        fuse_affine: bool = True,
        post_affine: bool = True,
        dtype=None,
        param_dtype=jnp.float32,
        conv_general_dilated=None,
        rngs: nnx.Rngs,
    ):
        channels = tuple(channels)
        num_blocks = tuple(num_blocks) if num_blocks is not None else (1,) * len(channels)
        big_kernels = tuple(big_kernels) if big_kernels is not None else (0,) * len(channels)
        inner = _check_options(channels, num_blocks, big_kernels, expansion, num_groups, dropout)
        self.channels, self.dtype = channels, dtype
        layers = _Layers(dtype, param_dtype, conv_general_dilated, rngs)
        self.branches = nnx.List([
            nnx.List([_Block(c, m, k, num_groups, block_affine, dropout, norm, layers) for _ in range(n)])
            for c, m, k, n in zip(channels, inner, big_kernels, num_blocks)
        ])
        n = len(channels)
        self.fuse = nnx.List([nnx.List([self._fusion(i, j, num_groups, fuse_affine, layers) for j in range(n)])
                              for i in range(n)] if n > 1 else [])
        self.post = nnx.List([_PostFusion(c, num_groups // 2, post_affine, norm, layers)
                              for c in channels] if n > 1 else [])

    def _fusion(self, i: int, j: int, groups: int, affine: bool, layers: _Layers):
        """The map from branch ``j`` into branch ``i`` (None: identity)."""
        if i == j:
            return None
        cin, cout = self.channels[j], self.channels[i]
        if j < i:
            return _Downsample(cin, cout, i - j, groups, affine, layers)
        return _Upsample(cin, cout, 2 ** (j - i), groups, affine, layers)

    def _check_injection(self, x) -> None:
        step = 2 ** (len(self.channels) - 1)
        if getattr(x, "ndim", None) != 4 or x.shape[-1] != self.channels[0] or x.shape[1] % step or x.shape[2] % step:
            raise ValueError(f"MDEQCell: expected an injection x of shape [B, H, W, {self.channels[0]}] with H and W "
                             f"divisible by 2^(branches - 1) = {step}, got shape {getattr(x, 'shape', type(x))}.")

    def state_shapes(self, x) -> tuple[tuple[int, ...], ...]:
        """The shapes of ``z``'s entries for the injection ``x``: ``[B, H/2^i, W/2^i, c_i]``."""
        self._check_injection(x)
        batch, height, width = x.shape[:3]
        return tuple((batch, height >> i, width >> i, c) for i, c in enumerate(self.channels))

    def initial_state(self, x: jax.Array) -> tuple[jax.Array, ...]:
        """Zeros for every branch, as the official solver starts: shapes ``state_shapes``, dtype ``x``'s
        promoted to at least float32 (the dtype ``deq_jax.nn.DEQ`` gives its state)."""
        dtype = jnp.promote_types(x.dtype, jnp.float32)
        return tuple(jnp.zeros(shape, dtype) for shape in self.state_shapes(x))

    def _check_state(self, z, x) -> None:
        want = self.state_shapes(x)
        got = tuple(getattr(z_i, "shape", type(z_i).__name__) for z_i in z) if isinstance(z, (tuple, list)) else None
        if got != want:
            raise ValueError(f"MDEQCell: expected z as a tuple of {len(want)} arrays of shapes {list(want)} (for x of "
                             f"shape {x.shape}), got {list(got) if got is not None else type(z).__name__}.")

    def __call__(self, z: Sequence[jax.Array], x: jax.Array) -> tuple[jax.Array, ...]:
        """``f(z, x)``: a tuple shaped like ``z``, in ``dtype`` (None: the inputs')."""
        self._check_state(z, x)
        if self.dtype is not None:
            z, x = tuple(z_i.astype(self.dtype) for z_i in z), x.astype(self.dtype)
        blocks = []
        for i, (branch, y) in enumerate(zip(self.branches, z)):
            for k, block in enumerate(branch):
                y = block(y, x if i == 0 and k == 0 else None)
            blocks.append(y)
        if len(blocks) == 1:
            return tuple(blocks)
        return tuple(post(self._fused(i, blocks)) for i, post in enumerate(self.post))

    def _fused(self, i: int, blocks: list[jax.Array]) -> jax.Array:
        """The sum over ``j`` of block output ``j`` mapped into branch ``i``."""
        total = None
        for j, (fusion, y) in enumerate(zip(self.fuse[i], blocks)):
            y = y if fusion is None else fusion(y)
            total = y if total is None else total + y
        return total
