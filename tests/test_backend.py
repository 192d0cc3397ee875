"""Per-backend choices: every program shape of the table computes the same numbers as the other."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deq_jax as dj

PLAIN, CPU = dj.BackendChoices(), dj.BACKEND_CHOICES["cpu"]


def problem():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(6, 6)) * 0.3)
    x = jnp.asarray(rng.normal(size=(4, 6)) * np.linspace(0.2, 2, 4)[:, None])
    return (lambda z, args: jnp.tanh(z @ args[0] + args[1])), (w, x)


def everything(solver):
    """Forward values and stats, implicit and phantom gradients, and the penalty's gradient, under the current table."""
    f, args = problem()
    z0 = jnp.zeros_like(args[1])

    def loss(args, gradient):
        return jnp.sum(jnp.sin(dj.fixed_point(f, z0, args, solver=solver, gradient=gradient).value))

    def penalty(args):
        return dj.jacobian_penalty(f, args[1], args, jax.random.key(0), num_vectors=3).sum()

    sol = jax.jit(lambda a: dj.fixed_point(f, z0, a, solver=solver))(args)
    return (sol.value, sol.num_steps, sol.trace, jax.jit(jax.grad(loss), static_argnums=1)(args, dj.Implicit()),
            jax.jit(jax.grad(loss), static_argnums=1)(args, dj.Phantom(3, 0.7)), jax.jit(jax.grad(penalty))(args))


@pytest.mark.parametrize("solver", [dj.Anderson(tol=1e-5, max_iter=40), dj.Broyden(tol=1e-5, max_iter=40),
                                    dj.ForwardIteration(tol=1e-5, max_iter=60)], ids=type)
def test_plain_and_xla_cpu_program_shapes_agree(x64, monkeypatch, solver):
    backend = jax.default_backend()
    results = []
    for choices in (PLAIN, CPU):
        monkeypatch.setitem(dj.BACKEND_CHOICES, backend, choices)
        assert dj.backend_choices() is choices
        results.append(everything(solver))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12), *results)


def test_each_choice_changes_the_program(monkeypatch):
    """Flipping one entry changes what is compiled (the table is read at trace time, not ignored)."""
    f, args = problem()
    backend = jax.default_backend()

    def text(choices):
        monkeypatch.setitem(dj.BACKEND_CHOICES, backend, choices)
        grad = jax.grad(lambda a: jnp.sum(dj.fixed_point(f, jnp.zeros_like(a[1]), a, solver=dj.Anderson(),
                                                         gradient=dj.Phantom(2)).value)
                        + dj.jacobian_penalty(f, a[1], a, jax.random.key(0), num_vectors=2).sum())
        return jax.jit(grad).lower(args).as_text()

    plain = text(PLAIN)
    for field in ("conditional_writes", "f_in_cond", "unrolled_phantom", "unrolled_hutchinson"):
        assert text(dataclasses.replace(PLAIN, **{field: True})) != plain, field


def test_bad_choice_is_an_error():
    with pytest.raises(ValueError, match="conv must be 'lax' or 'loop_friendly', got 'cudnn'"):
        dj.BackendChoices(conv="cudnn")
