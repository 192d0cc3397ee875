"""jacobian_penalty and spectral_radius: against dense Jacobians, gradients, per example, errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import deq_jax as dj
from deq_jax._jacobian import _penalty_from_vectors, _power_iteration

B, D = 3, 5


def mlp(z, args):
    w, b = args
    return jnp.tanh(z @ w + b)


def mlp_problem(seed=0):
    """z [B, D] and (w, b), drawn with NumPy (eager jax.random would compile once per shape)."""
    rng = np.random.default_rng(seed)
    args = (jnp.asarray(rng.normal(size=(D, D)) / np.sqrt(D)), jnp.asarray(0.1 * rng.normal(size=D)))
    return jnp.asarray(rng.normal(size=(B, D))), args


@functools.partial(jax.jit, static_argnums=0)
def dense_jacobians(f, z, args):
    """[B, D, D]: d f_b / d z_b per example, the diagonal blocks of the batch's jacrev."""
    return jnp.einsum("bibj->bij", jax.jacrev(lambda u: f(u, args))(z))


@pytest.fixture(scope="module")
def cell():
    """A float64 ResNetCell(4, 8, num_groups=2) on 4x4 images, batch 2: (graphdefs, params, z, x).

    ``graphdefs`` maps the convolution (``loop_friendly_conv``, ``lax``) to a graphdef; the
    parameters are random (not the N(0, 0.01) init), so every part of the cell matters.
    """
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        graphdefs = {}
        for name, conv in (("loop_friendly_conv", None), ("lax", jax.lax.conv_general_dilated)):
            kwargs = {} if conv is None else {"conv_general_dilated": conv}
            abstract = nnx.eval_shape(lambda: dj.nn.ResNetCell(4, 8, num_groups=2, param_dtype=jnp.float64,
                                                               rngs=nnx.Rngs(0), **kwargs))
            graphdefs[name], shapes = nnx.split(abstract)
        params = jax.tree_util.tree_map(
            lambda s: jnp.asarray((1.0 if len(s.shape) == 1 else 0.0) + 0.3 * rng.normal(size=s.shape)), shapes)
        z, x = (jnp.asarray(rng.normal(size=(2, 4, 4, 4))) for _ in range(2))
    return graphdefs, params, z, x


def cell_fn(graphdef):
    return lambda z, args: nnx.merge(graphdef, args[0])(z, args[1])


def test_penalty_is_the_formula_with_a_dense_jacobian(x64):
    z, args = mlp_problem()
    k = 4
    penalty = jax.jit(lambda key: dj.jacobian_penalty(mlp, z, args, key, num_vectors=k))
    vectors = jax.jit(lambda key: jax.random.normal(key, (k,) + z.shape, z.dtype))(jax.random.key(3))  # the draw
    jac = dense_jacobians(mlp, z, args)
    expected = np.sum(np.einsum("kbi,bij->kbj", vectors, jac) ** 2, axis=(0, 2)) / (k * D)  # ||v^T J||^2
    np.testing.assert_allclose(penalty(jax.random.key(3)), expected, rtol=1e-12)
    np.testing.assert_allclose(penalty(jax.random.PRNGKey(3)), expected, rtol=1e-12)  # a legacy key: same draw
    # Its batch mean is torchdeq's jac_reg: the batch total over num_vectors * z.size.
    total = np.sum(np.einsum("kbi,bij->kbj", vectors, jac) ** 2)
    np.testing.assert_allclose(np.mean(penalty(jax.random.key(3))), total / (k * z.size), rtol=1e-12)


