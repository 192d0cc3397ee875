"""Broyden: the same iterates as a plain dense-matrix Broyden, limited memory, degenerate updates, per-example
semantics, no buffer copies in the compiled loop, and the cost benchmark in quick mode."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deq_jax as dj
from deq_jax._solvers.broyden import broyden_update

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
    ``(u, v)`` make up ``H = -I + sum u v^T``: once ``memory`` are kept, the oldest is dropped
    first and the new pair is computed from the ``memory - 1`` others.

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
        if memory is not None and len(pairs) == memory:
            pairs = pairs[1:]
            h = inverse()
        v = dz @ h
        pairs.append(((dz - h @ dg) / (v @ dg), v))
        z, g = z_new, g_new
        iterates.append(z)
    return iterates


def relative_residual(f, z):
    return np.linalg.norm(f(z) - z) / (np.linalg.norm(f(z)) + 1e-5)


# None: the default memory (every update, on so small a state); 2 and 5: the ring wraps
# several times; 20: every update kept.
@pytest.mark.parametrize("memory", [None, 2, 5, 20])
def test_same_iterates_as_a_dense_matrix_broyden(x64, memory):
    batched, per_example = tanh_problem()
    num_evals = 12
    solver = dj.Broyden(tol=1e-300, max_iter=num_evals, memory=memory)
    sol = solver(batched, jnp.zeros((BATCH, DIM)))
    assert (sol.num_steps == num_evals).all()
    for b, f in enumerate(per_example):
        iterates = dense_broyden(f, np.zeros(DIM), num_evals, solver.memory_for(DIM, jnp.float64))
        residuals = np.array([relative_residual(f, z) for z in iterates])
        np.testing.assert_allclose(sol.trace[:, b], residuals, rtol=1e-9, atol=1e-15)
        best = iterates[int(np.argmin(residuals))]
        np.testing.assert_allclose(sol.value[b], f(best), rtol=1e-12)
    assert sol.residual.max() < (1e-2 if memory == 2 else 1e-4), "the problem must be nearly solved, or the comparison says little"


def test_default_memory_is_bounded_by_the_buffers_size():
    cifar = 32 * 32 * 48  # the CIFAR cell's state: 2 buffers x 6 x 192 KiB per example, not 23 or 48
    assert dj.Broyden(max_iter=25).memory_for(cifar, jnp.float32) == dj.Broyden(max_iter=50).memory_for(cifar, jnp.float32) == 6
    # Small states keep every update a solve can use (max_iter - 2) while two buffers fit 1 MiB per example.
    assert dj.Broyden(max_iter=300).memory_for(36, jnp.float64) == 298
    assert dj.Broyden(max_iter=300).memory_for(2048, jnp.float32) == 2 ** 20 // (2 * 2048 * 4) == 64
    assert dj.Broyden(max_iter=6).memory_for(cifar, jnp.float32) == 4 and dj.Broyden(max_iter=2).memory_for(8, jnp.float32) == 1
    assert dj.Broyden(max_iter=50, memory=30).memory_for(cifar, jnp.float32) == 30
    assert dj.Broyden(max_iter=25).init(100, cifar, jnp.float32).u.shape == (100, 6, cifar)


def test_limited_memory_changes_the_iterates(x64):
    batched, _ = tanh_problem()
    full, short = (dj.Broyden(tol=1e-300, max_iter=12, memory=m)(batched, jnp.zeros((BATCH, DIM))) for m in (20, 2))
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


def full_ring_history(seed=0, memory=3):
    """A history whose ring is full (random pairs) after an iterate with residual ``g_prev``, and a new residual ``g``.

    ``step = -H g_prev`` and ``c = V g_prev``, as recording ``g_prev`` leaves them.
    """
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.normal(size=shape)
    u, v, g_prev = normal(BATCH, memory, DIM) * 0.3, normal(BATCH, memory, DIM) * 0.3, normal(BATCH, DIM)
    step = np.stack([-dense_inverse(u[b], v[b]) @ g_prev[b] for b in range(BATCH)])
    history = dj.Broyden(memory=memory).init(BATCH, DIM, jnp.float64)._replace(
        x_next=jnp.asarray(normal(BATCH, DIM)), step=jnp.asarray(step), u=jnp.asarray(u), v=jnp.asarray(v),
        c=jnp.einsum("bmd,bd->bm", v, g_prev))
    return history, g_prev, jnp.asarray(normal(BATCH, DIM))


def dense_inverse(u, v):
    """``H = -I + sum_j u_j v_j^T`` from ``[memory, D]`` pairs."""
    return -np.eye(u.shape[1]) + np.einsum("md,me->de", u, v)


def test_an_update_replaces_the_oldest_pair_and_a_skipped_one_keeps_h(x64):
    history, g_prev, g = full_ring_history()
    # g_prev = 0 for example 1 gives dx = -H g_prev = 0: v^T = dx^T H' = 0, a zero denominator.
    history = history._replace(step=history.step.at[1].set(0), c=history.c.at[1].set(0))
    g_prev[1] = 0
    k = 7  # 6 updates made: the ring (memory 3) is full and slot (k - 1) % 3 = 0 holds the oldest pair
    new = broyden_update(history, jnp.asarray(k), history.x_next, g, jnp.ones(BATCH, bool))
    np.testing.assert_array_equal(new.u[1], history.u[1])
    np.testing.assert_array_equal(new.v[1], history.v[1])
    np.testing.assert_allclose(new.step[1], -dense_inverse(history.u[1], history.v[1]) @ g[1], rtol=1e-12)
    # The others: slot 0's pair dropped, the dense update of H' = -I + (pairs 1 and 2) written over it.
    for b in (0, 2):
        dx, dg = np.asarray(history.step[b]), np.asarray(g[b] - g_prev[b])
        h = dense_inverse(history.u[b, 1:], history.v[b, 1:])
        v = dx @ h
        u = (dx - h @ dg) / (v @ dg)
        np.testing.assert_allclose(new.u[b, 0], u, rtol=1e-9)
        np.testing.assert_allclose(new.v[b, 0], v, rtol=1e-9)
        np.testing.assert_array_equal(new.u[b, 1:], history.u[b, 1:])
        h_new = dense_inverse(new.u[b], new.v[b])
        np.testing.assert_allclose(h_new @ dg, dx, rtol=1e-9)  # the secant condition
        np.testing.assert_allclose(new.step[b], -h_new @ g[b], rtol=1e-9)
        np.testing.assert_allclose(new.x_next[b], history.x_next[b] + new.step[b], rtol=1e-12)
        np.testing.assert_allclose(new.c[b], new.v[b] @ g[b], rtol=1e-9)


def test_rows_of_stopped_examples_are_unchanged(x64):
    history, _, g = full_ring_history(seed=1)
    active = jnp.array([True, False, True])
    new = broyden_update(history, jnp.asarray(5), history.x_next, g, active)
    for field, old in zip(new, history):
        np.testing.assert_array_equal(field[1], old[1])  # stopped: every row as it was
        assert not np.array_equal(field[0], old[0]) and not np.array_equal(field[2], old[2])  # running: updated


def test_nan_in_one_example_reaches_no_other(x64):
    batched, _ = tanh_problem()
    # With example 2 poisoned, its f turns NaN away from z0 = 0, from the second iterate on. The
    # clean run uses the same f with nothing poisoned: one program, so that the comparison is
    # bit-exact whatever the compiler fuses (at LLVM level 0, f inside and outside the where differed
    # in the last bit).
    def f_poisoning(poisoned):
        poisoned = poisoned[:, None]
        return lambda z: jnp.where(poisoned & (jnp.abs(z).sum(1, keepdims=True) > 0), jnp.nan, batched(z))

    solver = dj.Broyden(tol=1e-10, max_iter=20, memory=3)
    z0, nobody = jnp.zeros((BATCH, DIM)), jnp.zeros(BATCH, bool)
    sol, clean = solver(f_poisoning(nobody.at[2].set(True)), z0), solver(f_poisoning(nobody), z0)
    np.testing.assert_array_equal(sol.value[:2], clean.value[:2])
    np.testing.assert_array_equal(sol.trace[:, :2], clean.trace[:, :2])
    assert sol.num_steps[2] == 2 and np.isfinite(sol.value[2]).all() and not sol.converged[2]


def test_alone_equals_batched_with_a_wrapping_ring(x64):
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.normal(size=(BATCH, DIM, DIM)) * 0.9 / np.sqrt(DIM))
    c = jnp.asarray(rng.normal(size=(BATCH, DIM)) * np.array([0.3, 1.0, 3.0])[:, None])
    f = lambda w, c: (lambda z: jnp.tanh(jnp.einsum("bij,bj->bi", w, z) + c))
    solver = dj.Broyden(tol=1e-9, max_iter=40, memory=3)
    solve = jax.jit(lambda w, c: solver(f(w, c), jnp.zeros((len(w), DIM))))  # one program per batch size
    sol = solve(w, c)
    assert sol.converged.all() and (sol.num_steps > 5).all(), "every example must use the ring after it wraps"
    assert len(set(np.asarray(sol.num_steps))) > 1, "examples must stop apart"
    for b in range(BATCH):
        alone = solve(w[b:b + 1], c[b:b + 1])
        assert alone.num_steps[0] == sol.num_steps[b]
        np.testing.assert_allclose(alone.value[0], sol.value[b], rtol=1e-12)
        np.testing.assert_allclose(alone.trace[:, 0], sol.trace[:, b], rtol=1e-10)


def test_jit_and_memory_one(x64):
    batched, _ = tanh_problem()
    sol = jax.jit(dj.Broyden(tol=1e-8, max_iter=60, memory=1).__call__, static_argnums=0)(batched, jnp.zeros((BATCH, DIM)))
    assert sol.converged.all()


def while_bodies(hlo: str) -> list[str]:
    """The text of every ``while`` loop body computation in compiled HLO."""
    bodies = []
    for name in set(re.findall(r"body=%([\w.\-]+)", hlo)):
        start = hlo.index(f"%{name} ")
        bodies.append(hlo[start:hlo.index("\n}", start)])
    return bodies


def test_no_copy_of_the_buffers_inside_the_loop():
    """Reading the replaced slot outside its in-place write makes XLA:CPU copy both buffers at every step."""
    batch, memory, dim = 4, 5, 1000
    c = jax.random.normal(jax.random.key(0), (batch, dim))
    solve = jax.jit(lambda z: dj.Broyden(tol=1e-12, max_iter=20, memory=memory)(lambda z: jnp.tanh(0.5 * z + c), z).value)
    hlo = solve.lower(jnp.zeros((batch, dim))).compile().as_text()
    bodies = while_bodies(hlo)
    assert bodies and any(f"[{batch},{memory},{dim}]" in body for body in bodies)
    copies = [line for body in bodies for line in body.splitlines()
              if " copy(" in line and f"[{batch},{memory},{dim}]" in line.split("copy(")[0]]
    assert not copies, copies


def test_cost_benchmark_quick():
    from experiments.benchmarks import broyden_cost, common

    result = broyden_cost.run(quick=True, repeats=1)
    lines = result.table.splitlines()
    assert len(lines) == 2 + len(result.rows) == 4 and "load average" in result.markdown()
    assert [r["workload"] for r in result.rows] == ["forward only", "forward + backward (grad)"]
    for r in result.rows:
        assert r["anderson_ms"] > 0 and r["broyden_ms"] > 0 and r["ratio"] == pytest.approx(r["broyden_ms"] / r["anderson_ms"])
        assert r["memory"] == dj.Broyden(max_iter=r["max_iter"]).memory_for(8 * 8 * 8, jnp.float32)
        # Both solvers spent every step, forward and backward.
        for lo, hi, grad_forward, backward_mean, backward_max in r["steps"].values():
            assert lo == hi == grad_forward == backward_mean == backward_max == r["max_iter"]
    assert isinstance(result, common.Result)
