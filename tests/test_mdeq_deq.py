"""The DEQ layer over MDEQCell's tuple state: gradients, per-example solves, dropout, training aids, bfloat16."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import deq_jax as dj

# Broyden: at initialisation this cell is not a contraction (plain iteration stalls at a
# residual of 0.25-0.45, Anderson at 1e-6 after 200 steps), Broyden reaches 1e-14 in 57-73.
# So tight because finite differences see the solve's error divided by eps.
TIGHT = dj.Broyden(tol=1e-14, max_iter=120)


def small_cell(dropout=0.0, dtype=None, param_dtype=jnp.float64, seed=0):
    """Two branches (4 channels on 4x4, 8 on 2x2): small enough for finite differences."""
    return dj.nn.MDEQCell((4, 8), expansion=2, num_groups=2, dropout=dropout, dtype=dtype,
                          param_dtype=param_dtype, rngs=nnx.Rngs(seed, dropout=seed + 1))


def injection(batch=2, dtype=jnp.float64, seed=0, scale=4.0):
    """N(0, scale^2) pixels: the cell's GroupNorms make its output scale-free, and a large
    injection dominates the residual sum inside each block's last norm, which weakens the
    dependence on ``z`` (Jacobian spectral radius at the fixed point: 0.18 and 0.44)."""
    return scale * jax.random.normal(jax.random.key(seed), (batch, 4, 4, 4), dtype)


def weighted_sum(z, seed=10):
    return sum(jnp.sum(jax.random.normal(jax.random.key(seed + i), zi.shape, zi.dtype) * zi) for i, zi in enumerate(z))


def test_implicit_gradient_through_a_tuple_state_matches_finite_differences(x64):
    deq = dj.nn.DEQ(small_cell(), solver=TIGHT, gradient=dj.Implicit())
    graphdef, params, rest = nnx.split(deq, nnx.Param, ...)
    loss = jax.jit(lambda params, x: weighted_sum(nnx.merge(graphdef, params, rest, copy=True)(x)))
    # eps 1e-7: this loss is so curved in the parameters that central differences are off by
    # 2e-5 relative at eps 1e-6 (2e-7 at 1e-7, 1.8e-3 at 1e-5); the implicit gradient is what
    # they converge to. A gradient without J's feedback would be off by O(1).
    check_grads(loss, (params, injection()), order=1, modes=["rev"], eps=1e-7, atol=1e-5, rtol=1e-5)


def test_phantom_gradient_is_backprop_through_its_steps_from_the_fixed_point(x64):
    deq = dj.nn.DEQ(small_cell(), solver=TIGHT, gradient=dj.Phantom(steps=3, damping=0.8))
    x = injection()
    f, state = dj.nn.explicit_cell(deq.cell)
    z_star = jax.jit(lambda args: dj.fixed_point(f, deq.initial_state(x), args, solver=TIGHT).value)((state, x))

    def unrolled(state, x):
        z = z_star
        for _ in range(3):
            z = jax.tree.map(lambda new, old: 0.8 * new + 0.2 * old, f(z, (state, x)), z)
        return weighted_sum(z)

    params = lambda tree: nnx.state(nnx.merge(nnx.graphdef(deq.cell), tree), nnx.Param)
    want_state, want_x = jax.jit(jax.grad(unrolled, argnums=(0, 1)))(state, x)  # jitted: eager ops compile one by one
    grads, got_x = nnx.jit(nnx.grad(lambda deq, x: weighted_sum(deq(x)), argnums=(0, 1)))(deq, x)
    np.testing.assert_allclose(got_x, want_x, rtol=1e-9)
    for got, want in zip(jax.tree.leaves(grads["cell"]), jax.tree.leaves(params(want_state))):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_the_fixed_point_is_per_example_and_each_branch_has_its_shape(x64):
    deq = dj.nn.DEQ(small_cell(), solver=TIGHT)
    x = injection(batch=3)
    solve = nnx.jit(lambda deq, x: deq.solve(x))
    solution = solve(deq, x)
    assert [z.shape for z in solution.value] == [(3, 4, 4, 4), (3, 2, 2, 8)]
    assert solution.converged.all()
    f, state = dj.nn.explicit_cell(deq.cell)
    for zi, fi in zip(solution.value, jax.jit(f)(solution.value, (state, x))):  # jitted: not op by op
        np.testing.assert_allclose(fi, zi, atol=1e-9)
    for b in range(3):
        alone = solve(deq, x[b:b + 1])
        assert alone.num_steps[0] == solution.num_steps[b]
        for zi, ai in zip(solution.value, alone.value):
            np.testing.assert_allclose(ai[0], zi[b], rtol=1e-9, atol=1e-12)


def test_dropout_mask_is_one_per_pass_and_new_on_the_next(x64):
    deq = dj.nn.DEQ(small_cell(dropout=0.3), solver=TIGHT)
    x = injection()
    f, before = dj.nn.explicit_cell(nnx.clone(deq.cell))
    solve = nnx.jit(lambda deq, x: deq.solve(x))
    first = solve(deq, x)
    assert first.converged.all()
    for zi, fi in zip(first.value, jax.jit(f)(first.value, (before, x))):  # z* = f(z*) with this pass's mask
        np.testing.assert_allclose(fi, zi, atol=1e-9)
    second = solve(deq, x)
    assert not np.allclose(first.value[0], second.value[0], atol=1e-3), "two passes drew the same mask"
    deq.eval()
    np.testing.assert_array_equal(solve(deq, x).value[0], solve(deq, x).value[0])


def test_training_aids_take_the_tuple_state(x64):
    deq = dj.nn.DEQ(small_cell(), solver=TIGHT)

    @nnx.jit  # one program: eagerly, every operation of the unrolled Hutchinson VJPs compiles alone
    def aids(deq, x):
        z = deq(x)
        penalty = deq.jacobian_penalty(x, jax.lax.stop_gradient(z), jax.random.key(0), num_vectors=2)
        return penalty, deq.spectral_radius(x, z, jax.random.key(1), num_iters=30)

    penalty, radius = aids(deq, injection())
    assert penalty.shape == radius.shape == (2,)
    assert np.all(np.asarray(penalty) > 0) and np.all((np.asarray(radius) > 0) & (np.asarray(radius) < 1))


def test_the_penalty_sees_the_solves_dropout_mask_when_given_its_cell_state(x64):
    deq = dj.nn.DEQ(small_cell(dropout=0.3), solver=TIGHT)
    x, key = injection(), jax.random.key(0)
    f, before = dj.nn.explicit_cell(nnx.clone(deq.cell))

    @nnx.jit
    def penalties(deq, x):
        solved_with = nnx.clone(nnx.state(deq.cell))
        z = jax.lax.stop_gradient(deq(x))
        return z, deq.jacobian_penalty(x, z, key, cell_state=solved_with), deq.jacobian_penalty(x, z, key)

    z, same_mask, next_mask = penalties(deq, x)
    # The penalty of the very f whose fixed point z is: this pass's mask, by hand.
    by_hand = jax.jit(lambda z, state: dj.jacobian_penalty(f, z, (state, x), key))(z, before)
    np.testing.assert_allclose(same_mask, by_hand, rtol=1e-12)
    assert not np.allclose(same_mask, next_mask, rtol=1e-3), "after the solve the cell draws another mask"


def test_a_bfloat16_cell_keeps_a_float32_state():
    deq = dj.nn.DEQ(small_cell(dtype=jnp.bfloat16, param_dtype=jnp.float32), solver=dj.Broyden(tol=1e-2, max_iter=30))
    x = injection(dtype=jnp.float32)

    def loss(deq):
        solution = deq.solve(x.astype(jnp.bfloat16))
        return sum(jnp.sum(z ** 2) for z in solution.value), solution

    grads, solution = nnx.jit(nnx.grad(loss, has_aux=True))(deq)  # one program: solve, backward solve
    assert [z.dtype for z in solution.value] == [jnp.float32, jnp.float32]
    # bfloat16 rounding of f limits the residual (here one example stayed above tol 1e-2).
    assert (np.asarray(solution.residual) < 0.05).all(), solution.residual
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_unrolled_warm_up_is_plain_backprop_through_depth_applications(x64):
    deq = dj.nn.DEQ(small_cell(dropout=0.3))
    x = injection()
    f, state = dj.nn.explicit_cell(nnx.clone(deq.cell))  # the state the call will see: one mask for every application

    def plain(params, x):
        z = deq.initial_state(x)
        for _ in range(4):
            z = f(z, (nnx.merge_state(state, params), x))
        return weighted_sum(z)

    params = nnx.state(deq.cell, nnx.Param)
    want_value, (want_params, want_x) = jax.value_and_grad(plain, argnums=(0, 1))(params, x)
    value, (grads, got_x) = nnx.value_and_grad(lambda deq, x: weighted_sum(deq.unrolled(x, depth=4)), argnums=(0, 1))(deq, x)
    np.testing.assert_allclose(value, want_value, rtol=1e-12)
    np.testing.assert_allclose(got_x, want_x, rtol=1e-10, atol=1e-12)
    for got, want in zip(jax.tree.leaves(grads["cell"]), jax.tree.leaves(want_params)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    # The mask advanced once: the next call differs.
    assert not np.allclose(deq.unrolled(x, depth=4)[0], dj.nn.DEQ(small_cell(dropout=0.3)).unrolled(x, depth=4)[0])
    with pytest.raises(ValueError, match="depth must be an int >= 1, got 0"):
        deq.unrolled(x, depth=0)


def test_the_experiments_mdeq_trains_with_dropout_and_evaluates_without():
    from experiments.cifar10.model import CifarMDEQ

    model = CifarMDEQ("mdeq-tiny", solver=dj.Broyden(tol=1e-2, max_iter=6), gradient=dj.Implicit(), rngs=nnx.Rngs(0))
    images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
    labels = jnp.array([3, 7])

    @nnx.jit
    def train_loss_and_grads(model, images):
        def loss(model):
            logits = model(images, train=True)
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), labels])
        return nnx.value_and_grad(loss)(model)

    evaluate = nnx.jit(lambda model, images: model(images, train=False))
    first, grads = train_loss_and_grads(model, images)
    second, _ = train_loss_and_grads(model, images)
    assert np.isfinite(first) and first != second, "two training passes must draw two dropout masks"
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    cell_grads = nnx.state(grads["deq"]["cell"], nnx.Param)
    assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(cell_grads))
    logits = evaluate(model, images)
    assert logits.dtype == jnp.float32 and logits.shape == (2, 10)
    np.testing.assert_array_equal(logits, evaluate(model, images))  # no dropout, running statistics
