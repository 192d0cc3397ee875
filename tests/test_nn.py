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
    cell = dj.nn.ResNetCell(4, 6, num_groups=2, param_dtype=jnp.float64, norm="weight" if weight_norm else "none", rngs=nnx.Rngs(0))
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
        def loss(deq):
            solution = deq.solve(x)
            return jnp.sum(w * solution.value), solution.stats()

        diff = nnx.DiffState(0, dj.nn.WITH_BACKWARD_STATS)
        return nnx.value_and_grad(loss, argnums=diff, has_aux=True)(deq)

    (loss, forward), grads = step(deq, x)
    grads, backward = dj.nn.split_backward_stats(grads)
    backward = backward[""]
    f, params = dj.nn.explicit_cell(deq.cell)
    explicit = jax.grad(lambda p: jnp.sum(w * dj.fixed_point(f, jnp.zeros_like(x), (p, x), solver=TIGHT).value))
    want = explicit(params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10), grads["cell"], want)
    paths = lambda state: {path for path, _ in nnx.to_flat_state(state)}
    assert paths(grads) == paths(nnx.state(deq, nnx.Param))
    for stats in (forward, backward):
        assert stats.converged_fraction == 1 and 1 < stats.mean_steps <= stats.max_steps < TIGHT.max_iter
        assert stats.max_residual < TIGHT.tol


class DropoutCell(nnx.Module):
    """``tanh(dropout(z W) + x)`` with a mask drawn from the cell's own rngs, and a call counter."""

    def __init__(self, features, rate, rngs):
        self.linear = nnx.Linear(features, features, use_bias=False, rngs=rngs)
        self.linear.kernel[...] = 0.5 * self.linear.kernel[...] / np.linalg.norm(self.linear.kernel[...], 2)
        self.dropout = nnx.Dropout(rate, rngs=rngs)
        self.calls = nnx.Variable(jnp.zeros((), jnp.int32))

    def __call__(self, z, x):
        self.calls[...] += 1
        return jnp.tanh(self.dropout(self.linear(z)) + x)


def test_cell_state_is_fixed_during_a_solve_and_advances_once_per_call():
    """One dropout mask per solve (z* = f(z*) with that pass's mask), a new one on the next call."""
    deq = dj.nn.DEQ(DropoutCell(16, 0.5, nnx.Rngs(0, dropout=1)), solver=dj.Anderson(tol=1e-6, max_iter=100))
    x = jax.random.normal(jax.random.key(2), (3, 16))
    call = nnx.jit(lambda deq, x: deq.solve(x))
    f, before = dj.nn.explicit_cell(nnx.clone(deq.cell))  # the state before the call
    first = call(deq, x)
    assert first.converged.all()
    # The fixed point of the map with the mask this pass drew (the state before the call).
    np.testing.assert_allclose(f(first.value, (before, x)), first.value, atol=1e-5)
    assert int(deq.cell.calls[...]) == 1  # as one application of the cell, however many solver steps
    _, after = dj.nn.explicit_cell(nnx.clone(deq.cell))
    second = call(deq, x)
    np.testing.assert_allclose(f(second.value, (after, x)), second.value, atol=1e-5)
    assert not np.allclose(first.value, second.value, atol=1e-3), "two calls drew the same mask"
    # The backward solve sees the same mask as the forward one: the implicit gradient of that map.
    _, before = dj.nn.explicit_cell(nnx.clone(deq.cell))
    grads = nnx.jit(nnx.grad(lambda deq: jnp.sum(deq(x) ** 2)))(deq)  # jitted: one program, not op by op
    want = jax.jit(jax.grad(lambda s: jnp.sum(dj.fixed_point(f, jnp.zeros_like(x), (s, x), solver=deq.solver).value ** 2),
                            allow_int=True))
    np.testing.assert_allclose(grads["cell"]["linear"]["kernel"][...], want(before)["linear"]["kernel"][...], rtol=1e-4)
    deq.eval()  # deterministic dropout: no draw, so the state no longer moves
    counts = int(deq.cell.dropout.rngs.count[...])
    deq(x)
    assert int(deq.cell.dropout.rngs.count[...]) == counts
