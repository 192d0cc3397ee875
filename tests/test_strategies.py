"""The gradient protocol (a strategy written outside the package), the Neumann-series phantom gradient, backprop
through the solve, and ``has_aux``."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import deq_jax as dj
from experiments.benchmarks.reversible_error import unrolled as unrolled_reversible

TIGHT = dj.Anderson(lam=1e-10, tol=1e-13, max_iter=200)


@dataclasses.dataclass(frozen=True)
class JacobianFree(dj.Gradient):
    """The Jacobian-free gradient, written as a user would: the value f(z*), differentiated through that step only."""

    def solve(self, f, z0, args, solver, budget, backward_stats_probe):
        frozen = jax.lax.stop_gradient(args)
        solution = solver(lambda z: f(z, frozen), z0, budget)
        return dataclasses.replace(solution, value=f(jax.lax.stop_gradient(solution.value), args))


def test_a_strategy_from_outside_gets_the_deq_layer_statistics_and_budgets(x64):
    x = jax.random.normal(jax.random.key(0), (3, 4, 4, 4), jnp.float64)
    solver = dj.Anderson(tol=1e-4, max_iter=60)
    cell = lambda: dj.nn.ResNetCell(4, 6, num_groups=2, param_dtype=jnp.float64, rngs=nnx.Rngs(0))

    def grads(gradient):
        deq = dj.nn.DEQ(cell(), solver=solver, gradient=gradient)
        return nnx.jit(nnx.grad(lambda deq: jnp.sum(jnp.sin(deq(x)))))(deq)

    mine, builtin = grads(JacobianFree()), grads(dj.Phantom(1, 1.0))  # Phantom(1, 1.0) is the same gradient
    for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(builtin)):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    deq = dj.nn.DEQ(cell(), solver=solver, gradient=JacobianFree())
    solution = nnx.jit(lambda deq, budget: deq.solve(x, budget=budget))(deq, jnp.array([2, 3, 60]))
    np.testing.assert_array_equal(solution.num_steps[:2], [2, 3])
    assert bool(solution.converged[2]) and not solution.converged[:2].any()
    stats = solution.stats()
    assert float(stats.max_steps) == float(solution.num_steps[2]) and float(stats.converged_fraction) == pytest.approx(1 / 3)


def dense_problem():
    """``f(z, (w, x)) = tanh(z w + x)`` on a batch of 3 examples of 4 features, float64, with its fixed point."""
    w = 0.7 * jax.random.orthogonal(jax.random.key(0), 4, dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(1), (3, 4), jnp.float64)
    f = lambda z, a: jnp.tanh(z @ a[0] + a[1])
    z_star = TIGHT(lambda z: f(z, (w, x)), jnp.zeros_like(x)).value
    return f, (w, x), z_star


def by_hand_series(matrices, y, terms, damping):
    """``damping * sum_{k<terms} A_b^k y_b`` per example, ``A_b = damping * M_b + (1 - damping) * I``."""
    a = damping * matrices + (1 - damping) * jnp.eye(matrices.shape[-1])
    total, term = jnp.zeros_like(y), y
    for _ in range(terms):
        total, term = total + term, jnp.einsum("bij,bj->bi", a, term)
    return damping * total


@pytest.mark.parametrize("terms, damping", [(1, 1.0), (4, 1.0), (6, 0.6)])
def test_neumann_is_the_hand_written_series_in_both_modes(x64, terms, damping):
    f, (w, x), z_star = dense_problem()
    # J_b = d f_b / d z_b at z*, one Jacobian per example (rows do not interact).
    jacobians = jax.vmap(jax.jacobian(lambda z, x: f(z[None], (w, x[None]))[0]))(z_star, x)
    fixed_point = lambda a: dj.fixed_point(f, jnp.zeros_like(x), a, solver=TIGHT, gradient=dj.Neumann(terms, damping)).value
    _, f_vjp = jax.vjp(lambda a: f(z_star, a), (w, x))
    y = jax.random.normal(jax.random.key(2), x.shape, jnp.float64)
    # Reverse: the cotangent y through the transposed series, then one VJP w.r.t. the arguments.
    want = f_vjp(by_hand_series(jnp.swapaxes(jacobians, 1, 2), y, terms, damping))[0]
    got = jax.vjp(fixed_point, (w, x))[1](y)[0]
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
    # Forward: the tangent of the arguments through f, then the series.
    v = (jnp.zeros_like(w), jax.random.normal(jax.random.key(3), x.shape, jnp.float64))
    rhs = jax.jvp(lambda a: f(z_star, a), ((w, x),), (v,))[1]
    np.testing.assert_allclose(jax.jvp(fixed_point, ((w, x),), (v,))[1], by_hand_series(jacobians, rhs, terms, damping),
                               rtol=1e-10, atol=1e-13)


def test_neumann_approaches_the_implicit_gradient_on_a_tuple_state_and_reports_no_backward_stats(x64):
    # A tuple state (as MDEQ's branches): u feeds v, v feeds u.
    f = lambda z, a: (jnp.tanh(0.2 * z[0] + 0.3 * z[1].sum(1, keepdims=True) + a), jnp.tanh(0.4 * z[0][:, :2] - a[:, :2]))
    z0 = (jnp.zeros((2, 3), jnp.float64), jnp.zeros((2, 2), jnp.float64))
    a = jax.random.normal(jax.random.key(0), (2, 3), jnp.float64)
    probe = jnp.ones(len(dj.SolveStats._fields))

    def loss(a, probe, gradient):
        z = dj.fixed_point(f, z0, a, solver=TIGHT, gradient=gradient, backward_stats_probe=probe).value
        return jnp.sum(jnp.sin(z[0])) + jnp.sum(z[1] ** 2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    exact = grad(a, probe, dj.Implicit())[0]
    errors = [float(jnp.abs(grad(a, probe, dj.Neumann(k))[0] - exact).max()) for k in (1, 4, 16, 48)]
    assert all(e1 > e2 for e1, e2 in zip(errors, errors[1:])) and errors[0] > 1e-2 and errors[-1] < 1e-12, errors
    np.testing.assert_array_equal(grad(a, probe, dj.Neumann(4))[1], 0)


def forward_iteration_schedule(f, z0, tol, max_iter, damping):
    """Each example's f evaluations and lowest-residual one, by damped forward iteration in numpy (the loop's rule)."""
    schedule = []
    for row in np.asarray(z0):
        x = row[None]
        residuals = []
        while True:
            fx = np.asarray(f(x, len(schedule)))
            residuals.append(np.linalg.norm(fx - x) / (np.linalg.norm(fx) + 1e-5))
            if residuals[-1] < tol or len(residuals) == max_iter:
                break
            x = damping * fx + (1 - damping) * x
        schedule.append((len(residuals), int(np.argmin(residuals))))
    return schedule


@pytest.mark.parametrize("checkpoint_every", [None, 3])
def test_backprop_is_plain_backprop_through_a_python_unrolled_loop_of_each_examples_steps(x64, checkpoint_every):
    f, (w, x), _ = dense_problem()
    x = x * jnp.array([[0.1], [1.0], [3.0]])  # examples that stop after different numbers of steps
    tol, max_iter, damping = 1e-6, 40, 0.8
    z0 = jnp.zeros_like(x)
    schedule = forward_iteration_schedule(lambda z, b: f(z, (w, x[b:b + 1])), z0, tol, max_iter, damping)
    assert len({steps for steps, _ in schedule}) == 3, schedule

    def unrolled(a):
        rows = []
        for b, (steps, best) in enumerate(schedule):
            z, images = z0[b:b + 1], []
            for _ in range(steps):
                images.append(f(z, (a[0], a[1][b:b + 1])))
                z = damping * images[-1] + (1 - damping) * z
            rows.append(images[best])
        return jnp.concatenate(rows)

    solver = dj.ForwardIteration(tol, max_iter, damping=damping)
    solution = dj.fixed_point(f, z0, (w, x), solver=solver, gradient=dj.Backprop(checkpoint_every))
    np.testing.assert_array_equal(solution.num_steps, [steps for steps, _ in schedule])
    fixed_point = lambda a: dj.fixed_point(f, z0, a, solver=solver, gradient=dj.Backprop(checkpoint_every)).value
    y = jax.random.normal(jax.random.key(2), x.shape, jnp.float64)
    got, want = jax.vjp(fixed_point, (w, x))[1](y)[0], jax.vjp(unrolled, (w, x))[1](y)[0]
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    tangent = (jnp.ones_like(w), jnp.zeros_like(x))
    np.testing.assert_allclose(jax.jvp(fixed_point, ((w, x),), (tangent,))[1],
                               jax.jvp(unrolled, ((w, x),), (tangent,))[1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("solver", [dj.Anderson(tol=1e-12, max_iter=8), dj.Broyden(tol=1e-12, max_iter=8)], ids=type)
def test_backprop_through_anderson_and_broyden_matches_finite_differences(x64, solver):
    # 8 steps, far from the tolerance: the derivative of the finite solve, not of the fixed point.
    f, args, _ = dense_problem()
    loss = lambda a: jnp.sum(jnp.sin(dj.fixed_point(f, jnp.zeros_like(a[1]), a, solver=solver,
                                                    gradient=dj.Backprop(checkpoint_every=3)).value))
    check_grads(jax.jit(loss), (args,), order=1, modes=["rev", "fwd"], eps=1e-6, atol=1e-7, rtol=1e-7)


def test_backprop_with_checkpoints_stores_less(x64):
    f, args, _ = dense_problem()
    solver = dj.ForwardIteration(tol=1e-30, max_iter=200)  # every step runs

    def temp_bytes(gradient):
        loss = lambda a: jnp.sum(dj.fixed_point(f, jnp.zeros_like(a[1]), a, solver=solver, gradient=gradient).value)
        return jax.jit(jax.grad(loss)).lower(args).compile().memory_analysis().temp_size_in_bytes

    stored, checkpointed = temp_bytes(dj.Backprop()), temp_bytes(dj.Backprop(checkpoint_every=14))
    assert checkpointed < stored / 4, (checkpointed, stored)


def test_gdeq_is_the_cotangent_preconditioned_by_hand_with_the_broyden_factors(x64):
    from deq_jax._solvers._loop import iterate

    f, (w, x), _ = dense_problem()
    solver = dj.Broyden(tol=1e-5, max_iter=30, memory=4)  # fewer updates kept than steps taken
    solution, history = iterate(solver, lambda z: f(z, (w, x)), jnp.zeros_like(x), with_history=True)
    assert int(solution.num_steps.min()) > 4
    y = jax.random.normal(jax.random.key(2), x.shape, jnp.float64)
    # H_b = -I + U_b^T V_b per example; the cotangent is -H_b^T y_b.
    h = -jnp.eye(4) + jnp.einsum("bmi,bmj->bij", history.u, history.v)
    _, f_vjp = jax.vjp(lambda a: f(solution.value, a), (w, x))
    want = f_vjp(-jnp.einsum("bij,bi->bj", h, y))[0]
    fixed_point = lambda a: dj.fixed_point(f, jnp.zeros_like(x), a, solver=solver, gradient=dj.GDEQ()).value
    np.testing.assert_allclose(fixed_point((w, x)), solution.value, rtol=1e-14)
    got = jax.vjp(fixed_point, (w, x))[1](y)[0]
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    # Closer to the implicit gradient than the Jacobian-free one it preconditions.
    exact = jax.vjp(lambda a: dj.fixed_point(f, jnp.zeros_like(x), a, solver=TIGHT).value, (w, x))[1](y)[0]
    jfb = jax.vjp(lambda a: dj.fixed_point(f, jnp.zeros_like(x), a, solver=solver, gradient=dj.Phantom(1)).value,
                  (w, x))[1](y)[0]
    error = lambda g: float(jnp.linalg.norm(g[0] - exact[0]) / jnp.linalg.norm(exact[0]))
    assert error(got) < error(jfb), (error(got), error(jfb))  # measured 0.42 against 0.55


def test_gdeq_needs_broyden_and_reverse_mode():
    f = lambda z, a: jnp.tanh(0.5 * z + a)
    with pytest.raises(TypeError, match="GDEQ .* the solver must be a deq_jax.Broyden; got Anderson"):
        dj.fixed_point(f, jnp.zeros((2, 3)), 0.3, gradient=dj.GDEQ())
    solve = lambda a: dj.fixed_point(f, jnp.zeros((2, 3)), a, solver=dj.Broyden(), gradient=dj.GDEQ()).value
    with pytest.raises(TypeError, match="GDEQ gradients are reverse-mode only.*Implicit"):
        jax.jvp(solve, (0.3,), (1.0,))


@pytest.mark.parametrize("beta", [0.5, 0.75])
def test_reversible_backprop_is_backprop_through_the_same_finite_iteration_per_example(x64, beta):
    f, (w, x), _ = dense_problem()
    x = x * jnp.array([[0.1], [1.0], [3.0]])  # examples that stop after different numbers of evaluations
    z0 = 0.1 * jax.random.normal(jax.random.key(4), x.shape, jnp.float64)
    # Reconstruction amplifies rounding errors geometrically. Measured, relative to each gradient's largest
    # entry: 3e-11 at beta 1/2 (36 evaluations at most), 4e-8 at beta 3/4 (23); a logic error is off by O(1).
    solver = dj.Reversible(tol=1e-2, max_iter=40, beta=beta)
    solve = lambda a, z0: dj.fixed_point(f, z0, a, solver=solver, gradient=dj.ReversibleBackprop())
    steps = [int(n) for n in solve((w, x), z0).num_steps]
    assert len(set(steps)) > 1 and max(steps) < 40, steps

    def unrolled(a, z0):
        return jnp.concatenate([unrolled_reversible(f, (a[0], a[1][b:b + 1]), z0[b:b + 1], n, beta)
                                for b, n in enumerate(steps)])

    np.testing.assert_allclose(solve((w, x), z0).value, unrolled((w, x), z0), rtol=1e-13)
    y = jax.random.normal(jax.random.key(2), x.shape, jnp.float64)
    got = jax.vjp(lambda a, z0: solve(a, z0).value, (w, x), z0)[1](y)
    want = jax.vjp(unrolled, (w, x), z0)[1](y)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):  # the arguments' gradients and z0's
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-9)


def test_reversible_backprop_memory_is_flat_in_max_iter_where_backprop_grows(x64):
    f, args, _ = dense_problem()

    def temp_bytes(gradient, max_iter):
        solver = dj.Reversible(tol=1e-30, max_iter=max_iter)  # every evaluation runs
        loss = lambda a: jnp.sum(dj.fixed_point(f, jnp.zeros_like(a[1]), a, solver=solver, gradient=gradient).value)
        return jax.jit(jax.grad(loss)).lower(args).compile().memory_analysis().temp_size_in_bytes

    reversible = [temp_bytes(dj.ReversibleBackprop(), n) for n in (50, 400)]
    stored = [temp_bytes(dj.Backprop(), n) for n in (50, 400)]
    assert reversible[1] <= reversible[0] * 1.1 and stored[1] > stored[0] * 4, (reversible, stored)


def test_reversible_reconstruction_in_float32_is_close_for_a_dozen_evaluations():
    # Undoing an update amplifies rounding errors by 1 / (1 - beta) or more: fine for 12 evaluations at
    # beta 1/2 (measured 4e-7 against the float64 unrolled loop), not for 50 (3e-3).
    with jax.enable_x64(True):
        f, (w, x), _ = dense_problem()
        w, x = np.asarray(w, np.float32), np.asarray(x, np.float32)
    y = jax.random.normal(jax.random.key(2), x.shape)
    solver = dj.Reversible(tol=1e-30, max_iter=12)
    got = jax.vjp(lambda a: dj.fixed_point(f, jnp.zeros_like(x), a, solver=solver,
                                           gradient=dj.ReversibleBackprop()).value, (w, x))[1](y)[0][0]
    with jax.enable_x64(True):
        a64 = (jnp.asarray(w, jnp.float64), jnp.asarray(x, jnp.float64))
        want = jax.vjp(lambda a: unrolled_reversible(f, a, jnp.zeros_like(a64[1]), 12, 0.5), a64)[1](
            jnp.asarray(y, jnp.float64))[0][0]
        assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 1e-5


def test_reversible_backprop_needs_the_reversible_solver_and_reverse_mode():
    f = lambda z, a: jnp.tanh(0.5 * z + a)
    with pytest.raises(TypeError, match="ReversibleBackprop reconstructs .* the solver must be a deq_jax.Reversible; got Anderson"):
        dj.fixed_point(f, jnp.zeros((2, 3)), 0.3, gradient=dj.ReversibleBackprop())
    solve = lambda a: dj.fixed_point(f, jnp.zeros((2, 3)), a, solver=dj.Reversible(),
                                     gradient=dj.ReversibleBackprop()).value
    with pytest.raises(TypeError, match="ReversibleBackprop gradients are reverse-mode only.*Implicit"):
        jax.jvp(solve, (0.3,), (1.0,))


# The largest entry of |gradient - implicit gradient| allowed, relative to the implicit gradient's largest: Neumann's
# 4 terms and GDEQ approximate it (measured 0.19 and 0.52), the finite solves' exact gradients are close to it.
@pytest.mark.parametrize("gradient, solver, max_error", [
    (dj.Neumann(4), dj.Anderson(tol=1e-4, max_iter=30), 0.3),
    (dj.Backprop(checkpoint_every=4), dj.Anderson(tol=1e-4, max_iter=30), 0.05),
    (dj.GDEQ(), dj.Broyden(tol=1e-4, max_iter=30), 0.7),
    (dj.ReversibleBackprop(), dj.Reversible(tol=1e-4, max_iter=30), 0.05),
], ids=lambda v: type(v).__name__ if not isinstance(v, float) else str(v))
def test_every_strategy_takes_tuple_states_budgets_bfloat16_cells_and_fixed_point_correction(gradient, solver,
                                                                                           max_error):
    # A two-branch state (as MDEQ's), computed in bfloat16 and cast back to the float32 state.
    def f(z, a):
        u, v = (t.astype(jnp.bfloat16) for t in z)
        a = a.astype(jnp.bfloat16)
        return (jnp.tanh(0.3 * u + 0.2 * v.sum(1, keepdims=True) + a).astype(jnp.float32),
                jnp.tanh(0.4 * u[:, :2] - a[:, :2]).astype(jnp.float32))

    z0 = (jnp.zeros((2, 3)), jnp.zeros((2, 2)))
    a = jax.random.normal(jax.random.key(0), (2, 3))
    solve = lambda a, budget: dj.fixed_point(f, z0, a, solver=solver, gradient=gradient, budget=budget)
    solution = jax.jit(solve)(a, jnp.array([3, 30]))
    assert int(solution.num_steps[0]) == 3 and int(solution.num_steps[1]) <= 30
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(solution.value))
    grad = jax.jit(jax.grad(lambda a: sum(jnp.sum(t) for t in solve(a, None).value)))(a)
    exact = jax.grad(lambda a: sum(jnp.sum(t) for t in dj.fixed_point(f, z0, a, solver=TIGHT).value))(a)
    assert grad.dtype == jnp.float32 and float(jnp.abs(grad - exact).max()) < max_error * float(jnp.abs(exact).max())
    corrected = lambda a: dj.fp_correction([sum(jnp.sum(t) for t in s.value) for s in dj.fixed_point_states(
        f, z0, a, 2, solver=solver, gradient=gradient)], gamma=0.8)
    assert bool(jnp.isfinite(jax.jit(jax.grad(corrected))(a)).all())


def aux_problem():
    """``f(z, (w, x)) = (tanh(z w + x), {"energy": ||z||^2 per example, "mean": mean of z w})`` and its args."""
    f, args, _ = dense_problem()
    return (lambda z, a: (f(z, a), {"energy": jnp.sum(z ** 2, axis=1), "mean": jnp.mean(z @ a[0])})), args


@pytest.mark.parametrize("gradient", [dj.Implicit(), dj.Neumann(60), dj.Backprop()], ids=repr)
def test_has_aux_returns_f_s_aux_at_the_fixed_point_differentiable_in_every_mode(x64, gradient):
    f, args = aux_problem()
    solve = lambda a: dj.fixed_point(f, jnp.zeros_like(a[1]), a, solver=TIGHT, gradient=gradient, has_aux=True)
    solution = solve(args)
    want = f(solution.value, args)[1]
    for key in want:
        np.testing.assert_allclose(solution.aux[key], want[key], rtol=1e-14)
    loss = lambda a: jnp.sum(jnp.sin(solve(a).value)) + jnp.sum(solve(a).aux["energy"]) + solve(a).aux["mean"]
    # Each strategy's gradient is the exact one here (a converged solve, a series of 60 terms at contraction 0.7).
    check_grads(jax.jit(loss), (args,), order=1, modes=["rev", "fwd"], eps=1e-6, atol=1e-6, rtol=1e-6)


def test_a_deq_layer_with_an_aux_cell_returns_the_pair_and_its_gradients():
    class EnergyCell(nnx.Module):
        def __init__(self, rngs):
            self.inner = dj.nn.ResNetCell(4, 6, num_groups=2, rngs=rngs)

        def __call__(self, z, x):
            return self.inner(z, x), jnp.mean(z ** 2, axis=(1, 2, 3))

    x = jax.random.normal(jax.random.key(0), (3, 4, 4, 4))
    deq = dj.nn.DEQ(EnergyCell(nnx.Rngs(0)), solver=dj.Anderson(tol=1e-3, max_iter=30), has_aux=True)
    z, energy = deq(x)
    np.testing.assert_allclose(energy, jnp.mean(z ** 2, axis=(1, 2, 3)), rtol=1e-6)
    plain = dj.nn.DEQ(EnergyCell(nnx.Rngs(0)).inner, solver=dj.Anderson(tol=1e-3, max_iter=30))
    np.testing.assert_allclose(z, plain(x), rtol=1e-6)
    grads = nnx.jit(nnx.grad(lambda deq: jnp.sum(deq(x)[1])))(deq)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads)) and any(
        float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    assert deq.spectral_radius(x, z, jax.random.key(0), num_iters=5).shape == (3,)  # the state alone


def test_has_aux_needs_a_pair():
    with pytest.raises(TypeError, match=r"with has_aux=True, f must return a pair \(z, aux\); got tuple of length 3"):
        dj.fixed_point(lambda z, a: (z, z, z), jnp.zeros((2, 3)), 0.5, has_aux=True)


@pytest.mark.parametrize("make, message", [
    (lambda: dj.Backprop(0), "Backprop: checkpoint_every must be an int >= 1, got 0"),
    (lambda: dj.Reversible(beta=0.4), r"Reversible: beta must be a number in \[0.5, 1\), got 0.4"),
    (lambda: dj.Reversible(beta=1.0), r"Reversible: beta must be a number in \[0.5, 1\), got 1.0"),
    (lambda: dj.Neumann(0), "Neumann: terms must be an int >= 1, got 0"),
    (lambda: dj.Neumann(3, 1.5), r"Neumann: damping must be a number in \(0, 1\], got 1.5"),
    (lambda: dj.Neumann(3, 0.0), r"Neumann: damping must be a number in \(0, 1\], got 0.0"),
])
def test_bad_neumann_options_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_the_protocol_needs_its_method():
    class Incomplete(dj.Gradient):
        pass

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()
