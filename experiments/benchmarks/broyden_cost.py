"""Q9. Broyden's cost against Anderson's at the same number of f evaluations and VJPs.

Both solvers are forced to spend the same work: tol 1e-12 (nobody stops early),
``max_iter`` f evaluations forward and ``max_iter`` VJPs in the implicit backward
solve (``dj.Implicit`` with the same solver). What is left between the two is each
solver's own work per step: Anderson's (m=5) Gram matrix and mixing against Broyden's
products with its rank-one updates. Measured on the CIFAR model's cell
``ResNetCell(48, 64)``, batch 32 of 32x32, ``z0 = 0``, ``x ~ N(0, 1)``:
  - forward only: ``dj.fixed_point(...).value``, jitted;
  - forward + backward: ``jax.grad`` of ``sum(w * z*)`` w.r.t. the cell's parameters and
    ``x`` (``w ~ N(0, 1)``), jitted.

The two contenders of a row alternate in one process (``common.interleaved``) and
each reports its median. The table also gives Broyden's default ``memory`` (rank-one
updates kept) and its two ``[B, memory, D]`` buffers' size, and the notes count the
``copy(`` instructions in each compiled forward solve (a full-buffer copy per step is
what a careless ring-buffer write costs on XLA:CPU).

With ``--memory-sweep`` it measures instead what Broyden's ``memory`` (rank-one updates
kept) costs in steps to converge: forward and backward (implicit, Broyden with the
same ``memory`` and ``tol``) solves of the CIFAR cell at initialisation (batch 32) and
of the chapter's demo problem (``ResNetCell(64, 128)`` on 32x32, as in ``solver_overhead``
but batch 32), ``z0 = 0``, ``x ~ N(0, 1)``, at tol 1e-2 and 1e-4 with
``max_iter`` 50, for several ``memory`` against every update kept (``max_iter - 2``).
This is the measurement behind ``dj.Broyden``'s default ``memory``.

Usage:
  python -m experiments.benchmarks.broyden_cost [--quick] [--repeats N] [--memory-sweep]
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import deq_jax as dj
from deq_jax._solution import SolveStats

from . import common

TOL = 1e-12  # nobody stops early: both solvers spend every step
PROBLEMS = {"full": ("CIFAR cell: ResNetCell(48,64), B=32, 32x32", 48, 64, 32, 32, 25),
            "quick": ("tiny: ResNetCell(8,16), B=2, 8x8", 8, 16, 2, 8, 6)}


def solvers(max_iter: int) -> dict:
    """The two contenders at ``tol`` 1e-12: Anderson (m=5, the chapter's) and Broyden (its default memory)."""
    return {"Anderson": dj.Anderson(m=5, lam=1e-4, beta=1.0, tol=TOL, max_iter=max_iter),
            "Broyden": dj.Broyden(tol=TOL, max_iter=max_iter)}


def programs(f, solver):
    """The jitted forward solve (its ``Solution``) and gradient of ``sum(w * z*)`` (with the ``Solution`` as aux)."""

    def solve(args, probe):
        z0 = jnp.zeros_like(args[1])
        return dj.fixed_point(f, z0, args, solver=solver, gradient=dj.Implicit(solver), backward_stats_probe=probe)

    def loss(args, probe, w):
        sol = solve(args, probe)
        return jnp.sum(w * sol.value), sol

    return jax.jit(solve), jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))


