"""Bad input gives a clear error at trace time, naming what was expected and what came in."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deq_jax as dj

Z0 = jnp.zeros((2, 3))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: dj.Anderson(m=0), "m must be an int >= 1, got 0"),
        (lambda: dj.Anderson(max_iter=0), "max_iter must be an int >= 1, got 0"),
        (lambda: dj.Anderson(max_iter=2.5), "max_iter must be an int >= 1, got 2.5"),
        (lambda: dj.Anderson(tol=0.0), "tol must be a positive number, got 0.0"),
        (lambda: dj.Anderson(tol=-1e-3), "tol must be a positive number"),
        (lambda: dj.Anderson(beta=0), "beta must be a positive number"),
        (lambda: dj.Anderson(lam=-1.0), "lam must be a number >= 0, got -1.0"),
        (lambda: dj.ForwardIteration(max_iter=-3), "max_iter must be an int >= 1, got -3"),
        (lambda: dj.ForwardIteration(tol=None), "tol must be a positive number, got None"),
        (lambda: dj.Broyden(memory=0), "memory must be an int >= 1, got 0"),
        (lambda: dj.Broyden(max_iter=0), "max_iter must be an int >= 1, got 0"),
        (lambda: dj.Broyden(tol=0), "tol must be a positive number, got 0"),
        (lambda: dj.Phantom(steps=0), "steps must be an int >= 1, got 0"),
        (lambda: dj.Phantom(steps=True), "steps must be an int >= 1, got True"),
        (lambda: dj.Phantom(damping=0.0), r"damping must be a number in \(0, 1\], got 0.0"),
        (lambda: dj.Phantom(damping=1.5), r"damping must be a number in \(0, 1\], got 1.5"),
        (lambda: dj.ForwardIteration(damping=0), r"damping must be a number in \(0, 1\], got 0"),
        (lambda: dj.ForwardIteration(damping=1.01), r"damping must be a number in \(0, 1\], got 1.01"),
    ],
)
def test_bad_solver_options(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_unknown_option_is_an_error():
    with pytest.raises(TypeError, match="unexpected keyword argument 'tolerance'"):
        dj.Anderson(tolerance=1e-3)


@pytest.mark.parametrize("solver", [dj.Anderson(), dj.Broyden(), dj.ForwardIteration()], ids=type)
def test_shape_mismatch_between_z0_and_f(solver):
    with pytest.raises(ValueError, match=r"f\(z\) must have the structure, shape and dtype of z0.*\(2, 4\)"):
        solver(lambda z: jnp.concatenate([z, z[:, :1]], axis=1), Z0)


def test_dtype_mismatch_between_z0_and_f(x64):
    with pytest.raises(ValueError, match="float64"):
        dj.Anderson()(lambda z: z.astype(jnp.float64), jnp.zeros((2, 3), jnp.float32))


def test_non_floating_z0():
    with pytest.raises(TypeError, match="floating-point arrays, got dtype int32"):
        dj.Anderson()(lambda z: z, jnp.zeros((2, 3), jnp.int32))


def test_z0_without_batch_axis():
    with pytest.raises(ValueError, match="leading batch axis"):
        dj.ForwardIteration()(lambda z: z, jnp.float32(1.0))


@pytest.mark.parametrize("z0", [jnp.zeros((0, 3)), jnp.zeros((2, 0))], ids=["no examples", "no features"])
def test_an_empty_z0_is_a_clear_error(z0):
    with pytest.raises(ValueError, match="empty array"):
        dj.fixed_point(lambda z, a: a * z, z0, 0.5)


def test_numpy_scalars_are_accepted_as_options():
    solver = dj.Anderson(tol=np.float32(1e-3), max_iter=np.int64(30), m=np.int32(4), lam=np.float64(1e-4))
    assert bool(solver(lambda z: 0.5 * z + 1.0, Z0).converged.all())
    assert dj.Phantom(steps=np.int64(2), damping=np.float32(0.5)).steps == 2
    with pytest.raises(ValueError, match="tol must be a positive number"):
        dj.Anderson(tol=np.bool_(True))


def test_errors_are_raised_at_trace_time_under_jit():
    with pytest.raises(ValueError, match="f\\(z\\) must have"):
        jax.jit(lambda z: dj.Anderson()(lambda v: v[:, :1], z).value)(Z0)


def test_fixed_point_checks_its_arguments():
    f = lambda z, a: z * a
    with pytest.raises(TypeError, match="solver must be a deq_jax.Solver instance"):
        dj.fixed_point(f, Z0, 0.5, solver="anderson")
    with pytest.raises(TypeError, match="Implicit: solver must be a deq_jax.Solver instance"):
        dj.fixed_point(f, Z0, 0.5, gradient=dj.Implicit(dj.Anderson))
    with pytest.raises(TypeError, match=r"gradient must be a deq_jax.Gradient instance \(e.g. deq_jax.Implicit\(\)\)"):
        dj.fixed_point(f, Z0, 0.5, gradient="phantom")
    with pytest.raises(ValueError, match=r"backward_stats_probe must have shape \(6,\), got \(3,\)"):
        dj.fixed_point(f, Z0, 0.5, backward_stats_probe=jnp.zeros(3))
    with pytest.raises(ValueError, match="f\\(z\\) must have"):
        dj.fixed_point(lambda z, a: z[:, :2] * a, Z0, 0.5)


def test_cell_groups_must_divide_channels():
    with pytest.raises(ValueError, match="num_groups=8 must divide the channel count 12"):
        dj.nn.ResNetCell(12, 16, rngs=nnx.Rngs(0))


def test_non_convergence_is_reported_not_raised():
    sol = jax.jit(lambda z: dj.ForwardIteration(tol=1e-6, max_iter=5)(lambda v: -v + 1.0, z))(Z0)
    assert not sol.converged.any() and (sol.num_steps == 5).all() and (sol.residual > 1e-6).all()
