"""Q8. Training aids, ablated: the chapter's model trained with each solver, gradient and regulariser.

Every setting trains the CIFAR-10 experiment (``experiments.cifar10.train``) from the
same seed on the same CIFAR-10 subset, with the chapter's recipe otherwise (Adam 1e-3,
cosine schedule over the run, batch 100, tol 1e-2 and at most 25 steps both ways), one
run after another in this process. The chapter's setting and the recommended one run
with a second seed (and Phantom(1), its uncapped form), so the table shows the seed-to-seed
spread of accuracy.

Usage:
  python -m experiments.benchmarks.ablation [--quick] [--data-dir DIR] [--workdir DIR]
      [--train-limit N] [--eval-limit N] [--epochs N]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from experiments.cifar10 import train
from experiments.cifar10.config import Config

from . import common

SHARED_DATA = common.REFERENCE.parents[1] / "data" / "tfds"
CHAPTER = "Anderson + implicit (the chapter's)"
RECOMMENDED = "Anderson (at most 12 f evals) + Phantom(1)"
# name -> Config fields. The Jacobian penalty's weight is ours (Bai et al. use weights of order 1);
# it is added on every step: on a fraction of steps (a lax.cond) XLA:CPU runs it ~77x slower (Q7).
SETTINGS = {
    CHAPTER: {},
    "Broyden + implicit": dict(solver="broyden"),
    "Anderson + Phantom(1)": dict(gradient="phantom"),
    "Anderson + Phantom(5, 0.8)": dict(gradient="phantom", phantom_steps=5, phantom_damping=0.8),
    "Anderson + implicit + Jacobian reg (weight 1.0)": dict(jac_reg=1.0),
    "Anderson + implicit + weight norm": dict(norm="weight"),
    # The forward solve is most of a phantom step's cost: cap it (the chapter's cap is 25).
    RECOMMENDED: dict(gradient="phantom", f_max_iter=12),
}
SECOND_SEED = (CHAPTER, "Anderson + Phantom(1)", RECOMMENDED)
FULL = dict(epochs=3, train_limit=1500, eval_limit=1000, batch_size=100)
QUICK = dict(epochs=1, train_limit=20, eval_limit=10, batch_size=10, f_max_iter=4, b_max_iter=4)


def runs() -> list[tuple[str, int]]:
    """``(setting, seed)`` in the order they train: every setting with seed 0, then the second seeds."""
    return [(name, 0) for name in SETTINGS] + [(name, 1) for name in SECOND_SEED]


def train_one(name: str, seed: int, sizes: dict, data_dir: str | None, workdir: Path) -> dict:
    """Trains one setting and returns its table row (numbers from its ``metrics.jsonl`` history).

    A run already finished in ``workdir`` with the same settings is read, not trained
    again, so an interrupted ablation continues where it stopped; an unfinished one
    starts over.
    """
    config = Config(data_dir=data_dir, seed=seed, **{**sizes, **SETTINGS[name]})  # the setting's cap wins
    run_dir = workdir / f"{''.join(c if c.isalnum() else '_' for c in name)}-seed{seed}"
    done = run_dir / "summary.json"
    if done.exists() and json.loads(done.read_text())["config"] == dataclasses.asdict(config):
        summary = json.loads(done.read_text())
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
        summary = train.train_and_evaluate(config, run_dir)
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = history[-1]
    steps = summary["epochs"] * (summary["train_examples"] // config.batch_size)
    implicit = config.gradient == "implicit"
    return {
        "setting": name, "seed": seed, "s_per_step": sum(m["train_s"] for m in history) / steps,
        "fwd_evals": np.mean([m["fwd_batch_steps"] for m in history]),
        "fwd_steps_mean": np.mean([m["fwd_steps_mean"] for m in history]),
        # Beyond the solve: implicit linearises f once at z*; phantom unrolls its steps.
        "extra_f": 1 if implicit else config.phantom_steps,
        # Implicit: the backward solve's batched VJPs plus the one w.r.t. the parameters.
        "bwd_vjps": np.mean([m["bwd_batch_steps"] for m in history]) + 1 if implicit else config.phantom_steps,
        "test_accuracy": last["test_accuracy"], "train_loss": last["train_loss"],
        "radius": last["test_spectral_radius_mean"], "fwd_converged": last["fwd_converged"],
        "bwd_converged": last["bwd_converged"] if implicit else None, "run_dir": str(run_dir),
    }


def table(rows: list[dict]) -> str:
    """The markdown table; step times also as a ratio to the chapter's setting (seed 0)."""
    chapter = next(r["s_per_step"] for r in rows if r["setting"] == CHAPTER and r["seed"] == 0)

    def percent(value):
        return "-" if value is None else f"{value:.0%}"

    header = ["setting", "seed", "s / step", "vs chapter", "fwd f evals / step (batch; per example)",
              "extra f", "bwd VJPs / step", "test acc", "spectral radius", "fwd conv.", "bwd conv."]
    return common.markdown_table(header, [
        [r["setting"], r["seed"], f"{r['s_per_step']:.2f}", f"**{r['s_per_step'] / chapter:.2f}**",
         f"{r['fwd_evals']:.1f}; {r['fwd_steps_mean']:.1f}", r["extra_f"], f"{r['bwd_vjps']:.1f}",
         f"{r['test_accuracy']:.1%}", f"{r['radius']:.2f}", percent(r["fwd_converged"]), percent(r["bwd_converged"])]
        for r in rows])