def test_penalty_on_a_pytree_draws_one_key_per_leaf(x64):
    z, args = mlp_problem()
    split = lambda u: (u[:, :2], u[:, 2:])
    f = lambda zs, a: split(mlp(jnp.concatenate(zs, axis=1), a))

    @jax.jit
    def penalty_and_vectors(key):
        keys = jax.random.split(key, 2)
        vectors = jnp.concatenate([jax.random.normal(kk, p.shape) for kk, p in zip(keys, split(z))], axis=1)
        return dj.jacobian_penalty(f, split(z), args, key), vectors

    got, vectors = penalty_and_vectors(jax.random.key(5))
    expected = np.sum(np.einsum("bi,bij->bj", vectors, dense_jacobians(mlp, z, args)) ** 2, axis=1) / D
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_penalty_mean_over_many_vectors_is_the_frobenius_norm(x64):
    z, args = mlp_problem()
    jac = np.asarray(dense_jacobians(mlp, z, args))
    exact = np.sum(jac**2, axis=(1, 2)) / D
    n = 4000
    samples = jax.jit(jax.vmap(lambda key: dj.jacobian_penalty(mlp, z, args, key)))(
        jax.random.split(jax.random.key(0), n))
    # For v ~ N(0, I), ||J^T v||^2 has mean ||J||_F^2 and variance 2 ||J J^T||_F^2:
    # allow 5 standard errors of the mean of n samples (about 1e-6 false alarms).
    std_error = np.sqrt(2 * np.sum(np.einsum("bij,bkj->bik", jac, jac) ** 2, axis=(1, 2)) / n) / D
    error = np.abs(np.mean(samples, axis=0) - exact)
    assert np.all(error < 5 * std_error), (error, std_error)
    assert np.all(std_error < 0.05 * exact)  # and that is a sharp test: within 5% here


def test_penalty_gradients_mlp(x64):
    z, args = mlp_problem()
    key = jax.random.key(1)
    penalty = jax.jit(lambda z, w, b: jnp.mean(dj.jacobian_penalty(mlp, z, (w, b), key, 2)))
    check_grads(penalty, (z, *args), order=2, modes=["rev"])  # w.r.t. z and the parameters


def test_penalty_gradient_through_resnet_cell(cell, x64):
    graphdefs, params, z, x = cell
    key = jax.random.key(2)
    losses = {name: jax.jit(lambda params, f=cell_fn(g): jnp.mean(dj.jacobian_penalty(f, z, (params, x), key)))
              for name, g in graphdefs.items()}
    # loop_friendly_conv (custom_vjp) and GroupNorm (custom_jvp): second-order reverse mode
    # is exact -- the same as with lax.conv_general_dilated and the same weights.
    (value, pullback), (plain_value, plain_pullback) = (jax.vjp(loss, params) for loss in losses.values())
    np.testing.assert_allclose(value, plain_value, rtol=1e-12)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14),
                           pullback(jnp.ones_like(value))[0], plain_pullback(jnp.ones_like(value))[0])
    # Finite differences; a small eps keeps the ReLUs on one side of their kinks.
    check_grads(losses["loop_friendly_conv"], (params,), order=1, modes=["rev"], eps=1e-6)


def linear_problem(eigenvalues):
    """f(z, A) = A_b z_b per example, A_b = S_b diag(eigenvalues_b) S_b^-1 (not symmetric)."""
    s = np.random.default_rng(7).normal(size=(len(eigenvalues), D, D)) + 3 * np.eye(D)
    a = np.einsum("bij,bj,bjk->bik", s, np.asarray(eigenvalues), np.linalg.inv(s))
    return (lambda z, a: jnp.einsum("bij,bj->bi", a, z)), jnp.asarray(a)


radius = jax.jit(dj.spectral_radius, static_argnums=(0, 4))


def test_spectral_radius_matches_eigenvalues(x64):
    f, a = linear_problem([[0.9, 0.5, 0.3, 0.2, 0.1], [-1.5, 0.8, 0.1, 0.0, -0.3], [0.2, 0.05, 0.1, -0.1, 0.0]])
    z = jnp.ones((B, D))
    expected = [np.max(np.abs(np.linalg.eigvals(j))) for j in dense_jacobians(f, z, a)]
    np.testing.assert_allclose(expected, [0.9, 1.5, 0.2], rtol=1e-12)
    np.testing.assert_allclose(radius(f, z, a, jax.random.key(0), 100), expected, rtol=1e-4)
    # No gradient flows through it.
    grad = jax.jit(jax.grad(lambda a: jnp.sum(dj.spectral_radius(f, z, a, jax.random.key(0), 5))))(a)
    assert np.all(np.asarray(grad) == 0)