def measure(name, channels, inner, batch, size, max_iter, repeats) -> list[dict]:
    """The two rows (forward only, forward + backward) of one problem."""
    _, f, params, x, w = common.cell_problem(channels, inner, batch, size)
    args, probe = (params, x), jnp.zeros(len(SolveStats._fields), jnp.float32)
    contenders = solvers(max_iter)
    steps, hlo_copies, jitted = {}, {}, {}
    for label, solver in contenders.items():
        forward, grad = programs(f, solver)
        # Compiled once, ahead of time: the HLO text and the timed calls come from the same executable.
        forward, grad = forward.lower(args, probe).compile(), grad.lower(args, probe, w).compile()
        jitted[label] = forward, grad
        fwd_steps = common.block(forward(args, probe)).num_steps
        (_, probe_bar), grad_sol = common.block(grad(args, probe, w))
        grad_steps = grad_sol.num_steps
        backward = SolveStats.from_array(probe_bar)
        steps[label] = (int(np.min(fwd_steps)), int(np.max(fwd_steps)), int(np.min(grad_steps)),
                        float(backward.mean_steps), float(backward.max_steps))
        hlo_copies[label] = forward.as_text().count("copy(")
    broyden = contenders["Broyden"]
    memory = broyden.memory_for(x[0].size, x.dtype)
    buffer_bytes = 2 * memory * batch * x[0].size * x.dtype.itemsize
    workloads = {
        "forward only": {label: (lambda fw=forward: common.block(fw(args, probe)))
                         for label, (forward, _) in jitted.items()},
        "forward + backward (grad)": {label: (lambda g=grad: common.block(g(args, probe, w)))
                                      for label, (_, grad) in jitted.items()},
    }
    rows = []
    for workload, fns in workloads.items():
        times = common.interleaved(fns, repeats)
        rows.append({
            "problem": name, "workload": workload, "anderson_ms": times["Anderson"] * 1e3,
            "broyden_ms": times["Broyden"] * 1e3, "ratio": times["Broyden"] / times["Anderson"],
            "memory": memory, "buffer_bytes": buffer_bytes, "max_iter": max_iter,
            "steps": steps, "hlo_copies": hlo_copies,
        })
    return rows


SWEEP = {"full": {"problems": [("CIFAR cell: ResNetCell(48,64), B=32", 48, 64, 32, 32),
                               ("chapter demo: ResNetCell(64,128), B=32", 64, 128, 32, 32)],
                  "tols": (1e-2, 1e-4), "memories": (4, 6, 8, 10, 12, 16), "max_iter": 50},
         "quick": {"problems": [("tiny: ResNetCell(8,16), B=2, 8x8", 8, 16, 2, 8)],
                   "tols": (1e-2,), "memories": (2,), "max_iter": 8}}


def sweep_steps(channels, inner, batch, size, tol, memory, max_iter) -> dict:
    """Forward and backward step counts of one Broyden setting (the gradient of ``sum(w * z*)``)."""
    _, f, params, x, w = common.cell_problem(channels, inner, batch, size)
    solver = dj.Broyden(tol=tol, max_iter=max_iter, memory=memory)
    probe = jnp.zeros(len(SolveStats._fields), jnp.float32)
    _, grad = programs(f, solver)
    (_, probe_bar), sol = common.block(grad((params, x), probe, w))
    backward = SolveStats.from_array(probe_bar)
    return {"fwd_mean": float(np.mean(sol.num_steps)), "fwd_max": int(np.max(sol.num_steps)),
            "fwd_converged": float(np.mean(sol.converged)), "bwd_mean": float(backward.mean_steps),
            "bwd_max": int(backward.max_steps), "bwd_converged": float(backward.converged_fraction)}


def memory_label(memory: int, default: int, max_iter: int) -> str:
    """``'8 (default)'``, ``'48 (all kept)'`` or ``'4'``."""
    notes = [note for note, holds in (("default", memory == default), ("all kept", memory == max_iter - 2)) if holds]
    return f"{memory} ({', '.join(notes)})" if notes else str(memory)


