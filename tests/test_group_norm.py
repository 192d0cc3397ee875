"""GroupNorm: nnx.GroupNorm's values, and a hand-written VJP checked against autodiff and finite differences."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import deq_jax as dj

SHAPES = [(3, 5, 7, 12), (2, 6, 12), (4, 12), (2, 3, 4, 5, 12)]


def random_norm(num_groups, dtype, key=0):
    """Our GroupNorm and nnx.GroupNorm with the same random scale and bias."""
    ours = dj.nn.GroupNorm(12, num_groups, param_dtype=dtype)
    theirs = nnx.GroupNorm(12, num_groups=num_groups, epsilon=1e-5, use_fast_variance=False, param_dtype=dtype,
                           rngs=nnx.Rngs(0))
    k1, k2 = jax.random.split(jax.random.key(key))
    for norm in (ours, theirs):
        norm.scale[...] = 1 + jax.random.normal(k1, (12,), dtype)
        norm.bias[...] = jax.random.normal(k2, (12,), dtype)
    return ours, theirs


def inputs(shape, dtype, key=1):
    # An offset mean makes a one-pass variance lose digits; the two-pass one must not.
    return 3.0 + 2.0 * jax.random.normal(jax.random.key(key), shape, dtype)


@pytest.mark.parametrize("num_groups", [1, 3, 12])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_values_match_flax(x64, shape, num_groups):
    ours, theirs = random_norm(num_groups, jnp.float64)
    x = inputs(shape, jnp.float64)
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_vjp_matches_autodiff_of_flax(x64, shape):
    ours, theirs = random_norm(4, jnp.float64)
    x = inputs(shape, jnp.float64)
    y = jax.random.normal(jax.random.key(2), shape, jnp.float64)

    def vjp(norm):
        graphdef, params = nnx.split(norm)
        pullback = lambda params, x: jax.vjp(lambda p, x: nnx.merge(graphdef, p)(x), params, x)[1](y)
        return jax.jit(pullback)(params, x)  # one program, not op by op

    (p_ours, x_ours), (p_theirs, x_theirs) = vjp(ours), vjp(theirs)
    np.testing.assert_allclose(x_ours, x_theirs, rtol=1e-10, atol=1e-12)
    for name in ("scale", "bias"):
        np.testing.assert_allclose(p_ours[name][...], p_theirs[name][...], rtol=1e-10, atol=1e-12)


def test_check_grads(x64):
    x = inputs((2, 3, 3, 12), jnp.float64)
    scale, bias = 1 + jax.random.normal(jax.random.key(3), (2, 12), jnp.float64)
    fn = jax.jit(lambda x, scale, bias: dj.nn.group_norm(x, scale, bias, 4, 1e-5))
    check_grads(fn, (x, scale, bias), order=2, modes=["rev"], eps=1e-5, atol=1e-6, rtol=1e-6)


def test_low_precision_input_keeps_its_dtype_and_float32_statistics():
    ours, theirs = random_norm(4, jnp.float32)
    x = inputs((2, 4, 4, 12), jnp.float32)
    out = ours(x.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), theirs(x), atol=0.05)


def test_rejects_bad_groups_and_shapes():
    with pytest.raises(ValueError, match="must divide"):
        dj.nn.GroupNorm(12, 5)
    with pytest.raises(ValueError, match=r"expected \[batch, ..., 12\]"):
        dj.nn.GroupNorm(12, 4)(jnp.ones((2, 3, 8)))
