"""Q13. Anderson at a tight tolerance: its ridge ``lam`` and the precision of its products.

The chapter's demo problem (``ResNetCell(64, 128)``, batch 10 of 32x32, x ~ N(0, 1),
z0 = 0, float32), solved to a relative residual of 1e-6 (and of 1e-2, the chapter's) in
at most 100 f evaluations with Anderson m=5, beta=1 and
  - the ridge ``lam`` absolute, as in the chapter (``G G^T + lam I``), for several values;
  - the ridge relative to the Gram matrix's mean diagonal (``ridge="relative"``:
    ``G G^T + lam * mean(diag(G G^T)) I``);
  - the default ``lam`` with the history products (Gram matrix, mixing) rounded to TF32
    inputs, as a float32 product at default precision may run on recent NVIDIA GPUs.
    ``deq_jax`` asks for full precision; this row shows why.

Those rows count f evaluations and residuals only, no times, so they mean the same on
every machine. A last note times what full precision costs: a gradient through the
forward and backward solves of the CIFAR cell (``ResNetCell(48, 64)``, batch 100, tol
1e-2, at most 25 steps each way, as the experiment) with the history products at full and
at default precision, alternating rounds (on a CPU both are float32 products).

Usage:
  python -m experiments.benchmarks.anderson_ridge [--quick]
"""
from __future__ import annotations

import contextlib
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

import deq_jax as dj
from deq_jax._solvers import anderson, broyden

from . import common

TOL, CHAPTER_TOL, MAX_ITER = 1e-6, 1e-2, 100
PROBLEM = {"full": (64, 128, 10, 32), "quick": (8, 16, 2, 8)}
CIFAR_CELL = {"full": (48, 64, 100, 32), "quick": (8, 16, 2, 8)}


def tf32(a: jax.Array) -> jax.Array:
    """``a`` (float32) rounded to TF32's 10-bit mantissa, to nearest."""
    bits = jax.lax.bitcast_convert_type(a, jnp.uint32)
    return jax.lax.bitcast_convert_type((bits + jnp.uint32(0x1000)) & jnp.uint32(0xFFFFE000), jnp.float32)


def tf32_einsum(subscripts: str, *operands: jax.Array) -> jax.Array:
    """A float32 einsum whose inputs are rounded to TF32, accumulated in float32."""
    return jnp.einsum(subscripts, *map(tf32, operands), precision=jax.lax.Precision.HIGHEST)


def default_precision_einsum(subscripts: str, *operands: jax.Array) -> jax.Array:
    """The history products as they were before full precision: the backend's default."""
    return jnp.einsum(subscripts, *operands)


def products(kind: str):
    """A context in which the solvers' history products are ``"tf32"``, ``"default"`` or ``"full"``."""
    einsum = {"tf32": tf32_einsum, "default": default_precision_einsum}.get(kind)
    if einsum is None:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    for module in (anderson, broyden):
        stack.enter_context(mock.patch.object(module, "history_einsum", einsum))
    return stack


def precision_cost(quick: bool, repeats: int) -> str:
    """One note: a jitted gradient through both solves at full and at default precision, timed side by side."""
    channels, inner, batch, size = CIFAR_CELL["quick" if quick else "full"]
    _, f, params, x, w = common.cell_problem(channels, inner, batch, size)
    times = {}
    solvers = [dj.Anderson(m=5, tol=1e-2, max_iter=25)] + ([] if quick else [dj.Broyden(tol=1e-2, max_iter=25)])
    for solver in solvers:
        loss = lambda a: jnp.sum(w * dj.fixed_point(f, jnp.zeros_like(x), a, solver=solver).value)
        grads = {}
        for kind in ("full", "default"):
            with products(kind):
                grads[kind] = jax.jit(jax.grad(loss)).lower((params, x)).compile()
        name = type(solver).__name__
        measured = common.interleaved({kind: lambda g=g: common.block(g((params, x))) for kind, g in grads.items()},
                                      repeats)
        times[name] = f"{name} {measured['full'] * 1e3:.0f} ms vs {measured['default'] * 1e3:.0f} ms " \
                      f"(**{measured['full'] / measured['default']:.2f}**)"
    return (f"full precision's cost, gradient through the forward and backward solves of ResNetCell({channels},"
            f"{inner}), batch {batch}, tol 1e-2, max_iter 25, median of {repeats} alternating rounds: "
            + "; ".join(times.values()) + " (full vs default precision).")


def variants(quick: bool = False) -> dict[str, tuple[dj.Anderson, str]]:
    """Row name -> (solver, its history products' kind for :func:`products`); fewer in quick mode."""
    make = lambda tol, **options: dj.Anderson(m=5, tol=tol, max_iter=MAX_ITER, **options)
    rows = {} if quick else {
        f"tol {CHAPTER_TOL:g}: lam=1e-4 absolute (default)": (make(CHAPTER_TOL), "full"),
        f"tol {CHAPTER_TOL:g}: lam=1e-4 relative": (make(CHAPTER_TOL, ridge="relative"), "full")}
    for lam in (1e-4, 1e-8) if quick else (1e-4, 1e-6, 1e-8, 1e-10):
        rows[f"tol {TOL:g}: lam={lam:g} absolute"] = (make(TOL, lam=lam), "full")
    for lam in (1e-4,) if quick else (1e-4, 1e-8):
        rows[f"tol {TOL:g}: lam={lam:g} relative"] = (make(TOL, lam=lam, ridge="relative"), "full")
    rows[f"tol {TOL:g}: lam=0.0001 absolute, TF32 products"] = (make(TOL), "tf32")
    return rows


def solve(solver: dj.Anderson, kind: str, f, args):
    """One jitted forward solve from zero, traced with the history products of ``kind``."""
    with products(kind):
        return jax.jit(lambda a: solver(lambda z: f(z, a), jnp.zeros_like(a[1])))(args)


def run(quick: bool = False, repeats: int | None = None) -> common.Result:
    """Solves the problem with every variant and tabulates f evaluations and residuals."""
    repeats = common.repeats_or_default(repeats, quick)
    before = common.load()
    channels, inner, batch, size = PROBLEM["quick" if quick else "full"]
    _, f, params, x, _ = common.cell_problem(channels, inner, batch, size)
    rows = []
    for name, (solver, kind) in variants(quick).items():
        solution = jax.device_get(solve(solver, kind, f, (params, x)))
        rows.append({"variant": name, "mean_steps": float(np.mean(solution.num_steps)),
                     "max_steps": int(np.max(solution.num_steps)),
                     "max_residual": float(np.max(solution.residual)),
                     "converged_fraction": float(np.mean(solution.converged))})
    table = common.markdown_table(
        ["Anderson", "f evaluations mean / max", "residual max", "converged"],
        [[r["variant"], f"{r['mean_steps']:.1f} / {r['max_steps']}", f"{r['max_residual']:.1e}",
          f"{r['converged_fraction']:.0%}"] for r in rows])
    notes = [f"ResNetCell({channels},{inner}), batch {batch} of {size}x{size}, float32, "
             f"at most {MAX_ITER} f evaluations per example, m=5, beta=1.",
             precision_cost(quick, repeats)]
    return common.Result("Q13. Anderson at a tight tolerance: the ridge and the products' precision", table, rows, notes,
                         (before, common.load()))


def main(argv=None) -> common.Result:
    """Command-line entry point: prints the table."""
    return common.cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
