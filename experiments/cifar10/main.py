"""Command line of the CIFAR-10 experiment: parses flags, joins the processes, calls ``train.train_and_evaluate``.

    python -m experiments.cifar10 --workdir runs/cifar10 --data-dir ../shared/data/tfds

Several processes (hosts) run the same command with ``--coordinator-address``,
``--num-processes`` and ``--process-id`` (see :mod:`distributed`).
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

import jax

from . import distributed, train

DEFAULTS = train.Config()


def parse_args(argv: list[str] | None = None) -> tuple[train.Config, str, distributed.Cluster]:
    """Parses and checks the flags.

    Args:
      argv: the arguments after the program name; ``sys.argv[1:]`` if None.

    Returns:
      ``(config, workdir, cluster)``. Exits with status 2 and a message naming the flag on a bad value.
    """
    parser = argparse.ArgumentParser(
        prog="python -m experiments.cifar10",
        description="Train the chapter's conv DEQ on CIFAR-10, data parallel over all devices.",
    )
    add = parser.add_argument
    add("--workdir", required=True, help="output folder: metrics, summary, plots, checkpoints")
    add("--data-dir", help="TFDS data dir holding cifar10 (default: TFDS's own), or a folder of "
        "the <split>-NNNNN-of-NNNNN.npz parts written by experiments.cifar10.export_npz")
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
    add("--dtype", choices=tuple(train.DTYPES), default=DEFAULTS.dtype,
        help="computation dtype; parameters, solver state and loss stay float32 (%(default)s)")
    add("--time-budget", type=float, metavar="S", help="stop cleanly before an epoch that would end after S "
        "seconds of this invocation (judged by the last epoch); --resume continues")
    _add_cluster_flags(parser.add_argument_group(
        "several processes", "one per host, each with the same flags but --process-id; without these flags "
        "JAX detects a SLURM, Open MPI or Cloud TPU cluster, else the run is one process"))
    args = vars(parser.parse_args(argv))
    workdir = args.pop("workdir")
    cluster = {name: args.pop(name) for name in CLUSTER_FLAGS}
    try:
        return train.Config(**args), workdir, distributed.Cluster(**cluster)
    except ValueError as e:
        parser.error(str(e))


CLUSTER_FLAGS = ("coordinator_address", "num_processes", "process_id", "init_timeout_s", "heartbeat_timeout_s")


def _add_cluster_flags(group) -> None:
    add = group.add_argument
    add("--coordinator-address", metavar="HOST:PORT", help="process 0's host and a free port, the same for all")
    add("--num-processes", type=int, metavar="N", help="processes in the run")
    add("--process-id", type=int, metavar="I", help="this process's index, 0 .. N-1")
    add("--init-timeout", dest="init_timeout_s", type=int, default=distributed.INIT_TIMEOUT_S, metavar="S",
        help="seconds to wait for every process to start (%(default)s)")
    add("--heartbeat-timeout", dest="heartbeat_timeout_s", type=int, default=distributed.HEARTBEAT_TIMEOUT_S,
        metavar="S", help="seconds of silence after which a process counts as dead and the run ends (%(default)s)")


def main(argv: list[str] | None = None) -> None:
    """Runs the experiment; bad data, devices, workdir, checkpoint or cluster end in one 'error:' line.

    In a run of several processes an error names the process, and that process ends at
    once: waiting in JAX's shutdown barrier would keep the others blocked in a collective;
    once it is gone they stop within the heartbeat timeout.
    """
    config, workdir, cluster = parse_args(argv)
    try:
        distributed.initialize(cluster)
        train.train_and_evaluate(config, workdir)
    except Exception as e:  # noqa: BLE001 - every failure must end all processes, not only these
        expected = isinstance(e, (FileNotFoundError, FileExistsError, ValueError))
        if jax.process_count() == 1:
            if expected:
                sys.exit(f"error: {e}")
            raise
        where = f"process {jax.process_index()} of {jax.process_count()}"
        print(f"error ({where}): {e}" if expected else f"error ({where}):\n{traceback.format_exc()}",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
