"""Forward mode through the implicit gradient: jax.jvp, jax.jacfwd, jax.hessian, checked against reverse mode and finite differences."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import deq_jax as dj

# Anderson here; Broyden's tangent and backward solves are checked through the tuple state below.
TIGHT = dj.Anderson(lam=1e-10, tol=1e-12, max_iter=300)


def resnet_cell(seed=0):
    """The chapter's cell, small, with kernels 3x their initial size (a less trivial map); the default convolution."""
    cell = dj.nn.ResNetCell(4, 6, num_groups=2, param_dtype=jnp.float64, rngs=nnx.Rngs(seed))
    for conv in (cell.conv1, cell.conv2):
        conv.kernel[...] = conv.kernel[...] * 3.0
    return cell


def injection(shape=(2, 3, 3, 4), seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float64)


def pure_deq(deq):
    """``(params, x) -> z*`` of an NNX DEQ, for JAX's transformations."""
    graphdef, params, rest = nnx.split(deq, nnx.Param, ...)
    return jax.jit(lambda params, x: nnx.merge(graphdef, params, rest, copy=True)(x)), params


def test_jacfwd_equals_jacrev_through_fixed_point(x64):
    f, params = dj.nn.explicit_cell(resnet_cell())
    z_star = jax.jit(lambda x: dj.fixed_point(f, jnp.zeros_like(x), (params, x), solver=TIGHT).value)
    x = injection()
    forward, reverse = jax.jit(jax.jacfwd(z_star))(x), jax.jit(jax.jacrev(z_star))(x)
    assert forward.shape == x.shape * 2 and np.abs(forward).max() > 0.1
    np.testing.assert_allclose(forward, reverse, rtol=1e-9, atol=1e-11)


def test_jacfwd_equals_jacrev_through_deq(x64):
    deq_fn, params = pure_deq(dj.nn.DEQ(resnet_cell(), solver=TIGHT))
    x = injection()
    forward = jax.jit(jax.jacfwd(deq_fn, argnums=1))(params, x)
    reverse = jax.jit(jax.jacrev(deq_fn, argnums=1))(params, x)
    np.testing.assert_allclose(forward, reverse, rtol=1e-9, atol=1e-11)


def test_check_grads_forward_and_reverse_through_deq(x64):
    deq_fn, params = pure_deq(dj.nn.DEQ(resnet_cell(), solver=TIGHT))
    w = injection(seed=1)
    loss = lambda params, x: jnp.sum(w * deq_fn(params, x))
    check_grads(loss, (params, injection()), order=1, modes=("fwd", "rev"), eps=1e-6, atol=1e-6, rtol=1e-6)


def test_hessian_through_fixed_point_matches_finite_differences(x64):
    f, params = dj.nn.explicit_cell(resnet_cell())

    def loss(x):
        return jnp.sum(jnp.sin(dj.fixed_point(f, jnp.zeros_like(x), (params, x), solver=TIGHT).value))

    x = injection((1, 2, 2, 4))
    hessian = jax.jit(jax.hessian(loss))(x).reshape(x.size, x.size)
    grad, eps = jax.jit(jax.grad(loss)), 1e-5
    basis = np.eye(x.size).reshape((x.size,) + x.shape)
    central = np.stack([(grad(x + eps * e) - grad(x - eps * e)).ravel() / (2 * eps) for e in basis], axis=1)
    assert np.abs(hessian).max() > 0.1
    np.testing.assert_allclose(hessian, hessian.T, atol=1e-10)
    np.testing.assert_allclose(hessian, central, atol=1e-7)


def test_forward_mode_through_a_tuple_state(x64):
    """The multiscale cell's state is a tuple of branches: <w, J v> by jvp equals <J^T w, v> by vjp."""
    cell = dj.nn.MDEQCell((4, 8), expansion=2, num_groups=2, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    deq_fn, params = pure_deq(dj.nn.DEQ(cell, solver=dj.Broyden(tol=1e-12, max_iter=120)))
    x, v = 4.0 * injection((2, 4, 4, 4)), injection((2, 4, 4, 4), seed=1)
    z, jv = jax.jit(lambda x, v: jax.jvp(lambda x: deq_fn(params, x), (x,), (v,)))(x, v)
    w = tuple(jax.random.normal(jax.random.key(2 + i), zi.shape, zi.dtype) for i, zi in enumerate(z))
    jtw = jax.jit(jax.grad(lambda x: sum(jnp.sum(wi * zi) for wi, zi in zip(w, deq_fn(params, x)))))(x)
    forward = sum(jnp.sum(wi * ti) for wi, ti in zip(w, jv))
    np.testing.assert_allclose(forward, jnp.sum(jtw * v), rtol=1e-9)


@pytest.mark.parametrize("transform", ["jvp", "jacfwd"])
def test_phantom_gradients_refuse_forward_mode_by_name(transform):
    f = lambda z, a: jnp.tanh(a * z + 1.0)
    z_star = lambda a: dj.fixed_point(f, jnp.zeros((2, 3)), a, gradient=dj.Phantom(2)).value
    assert jax.grad(lambda a: z_star(a).sum())(0.5) > 0  # reverse mode works
    forward = {"jvp": lambda a: jax.jvp(z_star, (a,), (1.0,)), "jacfwd": jax.jacfwd(z_star)}[transform]
    with pytest.raises(TypeError, match="Phantom gradients are reverse-mode only.*Implicit"):
        forward(0.5)
