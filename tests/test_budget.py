"""Run-time iteration budgets: one compilation for every budget, per-example caps, gradients at the capped point."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deq_jax as dj

SOLVERS = [dj.Anderson(tol=1e-10, max_iter=20), dj.Broyden(tol=1e-10, max_iter=20),
           dj.ForwardIteration(tol=1e-10, max_iter=20), dj.ForwardIteration(tol=1e-10, max_iter=20, damping=0.7)]


def problem(batch=3, features=5, dtype=jnp.float32):
    """``f(z, a) = tanh(W z + a)``: contractive, each example its own injection."""
    w = 0.5 * jax.random.normal(jax.random.key(0), (features, features), dtype) / np.sqrt(features)
    a = jax.random.normal(jax.random.key(1), (batch, features), dtype)
    return (lambda z, args: jnp.tanh(z @ args[0].T + args[1])), (w, a)


@pytest.mark.parametrize("solver", SOLVERS, ids=repr)
def test_changing_the_budget_compiles_once_and_caps_every_example(solver):
    f, args = problem()
    traces = []

    @jax.jit
    def solve(args, budget):
        traces.append(None)
        return dj.fixed_point(f, jnp.zeros_like(args[1]), args, solver=solver, budget=budget)

    free = solve(args, solver.max_iter).num_steps
    assert int(free.min()) > 4, "the test needs solves that a small budget cuts short"
    for budget in (1, 2, 4, 100):
        steps = solve(args, budget).num_steps
        np.testing.assert_array_equal(steps, np.minimum(free, budget))
    per_example = jnp.array([1, 3, 100])
    np.testing.assert_array_equal(solve(args, per_example).num_steps, np.minimum(free, [1, 3, 100]))
    assert len(traces) == 2  # one program for scalar budgets, one for per-example ones


def test_a_capped_example_in_a_batch_iterates_as_it_would_alone():
    f, (w, a) = problem()
    solver = SOLVERS[0]
    solve = jax.jit(lambda a, budget: dj.fixed_point(f, jnp.zeros_like(a), (w, a), solver=solver, budget=budget))
    batch = solve(a, jnp.array([2, 3, 4]))
    for i, budget in enumerate((2, 3, 4)):
        alone = solve(a[i:i + 1], budget)
        np.testing.assert_allclose(batch.value[i], alone.value[0], rtol=1e-6)
        assert int(batch.num_steps[i]) == budget


def test_implicit_gradient_under_a_budget_is_the_implicit_function_theorem_at_the_capped_point(x64):
    f, (w, a) = problem(batch=1, dtype=jnp.float64)
    solver = dj.Anderson(tol=1e-12, max_iter=50)
    tight = dj.Implicit(dj.ForwardIteration(tol=1e-13, max_iter=400))
    loss = lambda a: dj.fixed_point(f, jnp.zeros_like(a), (w, a), solver=solver, gradient=tight, budget=3).value.sum()
    solve = jax.jit(lambda a, budget: dj.fixed_point(f, jnp.zeros_like(a), (w, a), solver=solver, budget=budget).value)
    z = solve(a, 3)
    # Dense reference at the returned value z: dz/da = (I - J_z)^{-1} J_a, both Jacobians of f at z.
    j_z = jax.jacobian(lambda z: f(z, (w, a)))(z)[0, :, 0]
    j_a = jax.jacobian(lambda a: f(z, (w, a)))(a)[0, :, 0]
    want = np.ones(a.shape[1]) @ np.linalg.solve(np.eye(a.shape[1]) - j_z, j_a)
    np.testing.assert_allclose(jax.jit(jax.grad(loss))(a)[0], want, rtol=1e-9)
    free = solve(a, solver.max_iter)
    assert float(jnp.abs(z - free).max()) > 1e-3, "three steps must stop short of the fixed point"


def test_phantom_gradient_under_a_budget_unrolls_from_the_capped_point():
    f, (w, a) = problem()
    phantom = dj.Phantom(steps=2, damping=0.8)
    solver = SOLVERS[0]
    got = jax.grad(lambda a: dj.fixed_point(f, jnp.zeros_like(a), (w, a), solver=solver, gradient=phantom,
                                            budget=2).value.sum())(a)
    z = dj.fixed_point(f, jnp.zeros_like(a), (w, a), solver=solver, budget=2).value

    def two_damped_steps(a):
        y = z
        for _ in range(2):
            y = 0.8 * f(y, (w, a)) + 0.2 * y
        return y.sum()

    np.testing.assert_allclose(got, jax.grad(two_damped_steps)(a), rtol=1e-5)


def test_deq_layer_takes_a_budget_and_its_statistics_follow_it():
    deq = dj.nn.DEQ(dj.nn.ResNetCell(8, 16, num_groups=4, rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 8))
    solve = nnx.jit(lambda deq, budget: deq.solve(x, budget=budget))
    assert int(solve(deq, deq.solver.max_iter).num_steps.min()) > 2
    assert solve(deq, 2).stats().max_steps == 2
    grads = nnx.jit(nnx.grad(lambda deq: jnp.mean(deq(x, budget=jnp.array([1, 2])) ** 2)))(deq)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(grads))


@pytest.mark.parametrize("budget, error, match", [
    (0, ValueError, "budget must be >= 1"), (jnp.array([2, 0, 1]), ValueError, "budget must be >= 1"),
    (2.0, TypeError, "must be an integer"), (True, TypeError, "must be an integer"),
    (jnp.ones(4, jnp.int32), ValueError, r"shape \(3,\)"),
])
def test_a_bad_budget_is_a_clear_error(budget, error, match):
    f, args = problem()
    with pytest.raises(error, match=match):
        dj.fixed_point(f, jnp.zeros_like(args[1]), args, budget=budget)
