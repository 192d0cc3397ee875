"""Against the chapter's own PyTorch code, on the same weights, in float64."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deq_jax as dj

torch = pytest.importorskip("torch")


def cell_pair(torch_reference, channels=4, inner=6, groups=2, scale=3.0, seed=0):
    """A float64 ResNetCell and the chapter's ResNetLayer holding the same weights."""
    cell = dj.nn.ResNetCell(channels, inner, num_groups=groups, param_dtype=jnp.float64, rngs=nnx.Rngs(seed))
    for conv in (cell.conv1, cell.conv2):
        conv.kernel[...] = conv.kernel[...] * scale
    layer = torch_reference.ResNetLayer(channels, inner, num_groups=groups).double()
    with torch.no_grad():
        for name in ("conv1", "conv2"):
            kernel = np.asarray(getattr(cell, name).kernel[...]).transpose(3, 2, 0, 1)  # HWIO -> OIHW
            getattr(layer, name).weight.copy_(torch.from_numpy(kernel.copy()))
        for name in ("norm1", "norm2", "norm3"):
            norm = getattr(cell, name)
            getattr(layer, name).weight.copy_(torch.tensor(np.asarray(norm.scale[...])))
            getattr(layer, name).bias.copy_(torch.tensor(np.asarray(norm.bias[...])))
    return cell, layer


def nchw(a):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def test_cell_matches_resnet_layer(x64, torch_reference):
    cell, layer = cell_pair(torch_reference, channels=8, inner=16, groups=4, scale=1.0)
    z, x = (jax.random.normal(jax.random.key(i), (3, 5, 5, 8), jnp.float64) for i in range(2))
    want = layer(nchw(z), nchw(x)).detach().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(cell(z, x), want, rtol=1e-12, atol=1e-12)


def test_anderson_iterates_like_the_chapter_for_one_example(x64, torch_reference):
    cell, layer = cell_pair(torch_reference)
    x = jax.random.normal(jax.random.key(0), (1, 3, 3, 4), jnp.float64)
    ours = jax.jit(lambda x: dj.Anderson(tol=1e-6, max_iter=60)(lambda z: cell(z, x), jnp.zeros_like(x)))(x)
    _, residuals = torch_reference.anderson(lambda z: layer(z, nchw(x)), torch.zeros(1, 4, 3, 3, dtype=torch.float64),
                                            tol=1e-6, max_iter=60)
    # The chapter logs residuals from its third f evaluation on; with one example its
    # batch-wide norm is the per-example one.
    assert int(ours.num_steps[0]) == len(residuals) + 2
    np.testing.assert_allclose(ours.trace[2 : len(residuals) + 2, 0], residuals, rtol=1e-9)


def test_deq_fixed_point_and_gradients_match_the_chapter(x64, torch_reference):
    cell, layer = cell_pair(torch_reference)
    settings = dict(lam=1e-10, tol=1e-11, max_iter=300)
    deq = dj.nn.DEQ(cell, solver=dj.Anderson(**settings))
    reference = torch_reference.DEQFixedPoint(layer, torch_reference.anderson, **settings)
    x = jax.random.normal(jax.random.key(1), (2, 3, 3, 4), jnp.float64)
    w = jax.random.normal(jax.random.key(2), x.shape, jnp.float64)

    graphdef, params, stats = nnx.split(deq, nnx.Param, ...)
    # copy=True: the merged module is new in the grad trace, so DEQ may update its stats.
    loss = lambda params, x: jnp.sum(w * nnx.merge(graphdef, params, stats, copy=True)(x))
    out = nnx.merge(graphdef, params, stats)(x)
    param_grads, x_grad = jax.grad(loss, argnums=(0, 1))(params, x)

    x_torch = nchw(x).requires_grad_()
    out_torch = reference(x_torch)
    (out_torch * nchw(w)).sum().backward()

    def close(ours, theirs):
        ours, theirs = np.asarray(ours), theirs.detach().numpy()
        assert np.linalg.norm(ours - theirs) <= 1e-6 * np.linalg.norm(theirs)

    close(np.asarray(out).transpose(0, 3, 1, 2), out_torch)
    close(np.asarray(x_grad).transpose(0, 3, 1, 2), x_torch.grad)
    for name in ("conv1", "conv2"):
        close(np.asarray(param_grads["cell"][name]["kernel"][...]).transpose(3, 2, 0, 1), getattr(layer, name).weight.grad)
    for name in ("norm1", "norm2", "norm3"):
        close(param_grads["cell"][name]["scale"][...], getattr(layer, name).weight.grad)
        close(param_grads["cell"][name]["bias"][...], getattr(layer, name).bias.grad)
