"""Weight normalisation of the cell's convolutions: w = g * v / ||v|| per output channel (check_grads through a DEQ: test_nn)."""
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import deq_jax as dj


def cells(seed=0, **kwargs):
    """A plain cell and a weight-normed one with the same kernels."""
    plain = dj.nn.ResNetCell(8, 16, num_groups=4, rngs=nnx.Rngs(seed), **kwargs)
    normed = dj.nn.ResNetCell(8, 16, num_groups=4, norm="weight", rngs=nnx.Rngs(seed), **kwargs)
    return plain, normed


def inputs(shape=(2, 5, 5, 8), dtype=jnp.float32):
    return tuple(jax.random.normal(jax.random.key(i), shape, dtype) for i in range(2))


def params(module):
    return jax.tree.map(np.asarray, nnx.state(module, nnx.Param))


@nnx.jit
def apply(cell, z, x):
    return cell(z, x)


def assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_parameters_and_function_unchanged_at_init():
    plain, normed = cells()
    names = {".".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(normed, nnx.Param))}
    assert {"conv1.layer.kernel", "conv1.scale", "conv2.layer.kernel", "conv2.scale"} <= names
    for a, b in ((plain.conv1, normed.conv1), (plain.conv2, normed.conv2)):
        v = np.asarray(b.layer.kernel[...])
        np.testing.assert_array_equal(v, a.kernel[...])  # v: the same N(0, 0.01) draw
        np.testing.assert_allclose(b.scale[...], np.linalg.norm(v.reshape(-1, v.shape[-1]), axis=0), rtol=1e-6)
    z, x = inputs()
    np.testing.assert_allclose(apply(normed, z, x), apply(plain, z, x), rtol=1e-5, atol=1e-6)


def test_invariant_to_scaling_v_not_g():
    _, cell = cells()
    z, x = inputs()
    before = apply(cell, z, x)
    for conv in (cell.conv1, cell.conv2):
        conv.layer.kernel[...] = conv.layer.kernel[...] * 3.0
    np.testing.assert_allclose(apply(cell, z, x), before, rtol=1e-5, atol=1e-6)
    # conv2's output meets x before a GroupNorm (conv1's goes straight into one, which
    # would undo a uniform scale).
    cell.conv2.scale[...] = cell.conv2.scale[...] * 3.0
    assert np.abs(apply(cell, z, x) - before).max() > 0.1


def test_normalised_kernel_has_norm_g_and_is_the_one_used():
    plain, normed = cells()
    for conv, key in ((normed.conv1, 0), (normed.conv2, 1)):
        conv.scale[...] = jax.random.uniform(jax.random.key(key), conv.scale.shape, minval=0.5, maxval=2.0)
        w = np.asarray(conv.kernel())
        np.testing.assert_allclose(np.linalg.norm(w.reshape(-1, w.shape[-1]), axis=0), conv.scale[...], rtol=1e-5)
    plain.conv1.kernel[...], plain.conv2.kernel[...] = normed.conv1.kernel(), normed.conv2.kernel()
    z, x = inputs()
    np.testing.assert_allclose(apply(normed, z, x), apply(plain, z, x), rtol=1e-5, atol=1e-6)


def test_gradients_reach_v_and_g_and_grad_v_is_orthogonal_to_v(x64):
    _, cell = cells(param_dtype=jnp.float64)
    z, x = inputs(dtype=jnp.float64)
    w = jax.random.normal(jax.random.key(2), z.shape, jnp.float64)
    grads = nnx.jit(nnx.grad(lambda cell: jnp.sum(w * cell(z, x))))(cell)
    for conv, grad in ((cell.conv1, grads["conv1"]), (cell.conv2, grads["conv2"])):
        kernels = (conv.layer.kernel[...], grad["layer"]["kernel"][...])
        v, grad_v = (np.asarray(a).reshape(-1, a.shape[-1]) for a in kernels)
        assert np.all(np.linalg.norm(grad_v, axis=0) > 1e-3) and np.all(np.abs(grad["scale"][...]) > 0)
        cosine = np.sum(v * grad_v, axis=0) / (np.linalg.norm(v, axis=0) * np.linalg.norm(grad_v, axis=0))
        np.testing.assert_allclose(cosine, 0, atol=1e-10)


def test_no_write_back_eagerly_or_in_a_training_step():
    _, cell = cells()
    z, x = inputs()
    before = params(cell)
    first, second = cell(z, x), cell(z, x)
    np.testing.assert_array_equal(first, second)
    assert_trees_equal(params(cell), before)

    @nnx.jit
    def step(cell):
        return nnx.grad(lambda cell: jnp.sum(cell(z, x) ** 2))(cell)

    step(cell)
    assert_trees_equal(params(cell), before)


def test_convolution_goes_through_conv_general_dilated():
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[1].shape)
        return dj.nn.cell.loop_friendly_conv(*args, **kwargs)

    cell = dj.nn.ResNetCell(8, 16, num_groups=4, norm="weight", conv_general_dilated=spy, rngs=nnx.Rngs(0))
    cell(*inputs())
    assert calls == [(3, 3, 8, 16), (3, 3, 16, 8)]


@pytest.mark.parametrize("dtype, param_dtype", [(jnp.bfloat16, jnp.float32), (None, jnp.bfloat16)])
def test_dtype_and_param_dtype(dtype, param_dtype):
    plain, normed = cells(dtype=dtype, param_dtype=param_dtype)
    for conv in (normed.conv1, normed.conv2):
        assert conv.scale[...].dtype == conv.layer.kernel[...].dtype == param_dtype
    z, x = inputs()
    out, want = apply(normed, z, x), apply(plain, z, x)
    assert out.dtype == want.dtype == (dtype or jnp.float32)
    np.testing.assert_allclose(out.astype(jnp.float32), want.astype(jnp.float32), atol=5e-2)


def test_orbax_round_trip_of_params(tmp_path):
    _, cell = cells()
    cell.conv2.scale[...] = cell.conv2.scale[...] * 2.0  # not what a fresh cell holds
    saved = nnx.state(cell, nnx.Param)
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.save(0, args=ocp.args.StandardSave(saved))
        manager.wait_until_finished()
    fresh = dj.nn.ResNetCell(8, 16, num_groups=4, norm="weight", rngs=nnx.Rngs(1))
    with ocp.CheckpointManager(tmp_path) as manager:
        restored = manager.restore(0, args=ocp.args.StandardRestore(nnx.state(fresh, nnx.Param)))
    nnx.update(fresh, restored)
    assert_trees_equal(params(fresh), params(cell))
    z, x = inputs()
    np.testing.assert_array_equal(apply(fresh, z, x), apply(cell, z, x))


def test_rejects_a_layer_without_kernel():
    with pytest.raises(TypeError, match="kernel"):
        dj.nn.WeightNorm(dj.nn.GroupNorm(4, 2))
