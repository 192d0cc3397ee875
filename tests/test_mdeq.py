"""The multiscale DEQ cell, its stem and classifier head: shapes, parameter counts, dropout, errors,
and parity with the official PyTorch MDEQ (locuslab/deq, ``MDEQ-Vision``) on the same weights.

The parity tests need torch, PyYAML and the official code (``../shared/reference/locuslab-deq``, or
``$DEQ_MDEQ_REFERENCE``; see ``experiments/cifar10/official_mdeq.py``); without them they skip. Modules are
built abstractly (``nnx.eval_shape``) wherever values are not needed: on XLA:CPU every
distinct initializer shape costs a compilation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deq_jax as dj
from experiments.cifar10 import official_mdeq as om
from experiments.cifar10.model import MDEQ_PRESETS, MDEQ_SHARED, CifarMDEQ
from deq_jax.nn.mdeq import MDEQCell, VariationalDropout
from deq_jax.nn.mdeq_head import MDEQClassifierHead, MDEQStem

# Parameter counts of the official MDEQClsNet for the CIFAR-10 yamls (weight norm's g and v both
# counted), measured with torch 2.13 on locuslab/deq 1fb7059; ours (stem + cell + head) are equal.
OFFICIAL_COUNTS = {"TINY": 158_890, "LARGE": 11_097_438}


def official_spec(preset: str) -> dict:
    """The architecture of one of the experiment's presets (``MDEQ_PRESETS``, from the official CIFAR-10 yamls), as
    this file's ``Model`` takes it. The presets are thus checked against the yamls: by the parity test (TINY,
    the official model built from its yaml) and by the parameter counts (both)."""
    preset, shared = MDEQ_PRESETS[preset], MDEQ_SHARED
    branches = len(preset["channels"])
    return dict(channels=preset["channels"], num_blocks=(1,) * branches, big_kernels=(0,) * branches,
                head=preset["head_channels"], final=preset["final_channels"], num_groups=shared["num_groups"],
                weight_norm=shared["norm"] == "weight", post_affine=shared["post_affine"], stage0=preset["stage0"])


TINY, LARGE = official_spec("mdeq-tiny"), official_spec("mdeq-large")


def materialise(abstract, seed=0):
    """Values for an abstract module (``nnx.eval_shape``) without JAX initialisers (one compilation each):
    N(0, 0.3) floats, zero counters, fresh RNG keys."""
    rng = np.random.default_rng(seed)

    def fill(leaf):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.key(int(rng.integers(2**31)))
        if jnp.issubdtype(leaf.dtype, jnp.integer):
            return jnp.zeros(leaf.shape, leaf.dtype)
        return jnp.asarray(rng.normal(0, 0.3, leaf.shape), leaf.dtype)

    graphdef, state = nnx.split(abstract)
    return nnx.merge(graphdef, jax.tree.map(fill, state))


def count(module) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(nnx.state(module, nnx.Param)))


class Model(nnx.Module):
    """Stem, cell and head as the official ``MDEQClsNet`` holds them."""

    def __init__(self, spec, *, downsample_times=0, expansion=5, dropout=0.0, block_affine=True, fuse_affine=True,
                 param_dtype=jnp.float32):
        channels = spec["channels"]
        self.stem = MDEQStem(channels[0], downsample_times=downsample_times, stage0=spec["stage0"],
                             param_dtype=param_dtype, rngs=nnx.Rngs(0))
        self.cell = MDEQCell(channels, spec["num_blocks"], expansion=expansion, num_groups=spec["num_groups"],
                             big_kernels=spec["big_kernels"], dropout=dropout, norm="weight" if spec["weight_norm"] else "none",
                             block_affine=block_affine, fuse_affine=fuse_affine, post_affine=spec["post_affine"],
                             param_dtype=param_dtype, rngs=nnx.Rngs(1))
        self.head = MDEQClassifierHead(channels, spec["head"], spec["final"], 10, param_dtype=param_dtype,
                                       rngs=nnx.Rngs(2))


# --- shapes and parameter counts -------------------------------------------------------------------

@pytest.mark.parametrize("channels, num_blocks, big_kernels", [((8, 16), (1, 1), (0, 0)),
                                                               ((8, 16, 8), (2, 1, 1), (1, 2, 0))])
def test_cell_output_shapes(channels, num_blocks, big_kernels):
    cell = nnx.eval_shape(lambda: MDEQCell(channels, num_blocks, num_groups=4, big_kernels=big_kernels,
                                           rngs=nnx.Rngs(0)))
    x = jnp.zeros((2, 8, 8, channels[0]))
    want = [(2, 8 >> i, 8 >> i, c) for i, c in enumerate(channels)]
    assert [z.shape for z in cell.initial_state(x)] == want
    out = nnx.eval_shape(lambda cell, z, x: cell(z, x), cell, cell.initial_state(x), x)
    assert isinstance(out, tuple) and [z.shape for z in out] == want


def cell_formula(channels, num_blocks, big_kernels, expansion, norm, block_affine, fuse_affine, post_affine):
    """The official MDEQModule's parameter count, written out (spectral norm adds no parameter)."""
    total, weight_norm = 0, norm == "weight"
    for c, n, k in zip(channels, num_blocks, big_kernels):
        e = int(expansion * c)
        k1, k2 = (5 if k >= 1 else 3) ** 2, (5 if k >= 2 else 3) ** 2
        block = k1 * c * e + k2 * e * c + weight_norm * (e + c) + block_affine * 2 * (e + 2 * c)
        total += n * block
    for i, ci in enumerate(channels):
        for j, cj in enumerate(channels):
            if j < i:  # i - j stride-2 3x3 convs: cj -> cj ... -> ci, each with a GroupNorm
                outs = [cj] * (i - j - 1) + [ci]
                total += sum(9 * cj * o + fuse_affine * 2 * o for o in outs)
            elif j > i:  # 1x1 conv cj -> ci and a GroupNorm
                total += cj * ci + fuse_affine * 2 * ci
        total += ci * ci + weight_norm * ci + post_affine * 2 * ci  # post fusion
    return total


