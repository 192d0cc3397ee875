"""``python -m experiments.cifar10`` with faults injected, for tests/test_multiprocess.py.

Usage: python tests/cifar10_worker.py [the experiment's flags]

Environment:
  DEQ_TEST_WRONG_ROWS=1: every process feeds process 0's rows of each batch instead of
    its own (the negative control: the run must differ from one process's).
  DEQ_TEST_DIE_AT_EPOCH=E: process 1 kills itself (SIGKILL, like a lost host) at the start
    of epoch E, once epoch E-1's checkpoint is complete on disk.
"""
import os
import signal
import sys
import time
from pathlib import Path

from experiments.cifar10 import distributed, main, train


def _feed_wrong_rows() -> None:
    own_rows = distributed.process_rows

    def first_rows(sharding, batch_size):
        # The classic bug: every process reads the batch's first rows. (Swapping two
        # processes' rows would be no control: the step's gradient is a mean over the batch.)
        rows = own_rows(sharding, batch_size)
        return slice(0, rows.stop - rows.start)

    distributed.process_rows = first_rows


def _die_at(epoch: int, workdir: Path) -> None:
    train_epoch = train.train_epoch

    def dying_train_epoch(steps, state, split, config, this_epoch):
        if this_epoch == epoch and train.jax.process_index() == 1:
            # orbax renames the checkpoint's temporary folder to its epoch once all processes wrote it.
            while not (workdir / "checkpoints" / str(epoch - 1)).is_dir():
                time.sleep(0.05)
            print(f"process 1: killing itself at epoch {epoch}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return train_epoch(steps, state, split, config, this_epoch)

    train.train_epoch = dying_train_epoch


if __name__ == "__main__":
    if os.environ.get("DEQ_TEST_WRONG_ROWS"):
        _feed_wrong_rows()
    if os.environ.get("DEQ_TEST_DIE_AT_EPOCH"):
        workdir = Path(sys.argv[sys.argv.index("--workdir") + 1])
        _die_at(int(os.environ["DEQ_TEST_DIE_AT_EPOCH"]), workdir)
    main.main(sys.argv[1:])