def run(quick: bool = False, data_dir: str | None = None, workdir: str | None = None, **sizes) -> common.Result:
    """Trains every setting (see the module docstring) and returns the table.

    Args:
      quick: tiny sizes (checks that everything runs; the numbers mean nothing).
      data_dir: CIFAR-10 (a TFDS data dir or an ``export_npz`` folder); the workspace's copy
        if it exists, else TFDS's default.
      workdir: where the runs write (a folder per setting and seed); a temporary folder if None.
      sizes: overrides of ``epochs``, ``train_limit``, ``eval_limit`` (None keeps the default).

    Returns:
      :class:`common.Result`.
    """
    sizes = {**(QUICK if quick else FULL), **{k: v for k, v in sizes.items() if v is not None}}
    if data_dir is None and SHARED_DATA.is_dir():
        data_dir = str(SHARED_DATA)
    before = common.load()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(workdir or scratch)
        root.mkdir(parents=True, exist_ok=True)
        rows = []
        for name, seed in runs():
            rows.append(train_one(name, seed, sizes, data_dir, root))
            print(f"ablation: {name}, seed {seed}: {rows[-1]}", flush=True)  # in case the run is cut short
    notes = [
        f"each run: {sizes['train_limit']} CIFAR-10 training images x {sizes['epochs']} epochs, batch "
        f"{sizes['batch_size']}, test accuracy on the first {sizes['eval_limit']} test images after the last epoch; "
        "Adam 1e-3 with cosine decay, the chapter's solver settings (tol 1e-2, at most 25 steps).",
        "s / step = training seconds of all epochs / optimizer steps (compiled ahead of time, so no compilation); "
        "runs are sequential in one process, so 'vs chapter' compares numbers taken minutes apart.",
        "fwd f evals / step: batched f calls of the forward solve (the batch runs until its slowest example "
        "stops), then the mean per example; extra f: implicit linearises f once at z*, Phantom(k) unrolls k steps.",
        "bwd VJPs / step: implicit = batched backward-solve steps + 1 VJP w.r.t. the parameters; Phantom(k) = k.",
        "Jacobian reg: weight x the penalty (one Hutchinson vector at z*) on every step; its gradient costs "
        "about 8.6 f (Q7 `jacobian_cost`), in neither f nor VJP column.",
        "spectral radius: of J_f(z*) at the first test batch's fixed points (50 power iterations), after the "
        "last epoch; fwd/bwd conv.: fraction of examples whose solve reached tol, last epoch.",
    ]
    return common.Result("Q8. Training aids on the chapter's CIFAR-10 model", table(rows), rows, notes,
                         (before, common.load()))


def main(argv=None) -> common.Result:
    """Command-line entry point: trains every setting and prints the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that it runs, measures nothing")
    parser.add_argument("--data-dir", help=f"CIFAR-10 (default: {SHARED_DATA} if present, else TFDS's)")
    parser.add_argument("--workdir", help="keep every run's outputs here (default: a temporary folder)")
    for flag in ("epochs", "train_limit", "eval_limit"):
        parser.add_argument(f"--{flag.replace('_', '-')}", type=int, help=f"default {FULL[flag]}")
    flags = vars(parser.parse_args(argv))
    result = run(**flags)
    print(result.markdown())
    return result


if __name__ == "__main__":
    main()