def head_formula(channels, head, final, classes):
    """MDEQClsNet's head: bottlenecks (non-affine BNs, projection + affine BN), downsamplings, final, linear."""
    total = 0
    for c, h in zip(channels, head):
        total += c * h + 9 * h * h + h * 4 * h + (c != 4 * h) * (c * 4 * h + 2 * 4 * h)
    for a, b in zip(head[:-1], head[1:]):
        total += 9 * 4 * a * 4 * b + b * 4 + 2 * b * 4  # conv3x3 with bias, BN
    return total + 4 * head[-1] * final + final + 2 * final + final * classes + classes


@pytest.mark.parametrize("options", [
    dict(channels=(8, 16), num_blocks=(1, 1), big_kernels=(0, 0), expansion=5, norm="none",
         block_affine=True, fuse_affine=True, post_affine=True),
    dict(channels=(8, 16, 32), num_blocks=(2, 1, 1), big_kernels=(1, 2, 0), expansion=2.5, norm="weight",
         block_affine=False, fuse_affine=True, post_affine=False),
    dict(channels=(8, 8, 16, 8), num_blocks=(1, 1, 1, 2), big_kernels=(0, 0, 0, 1), expansion=3, norm="spectral",
         block_affine=True, fuse_affine=False, post_affine=True),
])
def test_cell_parameter_count(options):
    cell = nnx.eval_shape(lambda: MDEQCell(**options, num_groups=4, rngs=nnx.Rngs(0)))
    assert count(cell) == cell_formula(**options)


def test_head_parameter_count():
    head = nnx.eval_shape(lambda: MDEQClassifierHead((8, 16, 32), (4, 8, 16), 40, 7, rngs=nnx.Rngs(0)))
    assert count(head) == head_formula((8, 16, 32), (4, 8, 16), 40, 7)


