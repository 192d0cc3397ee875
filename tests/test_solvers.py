"""Solvers: known fixed points, per-example semantics, stats, jit/vmap, pytrees, a user-defined solver."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from flax import nnx

import deq_jax as dj

# The ridge term is absolute (as in the chapter): at tol 1e-10 it must be far smaller than
# the Gram matrix of residuals near the solution, or it slows Anderson down.
SOLVERS = [dj.Anderson(lam=1e-12, tol=1e-10, max_iter=100), dj.Broyden(tol=1e-10, max_iter=100),
           dj.ForwardIteration(tol=1e-10, max_iter=300)]


def affine_problem(batch=4, dim=6, seed=0):
    """``f(z) = z A^T + b`` with ||A|| = 0.7: its fixed point solves ``(I - A) z = b``."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(dim, dim))
    a *= 0.7 / np.linalg.norm(a, 2)
    b = rng.normal(size=(batch, dim)) * np.arange(1, batch + 1)[:, None]
    exact = np.linalg.solve(np.eye(dim) - a, b.T).T
    return (lambda z: z @ jnp.asarray(a).T + jnp.asarray(b)), jnp.zeros((batch, dim)), exact


def tanh_problem(batch=5, dim=8, seed=1):
    """A nonlinear contraction whose examples need different numbers of steps."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    x = rng.normal(size=(batch, dim)) * np.linspace(0.1, 3.0, batch)[:, None]
    return lambda z: jnp.tanh(z @ jnp.asarray(w).T + jnp.asarray(x)), jnp.zeros((batch, dim))


@pytest.mark.parametrize("solver", SOLVERS, ids=type)
def test_known_fixed_point_and_stats(x64, solver):
    f, z0, exact = affine_problem()
    sol = jax.jit(solver.__call__, static_argnums=0)(f, z0)
    np.testing.assert_allclose(sol.value, exact, rtol=1e-8)
    assert sol.converged.all() and (sol.residual < solver.tol).all()
    assert sol.trace.shape == (solver.max_iter, 4) and sol.num_steps.dtype == jnp.int32
    for example, steps in enumerate(np.asarray(sol.num_steps)):
        assert 1 < steps < solver.max_iter
        assert np.isfinite(sol.trace[:steps, example]).all() and np.isnan(sol.trace[steps:, example]).all()
        assert sol.trace[steps - 1, example] == sol.residual[example]
    stats = sol.stats()
    assert stats.mean_steps == np.mean(sol.num_steps) and stats.converged_fraction == 1.0


def test_anderson_solves_affine_problem_in_few_steps(x64):
    f, z0, _ = affine_problem(dim=4)
    anderson = dj.Anderson(m=6, lam=0.0, tol=1e-10)(f, z0)
    forward = dj.ForwardIteration(tol=1e-10, max_iter=300)(f, z0)
    # With m > dim Anderson is GMRES-like on an affine map: exact after ~dim + 2 steps.
    assert anderson.num_steps.max() <= 4 + 3 < forward.num_steps.min()


@pytest.mark.parametrize("solver", SOLVERS, ids=type)
def test_each_example_is_solved_as_if_alone(x64, solver):
    f, z0 = tanh_problem()
    batched = solver(f, z0)
    assert len(set(np.asarray(batched.num_steps).tolist())) > 1, "the problem must give different step counts"
    # Example i alone: f of a batch holding only its row. One program for every i (i traced).
    row = lambda i: (lambda z: jax.lax.dynamic_slice_in_dim(f(jnp.zeros_like(z0).at[i].set(z[0])), i, 1))
    solve_alone = jax.jit(lambda i: solver(row(i), jax.lax.dynamic_slice_in_dim(z0, i, 1)))
    for i in range(z0.shape[0]):
        alone = solve_alone(i)
        np.testing.assert_allclose(batched.value[i], alone.value[0], rtol=1e-12, atol=1e-14)
        assert batched.num_steps[i] == alone.num_steps[0]


@pytest.mark.parametrize("solver", SOLVERS, ids=type)
def test_nan_example_is_reported_and_isolated(x64, solver):
    f, z0 = tanh_problem()
    poison = jnp.zeros(z0.shape[0]).at[2].set(jnp.nan)[:, None]
    sol = solver(lambda z: f(z) + poison, z0)
    clean = solver(f, z0)
    keep = np.arange(z0.shape[0]) != 2
    np.testing.assert_allclose(sol.value[keep], clean.value[keep], rtol=1e-12)
    assert not sol.converged[2] and sol.residual[2] == np.inf and sol.num_steps[2] == 1
    assert sol.converged[keep].all()


def test_relaxed_iteration_follows_the_hand_written_damped_loop(x64):
    f, z0 = tanh_problem()
    damping, steps = 0.6, 7
    z, residuals = z0, []
    for _ in range(steps):
        fz = f(z)
        residuals.append(np.linalg.norm(fz - z, axis=1) / (np.linalg.norm(fz, axis=1) + 1e-5))  # the loop's eps
        z = damping * fz + (1 - damping) * z
    solution = dj.ForwardIteration(tol=1e-14, max_iter=steps, damping=damping)(f, z0)
    np.testing.assert_allclose(solution.trace, np.stack(residuals), rtol=1e-12)
    assert (np.diff(np.stack(residuals), axis=0) < 0).all()  # so the last iterate is the best, and value is f of it
    np.testing.assert_allclose(solution.value, fz, rtol=1e-12)


def test_relaxed_iteration_converges_where_plain_iteration_oscillates(x64):
    f = lambda z: -1.05 * z + 1.0  # J = -1.05: plain iteration diverges, damping 0.5 contracts (|1 - 0.5 * 2.05| < 1)
    z0 = jnp.zeros((1, 1))
    assert not bool(dj.ForwardIteration(tol=1e-8, max_iter=200)(f, z0).converged[0])
    relaxed = dj.ForwardIteration(tol=1e-8, max_iter=200, damping=0.5)(f, z0)
    assert bool(relaxed.converged[0])
    np.testing.assert_allclose(relaxed.value, 1 / 2.05, rtol=1e-7)


def test_anderson_beats_forward_iteration_on_chapter_demo():
    cell = dj.nn.ResNetCell(64, 128, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (10, 32, 32, 64))
    f = jax.jit(lambda z: cell(z, x))
    anderson = dj.Anderson(tol=1e-4, max_iter=50)(f, jnp.zeros_like(x))
    forward = dj.ForwardIteration(tol=1e-4, max_iter=50)(f, jnp.zeros_like(x))
    assert anderson.converged.all()
    assert anderson.num_steps.max() < forward.num_steps.min()


def test_pytree_state_matches_flat_state(x64):
    f, z0 = tanh_problem(dim=8)
    split = lambda z: {"a": z[:, :3], "b": z[:, 3:].reshape(-1, 5, 1)}
    join = lambda t: jnp.concatenate([t["a"], t["b"].reshape(-1, 5)], axis=1)
    flat = dj.Anderson(lam=1e-12, tol=1e-10)(f, z0)
    tree = dj.Anderson(lam=1e-12, tol=1e-10)(lambda t: split(f(join(t))), split(z0))
    np.testing.assert_allclose(join(tree.value), flat.value, rtol=1e-12)
    np.testing.assert_array_equal(tree.num_steps, flat.num_steps)


def test_vmap_over_an_outer_axis(x64):
    f, z0 = tanh_problem()
    solver = dj.Anderson(lam=1e-12, tol=1e-10)
    scales = jnp.array([0.5, 1.0])
    vmapped = jax.vmap(lambda s: solver(lambda z: f(z) * s, z0).value)(scales)
    for s, v in zip(scales, vmapped):
        np.testing.assert_allclose(v, solver(lambda z: f(z) * s, z0).value, rtol=1e-12)


def test_solvers_are_hashable_static_arguments():
    assert hash(dj.Anderson(tol=1e-3)) == hash(dj.Anderson(tol=1e-3))
    solve = jax.jit(lambda z, solver: solver(jnp.tanh, z).value, static_argnums=1)
    assert solve(jnp.ones((2, 3)), dj.ForwardIteration(tol=1e-3)).shape == (2, 3)


@dataclasses.dataclass(frozen=True)
class HalfStep(dj.Solver):
    """A solver written outside the package: Krasnoselskii-Mann steps ``z <- (z + f(z)) / 2``."""

    tol: float = 1e-10
    max_iter: int = 200

    def init(self, batch, features, dtype):
        return jnp.zeros((batch, features), dtype)

    def propose(self, history, k):
        return history

    def record(self, history, k, x, fx, active):
        return jnp.where(active[:, None], (x + fx) / 2, history)


def test_a_user_defined_solver_gets_per_example_stops_stats_and_gradients(x64):
    f, z0 = tanh_problem()
    solver = HalfStep()
    sol = jax.jit(solver.__call__, static_argnums=0)(f, z0)
    assert sol.converged.all() and (sol.residual < solver.tol).all()
    np.testing.assert_allclose(sol.value, f(sol.value), atol=1e-9)
    assert len(set(np.asarray(sol.num_steps).tolist())) > 1, "examples should stop at different steps"
    g, z0, exact = affine_problem()
    batched = solver(g, z0)
    np.testing.assert_allclose(batched.value, exact, rtol=1e-8)
    # Implicit gradients through fixed_point with the new solver, forward and backward.
    rng = np.random.default_rng(3)
    w, x = rng.normal(size=(6, 6)) * 0.1, rng.normal(size=(4, 6))
    h = lambda z, args: jnp.tanh(z @ args[0] + args[1])
    loss = lambda args: jnp.sum(jnp.sin(dj.fixed_point(h, jnp.zeros((4, 6)), args, solver=solver).value))
    check_grads(loss, ((jnp.asarray(w), jnp.asarray(x)),), order=1, modes=("rev",), atol=1e-6,
                              rtol=1e-6)
    with pytest.raises(TypeError, match="Can't instantiate abstract class"):
        type("Incomplete", (dj.Solver,), {})()


@pytest.mark.parametrize("solver, blow_up", [
    (dj.ForwardIteration(max_iter=100), lambda z: 3 * z + 1),  # overflows float32 after about 80 steps
    (dj.Broyden(max_iter=100), jnp.exp),  # no fixed point (Anderson and Broyden solve 3z + 1 exactly)
    (dj.Anderson(max_iter=100), lambda z: jnp.tan(z) + 1),
], ids=lambda x: type(x).__name__ if isinstance(x, dj.Solver) else "")
def test_divergence_is_reported_not_hidden_behind_the_best_finite_iterate(solver, blow_up):
    """Row 0 blows up to Inf/NaN, row 1 (``z <- z / 2 + 1``) converges: only row 0 is diverged."""
    row0 = jnp.array([[True], [False]])
    solution = solver(lambda z: jnp.where(row0, blow_up(z), 0.5 * z + 1), jnp.zeros((2, 4), jnp.float32))
    assert solution.diverged.tolist() == [True, False]
    assert solution.converged.tolist() == [False, True]
    assert np.isfinite(solution.residual[0]) and np.isinf(np.nanmax(solution.trace[:, 0]))
    assert float(solution.stats().diverged_fraction) == 0.5


def test_a_non_finite_start_is_diverged():
    solution = dj.Anderson()(lambda z: z + 1.0, jnp.array([[jnp.nan, 0.0], [0.0, 0.0]]))
    assert solution.diverged.tolist() == [True, False] and np.isinf(solution.residual[0])


def dot_precisions(jaxpr):
    """The ``precision`` of every ``dot_general`` in ``jaxpr`` and the jaxprs it calls."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn.params["precision"]
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if hasattr(sub, "jaxpr") and hasattr(sub, "consts"):  # a ClosedJaxpr
                    sub = sub.jaxpr
                if hasattr(sub, "eqns"):
                    yield from dot_precisions(sub)


