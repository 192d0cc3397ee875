"""Q1. Solver overhead: forward-solve time / (f evaluations x time of one jitted f).

A solver that spent nothing besides evaluating ``f`` would score 1.0. Everything
above it is the solver's own work: Anderson's history, Gram matrix and mixing, Broyden's
rank-one updates,
the per-example residuals, stops and best iterates, and the loop itself.

Problems (z0 = 0, x ~ N(0, 1), tol 1e-4, max_iter 50, Anderson m=5 lam=1e-4 beta=1):
  - the chapter's demo: ``ResNetCell(64, 128)``, batch 10 of 32x32;
  - the CIFAR model's cell: ``ResNetCell(48, 64)``, batch 100 of 32x32.

Usage:
  python -m experiments.benchmarks.solver_overhead [--quick] [--repeats N]
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import deq_jax as dj

from . import common

TOL, MAX_ITER = 1e-4, 50
PROBLEMS = {
    "full": [("chapter demo: ResNetCell(64,128), B=10", 64, 128, 10, 32),
             ("CIFAR cell: ResNetCell(48,64), B=100", 48, 64, 100, 32)],
    "quick": [("tiny: ResNetCell(8,16), B=2, 8x8", 8, 16, 2, 8)],
}
F_CALLS_PER_ROUND = 3  # f alone is short: time a few calls per round and take the mean


def solvers(max_iter: int) -> dict:
    """The three solvers, at the benchmark's tolerance."""
    return {"Anderson": dj.Anderson(m=5, lam=1e-4, beta=1.0, tol=TOL, max_iter=max_iter),
            "Broyden": dj.Broyden(tol=TOL, max_iter=max_iter),
            "ForwardIteration": dj.ForwardIteration(tol=TOL, max_iter=max_iter)}


def measure(name, channels, inner, batch, size, repeats, max_iter) -> list[dict]:
    """The rows of one problem: each solver's time, f evaluations and overhead ratio."""
    _, f, params, x, _ = common.cell_problem(channels, inner, batch, size)
    args = (params, x)
    z0 = jnp.zeros_like(x)
    f_jit = jax.jit(f)
    solves = {label: jax.jit(lambda a, s=solver: s(lambda z: f(z, a), jnp.zeros_like(a[1])))
              for label, solver in solvers(max_iter).items()}
    solutions = {label: common.block(solve(args)) for label, solve in solves.items()}

    def f_calls():
        for _ in range(F_CALLS_PER_ROUND):
            common.block(f_jit(z0, args))

    # The loop runs until the slowest example stops and evaluates f on the whole batch
    # each time, so the batched f is called max(num_steps) times.
    evals = {label: int(np.max(sol.num_steps)) for label, sol in solutions.items()}
    # f alone, iterated in a loop as many times as the longest solve: no solver work at all.
    bare_steps = max(evals.values())
    bare = jax.jit(lambda a: jax.lax.fori_loop(0, bare_steps, lambda _, z: f(z, a), jnp.zeros_like(a[1])))
    fns = {"f": f_calls, "bare": lambda: common.block(bare(args)),
           **{label: (lambda s=solve: common.block(s(args))) for label, solve in solves.items()}}
    times = common.interleaved(fns, repeats)
    f_seconds, bare_seconds = times["f"] / F_CALLS_PER_ROUND, times["bare"] / bare_steps
    rows = []
    for label, sol in solutions.items():
        rows.append({
            "problem": name, "solver": label, "f_evals": evals[label], "f_ms": f_seconds * 1e3,
            "bare_ms": bare_seconds * 1e3, "solve_ms": times[label] * 1e3,
            "ratio": times[label] / (evals[label] * f_seconds), "bare_ratio": times[label] / (evals[label] * bare_seconds),
            "residual_max": float(np.max(sol.residual)), "converged": float(np.mean(sol.converged)),
        })
    return rows


def run(quick: bool = False, repeats: int | None = None) -> common.Result:
    """Measures every problem; see the module docstring."""
    repeats = common.repeats_or_default(repeats, quick)
    max_iter = 10 if quick else MAX_ITER
    before = common.load()
    rows = []
    for problem in PROBLEMS["quick" if quick else "full"]:
        rows += measure(*problem, repeats=repeats, max_iter=max_iter)
    header = ["problem", "solver", "f evals", "one f (ms)", "f in a bare loop (ms)", "solve (ms)",
              "overhead ratio", "ratio vs bare loop", "max residual", "converged"]
    table = common.markdown_table(header, [
        [r["problem"], r["solver"], r["f_evals"], f"{r['f_ms']:.1f}", f"{r['bare_ms']:.1f}", f"{r['solve_ms']:.1f}",
         f"**{r['ratio']:.3f}**", f"{r['bare_ratio']:.3f}", f"{r['residual_max']:.1e}", f"{r['converged']:.0%}"]
        for r in rows])
    notes = [
        f"overhead ratio = solve time / (f evals x one f); 1.0 is the floor. tol {TOL:g}, max_iter {max_iter}, "
        f"z0 = 0, x ~ N(0, 1); Anderson m=5, lam=1e-4, beta=1; Broyden memory=None (max_iter - 2 updates).",
        "f evals = batched f calls = max over the batch of num_steps (the batch runs until its slowest example stops).",
        f"one f = a jitted call of the cell on the whole batch, blocked, median over {repeats} rounds of "
        f"{F_CALLS_PER_ROUND} calls; every contender alternates with the others in each round.",
        "f in a bare loop = lax.fori_loop of f alone (as many steps as the longest solve) / steps: f without call "
        "dispatch and with warm caches, often cheaper than one call; 'ratio vs bare loop' is the solver's own cost.",
    ]
    return common.Result("Q1. Solver overhead on the chapter's cell", table, rows, notes, (before, common.load()))


def main(argv=None) -> common.Result:
    """Command-line entry point: prints the table."""
    return common.cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