@pytest.mark.parametrize("name", ["TINY", "LARGE"])
def test_full_model_parameter_count(name):
    spec = TINY if name == "TINY" else LARGE
    assert count(nnx.eval_shape(lambda: Model(spec))) == OFFICIAL_COUNTS[name]
    # The experiment's model of that configuration holds the same parameters.
    experiment = nnx.eval_shape(lambda: CifarMDEQ(f"mdeq-{name.lower()}", solver=dj.Broyden(), gradient=dj.Implicit(),
                                                  rngs=nnx.Rngs(0)))
    assert count(experiment) == OFFICIAL_COUNTS[name]


# --- BatchNorm as PyTorch's ----------------------------------------------------------------------------

def test_torch_batch_norm_mixes_the_unbiased_variance_into_its_running_variance():
    from deq_jax.nn.mdeq_head import TorchBatchNorm

    x = np.random.default_rng(0).normal(2.0, 3.0, (4, 5, 5, 3))
    norm = TorchBatchNorm(3, momentum=0.9, epsilon=1e-5, use_fast_variance=False, rngs=nnx.Rngs(0))
    y = norm(jnp.asarray(x, jnp.float32), use_running_average=False)
    flat = x.reshape(-1, 3)
    # The output uses the biased variance; the running variance mixes in 0.1 of the unbiased one (n = 100).
    np.testing.assert_allclose(y, (x - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(norm.var[...], 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-6)
    np.testing.assert_allclose(norm.mean[...], 0.1 * flat.mean(0), rtol=1e-6)
    before = np.asarray(norm.var[...])
    norm(jnp.asarray(x, jnp.float32), use_running_average=True)  # evaluation updates nothing
    np.testing.assert_array_equal(norm.var[...], before)


# --- variational dropout -----------------------------------------------------------------------------

def test_variational_dropout_masks():
    drop = VariationalDropout(0.3, rngs=nnx.Rngs(0))
    x = jnp.ones((64, 3, 3, 256))
    first, second = drop(x), drop(x)
    assert bool((first == first[:, :1, :1]).all())  # one mask per example and channel
    np.testing.assert_allclose(np.unique(np.asarray(first)), [0.0, 1 / 0.7], rtol=1e-6)
    assert not bool((first == second).all())  # a new mask on each call
    assert abs(float(first.mean()) - 1.0) < 0.03  # 1/(1-p) keeps the mean (std of this mean ~0.005)
    drop.eval()
    assert drop(x) is x
    assert VariationalDropout(0.0, rngs=nnx.Rngs(0))(x) is x


def test_cell_dropout_follows_eval_and_is_frozen_like_in_a_deq_solve():
    cell = materialise(nnx.eval_shape(lambda: MDEQCell((4,), num_groups=2, expansion=2, dropout=0.5,
                                                       rngs=nnx.Rngs(0))))
    z, x = (jnp.ones((8, 4, 4, 4)),), jnp.ones((8, 4, 4, 4))
    # What deq_jax.nn.explicit_cell does: every call starts from the same state, hence the same mask.
    graphdef, state = nnx.split(cell)
    f = jax.jit(lambda z, state: nnx.merge(graphdef, state, copy=True)(z, x)[0])
    assert bool((f(z, state) == f(z, state)).all())
    apply = nnx.jit(lambda cell: cell(z, x)[0])
    assert not bool((apply(cell) == apply(cell)).all())  # the cell's own calls advance its RNG stream
    cell.eval()
    dropout = cell.branches[0][0].dropout
    assert dropout.deterministic and dropout(x) is x


# --- bad input -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    (dict(channels=(8, 16), num_blocks=(1,)), r"one length .* got lengths 2, 1, 2"),
    (dict(channels=(8, 16), big_kernels=(0, 0, 0)), r"got lengths 2, 2, 3"),
    (dict(channels=(8, 12), num_groups=8), r"8 GroupNorm groups must divide the channels; got \[8, 12\]"),
    (dict(channels=(8,), num_groups=8, expansion=1.5), r"must divide the inner channels .* got \[12\]"),
    (dict(channels=(8, 16), num_groups=1), r"0 GroupNorm groups must divide the channels for the post-fusion"),
    (dict(channels=(8,), dropout=1.0), r"dropout must be a number in \[0, 1\), got 1.0"),
    (dict(channels=(8,), dropout=-0.1), r"dropout must be a number in \[0, 1\), got -0.1"),
    (dict(channels=(8,), big_kernels=(3,)), r"big_kernels\[0\] must be 0, 1 or 2, got 3"),
])
def test_bad_cell_options(options, message):
    with pytest.raises(ValueError, match=message):
        MDEQCell(**{"num_groups": 4, **options}, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("z_shapes, x_shape, message", [
    ([(2, 8, 8, 8)], (2, 8, 8, 8), r"tuple of 3 arrays of shapes \[\(2, 8, 8, 8\), \(2, 4, 4, 16\), \(2, 2, 2, 8\)\]"
                                   r".*got \[\(2, 8, 8, 8\)\]"),
    ([(2, 8, 8, 8), (2, 4, 4, 8), (2, 2, 2, 8)], (2, 8, 8, 8), r"got \[.*\(2, 4, 4, 8\)"),
    (None, (2, 8, 8, 8), r"tuple of 3 arrays .* got ndarray"),
    ([(2, 6, 6, 8), (2, 3, 3, 16), (2, 2, 2, 8)], (2, 6, 6, 8), r"divisible by 2\^\(branches - 1\) = 4, got shape"),
    ([(2, 8, 8, 8), (2, 4, 4, 16), (2, 2, 2, 8)], (2, 8, 8, 3), r"x of shape \[B, H, W, 8\]"),
])
def test_bad_cell_inputs(z_shapes, x_shape, message):
    cell = nnx.eval_shape(lambda: MDEQCell((8, 16, 8), num_groups=4, rngs=nnx.Rngs(0)))
    z = np.zeros((2, 8, 8, 8)) if z_shapes is None else tuple(np.zeros(s) for s in z_shapes)
    with pytest.raises(ValueError, match=message):
        cell(z, np.zeros(x_shape))


def test_bad_dropout_and_stem_options():
    with pytest.raises(ValueError, match=r"VariationalDropout: rate must be a number in \[0, 1\), got 1.5"):
        VariationalDropout(1.5)
    with pytest.raises(ValueError, match=r"MDEQStem: downsample_times must be an int >= 0, got -1"):
        MDEQStem(8, downsample_times=-1, rngs=nnx.Rngs(0))


def test_bad_head_inputs():
    with pytest.raises(ValueError, match=r"one head channel count per branch, got channels \(8, 16\)"):
        MDEQClassifierHead((8, 16), (4,), 32, 10, rngs=nnx.Rngs(0))
    head = nnx.eval_shape(lambda: MDEQClassifierHead((8, 16), (4, 8), 32, 10, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"channels \[8, 16\], got \[\(2, 8, 8, 8\)\]"):
        head((np.zeros((2, 8, 8, 8)),))


# --- parity with the official PyTorch code ------------------------------------------------------------

@pytest.fixture(scope="module")
def official():
    """``(torch, build)``: the official code's torch and its ``get_cls_net`` of a yaml, or a skip."""
    reason = om.missing()
    if reason is not None:
        pytest.skip(reason)
    loaded = om.load()
    return loaded.torch, lambda name, **changes: loaded.build(name, **changes)


@pytest.mark.parametrize("name", ["TINY", "LARGE"])
def test_official_parameter_count(official, name):
    _, build = official
    assert sum(p.numel() for p in build(name).parameters()) == OFFICIAL_COUNTS[name]


def transfer(model, net, torch):
    """The official model's parameters and running statistics copied into ``model`` (a ``Model``)."""
    return om.transfer(model.stem, model.cell, model.head, net, torch)


def perturb(net, torch):
    """Random weights, norm affines and running statistics (the official init has GN/BN at 1 and 0)."""
    gen = torch.Generator().manual_seed(1)
    noise = lambda t: torch.randn(t.shape, generator=gen, dtype=t.dtype)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1 + 0.5 * noise(p)).add_(0.1 * noise(p) if p.ndim == 1 else 0)
        for name, b in net.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * noise(b))
            elif name.endswith("running_var"):
                b.copy_(1 + 0.5 * torch.rand(b.shape, generator=gen, dtype=b.dtype))


