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

from . import config as config_lib
from . import distributed, train
from .errors import UsageError


def parse_args(argv: list[str] | None = None) -> tuple[config_lib.Config, str, distributed.Cluster]:
    """Parses and checks the flags (one per :class:`config.Config` field, plus the workdir and cluster flags).

    Args:
      argv: the arguments after the program name; ``sys.argv[1:]`` if None.

    Returns:
      ``(config, workdir, cluster)``. Exits with status 2 and a message naming the flag on a bad value.
    """
    parser = argparse.ArgumentParser(
        prog="python -m experiments.cifar10",
        description="Train the chapter's conv DEQ on CIFAR-10, data parallel over all devices.",
    )
    parser.add_argument("--workdir", required=True, help="output folder: metrics, summary, plots, checkpoints")
    config_lib.add_flags(parser)
    _add_cluster_flags(parser.add_argument_group(
        "several processes", "one per host, each with the same flags but --process-id; without these flags "
        "JAX detects a SLURM, Open MPI or Cloud TPU cluster, else the run is one process"))
    args = vars(parser.parse_args(argv))
    cluster = {name: args.pop(name) for name in CLUSTER_FLAGS}
    try:
        return config_lib.from_flags(args), args["workdir"], distributed.Cluster(**cluster)
    except UsageError as e:
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
    """Runs the experiment; the user's mistakes (:class:`errors.UsageError`: bad data, devices, workdir,
    checkpoint or cluster) end in one 'error:' line, anything else with its traceback.

    In a run of several processes an error names the process, and that process ends at
    once: waiting in JAX's shutdown barrier would keep the others blocked in a collective;
    once it is gone they stop within the heartbeat timeout.
    """
    config, workdir, cluster = parse_args(argv)
    try:
        distributed.initialize(cluster)
        train.train_and_evaluate(config, workdir)
    except Exception as e:  # noqa: BLE001 - every failure must end all processes, not only these
        expected = isinstance(e, UsageError)
        if jax.process_count() == 1:
            if expected:
                sys.exit(f"error: {e}")
            raise
        where = f"process {jax.process_index()} of {jax.process_count()}"
        print(f"error ({where}): {e}" if expected else f"error ({where}):\n{traceback.format_exc()}",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
