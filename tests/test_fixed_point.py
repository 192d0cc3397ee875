"""fixed_point: implicit gradients against finite differences and unrolled backprop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import deq_jax as dj
from deq_jax._implicit import solve_linear

TIGHT = [dj.Anderson(lam=1e-10, tol=1e-12, max_iter=300), dj.Broyden(tol=1e-12, max_iter=300),
         dj.ForwardIteration(tol=1e-12, max_iter=300)]


def small_cell(seed=0, scale=3.0, dtype=jnp.float64):
    """A small ResNetCell whose kernels (std 0.01 * scale) make z* depend strongly on z."""
    cell = dj.nn.ResNetCell(4, 6, num_groups=2, param_dtype=dtype, rngs=nnx.Rngs(seed))
    for conv in (cell.conv1, cell.conv2):
        conv.kernel[...] = conv.kernel[...] * scale
    return cell


def cell_problem(batch=2, seed=0, dtype=jnp.float64):
    cell = small_cell(seed, dtype=dtype)
    f, params = dj.nn.explicit_cell(cell)
    x = jax.random.normal(jax.random.key(seed), (batch, 3, 3, 4), dtype)
    return f, params, x


def unrolled(f, z0, args, steps):
    """Backprop-able forward iteration: the reference the implicit gradient must match."""
    return jax.lax.fori_loop(0, steps, lambda _, z: f(z, args), z0)


@pytest.mark.parametrize("solver", TIGHT, ids=type)
def test_check_grads_wrt_input_and_parameters(x64, solver):
    f, params, x = cell_problem()
    w = jax.random.normal(jax.random.key(1), x.shape, jnp.float64)
    loss = lambda params, x: jnp.sum(w * dj.fixed_point(f, jnp.zeros_like(x), (params, x), solver=solver).value)
    check_grads(jax.jit(loss), (params, x), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backward_solver", TIGHT, ids=type)
@pytest.mark.parametrize("solver", TIGHT, ids=type)
def test_matches_backprop_through_long_unrolled_iteration(x64, solver, backward_solver):
    f, params, x = cell_problem()
    w = jax.random.normal(jax.random.key(1), x.shape, jnp.float64)
    implicit = lambda p, x: jnp.sum(
        w * dj.fixed_point(f, jnp.zeros_like(x), (p, x), solver=solver, gradient=dj.Implicit(backward_solver)).value
    )
    explicit = lambda p, x: jnp.sum(w * unrolled(f, jnp.zeros_like(x), (p, x), 300))
    grad = lambda loss: jax.jit(jax.grad(loss, argnums=(0, 1)))  # one program each, not op by op
    got, want = grad(implicit)(params, x), grad(explicit)(params, x)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-12), got, want)
    assert all(np.abs(leaf).max() > 1e-3 for leaf in jax.tree_util.tree_leaves(got)), "gradients must not vanish"


def test_closed_over_arrays_receive_gradients(x64):
    f, params, x = cell_problem()
    closed = lambda x: dj.fixed_point(lambda z, _: f(z, (params, x)), jnp.zeros_like(x), (), solver=TIGHT[0]).value
    explicit = lambda x: dj.fixed_point(f, jnp.zeros_like(x), (params, x), solver=TIGHT[0]).value
    loss = lambda g: lambda x: jnp.sum(jnp.sin(g(x)))
    grad = lambda g: jax.jit(jax.grad(loss(g)))  # x stays a closed-over tracer inside; one program, not op by op
    np.testing.assert_allclose(grad(closed)(x), grad(explicit)(x), rtol=1e-10)


def test_backward_stats_come_out_through_the_probe(x64):
    f, params, x = cell_problem()
    probe = jnp.zeros(len(dj.SolveStats._fields), jnp.float32)
    solver = dj.Anderson(lam=1e-8, tol=1e-6, max_iter=100)
    w = jax.random.normal(jax.random.key(1), x.shape, jnp.float64)  # sum(z*) has a zero gradient

    def loss(params, probe):
        return jnp.sum(w * dj.fixed_point(f, jnp.zeros_like(x), (params, x), solver=solver, backward_stats_probe=probe).value)

    stats = dj.SolveStats.from_array(jax.grad(loss, argnums=1)(params, probe))
    assert 2 <= stats.mean_steps <= stats.max_steps < 100
    assert 0 < stats.mean_residual <= stats.max_residual < 1e-6 and stats.converged_fraction == 1


def test_backward_solve_does_not_depend_on_the_loss_scale(x64):
    # Anderson's ridge lam is absolute: solved on the raw cotangent, a loss scaled by
    # 1e-6 makes lam swamp the Gram matrix and the backward solve degrades.
    f, params, x = cell_problem()
    solver = dj.Anderson(tol=1e-6, max_iter=100)
    w = jax.random.normal(jax.random.key(1), x.shape, jnp.float64)

    @jax.jit  # the scale traced: one program for both
    def grad_and_stats(scale):
        def loss(params, probe):
            z = dj.fixed_point(f, jnp.zeros_like(x), (params, x), solver=solver, backward_stats_probe=probe).value
            return scale * jnp.sum(w * z)

        grads, probe_grad = jax.grad(loss, argnums=(0, 1))(params, jnp.zeros(len(dj.SolveStats._fields)))
        return jax.tree_util.tree_map(lambda g: g / scale, grads), dj.SolveStats.from_array(probe_grad)

    (tiny, tiny_stats), (unit, unit_stats) = grad_and_stats(1e-6), grad_and_stats(1.0)
    assert tiny_stats.converged_fraction == 1 and tiny_stats.max_steps == unit_stats.max_steps < 100
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12), tiny, unit)


def test_one_forward_and_backward_costs_solver_steps_plus_one_f_evaluation(x64):
    f, params, x = cell_problem()
    calls = []

    def counted_f(z, args):
        jax.debug.callback(lambda: calls.append(1))
        return f(z, args)

    solver = dj.Anderson(tol=1e-8, max_iter=60)
    solve = lambda f, p: dj.fixed_point(f, jnp.zeros_like(x), (p, x), solver=solver)
    forward = lambda f, p: solve(f, p).value
    grad = lambda f: jax.grad(lambda p: jnp.sum(x * forward(f, p)))
    calls.clear()
    solution = jax.jit(lambda p: solve(counted_f, p))(params)
    assert len(calls) == int(solution.num_steps.max())
    z_star = solution.value
    # The backward pass linearises f at z* once: the compiled gradient has the convolutions
    # of the forward solve plus those of a backward pass written by hand with a single
    # linearisation. (Its jaxpr holds more copies of f -- for the right-hand side, for the
    # backward solve, for the transposed operator -- the same operations on the same
    # operands, which XLA merges or drops; a callback in f would run each of them.)
    def one_linearisation(z_star, p, y):
        _, vjp = jax.vjp(f, z_star, (p, x))
        g = solve_linear(lambda g: vjp(g)[0], y, z_star, solver).value
        return vjp(g)[1][0]

    def convolutions(fn, *args):
        return jax.jit(fn).lower(*args).compile().as_text().count("convolution(")

    assert convolutions(grad(f), params) == (
        convolutions(lambda p: forward(f, p), params) + convolutions(one_linearisation, z_star, params, x))


def test_jitted_loss_and_grad_compiles_once():
    f, params, x = cell_problem(dtype=jnp.float32)
    traces = []

    @jax.jit
    def loss_and_grad(params, x):
        traces.append(1)
        loss = lambda p: jnp.mean(dj.fixed_point(f, jnp.zeros_like(x), (p, x)).value ** 2)
        return jax.value_and_grad(loss)(params)

    for seed in range(3):
        x = jax.random.normal(jax.random.key(seed), (2, 3, 3, 4))
        loss, grads = loss_and_grad(params, x)
        assert np.isfinite(loss)
    assert len(traces) == 1


def test_gradients_under_vmap_match_a_loop(x64):
    f, params, x = cell_problem()
    xs = jnp.stack([x, 0.5 * x])
    grad = jax.grad(lambda x: jnp.sum(jnp.sin(dj.fixed_point(f, jnp.zeros_like(x), (params, x), solver=TIGHT[0]).value)))
    vmapped = jax.jit(jax.vmap(grad))(xs)
    for x_i, g_i in zip(xs, vmapped):
        np.testing.assert_allclose(g_i, jax.jit(grad)(x_i), rtol=1e-10)