def test_batched_equals_alone(cell, x64):
    graphdefs, params, zc, x = cell
    z, args = mlp_problem()
    penalty = jax.jit(_penalty_from_vectors, static_argnums=0)
    power = jax.jit(_power_iteration, static_argnums=(0, 4))
    for f, z, args, per_example in [(mlp, z, args, lambda i: args),
                                    (cell_fn(graphdefs["loop_friendly_conv"]), zc, (params, x),
                                     lambda i: (params, x[i:i + 1]))]:
        vectors = jnp.asarray(np.random.default_rng(4).normal(size=(2,) + z.shape))
        alone = [(penalty(f, z[i:i + 1], per_example(i), vectors[:, i:i + 1])[0],
                  power(f, z[i:i + 1], per_example(i), vectors[0, i:i + 1], 20)[0]) for i in range(z.shape[0])]
        np.testing.assert_allclose(penalty(f, z, args, vectors), [p for p, _ in alone], rtol=1e-10)
        np.testing.assert_allclose(power(f, z, args, vectors[0], 20), [r for _, r in alone], rtol=1e-10)


def test_spectral_radius_bad_examples_stay_alone(x64):
    f, a = linear_problem([[0.9, 0.5, 0.3, 0.2, 0.1], [0.0] * 5, [0.2, 0.05, 0.1, -0.1, 0.0]])
    z = jnp.ones((B, D))
    clean = radius(f, z, a, jax.random.key(0), 100)
    np.testing.assert_allclose(clean, [0.9, 0.0, 0.2], rtol=1e-4, atol=1e-12)  # a zero Jacobian reads 0
    poisoned = radius(f, z, a.at[1, 0, 0].set(jnp.nan), jax.random.key(0), 100)
    assert np.isnan(poisoned[1])
    np.testing.assert_array_equal(poisoned[np.array([0, 2])], clean[np.array([0, 2])])
    z, args = mlp_problem()  # NaN in z: f is linearised at NaN for that example only
    clean = radius(mlp, z, args, jax.random.key(0), 10)
    poisoned = radius(mlp, z.at[0, 1].set(jnp.nan), args, jax.random.key(0), 10)
    assert np.isnan(poisoned[0]) and np.isfinite(clean).all()
    np.testing.assert_array_equal(poisoned[1:], clean[1:])


FUNCTIONS = [(dj.jacobian_penalty, "num_vectors"), (dj.spectral_radius, "num_iters")]


@pytest.mark.parametrize("fn,count", FUNCTIONS)
@pytest.mark.parametrize("bad", [0, -1, 2.0, True, None])
def test_bad_count(fn, count, bad):
    z, args = mlp_problem()
    with pytest.raises(ValueError, match=rf"{fn.__name__}: {count} must be an int >= 1, got {bad!r}"):
        fn(mlp, z, args, jax.random.key(0), **{count: bad})


@pytest.mark.parametrize("fn", [f for f, _ in FUNCTIONS])
@pytest.mark.parametrize("bad", [0, np.float32(0), np.zeros(2), np.zeros(3, np.uint32), "keys[2]"])
def test_bad_key(fn, bad):
    z, args = mlp_problem()
    bad = jax.random.split(jax.random.key(0), 2) if isinstance(bad, str) else bad
    with pytest.raises(TypeError, match=rf"{fn.__name__}: key must be one JAX PRNG key .* got "):
        fn(mlp, z, args, bad)


@pytest.mark.parametrize("fn", [f for f, _ in FUNCTIONS])
def test_bad_problem(fn):
    z, args = mlp_problem()
    key = jax.random.key(0)
    with pytest.raises(TypeError, match=f"{fn.__name__}: z0 must hold floating-point arrays, got dtype int32"):
        fn(mlp, z.astype(jnp.int32), args, key)
    for f in (lambda z, a: z[:, :2], lambda z, a: z.astype(jnp.float16), lambda z, a: (z, z)):
        with pytest.raises(ValueError, match=f"{fn.__name__}: f\\(z\\) must have the structure, shape and dtype"):
            fn(f, z, args, key)
