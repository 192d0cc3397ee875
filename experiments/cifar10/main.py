"""Command line of the CIFAR-10 experiment: parses flags, then calls ``train.train_and_evaluate``.

    python -m experiments.cifar10 --workdir runs/cifar10 --data-dir ../shared/data/tfds
"""
from __future__ import annotations

import argparse
import sys

from . import train

DEFAULTS = train.Config()


def parse_args(argv: list[str] | None = None) -> tuple[train.Config, str]:
    """Parses and checks the flags.

    Args:
      argv: the arguments after the program name; ``sys.argv[1:]`` if None.

    Returns:
      ``(config, workdir)``. Exits with status 2 and a message naming the flag on a bad value.
    """
    parser = argparse.ArgumentParser(
        prog="python -m experiments.cifar10",
        description="Train the chapter's conv DEQ on CIFAR-10, data parallel over all devices.",
    )
    add = parser.add_argument
    add("--workdir", required=True, help="output folder: metrics, summary, plots, checkpoints")
    add("--data-dir", help="TFDS data dir holding cifar10 (default: TFDS's own), or a folder of "
        "train.npz/test.npz written by experiments.cifar10.export_npz")
    add("--epochs", type=int, default=DEFAULTS.epochs, help="passes over the training set (%(default)s)")
    add("--batch-size", type=int, default=DEFAULTS.batch_size, help="global batch, split over devices (%(default)s)")
    add("--lr", type=float, default=DEFAULTS.lr, help="initial Adam rate, cosine decay to 1e-6 (%(default)s)")
    add("--seed", type=int, default=DEFAULTS.seed, help="initial weights, shuffling, augmentation (%(default)s)")
    add("--train-limit", type=int, metavar="N", help="train on the first N training examples only")
    add("--eval-limit", type=int, metavar="N", help="evaluate on the first N test examples only")
    add("--resume", action="store_true", help="continue the run checkpointed in --workdir")
    add("--augment", action="store_true", help="random crop (4 px padding) and horizontal flip")
    add("--solver", choices=train.SOLVERS, default=DEFAULTS.solver, help="forward and backward solver (%(default)s)")
    add("--f-tol", type=float, default=DEFAULTS.f_tol, help="forward relative residual tolerance (%(default)s)")
    add("--f-max-iter", type=int, default=DEFAULTS.f_max_iter, help="most forward f evaluations (%(default)s)")
    add("--b-tol", type=float, default=DEFAULTS.b_tol, help="backward relative residual tolerance (%(default)s)")
    add("--b-max-iter", type=int, default=DEFAULTS.b_max_iter, help="most backward solver steps (%(default)s)")
    add("--gradient", choices=train.GRADIENTS, default=DEFAULTS.gradient,
        help="implicit (exact) or phantom (backprop through a few damped steps from z*) (%(default)s)")
    add("--phantom-steps", type=int, default=DEFAULTS.phantom_steps, metavar="K",
        help="phantom gradient: unrolled steps (%(default)s)")
    add("--phantom-damping", type=float, default=DEFAULTS.phantom_damping, metavar="T",
        help="phantom gradient: damping in (0, 1] (%(default)s)")
    add("--jac-reg", type=float, default=DEFAULTS.jac_reg, metavar="WEIGHT",
        help="weight of the Jacobian penalty ||J_f(z*)||_F^2 / D in the loss; 0 is off (%(default)s)")
    add("--jac-reg-freq", type=float, default=DEFAULTS.jac_reg_freq, metavar="P",
        help="fraction of training steps that add the Jacobian penalty (%(default)s)")
    add("--weight-norm", action="store_true", help="weight-normalise the DEQ cell's convolutions")
    args = vars(parser.parse_args(argv))
    workdir = args.pop("workdir")
    try:
        return train.Config(**args), workdir
    except ValueError as e:
        parser.error(str(e))


def main(argv: list[str] | None = None) -> None:
    """Runs the experiment; bad data, devices, workdir or checkpoint end in one 'error:' line."""
    config, workdir = parse_args(argv)
    try:
        train.train_and_evaluate(config, workdir)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        sys.exit(f"error: {e}")
