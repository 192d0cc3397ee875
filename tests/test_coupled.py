"""examples='coupled': exact gradients when f mixes the examples of its batch (float64).

Each case is checked against backprop through a long unrolled iteration and against
finite differences; with the default per-example treatment the same gradients are
wrong (the first test says by how much), or, for a 1-D state, refused.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import deq_jax as dj

SOLVER = dj.Anderson(lam=1e-10, tol=1e-12, max_iter=200)
UNROLLED_STEPS = 300


def unrolled(f, z0, args):
    """Backprop through ``UNROLLED_STEPS`` plain iterations: the reference gradient."""
    return jax.lax.fori_loop(0, UNROLLED_STEPS, lambda _, z: f(z, args), z0)


def batch_centring_problem():
    """``f(z) = tanh(z W + (z - mean_b z) / 2 + x)``: every row depends on the batch mean."""
    w = 0.4 * jax.random.normal(jax.random.key(0), (6, 6), jnp.float64) / np.sqrt(6)
    x = jax.random.normal(jax.random.key(1), (4, 6), jnp.float64)
    f = lambda z, a: jnp.tanh(z @ a[0] + 0.5 * (z - z.mean(0)) + a[1])
    return f, (w, x), jnp.zeros_like(x)


def vector_problem(n=5):
    """An unbatched state: ``z`` of shape ``(n,)``, ``f(z) = tanh(W z + x)``."""
    w = 0.6 * jax.random.normal(jax.random.key(2), (n, n), jnp.float64) / np.sqrt(n)
    x = jax.random.normal(jax.random.key(3), (n,), jnp.float64)
    return lambda z, a: jnp.tanh(a[0] @ z + a[1]), (w, x), jnp.zeros(n, jnp.float64)


class BatchNormCell(nnx.Module):
    """``tanh(0.3 * BatchNorm(Linear(z)) + x)`` with BatchNorm in training mode: batch statistics inside f."""

    def __init__(self, features: int, rngs: nnx.Rngs):
        self.linear = nnx.Linear(features, features, param_dtype=jnp.float64, rngs=rngs)
        self.norm = nnx.BatchNorm(features, use_running_average=False, dtype=jnp.float64, param_dtype=jnp.float64,
                                  scale_init=nnx.initializers.constant(0.3), rngs=rngs)

    def __call__(self, z, x):
        return jnp.tanh(self.norm(self.linear(z)) + x)


def batch_norm_problem():
    f, state = dj.nn.explicit_cell(BatchNormCell(6, nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(4), (5, 6), jnp.float64)
    return f, (state, x), jnp.zeros_like(x)


def weighted_loss(z):
    weights = jnp.cos(jnp.arange(z.size, dtype=z.dtype)).reshape(z.shape)
    return jnp.sum(weights * z)


def solved(f, z0, examples):
    return lambda args: weighted_loss(dj.fixed_point(f, z0, args, solver=SOLVER, gradient=dj.Implicit(SOLVER),
                                                     examples=examples).value)


def max_relative_error(got, want) -> float:
    """The largest error over every leaf, relative to the largest reference entry (some leaves' are ~0)."""
    errors = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), got, want)
    return max(jax.tree_util.tree_leaves(errors)) / max(float(jnp.abs(b).max()) for b in jax.tree_util.tree_leaves(want))


@pytest.mark.parametrize("problem", [batch_centring_problem, batch_norm_problem])
def test_coupled_batch_matches_unrolled_backprop(x64, problem):
    f, args, z0 = problem()
    want = jax.jit(jax.grad(lambda a: weighted_loss(unrolled(f, z0, a))))(args)
    got = jax.jit(jax.grad(solved(f, z0, "coupled")))(args)
    assert max_relative_error(got, want) < 1e-9
    # The per-example treatment is wrong on these f (by 2-3% of the largest entry), which is why the option exists.
    assert max_relative_error(jax.jit(jax.grad(solved(f, z0, "independent")))(args), want) > 1e-2


@pytest.mark.parametrize("problem", [batch_centring_problem, batch_norm_problem, vector_problem])
def test_coupled_gradients_match_finite_differences(x64, problem):
    f, args, z0 = problem()
    check_grads(jax.jit(solved(f, z0, "coupled")), (args,), order=1, modes=["fwd", "rev"],
                eps=1e-6, atol=1e-6, rtol=1e-6)


def test_unbatched_state_matches_unrolled_backprop_and_is_refused_per_example(x64):
    f, args, z0 = vector_problem()
    want = jax.grad(lambda a: weighted_loss(unrolled(f, z0, a)))(args)
    assert max_relative_error(jax.jit(jax.grad(solved(f, z0, "coupled")))(args), want) < 1e-9
    with pytest.raises(ValueError, match="examples='coupled'"):
        solved(f, z0, "independent")(args)


def test_vmap_of_a_coupled_solve_matches_unrolled_backprop(x64):
    """``jax.vmap`` of an unbatched solve: each mapped system is solved (and stopped) on its own."""
    f, (w, _), z0 = vector_problem()
    xs = jax.random.normal(jax.random.key(5), (3, z0.shape[0]), jnp.float64)
    mapped = lambda solve: lambda w, xs: jnp.sum(jax.vmap(lambda x: solve((w, x)))(xs) ** 2)
    solve = lambda a: dj.fixed_point(f, z0, a, solver=SOLVER, examples="coupled").value
    want = jax.grad(mapped(lambda a: unrolled(f, z0, a)), argnums=(0, 1))(w, xs)
    got = jax.jit(jax.grad(mapped(solve), argnums=(0, 1)))(w, xs)
    assert max_relative_error(got, want) < 1e-9


def test_deq_layer_with_batch_norm_cell(x64):
    """``DEQ(examples='coupled')``: a BatchNorm cell's gradients match unrolled backprop; one system's statistics."""
    deq = dj.nn.DEQ(BatchNormCell(6, nnx.Rngs(0)), solver=SOLVER, gradient=dj.Implicit(SOLVER), examples="coupled")
    x = jax.random.normal(jax.random.key(4), (5, 6), jnp.float64)
    solution = deq.solve(x)
    assert solution.num_steps.shape == (1,) and bool(solution.converged[0])
    f, state = dj.nn.explicit_cell(deq.cell)
    params = nnx.state(deq, nnx.Param)
    got = nnx.grad(lambda deq: weighted_loss(deq(x)))(deq)
    want = jax.grad(lambda s: weighted_loss(unrolled(f, jnp.zeros_like(x), (s, x))))(state)
    got_cell = nnx.state(got, nnx.Param)["cell"]
    want_params = nnx.state(nnx.merge(nnx.graphdef(deq.cell), want), nnx.Param)
    assert max_relative_error(jax.tree.leaves(got_cell), jax.tree.leaves(want_params)) < 1e-9
    assert len(jax.tree.leaves(params)) == len(jax.tree.leaves(got))
    assert deq.spectral_radius(x, solution.value, jax.random.key(0), num_iters=50).shape == (1,)


def test_bad_examples_and_per_example_budget_are_refused():
    f, z0 = (lambda z, a: 0.5 * z + a), jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="examples must be 'independent' or 'coupled'"):
        dj.fixed_point(f, z0, 1.0, examples="batch")
    with pytest.raises(ValueError, match="budget must be a scalar"):
        dj.fixed_point(f, z0, 1.0, examples="coupled", budget=jnp.array([2, 3]))
