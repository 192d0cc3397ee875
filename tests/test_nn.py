"""NNX layers: the cell's structure and initialisation, the DEQ layer's gradients and stats."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import deq_jax as dj

TIGHT = dj.Anderson(lam=1e-10, tol=1e-12, max_iter=300)


def test_cell_structure_and_initialisation():
    cell = dj.nn.ResNetCell(48, 64, rngs=nnx.Rngs(0))
    assert cell.conv1.kernel.shape == (3, 3, 48, 64) and cell.conv2.kernel.shape == (3, 3, 64, 48)
    assert cell.conv1.bias is None and cell.conv2.bias is None
    for conv in (cell.conv1, cell.conv2):
        kernel = np.asarray(conv.kernel[...])
        assert abs(kernel.mean()) < 1e-3 and abs(kernel.std() - 0.01) < 5e-4
    for norm in (cell.norm1, cell.norm2, cell.norm3):
        assert norm.epsilon == 1e-5 and norm.num_groups == 8
    # The chapter's cell: 2 * 3*3*48*64 conv weights + GroupNorm scales and biases.
    assert sum(a.size for a in jax.tree_util.tree_leaves(nnx.state(cell, nnx.Param))) == 55616


def test_cell_keeps_shape_and_normalises():
    cell = dj.nn.ResNetCell(8, 16, num_groups=4, rngs=nnx.Rngs(0))
    z, x = (jax.random.normal(jax.random.key(i), (2, 7, 7, 8)) for i in range(2))
    out = cell(z, x)
    assert out.shape == z.shape
    groups = np.asarray(out).reshape(2, 49, 4, 2)
    np.testing.assert_allclose(groups.mean(axis=(1, 3)), 0, atol=1e-5)


def small_deq(weight_norm=False):
    cell = dj.nn.ResNetCell(4, 6, num_groups=2, param_dtype=jnp.float64, weight_norm=weight_norm, rngs=nnx.Rngs(0))
    for conv in (cell.conv1, cell.conv2):
        # Kernels 3x as large: a less trivial map (with weight norm only the scale g sets the size).
        weight = conv.scale if weight_norm else conv.kernel
        weight[...] = weight[...] * 3.0
    return dj.nn.DEQ(cell, solver=TIGHT)


@pytest.mark.parametrize("weight_norm", [False, True], ids=["plain", "weight_norm"])
def test_check_grads_through_deq(x64, weight_norm):
    graphdef, params, rest = nnx.split(small_deq(weight_norm), nnx.Param, ...)
    x = jax.random.normal(jax.random.key(0), (2, 3, 3, 4), jnp.float64)
    w = jax.random.normal(jax.random.key(1), x.shape, jnp.float64)

    @jax.jit
    def loss(params, x):
        return jnp.sum(w * nnx.merge(graphdef, params, rest, copy=True)(x))

    check_grads(loss, (params, x), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)


def test_deq_under_nnx_jit_and_grad_matches_fixed_point(x64):
    deq = small_deq()
    x = jax.random.normal(jax.random.key(0), (2, 3, 3, 4), jnp.float64)
    w = jax.random.normal(jax.random.key(1), x.shape, jnp.float64)

    @nnx.jit
    def step(deq, x):
        diff = nnx.DiffState(0, nnx.Any(nnx.Param, dj.nn.BackwardStatsProbe))
        return nnx.value_and_grad(lambda deq: jnp.sum(w * deq(x)), argnums=diff)(deq)

    loss, grads = step(deq, x)
    graphdef, cell_params = nnx.split(deq.cell)
    f = lambda z, args: nnx.merge(graphdef, args[0])(z, args[1])
    explicit = jax.grad(lambda p: jnp.sum(w * dj.fixed_point(f, jnp.zeros_like(x), (p, x), solver=TIGHT).value))
    want = explicit(cell_params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10), grads["cell"], want)

    forward = dj.SolveStats.from_array(deq.forward_stats[...])
    backward = dj.SolveStats.from_array(grads["backward_stats"][...])
    for stats in (forward, backward):
        assert stats.converged_fraction == 1 and 1 < stats.mean_steps <= stats.max_steps < TIGHT.max_iter
        assert stats.max_residual < TIGHT.tol
