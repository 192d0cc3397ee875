"""Gradient strategies: Phantom against backprop through the same steps and against the implicit gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import deq_jax as dj

TIGHT = dj.Anderson(lam=1e-10, tol=1e-12, max_iter=300)


def cell_problem(scale, seed=0):
    """A small float64 ResNetCell (kernels std 0.01 * scale) as ``f(z, (params, x))``."""
    cell = dj.nn.ResNetCell(4, 6, num_groups=2, param_dtype=jnp.float64, rngs=nnx.Rngs(seed))
    for conv in (cell.conv1, cell.conv2):
        conv.kernel[...] = conv.kernel[...] * scale
    f, params = dj.nn.explicit_cell(cell)
    x = jax.random.normal(jax.random.key(seed), (2, 3, 3, 4), jnp.float64)
    return f, params, x


def weighted_loss(f, x, gradient, solver=TIGHT):
    w = jax.random.normal(jax.random.key(1), x.shape, x.dtype)
    return lambda p, x: jnp.sum(w * dj.fixed_point(f, jnp.zeros_like(x), (p, x), solver=solver, gradient=gradient).value)


def relative_error(got, want):
    diff = sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    return float(jnp.sqrt(diff / sum(jnp.sum(b**2) for b in jax.tree.leaves(want))))


@pytest.mark.parametrize("steps, damping", [(1, 1.0), (3, 0.6)])
def test_phantom_equals_backprop_through_the_same_steps(x64, steps, damping):
    f, params, x = cell_problem(scale=3.0)
    solver = dj.Anderson(tol=1e-4, max_iter=30)  # a loose solve: z* is not the exact fixed point

    def by_hand(p, x):
        z_star = solver(lambda z: f(z, (p, x)), jnp.zeros_like(x)).value
        z = jax.lax.stop_gradient(z_star)
        for _ in range(steps):
            z = damping * f(z, (p, x)) + (1 - damping) * z
        return z

    w = jax.random.normal(jax.random.key(1), x.shape, x.dtype)
    phantom = weighted_loss(f, x, dj.Phantom(steps, damping), solver)
    by_hand_loss = lambda p, x: jnp.sum(w * by_hand(p, x))
    value_and_grad = lambda loss: jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))  # one program, not op by op
    value, got = value_and_grad(phantom)(params, x)
    want_value, want = value_and_grad(by_hand_loss)(params, x)
    assert relative_error(got, want) < 1e-12
    assert float(value) == pytest.approx(float(want_value), rel=1e-14)


def test_one_undamped_step_returns_f_of_the_solution(x64):
    f, params, x = cell_problem(scale=3.0)
    solver = dj.Anderson(tol=1e-3, max_iter=30)
    z_star = solver(lambda z: f(z, (params, x)), jnp.zeros_like(x)).value
    sol = dj.fixed_point(f, jnp.zeros_like(x), (params, x), solver=solver, gradient=dj.Phantom(1, 1.0))
    np.testing.assert_allclose(sol.value, f(z_star, (params, x)), rtol=1e-14)


def test_phantom_approaches_the_implicit_gradient_as_steps_grow(x64):
    f, params, x = cell_problem(scale=3.0)
    implicit = jax.jit(jax.grad(weighted_loss(f, x, dj.Implicit()), argnums=(0, 1)))(params, x)
    errors = [relative_error(jax.grad(weighted_loss(f, x, dj.Phantom(k, 0.7)), argnums=(0, 1))(params, x), implicit)
              for k in (1, 4, 16, 48)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    # The cell contracts slowly (forward iteration's error shrinks ~0.78x per step), so 48 damped steps get to ~1e-3.
    assert errors[0] > 0.5 and errors[-1] < 1e-3, errors


class TanhCell(nnx.Module):
    """``tanh(z W + x)`` with ``||W|| = 0.3``: a strong contraction, unlike the ResNetCell (about 0.75 here)."""

    def __init__(self, dim, rngs):
        self.linear = nnx.Linear(dim, dim, use_bias=False, param_dtype=jnp.float64, rngs=rngs)
        self.linear.kernel[...] *= 0.3 / jnp.linalg.norm(self.linear.kernel[...], 2)

    def __call__(self, z, x):
        return jnp.tanh(self.linear(z) + x)


@pytest.mark.parametrize("solver", [TIGHT, dj.Broyden(tol=1e-12, max_iter=300)], ids=type)
@pytest.mark.parametrize("gradient", [dj.Implicit(), dj.Implicit(dj.ForwardIteration(1e-12, 300)), dj.Phantom(40, 0.9)],
                         ids=repr)
def test_check_grads_through_deq(x64, solver, gradient):
    # Phantom differentiates only its unrolled steps, which is the whole derivative only in the
    # limit: on this contraction 40 steps at damping 0.9 reach it to float64 precision (0.37^40).
    deq = dj.nn.DEQ(TanhCell(5, nnx.Rngs(0)), solver=solver, gradient=gradient)
    graphdef, params, rest = nnx.split(deq, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(0), (3, 5), jnp.float64)
    w = jax.random.normal(jax.random.key(1), x.shape, jnp.float64)
    loss = jax.jit(lambda params, x: jnp.sum(w * jnp.sin(nnx.merge(graphdef, params, rest, copy=True)(x))))
    check_grads(loss, (params, x), order=1, modes=["rev"], eps=1e-6, atol=1e-7, rtol=1e-7)


def test_phantom_leaves_the_backward_probe_at_zero(x64):
    f, params, x = cell_problem(scale=1.0)
    probe = jnp.ones(len(dj.SolveStats._fields))
    loss = lambda probe: jnp.sum(dj.fixed_point(f, jnp.zeros_like(x), (params, x), gradient=dj.Phantom(),
                                                backward_stats_probe=probe).value)
    np.testing.assert_array_equal(jax.grad(loss)(probe), 0)
