"""Q5. Scaling: time per training step of the CIFAR-10 experiment vs batch size, and solver steps.

The experiment's jitted ``train_step`` (the chapter's model and settings: Anderson m=5,
tol 1e-2, max_iter 25 forward and backward; Adam) on CIFAR-10 training images, one
compiled step per batch size, timed over consecutive steps from the same initial
weights. The solver columns are the per-batch statistics the step reports itself:
forward f evaluations and backward steps (mean over examples / most of any example),
averaged over the timed steps.

Usage:
  python -m experiments.benchmarks.scaling [--quick] [--repeats N]
"""
from __future__ import annotations

import time

import jax
import numpy as np

from . import common

BATCHES = {"full": (8, 16, 32, 64, 128, 256), "quick": (4,)}  # quick: the step vs_pytorch compiles


def measure(batch_size: int, repeats: int) -> dict:
    """Compiles the step for one batch size and times ``repeats`` steps after a warm-up one."""
    start = time.perf_counter()
    _, state, step = common.cifar_train_step(batch_size)
    compile_s = time.perf_counter() - start
    batches, source = common.cifar_batches(batch_size, repeats + 1)
    state, _ = common.block(step(state, *batches[0]))  # warm-up
    seconds, metrics = [], []
    for images, labels in batches[1:]:
        start = time.perf_counter()
        # Block on the new state too: the timed step is the whole update, on any device.
        state, m = common.block(step(state, images, labels))
        m = jax.device_get(m)
        seconds.append(time.perf_counter() - start)
        metrics.append(m)
    mean = lambda key: float(np.mean([m[key] for m in metrics]))
    step_s = float(np.median(seconds))
    return {"batch": batch_size, "step_s": step_s, "images_per_s": batch_size / step_s,
            "ms_per_image": step_s / batch_size * 1e3, "compile_s": compile_s,
            "fwd_mean": mean("fwd_steps_mean"), "fwd_max": mean("fwd_steps_max"),
            "bwd_mean": mean("bwd_steps_mean"), "bwd_max": mean("bwd_steps_max"),
            "fwd_residual": mean("fwd_residual_mean"), "bwd_residual": mean("bwd_residual_mean"), "source": source}


def run(quick: bool = False, repeats: int | None = None) -> common.Result:
    """Every batch size in turn; see the module docstring."""
    repeats = common.repeats_or_default(repeats, quick)
    before = common.load()
    rows = [measure(b, repeats) for b in BATCHES["quick" if quick else "full"]]
    header = ["batch", "s / step", "images / s", "ms / image", "fwd f evals mean / max", "bwd steps mean / max",
              "fwd / bwd residual (mean)", "compile (s)"]
    table = common.markdown_table(header, [
        [r["batch"], f"{r['step_s']:.3f}", f"{r['images_per_s']:.1f}", f"{r['ms_per_image']:.1f}",
         f"{r['fwd_mean']:.1f} / {r['fwd_max']:.1f}", f"{r['bwd_mean']:.1f} / {r['bwd_max']:.1f}",
         f"{r['fwd_residual']:.3f} / {r['bwd_residual']:.3f}", f"{r['compile_s']:.1f}"] for r in rows])
    notes = [
        f"the experiment's train_step, jitted and compiled per batch size; {rows[0]['source']}; median of {repeats} "
        "consecutive steps after one warm-up step, from the same initial weights at every batch size.",
        "solver columns: the step's own statistics (per-example f evaluations / backward steps, mean over the batch "
        "and the batch's most), averaged over the timed steps; the batch runs until its slowest example stops.",
        "time per image falls with the batch while the batch is too small to keep both cores busy; beyond that a "
        "step costs ~ the batch size x the slowest example's solver steps.",
    ]
    return common.Result("Q5. Training step time vs batch size", table, rows, notes, (before, common.load()))


def main(argv=None) -> common.Result:
    """Command-line entry point: prints the table."""
    return common.cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
