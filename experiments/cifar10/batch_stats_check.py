"""A run's last checkpoint on test images, classified with BatchNorm's running statistics and with the batch's own.

A model whose train accuracy rises while its test accuracy stays near chance may have
learnt fine and only carry running statistics (stem and head BatchNorms) that lag its
weights, as early in an MDEQ run. This script tells the two apart: it restores the
latest checkpoint of a ``workdir`` with the settings saved in it, and classifies the
first ``--limit`` test images in batches of ``--batch-size`` twice -- as the experiment
evaluates (running statistics), and with every BatchNorm normalising by the batch's own
statistics (as in training, but without dropout; the statistics are not updated).

Usage::

    python -m experiments.cifar10.batch_stats_check --workdir runs/mdeq_tiny --data-dir data/tfds --limit 128

Prints a table (statistics, accuracy, mean loss) and returns it as a dict from
:func:`compare`.
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import jax
import numpy as np

from . import checkpoints
from . import input_pipeline as ip
from .config import Config
from .errors import UsageError
from .steps import eval_step, in_warmup, init_state


def restore_latest(workdir) -> tuple:
    """``(config, model_def, state, epoch)`` of ``workdir``'s latest checkpoint, built with its saved settings."""
    manager = checkpoints.open_manager(Path(workdir).resolve(), resume=True)
    config = Config.from_json(checkpoints.saved_config(manager))
    model_def, state, _, _ = init_state(config, total_steps=1)  # the schedule's length shapes no array
    state, history = checkpoints.restore(manager, state, config)
    return config, model_def, state, len(history)


def compare(workdir, data_dir=None, limit: int = 128, batch_size: int = 128) -> dict:
    """Accuracy and mean loss of ``workdir``'s latest checkpoint with running and with batch statistics.

    Args:
      workdir: a run's workdir (``python -m experiments.cifar10 --workdir``).
      data_dir: where the CIFAR-10 test split is (as the run's ``--data-dir``); None: the run's own.
      limit: the number of test images, from the first.
      batch_size: images per batch; with batch statistics each batch is normalised on its own.
        ``limit`` must be a multiple of it (no padded rows in the statistics).

    Returns:
      ``{"running": {...}, "batch": {...}}``, each ``{"accuracy", "loss"}``, and ``"epoch"``.

    Examples:
      >>> compare("runs/mdeq_tiny", "data/tfds")  # doctest: +SKIP
      {'running': {'accuracy': ..., 'loss': ...}, 'batch': {...}, 'epoch': 3}
    """
    if limit < 1 or batch_size < 1 or limit % batch_size:
        raise UsageError(f"--limit ({limit}) must be a positive multiple of --batch-size ({batch_size})")
    config, model_def, state, epoch = restore_latest(workdir)
    split = ip.load_split("test", data_dir=data_dir or config.data_dir, limit=limit)
    if len(split) < limit:
        raise UsageError(f"--limit {limit}: the test split has only {len(split)} images")
    # As the run evaluated this checkpoint: unrolled while still in the MDEQ warm-up.
    warmup = in_warmup(config, int(state["step"]))
    mask, exact = np.ones(batch_size, bool), np.zeros(batch_size, bool)
    result = {"epoch": epoch}
    for name, batch_statistics in (("running", False), ("batch", True)):
        step = jax.jit(functools.partial(eval_step, model_def=model_def, config=config, warmup=warmup,
                                         batch_statistics=batch_statistics))
        sums = [step(state, split.images[start:start + batch_size], split.labels[start:start + batch_size], mask, exact)
                for start in range(0, limit, batch_size)]
        total = {key: sum(float(m[key]) for m in sums) for key in ("loss", "correct", "count")}
        result[name] = {"accuracy": total["correct"] / total["count"], "loss": total["loss"] / total["count"]}
    return result


def main(argv: list[str] | None = None) -> dict:
    """The command line: parses the flags, runs :func:`compare`, prints its table; a mistake is one error line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="the run's workdir")
    parser.add_argument("--data-dir", help="CIFAR-10 data, as the run's --data-dir (default: the run's own)")
    parser.add_argument("--limit", type=int, default=128, help="test images, from the first (%(default)s)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per batch (%(default)s)")
    args = parser.parse_args(argv)
    try:
        result = compare(args.workdir, args.data_dir, args.limit, args.batch_size)
    except UsageError as e:
        sys.exit(f"error: {e}")
    print(f"{args.workdir}, epoch {result['epoch']}, first {args.limit} test images in batches of {args.batch_size}")
    print("| BatchNorm statistics | accuracy | mean loss |\n|---|---|---|")
    for name, label in (("running", "running (as evaluated)"), ("batch", "the batch's own")):
        print(f"| {label} | {result[name]['accuracy']:.3f} | {result[name]['loss']:.3f} |")
    return result


if __name__ == "__main__":
    main()
