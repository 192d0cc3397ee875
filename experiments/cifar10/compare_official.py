"""MDEQ-tiny trained by the official PyTorch code and by ``--model mdeq-tiny``, side by side, per seed.

Both train on the same first ``--train-limit`` CIFAR-10 training images with the official
recipe (batch 128, Adam 1e-3 with weight decay 2.5e-6 on a cosine schedule over the run,
dropout 0.25, weight norm, Broyden 18/20 at tol 1e-3, the official input normalisation)
and its warm-up scaled to the budget (``--warmup-steps``), and are tested on the first
``--eval-limit`` test images. Per run: train accuracy (last epoch), test accuracy with
BatchNorm's running statistics and with each test batch's own, forward and backward
residuals and steps (last epoch's mean), seconds per training step; then each side's mean
and spread. The official side is its own code (``official_mdeq.Trainer``) in float32 with
its batch-wide Broyden, shuffled by numpy with deq_jax's per-epoch permutation, tested in
batches of its ``TEST.BATCH_SIZE_PER_GPU x 2 GPUs`` = 64; it also reports the accuracy of
classifying ``f(z*)`` (as deq_jax does) instead of its ``z*``.

Usage::

    python -m experiments.cifar10.compare_official --data-dir ../shared/data/tfds --seeds 0,1,2 \\
        --workdir /tmp/compare [--train-limit 768 --eval-limit 512 --epochs 3 --warmup-steps 3]
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import numpy as np

from . import batch_stats_check, official_mdeq
from . import input_pipeline as ip
from .config import Config, budget_list
from .train import train_and_evaluate

OFFICIAL_TEST_BATCH = 64  # cls_mdeq_TINY.yaml: TEST.BATCH_SIZE_PER_GPU 32 x GPUS (0, 1)
COLUMNS = ("train_acc", "test_acc", "test_acc_batch_stats", "test_acc_f_of_z", "fwd_residual", "fwd_steps",
           "bwd_residual", "bwd_steps", "s_per_step")


def run_deq_jax(config: Config, workdir: Path) -> dict:
    """One ``--model mdeq-tiny`` run; its last epoch's numbers and the batch-statistics check."""
    summary = train_and_evaluate(config, workdir)
    last = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
    limit = config.eval_limit - config.eval_limit % config.batch_size
    check = batch_stats_check.compare(workdir, config.data_dir, limit=limit, batch_size=config.batch_size)
    steps = ip.steps_per_epoch(summary["train_examples"], config.batch_size)
    return {"train_acc": last["train_accuracy"], "test_acc": last["test_accuracy"],
            "test_acc_batch_stats": check["batch"]["accuracy"], "fwd_residual": last["fwd_residual_mean"],
            "fwd_steps": last["fwd_steps_mean"], "bwd_residual": last["bwd_residual_mean"],
            "bwd_steps": last["bwd_steps_mean"], "s_per_step": last["train_s"] / steps}


def _official_accuracy(trainer, split: ip.Split, *, batch_statistics=False, classify_f=False) -> float:
    """Test accuracy of the official model in batches of 64 (BatchNorm running statistics unless asked)."""
    net, solver = trainer.net, trainer.net.f_solver
    if classify_f:  # classify f(z*), as deq_jax does, instead of the official z*
        def solve_then_apply(func, z, **kwargs):
            result = solver(func, z, **kwargs)
            return {**result, "result": func(result["result"])}
        net.f_solver = solve_then_apply
    correct = 0
    for start in range(0, len(split), OFFICIAL_TEST_BATCH):
        images = split.images[start:start + OFFICIAL_TEST_BATCH]
        pixels = official_mdeq.nchw(ip.normalize(images, "mean-std"), trainer.torch)
        logits = trainer.logits(pixels, batch_statistics=batch_statistics)
        correct += int((logits.argmax(-1) == split.labels[start:start + OFFICIAL_TEST_BATCH]).sum())
    net.f_solver = solver
    return correct / len(split)