VARIANT = dict(channels=(16, 8, 24), num_blocks=(2, 1, 1), big_kernels=(1, 2, 0), head=(4, 8, 4), final=24,
               num_groups=4, weight_norm=False, post_affine=True, stage0=True)


@pytest.mark.parametrize("name", ["TINY", "VARIANT"])
def test_parity_with_official(x64, official, name):
    """One application of f(z, x) for random z, the stem and the head's logits, in float64."""
    torch, build = official
    if name == "TINY":
        spec, changes, size, options = TINY, {"DROPOUT": 0.0}, 8, {}
    else:  # 3 branches, 2 blocks, 5x5 kernels, no weight norm, stem with stride 2 and stage0, other affine flags
        spec, size, options = VARIANT, 16, dict(downsample_times=1, expansion=3, block_affine=False)
        changes = dict(DROPOUT=0.0, NUM_BRANCHES=3, NUM_CHANNELS=[16, 8, 24], NUM_BLOCKS=[2, 1, 1],
                       BIG_KERNELS=[1, 2, 0], HEAD_CHANNELS=[4, 8, 4], FINAL_CHANSIZE=24, NUM_GROUPS=4, WNORM=False,
                       POST_GN_AFFINE=True, BLOCK_GN_AFFINE=False, DOWNSAMPLE_TIMES=1, EXPANSION_FACTOR=3)
    net = build("TINY", **changes).double()
    perturb(net, torch)
    model = nnx.eval_shape(lambda: Model(spec, param_dtype=jnp.float64, **options))
    used = transfer(model, net, torch)
    assert not [leaf for leaf in jax.tree.leaves(nnx.state(model)) if isinstance(leaf, jax.ShapeDtypeStruct)]
    assert used == {id(t) for t in [*net.parameters(), *(b for n, b in net.named_buffers() if "running" in n)]}

    rng = np.random.default_rng(0)  # numpy's: each shape of jax.random.normal costs seconds of compilation
    images, x = rng.normal(size=(2, size, size, 3)), rng.normal(size=(2, 8, 8, spec["channels"][0]))
    z = tuple(rng.normal(size=shape) for shape in model.cell.state_shapes(x))
    torch_z, torch_x = [om.nchw(a, torch) for a in z], [om.nchw(x, torch)] + [torch.zeros_like(om.nchw(a, torch)) for a in z[1:]]
    net.fullstage._reset(torch_z)  # computes the weight-normalised weights (and dropout masks) as the official forward
    with torch.no_grad():
        want = [t.numpy().transpose(0, 2, 3, 1) for t in net.fullstage(torch_z, torch_x)]
    got = nnx.jit(lambda cell, z, x: cell(z, x))(model.cell, z, x)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)

    stem_and_head = nnx.jit(lambda model, images, z: (model.stem(images), model.head(z)))
    for mode in ("eval", "train"):  # running statistics, then batch statistics
        getattr(net, mode)(), getattr(model, mode)()
        with torch.no_grad():
            stem = net.downsample(om.nchw(images, torch))
            stem = (net.stage0(stem) if net.stage0 is not None else stem).numpy().transpose(0, 2, 3, 1)
            logits = net.predict(torch_z).numpy()
        got_stem, got_logits = stem_and_head(model, images, z)
        np.testing.assert_allclose(got_stem, stem, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(got_logits, logits, rtol=1e-10, atol=1e-12)