def sweep_memory(quick: bool = False) -> common.Result:
    """Steps to converge against ``memory``; see the module docstring."""
    settings = SWEEP["quick" if quick else "full"]
    before = common.load()
    rows = []
    for name, channels, inner, batch, size in settings["problems"]:
        for tol in settings["tols"]:
            default = dj.Broyden(max_iter=settings["max_iter"]).memory_for(size * size * channels, jnp.float32)
            results = {memory: sweep_steps(channels, inner, batch, size, tol, memory, settings["max_iter"])
                       for memory in sorted({*settings["memories"], default, settings["max_iter"] - 2})}
            full = results[settings["max_iter"] - 2]
            for memory, r in results.items():
                rows.append({"problem": name, "tol": tol, "memory": memory, "default": default, **r,
                             "fwd_vs_full": r["fwd_mean"] / full["fwd_mean"], "bwd_vs_full": r["bwd_mean"] / full["bwd_mean"]})
    header = ["problem", "tol", "memory", "forward steps mean / max", "forward converged", "vs all kept",
              "backward steps mean / max", "backward converged", "vs all kept"]
    table = common.markdown_table(header, [
        [r["problem"], f"{r['tol']:g}", memory_label(r["memory"], r["default"], settings["max_iter"]),
         f"{r['fwd_mean']:.1f} / {r['fwd_max']}", f"{r['fwd_converged']:.0%}", f"{r['fwd_vs_full']:.3f}",
         f"{r['bwd_mean']:.1f} / {r['bwd_max']}", f"{r['bwd_converged']:.0%}", f"{r['bwd_vs_full']:.3f}"]
        for r in rows])
    notes = [f"max_iter {settings['max_iter']} forward and backward; all kept = memory {settings['max_iter'] - 2} "
             "(max_iter - 2, the old default); z0 = 0, x ~ N(0, 1), loss sum(w * z*), w ~ N(0, 1), "
             "backward = dj.Implicit(Broyden with the same memory and tol).",
             "vs all kept = mean steps / mean steps with every update kept."]
    return common.Result("Q9b. Broyden's memory against steps to converge", table, rows, notes, (before, common.load()))


def run(quick: bool = False, repeats: int | None = None, memory_sweep: bool = False) -> common.Result:
    """Measures the problem (or, with ``memory_sweep``, the steps against memory); see the module docstring."""
    if memory_sweep:
        return sweep_memory(quick)
    repeats = common.repeats_or_default(repeats, quick)
    name, channels, inner, batch, size, max_iter = PROBLEMS["quick" if quick else "full"]
    before = common.load()
    rows = measure(name, channels, inner, batch, size, max_iter, repeats)
    header = ["workload", "Anderson (ms)", "Broyden (ms)", "Broyden / Anderson", "Broyden memory",
              "Broyden buffers (MB)"]
    table = common.markdown_table(header, [
        [r["workload"], f"{r['anderson_ms']:.1f}", f"{r['broyden_ms']:.1f}", f"**{r['ratio']:.3f}**", r["memory"],
         f"{r['buffer_bytes'] / 2 ** 20:.3g}"] for r in rows])
    steps = "; ".join(f"{label}: forward {lo}-{hi} f evals, grad's forward {g}, backward mean {bm:.0f} / max {bx:.0f} VJPs"
                      for label, (lo, hi, g, bm, bx) in rows[0]["steps"].items())
    notes = [
        f"{name}; z0 = 0, x ~ N(0, 1); tol {TOL:g}, max_iter {max_iter} forward and backward "
        "(dj.Implicit with the same solver); Anderson m=5, lam=1e-4, beta=1; Broyden memory=None (its default).",
        f"work spent (per example, from Solution.num_steps and the backward stats probe): {steps}.",
        "forward + backward = jax.grad of sum(w * z*) w.r.t. (params, x), w ~ N(0, 1): forward solve, one "
        "linearisation, the backward solve, one VJP w.r.t. the arguments.",
        f"times: median of {repeats} rounds, the two solvers alternating in each round (after a warm-up call).",
        f"Broyden buffers = its two [B, memory, D] arrays (u and v of H = -I + sum u v^T), D = {size}*{size}*{channels}.",
        "copy( instructions in the compiled forward solve: "
        + ", ".join(f"{label} {n}" for label, n in rows[0]["hlo_copies"].items()) + ".",
    ]
    return common.Result("Q9. Broyden vs Anderson at equal f evaluations (CIFAR cell)", table, rows, notes,
                         (before, common.load()))


def add_flags(parser) -> None:
    """``--memory-sweep``."""
    parser.add_argument("--memory-sweep", action="store_true",
                        help="measure steps to converge against Broyden's memory instead of the cost")


def main(argv=None) -> common.Result:
    """Command-line entry point: prints the table."""
    return common.cli(run, __doc__, argv, add_flags)


if __name__ == "__main__":
    main()
