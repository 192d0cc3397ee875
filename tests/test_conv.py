"""deq_jax.nn.conv: loop_friendly_conv computes lax.conv_general_dilated's values and gradients;
default_conv picks one of them per backend."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax
from jax.test_util import check_grads

import deq_jax as dj
from deq_jax.nn.conv import CONVS, default_conv, loop_friendly_conv

DN = ("NHWC", "HWIO", "NHWC")


def both(x, kernel, padding):
    """The convolution through lax and through loop_friendly_conv."""
    args = (x, kernel, (1, 1), padding)
    return lax.conv_general_dilated(*args, dimension_numbers=DN), loop_friendly_conv(*args, dimension_numbers=DN)


@pytest.mark.parametrize("kernel_hw, padding", [
    ((3, 3), ((1, 1), (1, 1))),  # the cell's "same" convolution
    ((3, 3), ((0, 2), (2, 0))),  # asymmetric padding
    ((5, 3), ((2, 2), (0, 0))),  # non-square kernel, no padding on one side
    ((1, 1), ((0, 0), (0, 0))),
])
def test_values_and_vjp_match_lax_in_float64(x64, kernel_hw, padding):
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (2, 7, 6, 3), jnp.float64)
    kernel = jax.random.normal(keys[1], (*kernel_hw, 3, 4), jnp.float64)
    want, got = jax.jit(both, static_argnums=2)(x, kernel, padding)
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)
    cotangent = jax.random.normal(keys[2], want.shape, jnp.float64)

    @jax.jit
    def vjps(x, kernel, cotangent):
        return [jax.vjp(lambda a, b, i=i: both(a, b, padding)[i], x, kernel)[1](cotangent) for i in (0, 1)]

    want_bar, got_bar = vjps(x, kernel, cotangent)
    for g, w in zip(got_bar, want_bar):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)


def test_bfloat16_values_and_vjp_match_lax_to_rounding():
    """The mixed-precision path: bfloat16 in, bfloat16 out, lax's numbers up to bfloat16 rounding."""
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (2, 8, 8, 16), jnp.bfloat16)
    kernel = jax.random.normal(keys[1], (3, 3, 16, 8), jnp.bfloat16)
    cotangent = jax.random.normal(keys[2], (2, 8, 8, 8), jnp.bfloat16)
    padding = ((1, 1), (1, 1))
    outputs = [jax.vjp(lambda a, b, i=i: both(a, b, padding)[i], x, kernel) for i in (0, 1)]
    (want, want_vjp), (got, got_vjp) = outputs
    for w, g in zip((want, *want_vjp(cotangent)), (got, *got_vjp(cotangent))):
        assert g.dtype == w.dtype == jnp.bfloat16
        np.testing.assert_allclose(g.astype(np.float32), w.astype(np.float32), rtol=2e-2, atol=2e-2 * np.abs(w).max())


def test_gradient_against_finite_differences(x64):
    x = jax.random.normal(jax.random.key(1), (1, 5, 5, 2), jnp.float64)
    kernel = jax.random.normal(jax.random.key(2), (3, 3, 2, 3), jnp.float64)
    loss = lambda x, k: jnp.sum(jnp.sin(both(x, k, [(1, 1), (1, 1)])[1]))
    check_grads(loss, (x, kernel), order=1, modes=["rev"], eps=1e-6, atol=1e-7, rtol=1e-7)


def test_cell_gradients_match_a_cell_with_lax_convolutions(x64):
    """Same weights, two convolution functions: every gradient of the cell agrees."""
    cells = [dj.nn.ResNetCell(4, 8, num_groups=2, param_dtype=jnp.float64, conv_general_dilated=conv,
                              rngs=nnx.Rngs(0)) for conv in (loop_friendly_conv, lax.conv_general_dilated)]
    z, x = (jax.random.normal(jax.random.key(i), (2, 5, 5, 4), jnp.float64) for i in (3, 4))

    def grads(cell):
        graphdef, params = nnx.split(cell)
        loss = lambda p, z: jnp.sum(jnp.sin(nnx.merge(graphdef, p)(z, x)))
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, z)

    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14),
                           grads(cells[0]), grads(cells[1]))


def test_default_conv_reads_the_table_per_backend():
    assert default_conv("cpu") is loop_friendly_conv  # the one backend measured
    for backend, choices in dj.BACKEND_CHOICES.items():
        assert default_conv(backend) is CONVS[choices.conv]
    assert default_conv("some_plugin") is lax.conv_general_dilated  # the form that supports everything


def test_the_cell_takes_the_default_conv_of_the_backend_when_built(monkeypatch):
    assert dj.nn.ResNetCell(8, 16, num_groups=4, rngs=nnx.Rngs(0)).conv1.conv_general_dilated is default_conv()
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert default_conv() is lax.conv_general_dilated
    cell = dj.nn.ResNetCell(8, 16, num_groups=4, norm="weight", rngs=nnx.Rngs(0))
    assert cell.conv1.layer.conv_general_dilated is cell.conv2.layer.conv_general_dilated is lax.conv_general_dilated
    monkeypatch.setitem(dj.BACKEND_CHOICES, "tpu", dj.BackendChoices(conv="loop_friendly"))  # one entry flips it
    assert dj.nn.ResNetCell(8, 16, num_groups=4, rngs=nnx.Rngs(0)).conv2.conv_general_dilated is loop_friendly_conv


def test_loop_friendly_conv_is_importable_where_it_was():
    assert dj.nn.cell.loop_friendly_conv is dj.nn.loop_friendly_conv is loop_friendly_conv


def test_works_under_vmap_and_jit():
    cell = dj.nn.ResNetCell(8, 16, num_groups=4, conv_general_dilated=loop_friendly_conv, rngs=nnx.Rngs(0))
    z = jax.random.normal(jax.random.key(0), (3, 6, 6, 8))
    per_example = jax.jit(jax.vmap(jax.grad(lambda z: jnp.sum(cell(z[None], z[None]) ** 2))))(z)
    assert per_example.shape == z.shape and np.isfinite(per_example).all()


def test_unsupported_arguments_are_refused_with_a_message():
    x, kernel = jnp.ones((1, 6, 6, 2)), jnp.ones((3, 3, 2, 2))
    with pytest.raises(NotImplementedError, match="stride 1"):
        loop_friendly_conv(x, kernel, (2, 2), [(1, 1), (1, 1)], dimension_numbers=DN)
    with pytest.raises(NotImplementedError, match="padding"):
        loop_friendly_conv(x, kernel, (1, 1), "SAME", dimension_numbers=DN)


def test_forward_mode_is_not_supported_but_a_lax_cell_is():
    z = jnp.ones((1, 4, 4, 8))
    fast = dj.nn.ResNetCell(8, 8, num_groups=4, conv_general_dilated=loop_friendly_conv, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(lambda z: fast(z, z), (z,), (z,))
    plain = dj.nn.ResNetCell(8, 8, num_groups=4, conv_general_dilated=lax.conv_general_dilated, rngs=nnx.Rngs(0))
    assert jax.jvp(lambda z: plain(z, z), (z,), (z,))[1].shape == z.shape