@pytest.mark.parametrize("solver", [dj.Anderson(beta=0.5), dj.Broyden()], ids=type)
def test_the_solves_products_run_at_full_precision(solver):
    """No TF32 (GPU) or bfloat16-pass (TPU) products: a default-precision float32 Gram
    matrix stalls Anderson far above a float32 tolerance. ``f`` has no product of its own,
    so every product in the forward and backward solves is the solver's."""
    f = lambda z, scale: scale * jnp.tanh(z) + 1.0
    loss = lambda scale: dj.fixed_point(f, jnp.ones((3, 4)), scale, solver=solver).value.sum()
    precisions = list(dot_precisions(jax.make_jaxpr(jax.grad(loss))(0.5).jaxpr))
    assert len(precisions) >= 4
    assert all(p == (jax.lax.Precision.HIGHEST,) * 2 for p in precisions), precisions


def test_a_relative_ridge_makes_anderson_independent_of_the_problems_scale(x64):
    """``f_s(z) = s f(z / s)`` has the fixed point ``s z*`` and the same iterates scaled by ``s``:
    with ``ridge="relative"`` Anderson takes the same steps at every ``s`` (a power of two: exact
    scaling), where an absolute ridge stalls, the more so on the smaller problem."""
    f, z0 = tanh_problem()
    steps = {}
    for ridge in ("absolute", "relative"):
        solver = dj.Anderson(lam=1e-4, tol=1e-10, max_iter=60, ridge=ridge)
        for scale in (1.0, 2.0 ** -8):
            solution = solver(lambda z: scale * f(z / scale), z0)
            steps[ridge, scale] = solution.num_steps.tolist()
            assert bool(solution.converged.all()) == (ridge == "relative"), (ridge, scale, steps)
    assert steps["relative", 1.0] == steps["relative", 2.0 ** -8]
    assert steps["absolute", 1.0] != steps["absolute", 2.0 ** -8]


def test_an_unknown_ridge_is_refused():
    with pytest.raises(ValueError, match=r"Anderson: ridge must be one of \('absolute', 'relative'\), got 'scaled'"):
        dj.Anderson(ridge="scaled")
