"""Fixed-point correction: states along the solve, each with its own gradient, weighted gamma^(N-1-k)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deq_jax as dj

GAMMA = 0.7


def problem(dtype=jnp.float64):
    """``f(z, a) = tanh(z W^T + a)`` on two examples, each with its own injection."""
    w = 0.6 * jax.random.normal(jax.random.key(0), (5, 5), dtype) / np.sqrt(5)
    a = jax.random.normal(jax.random.key(1), (2, 5), dtype)
    target = jax.random.normal(jax.random.key(2), (2, 5), dtype)
    return (lambda z, args: jnp.tanh(z @ args[0].T + args[1])), w, a, target


def segment_starts(f, w, a, solver, budgets):
    """Each segment's starting point, by hand: the solver capped at each budget, chained."""
    starts, z = [], jnp.zeros_like(a)
    for budget in budgets:
        starts.append(z)
        z = solver(lambda z: f(z, (w, a)), z, budget).value
    return starts, z


def test_segments_split_the_solvers_max_iter():
    assert dj._correction.segment_budgets(25, 3) == [9, 8, 8]
    assert dj._correction.segment_budgets(4, 4) == [1, 1, 1, 1]


def test_jacobian_free_correction_equals_the_hand_written_sum_of_one_step_losses(x64):
    f, w, a, target = problem()
    solver = dj.Anderson(tol=1e-12, max_iter=9)
    gradient = dj.Phantom(steps=1, damping=1.0)  # each state: f at the segment's answer, backprop through that step

    def corrected(w, a):
        states = dj.fixed_point_states(f, jnp.zeros_like(a), (w, a), 3, solver=solver, gradient=gradient)
        return dj.fp_correction([jnp.sum((s.value - target) ** 2) for s in states], GAMMA)

    def by_hand(w, a):
        losses, z = [], jnp.zeros_like(a)
        for _ in range(3):  # each segment starts from the previous state, here f at the solver's answer
            end = jax.lax.stop_gradient(solver(lambda z: f(z, (w, a)), z, 3).value)
            z = f(end, (w, a))
            losses.append(jnp.sum((z - target) ** 2))
            z = jax.lax.stop_gradient(z)
        return GAMMA ** 2 * losses[0] + GAMMA * losses[1] + losses[2]

    # Jitted: eagerly, every segment's solve compiles alone.
    np.testing.assert_allclose(jax.jit(corrected)(w, a), jax.jit(by_hand)(w, a), rtol=1e-12)
    got, want = (jax.jit(jax.grad(loss, argnums=(0, 1)))(w, a) for loss in (corrected, by_hand))
    for g, h in zip(got, want):
        np.testing.assert_allclose(g, h, rtol=1e-10)


def test_implicit_correction_differentiates_each_state_by_the_implicit_function_theorem_at_it(x64):
    f, w, a, target = problem()
    solver = dj.Anderson(tol=1e-12, max_iter=6)
    gradient = dj.Implicit(dj.ForwardIteration(tol=1e-14, max_iter=500))
    loss = lambda a: dj.fp_correction(
        [jnp.sum((s.value - target) ** 2) for s in
         dj.fixed_point_states(f, jnp.zeros_like(a), (w, a), 2, solver=solver, gradient=gradient)], GAMMA)
    starts, _ = segment_starts(f, w, a, solver, [3, 3])
    want = np.zeros(a.shape)
    for weight, start in zip((GAMMA, 1.0), starts):
        z = solver(lambda z: f(z, (w, a)), start, 3).value
        for i in range(a.shape[0]):  # dz_i/da_i = (I - J_z)^{-1} J_a at the state, example by example
            j_z = jax.jacobian(lambda zi: f(zi[None], (w, a[i:i + 1]))[0])(z[i])
            j_a = jax.jacobian(lambda ai: f(z[i:i + 1], (w, ai[None]))[0])(a[i])
            want[i] += weight * 2 * (z[i] - target[i]) @ np.linalg.solve(np.eye(5) - j_z, j_a)
    np.testing.assert_allclose(jax.jit(jax.grad(loss))(a), want, rtol=1e-9)
    free = dj.fixed_point(f, jnp.zeros_like(a), (w, a), solver=dj.Anderson(tol=1e-12, max_iter=50)).value
    assert float(jnp.abs(starts[1] - free).max()) > 1e-4, "the first state must stop short of the fixed point"