def run_official(config: Config, train: ip.Split, test: ip.Split, official) -> dict:
    """The official MDEQ-tiny trained on ``train`` with ``config``'s recipe; its numbers as :func:`run_deq_jax`'s."""
    torch = official.torch
    torch.set_num_threads(1)  # one core per run, as XLA:CPU's runs beside it get
    net = official.build("TINY", seed=config.seed)
    net.pretrain_steps = config.warmup_steps
    per_epoch = ip.steps_per_epoch(len(train), config.batch_size)
    trainer = official_mdeq.Trainer(net, official, lr=config.lr, weight_decay=config.weight_decay,
                                    total_steps=per_epoch * config.epochs, f_thres=config.f_max_iter - 1,
                                    b_thres=config.b_max_iter, eps=config.f_tol)
    log = official_mdeq.SolveLog(net.f_solver)
    net.f_solver = net.b_solver = log
    for epoch in range(1, config.epochs + 1):
        log.records.clear()
        rng = np.random.default_rng(np.random.SeedSequence([config.seed, epoch]).spawn(2)[0])
        correct, began = 0, time.perf_counter()
        for images, labels in ip.epoch_batches(train, config.batch_size, rng=rng, drop_remainder=True):
            pixels = official_mdeq.nchw(ip.normalize(images, "mean-std"), torch)
            _, logits = trainer.step(pixels, torch.from_numpy(labels.astype(np.int64)))
            correct += int((logits.argmax(-1) == labels).sum())
        seconds = time.perf_counter() - began
        print(f"official seed {config.seed} epoch {epoch}: train acc {correct / (per_epoch * config.batch_size):.3f}, "
              f"{seconds / per_epoch:.1f} s/step", flush=True)
    (fwd_res, fwd_steps), (bwd_res, bwd_steps) = log.mean("forward"), log.mean("backward")
    return {"train_acc": correct / (per_epoch * config.batch_size), "test_acc": _official_accuracy(trainer, test),
            "test_acc_batch_stats": _official_accuracy(trainer, test, batch_statistics=True),
            "test_acc_f_of_z": _official_accuracy(trainer, test, classify_f=True),
            "fwd_residual": fwd_res, "fwd_steps": fwd_steps, "bwd_residual": bwd_res, "bwd_steps": bwd_steps,
            "s_per_step": seconds / per_epoch}


def table(rows: list[dict]) -> str:
    """A markdown table of every run, then each side's mean and spread (min-max)."""
    def cell(v):
        return "—" if v is None else f"{v:.3f}" if abs(v) >= 0.01 or v == 0 else f"{v:.2e}"

    lines = ["| side | seed | " + " | ".join(COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 2)]
    lines += [f"| {r['side']} | {r['seed']} | " + " | ".join(cell(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    for side in sorted({r["side"] for r in rows}):
        runs = [r for r in rows if r["side"] == side]
        stats = []
        for c in COLUMNS:
            values = [r[c] for r in runs if r.get(c) is not None]
            stats.append("—" if not values else f"{statistics.mean(values):.3f} ({min(values):.3f}–{max(values):.3f})"
                         if "_acc" in c else cell(statistics.mean(values)))
        lines.append(f"| **{side}** | mean (min–max) | " + " | ".join(stats) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--workdir", required=True, help="deq_jax's run folders and the results_*.json go here; "
                        "the table covers every results file there")
    parser.add_argument("--seeds", type=budget_list, default=(0, 1, 2), metavar="S,S,...")
    parser.add_argument("--sides", default="official,deq_jax", help="official, deq_jax or both (comma-separated)")
    parser.add_argument("--train-limit", type=int, default=768)
    parser.add_argument("--eval-limit", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--broyden-memory", type=int, default=None,
                        help="deq_jax's Broyden memory (default: its own, 6 on MDEQ-tiny); the official keeps all")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    train = ip.load_split("train", data_dir=args.data_dir, limit=args.train_limit)
    test = ip.load_split("test", data_dir=args.data_dir, limit=args.eval_limit)
    rows = []
    for seed in args.seeds:
        config = Config.for_model("mdeq-tiny", data_dir=args.data_dir, seed=seed, epochs=args.epochs,
                                  train_limit=args.train_limit, eval_limit=args.eval_limit,
                                  warmup_steps=args.warmup_steps, broyden_memory=args.broyden_memory)
        memory = "" if args.broyden_memory is None else f"_memory{args.broyden_memory}"
        sides = {"official": lambda: run_official(config, train, test, official_mdeq.load()),
                 "deq_jax": functools.partial(run_deq_jax, config, workdir / f"deq_jax{memory}_seed{seed}")}
        for side in args.sides.split(","):
            label = side if side == "official" or not memory else f"deq_jax, --broyden-memory {args.broyden_memory}"
            rows.append({"side": label, "seed": seed, **sides[side]()})
            # One file per invocation, so that one process per side can run at once.
            name = f"results_{args.sides.replace(',', '_')}{memory}_seeds{'_'.join(map(str, args.seeds))}.json"
            (workdir / name).write_text(json.dumps(rows, indent=2) + "\n")
    everything = [row for path in sorted(workdir.glob("results_*.json")) for row in json.loads(path.read_text())]
    print(table(everything))
    return everything


if __name__ == "__main__":
    main()
