"""Spectral normalisation: the kernel's largest singular value, eval-mode freezing, PyTorch's values and gradients,
and its place in a DEQ (one power-iteration step per DEQ call, one sigma for the whole solve)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import deq_jax as dj


def conv(seed=0, dtype=jnp.float32):
    return nnx.Conv(4, 6, (3, 3), padding=[(1, 1), (1, 1)], use_bias=False, param_dtype=dtype, rngs=nnx.Rngs(seed))


def largest_singular_value(kernel) -> float:
    """Of the kernel read as ``[out, in * k * k]``, by numpy's SVD."""
    kernel = np.asarray(kernel)
    return float(np.linalg.svd(kernel.reshape(-1, kernel.shape[-1]).T, compute_uv=False)[0])


def test_training_mode_power_iterations_normalise_the_largest_singular_value_to_one():
    layer = dj.nn.SpectralNorm(conv(), num_power_iterations=3, rngs=nnx.Rngs(1))
    assert abs(largest_singular_value(layer.layer.kernel[...]) - 1) > 0.1  # the raw kernel is far from norm 1
    for _ in range(10):
        layer.kernel()
    assert abs(largest_singular_value(layer.kernel()) - 1) < 1e-3


def test_evaluation_mode_uses_the_stored_vectors_and_changes_nothing():
    layer = dj.nn.SpectralNorm(conv(), rngs=nnx.Rngs(1))
    layer.kernel()
    layer.eval()
    u, v = np.asarray(layer.u[...]), np.asarray(layer.v[...])
    first = layer.kernel()
    np.testing.assert_array_equal(layer.kernel(), first)
    np.testing.assert_array_equal(layer.u[...], u)
    np.testing.assert_array_equal(layer.v[...], v)
    w = np.asarray(layer.layer.kernel[...])
    sigma = u @ w.reshape(-1, w.shape[-1]).T @ v
    np.testing.assert_allclose(first, w / sigma, rtol=1e-6)
    layer.train()
    layer.kernel()
    assert not np.array_equal(layer.u[...], u)


def test_gradients_through_sigma_match_finite_differences(x64):
    layer = dj.nn.SpectralNorm(conv(dtype=jnp.float64), rngs=nnx.Rngs(1))
    layer.eval()  # u and v fixed, so the normalised kernel is a function of the raw one
    graphdef, kernel, rest = nnx.split(layer, lambda path, _: path == ("layer", "kernel"), ...)
    x = jax.random.normal(jax.random.key(2), (2, 5, 5, 4), jnp.float64)
    loss = lambda kernel: jnp.sum(jnp.sin(nnx.merge(graphdef, kernel, rest)(x)))
    check_grads(loss, (kernel,), order=1, modes=["rev"], eps=1e-6)


def test_training_step_matches_pytorch_spectral_norm(x64):
    torch = pytest.importorskip("torch")
    layer = dj.nn.SpectralNorm(conv(dtype=jnp.float64), num_power_iterations=2, rngs=nnx.Rngs(1))
    kernel = np.asarray(layer.layer.kernel[...])  # HWIO
    reference = torch.nn.utils.spectral_norm(torch.nn.Conv2d(4, 6, 3, padding=1, bias=False).double(),
                                             n_power_iterations=2)
    with torch.no_grad():
        reference.weight_orig.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
        # PyTorch flattens OIHW as [out, in*k*k] in (in, kh, kw) order; ours is (kh, kw, in): same vector, permuted.
        reference.weight_u.copy_(torch.from_numpy(np.array(layer.u[...])))
        v = np.asarray(layer.v[...]).reshape(3, 3, 4).transpose(2, 0, 1).ravel()
        reference.weight_v.copy_(torch.from_numpy(v))
    x = np.random.default_rng(0).normal(size=(2, 5, 5, 4))
    torch_x = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    torch_loss = torch.sin(reference(torch_x)).sum()
    torch_loss.backward()

    def loss(layer):
        return jnp.sum(jnp.sin(layer(jnp.asarray(x))))

    value, grads = nnx.value_and_grad(loss)(layer)
    np.testing.assert_allclose(value, torch_loss.item(), rtol=1e-10)
    np.testing.assert_allclose(grads.layer.kernel[...], reference.weight_orig.grad.numpy().transpose(2, 3, 1, 0),
                               rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(layer.u[...], reference.weight_u.numpy(), rtol=1e-10)


def test_inside_a_deq_the_vectors_advance_once_per_call_and_the_solve_uses_one_sigma():
    cell = dj.nn.ResNetCell(8, 16, num_groups=4, norm="spectral", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 8))
    stepped = {}
    for name in ("conv1", "conv2"):  # one power-iteration step from the initial vectors, by hand
        layer = getattr(cell, name)
        w = np.asarray(layer.matrix())
        v = w.T @ np.asarray(layer.u[...])
        v /= np.linalg.norm(v)
        stepped[name] = (w @ v / np.linalg.norm(w @ v), v)
    # The same cell in evaluation mode, holding those vectors: a solve with one sigma throughout.
    twin = dj.nn.ResNetCell(8, 16, num_groups=4, norm="spectral", rngs=nnx.Rngs(0))
    twin.eval()
    for name, (u, v) in stepped.items():
        getattr(twin, name).u[...], getattr(twin, name).v[...] = u, v
    solver = dj.Anderson(tol=1e-3, max_iter=30)
    solve = nnx.jit(lambda deq: deq.solve(x))  # one program per mode; eagerly, each operation compiles alone
    got = solve(dj.nn.DEQ(cell, solver=solver))
    want = solve(dj.nn.DEQ(twin, solver=solver))
    np.testing.assert_array_equal(got.num_steps, want.num_steps)
    np.testing.assert_allclose(got.value, want.value, rtol=1e-4, atol=1e-5)
    for name, (u, v) in stepped.items():  # and the call advanced them by that one step
        np.testing.assert_allclose(getattr(cell, name).u[...], u, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(getattr(cell, name).v[...], v, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(getattr(twin, name).u[...], u)  # evaluation mode: unchanged


@pytest.mark.parametrize("make, error, match", [
    (lambda: dj.nn.SpectralNorm(conv(), 0, rngs=nnx.Rngs(0)), ValueError, "num_power_iterations must be an int >= 1"),
    (lambda: dj.nn.SpectralNorm(nnx.relu, rngs=nnx.Rngs(0)), TypeError, "a layer with a `kernel`"),
    (lambda: dj.nn.ResNetCell(8, 16, num_groups=4, norm="batch", rngs=nnx.Rngs(0)), ValueError,
     r"norm must be one of \('none', 'weight', 'spectral'\), got 'batch'"),
])
def test_bad_options_are_clear_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()