def test_deq_layer_exposes_the_states_and_their_gradients():
    deq = dj.nn.DEQ(dj.nn.ResNetCell(8, 16, num_groups=4, rngs=nnx.Rngs(0)), solver=dj.Anderson(tol=1e-6, max_iter=8))
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 8))
    states = nnx.jit(lambda deq: deq.solve_states(x, 4))(deq)
    assert len(states) == 4 and all(int(s.num_steps.max()) <= 2 for s in states)
    residuals = [float(s.residual.max()) for s in states]
    assert residuals[-1] < residuals[0]
    loss = lambda deq: dj.fp_correction([jnp.mean(s.value ** 2) for s in deq.solve_states(x, 4)])
    grads = nnx.jit(nnx.grad(loss))(deq)
    assert all(np.isfinite(leaf).all() and np.abs(leaf).max() > 0 for leaf in jax.tree.leaves(nnx.state(grads, nnx.Param)))


def test_backward_statistics_of_the_states_combine_instead_of_adding(x64):
    """Three states, three backward solves: the probe's gradient is their combination, not their sum."""
    f, w, a, target = problem()
    solver, backward = dj.Anderson(tol=1e-12, max_iter=9), dj.ForwardIteration(tol=1e-6, max_iter=200)
    probe = jnp.zeros(dj._solution.NUM_STATS, jnp.float32)

    def loss(probes):  # one probe per state, by hand: the states' own statistics
        states = dj.fixed_point_states(f, jnp.zeros_like(a), (w, a), 3, solver=solver, gradient=dj.Implicit(backward),
                                       backward_stats_probe=probes[0])
        return sum(jnp.sum((s.value - target) ** 2) for s in states)

    combined = dj.SolveStats.from_array(jax.grad(loss)((probe,))[0])
    per_state = []
    starts, _ = segment_starts(f, w, a, solver, [3, 3, 3])
    for start in starts:
        grad = jax.grad(lambda p: jnp.sum((dj.fixed_point(f, start, (w, a), solver=solver, budget=3,
                                                          gradient=dj.Implicit(backward), backward_stats_probe=p)
                                           .value - target) ** 2))(probe)
        per_state.append(dj.SolveStats.from_array(grad))
    assert float(combined.converged_fraction) == 1.0  # summed, it read 3
    np.testing.assert_allclose(combined.mean_steps, sum(s.mean_steps for s in per_state), rtol=1e-6)
    np.testing.assert_allclose(combined.max_steps, sum(s.max_steps for s in per_state), rtol=1e-6)
    np.testing.assert_allclose(combined.mean_residual, np.mean([s.mean_residual for s in per_state]), rtol=1e-5)
    np.testing.assert_allclose(combined.max_residual, max(s.max_residual for s in per_state), rtol=1e-5)
    assert min(s.mean_steps for s in per_state) > 1


def test_a_state_outside_the_loss_does_not_dilute_the_statistics():
    f, w, a, target = problem(jnp.float32)
    probe = jnp.zeros(dj._solution.NUM_STATS, jnp.float32)
    grad = jax.grad(lambda p: jnp.sum(dj.fixed_point_states(f, jnp.zeros_like(a), (w, a), 2,
                                                           backward_stats_probe=p)[-1].value ** 2))(probe)
    stats = dj.SolveStats.from_array(grad)
    assert float(stats.converged_fraction) == 1.0 and float(stats.mean_steps) > 0


@pytest.mark.parametrize("call, error, match", [
    (lambda: dj.fp_correction([1.0], gamma=0.0), ValueError, r"gamma must be a number in \(0, 1\], got 0.0"),
    (lambda: dj.fp_correction([1.0], gamma=1.5), ValueError, r"gamma must be a number in \(0, 1\], got 1.5"),
    (lambda: dj.fp_correction([]), ValueError, "losses is empty"),
    (lambda: dj.fixed_point_states(lambda z, a: z, jnp.zeros((1, 2)), (), 0), ValueError,
     "num_states must be an int >= 1, got 0"),
    (lambda: dj.fixed_point_states(lambda z, a: z, jnp.zeros((1, 2)), (), 30, solver=dj.Anderson(max_iter=25)),
     ValueError, r"num_states \(30\) must be at most the solver's max_iter \(25\)"),
])
def test_bad_input_is_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()
