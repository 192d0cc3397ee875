"""Broyden: the same iterates as a plain dense-matrix Broyden, limited memory, degenerate updates."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deq_jax as dj

BATCH, DIM = 3, 6


def tanh_problem(seed=0):
    """Per-example ``f_b(z) = tanh(W_b z + c_b)``, numpy and batched JAX forms."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(BATCH, DIM, DIM)) * 0.9 / np.sqrt(DIM)
    c = rng.normal(size=(BATCH, DIM))
    batched = lambda z: jnp.tanh(jnp.einsum("bij,bj->bi", w, z) + c)
    return batched, [lambda z, b=b: np.tanh(w[b] @ z + c[b]) for b in range(BATCH)]


def dense_broyden(f, z0, num_evals, memory=None):
    """Broyden's good update written out plainly, with the inverse Jacobian as a dense matrix.

    ``H`` starts at ``-I``; each step ``z <- z - H g``; then ``v^T = dz^T H``,
    ``u = (dz - H dg) / (v^T dg)``. With ``memory`` only the last ``memory`` pairs
    ``(u, v)`` make up ``H = -I + sum u v^T`` (the new pair is computed with all kept ones).

    Returns:
      The iterates (``num_evals`` of them: f is evaluated once at each).
    """
    pairs = []
    inverse = lambda: -np.eye(len(z0)) + sum((np.outer(u, v) for u, v in pairs), np.zeros((len(z0),) * 2))
    z, g = z0, f(z0) - z0
    iterates = [z]
    for _ in range(num_evals - 1):
        h = inverse()
        z_new = z - h @ g
        g_new = f(z_new) - z_new
        dz, dg = z_new - z, g_new - g
        v = dz @ h
        pairs.append(((dz - h @ dg) / (v @ dg), v))
        if memory is not None:
            pairs = pairs[-memory:]
        z, g = z_new, g_new
        iterates.append(z)
    return iterates


def relative_residual(f, z):
    return np.linalg.norm(f(z) - z) / (np.linalg.norm(f(z)) + 1e-5)


@pytest.mark.parametrize("memory", [None, 2])
def test_same_iterates_as_a_dense_matrix_broyden(x64, memory):
    batched, per_example = tanh_problem()
    num_evals = 12
    sol = dj.Broyden(tol=1e-300, max_iter=num_evals, memory=memory)(batched, jnp.zeros((BATCH, DIM)))
    assert (sol.num_steps == num_evals).all()
    for b, f in enumerate(per_example):
        iterates = dense_broyden(f, np.zeros(DIM), num_evals, memory)
        residuals = np.array([relative_residual(f, z) for z in iterates])
        np.testing.assert_allclose(sol.trace[:, b], residuals, rtol=1e-9, atol=1e-15)
        best = iterates[int(np.argmin(residuals))]
        np.testing.assert_allclose(sol.value[b], f(best), rtol=1e-12)
    assert sol.residual.max() < (1e-4 if memory is None else 1e-2), "the problem must be nearly solved, or the comparison says little"


def test_limited_memory_changes_the_iterates(x64):
    batched, _ = tanh_problem()
    full, short = (dj.Broyden(tol=1e-300, max_iter=12, memory=m)(batched, jnp.zeros((BATCH, DIM))) for m in (None, 2))
    assert not np.allclose(full.trace[4:], short.trace[4:]), "memory=2 must forget updates after 2 steps"
    np.testing.assert_array_equal(full.trace[:4], short.trace[:4])


def test_zero_denominator_skips_the_update_of_that_example_only(x64):
    # f(z) = z + 1 has a constant residual: dg = 0, so v^T dg = 0 at every step.
    batched, _ = tanh_problem()
    degenerate = jnp.zeros(BATCH, bool).at[1].set(True)[:, None]
    f = lambda z: jnp.where(degenerate, z + 1.0, batched(z))
    sol = dj.Broyden(tol=1e-10, max_iter=20)(f, jnp.zeros((BATCH, DIM)))
    clean = dj.Broyden(tol=1e-10, max_iter=20)(batched, jnp.zeros((BATCH, DIM)))
    keep = np.arange(BATCH) != 1
    np.testing.assert_allclose(sol.value[keep], clean.value[keep], rtol=1e-12)
    # With H = -I kept, each step is z <- z + 1: finite, never converging, never NaN.
    assert np.isfinite(sol.trace[:, 1]).all() and not sol.converged[1] and sol.num_steps[1] == 20


def test_jit_and_memory_one(x64):
    batched, _ = tanh_problem()
    sol = jax.jit(dj.Broyden(tol=1e-8, max_iter=60, memory=1).__call__, static_argnums=0)(batched, jnp.zeros((BATCH, DIM)))
    assert sol.converged.all()
