"""The CIFAR-10 experiment as several real processes: gloo collectives over localhost.

Every run is ``python tests/cifar10_worker.py`` (the experiment's command line, faults
injected on request), each process in its own session with K CPU devices, all sharing a
workdir and a persistent compilation cache, so each mesh compiles once per test session.
Two phases of concurrent runs on 16 synthetic images (2 steps of 8 per epoch, 2 epochs):

1. ``ref``: 1 process x 1 device; ``killed``: 2 processes x 2 devices whose process 1
   dies (SIGKILL) at the start of epoch 2, once epoch 1's checkpoint is complete.
2. ``resumed2`` / ``resumed1``: ``killed``'s epoch-1 checkpoint resumed by 2 processes and
   by 1; ``control``: 2 x 2 with every process feeding process 0's rows, stopped after
   epoch 1 by ``--time-budget``.

Tolerance: 2 x 2 devices and 1 device reduce in different orders. Measured here: parameters
apart by at most 5.9e-6 after 2 and 4 steps (conv kernels of scale 4e-2), train losses by
1e-7 and test losses by 4e-5 relative (after 10 steps, in a longer run: 1.5e-5 and 2e-4).
``PARAM_ATOL = 5e-5`` and ``LOSS_RTOL = 5e-4`` leave margins of 8x and 2.5x; feeding wrong
rows moved parameters by 3.7e-3 (74x ``PARAM_ATOL``) and losses by 1.6e-2 relative. The
stem's bias is left out: it feeds a BatchNorm in train mode, so its true gradient is 0 and
Adam steps it by +-lr in the sign of rounding noise.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments.cifar10 import distributed, errors, main

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("cifar10_worker.py")
FLAGS = ["--batch-size", "8", "--f-max-iter", "4", "--b-max-iter", "4", "--epochs", "2", "--augment",
         "--eval-limit", "12", "--heartbeat-timeout", "5"]
PARAM_ATOL = 5e-5
LOSS_RTOL = 5e-4
DEAD_PEER_BOUND_S = 60  # heartbeat timeout 5 s; JAX checks heartbeats every few seconds
PHASE_TIMEOUT_S = 400


class Run:
    """The processes of one run, each in its own session, with their logs."""

    def __init__(self, name, workdir, num_processes, devices, flags, env):
        self.name, self.workdir = name, workdir
        workdir.mkdir(parents=True, exist_ok=True)
        cluster = []
        if num_processes > 1:
            cluster = ["--coordinator-address", f"127.0.0.1:{_free_port()}", "--num-processes", str(num_processes)]
        self.processes, self.logs = [], []
        # Added to the run's XLA_FLAGS (conftest's compile flags), not in their place.
        xla_flags = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
        for i in range(num_processes):
            log = workdir.parent / f"{name}.{i}.log"
            self.logs.append(log)
            with log.open("w") as out:
                self.processes.append(subprocess.Popen(
                    [sys.executable, str(WORKER), "--workdir", str(workdir), *flags, *cluster,
                     *(["--process-id", str(i)] if cluster else [])],
                    cwd=ROOT, env={**env, "XLA_FLAGS": xla_flags},
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                ))
        self.start, self.exit_times = time.monotonic(), [None] * num_processes

    def poll(self) -> bool:
        """Records exit times; True once every process has exited."""
        for i, p in enumerate(self.processes):
            if self.exit_times[i] is None and p.poll() is not None:
                self.exit_times[i] = time.monotonic()
        return all(t is not None for t in self.exit_times)

    def kill(self):
        for p in self.processes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    @property
    def returncodes(self):
        return [p.returncode for p in self.processes]

    def log(self, i=0) -> str:
        return self.logs[i].read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(runs: list[Run]) -> None:
    """Waits for every process; on the deadline kills them all (no orphans) and fails."""
    deadline = time.monotonic() + PHASE_TIMEOUT_S
    try:
        while not all([run.poll() for run in runs]):  # a list: every run polled, for its exit times
            if time.monotonic() > deadline:
                pytest.fail(f"runs still going after {PHASE_TIMEOUT_S} s: "
                            + ", ".join(r.name for r in runs if not r.poll()))
            time.sleep(0.1)
    finally:
        for run in runs:
            run.kill()


def _resume_from(killed: Path, workdir: Path) -> Path:
    shutil.copytree(killed / "checkpoints" / "1", workdir / "checkpoints" / "1")
    return workdir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, write_cifar_parts):
    base = tmp_path_factory.mktemp("multiprocess")
    data = write_cifar_parts(base / "data", train=16, test=12)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
           # The run's cache (conftest), else one of its own: each mesh then compiles once.
           "JAX_COMPILATION_CACHE_DIR": os.environ.get("JAX_COMPILATION_CACHE_DIR", str(base / "jax_cache")),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
           # A dead proxy: the coordinator's connections must bypass it (no_proxy).
           "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
    flags = [*FLAGS, "--data-dir", str(data)]
    started = time.monotonic()
    out = {
        "ref": Run("ref", base / "ref", 1, 1, flags, env),
        "killed": Run("killed", base / "killed", 2, 2, flags, {**env, "DEQ_TEST_DIE_AT_EPOCH": "2"}),
    }
    _wait(list(out.values()))
    killed = out["killed"].workdir
    phase2 = {
        "resumed2": Run("resumed2", _resume_from(killed, base / "resumed2"), 2, 2, [*flags, "--resume"], env),
        "resumed1": Run("resumed1", _resume_from(killed, base / "resumed1"), 1, 1, [*flags, "--resume"], env),
        # Any time budget is spent by the end of epoch 1: the run stops cleanly there.
        "control": Run("control", base / "control", 2, 2, [*flags, "--time-budget", "0.001"],
                       {**env, "DEQ_TEST_WRONG_ROWS": "1"}),
    }
    _wait(list(phase2.values()))
    runs = {**out, **phase2}
    print(f"multi-process runs took {time.monotonic() - started:.1f} s: " + ", ".join(
        f"{name} {max(run.exit_times) - run.start:.1f} s" for name, run in runs.items())
          + f"; killed's process 0 exited {runs['killed'].exit_times[0] - runs['killed'].exit_times[1]:.1f} s "
          "after process 1")
    return runs


def _state(workdir: Path, epoch: int) -> dict:
    """A checkpoint's train state as numpy arrays, whatever devices wrote it."""
    path = workdir / "checkpoints" / str(epoch) / "state"
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))


def _param_gap(a: Path, b: Path, epoch: int) -> float:
    """The largest parameter difference of two runs' checkpoints, the stem's bias left out."""
    pa, pb = _state(a, epoch)["params"], _state(b, epoch)["params"]
    for params in (pa, pb):
        del params["stem"]["bias"]
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(x - y).max()), pa, pb)))


def _history(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _assert_same_losses(a: dict, b: dict):
    for key in ("train_loss", "test_loss", "train_accuracy", "test_accuracy"):
        np.testing.assert_allclose(a[key], b[key], rtol=LOSS_RTOL, err_msg=key)


def _assert_ok(run: Run):
    assert run.returncodes == [0] * len(run.processes), run.log(0)[-3000:]


def test_two_processes_match_one_process(runs):
    _assert_ok(runs["ref"])
    ref, killed = runs["ref"].workdir, runs["killed"].workdir
    assert _param_gap(ref, killed, 1) < PARAM_ATOL
    _assert_same_losses(_history(ref)[0], _history(killed)[0])
    assert "4 x cpu in 2 processes" in runs["killed"].log(0)
    assert _history(ref)[0]["test_accuracy"] is not None and json.loads(runs["ref"].log(0).splitlines()[-1])


def test_feeding_wrong_rows_fails_the_comparison(runs):
    ref, control = runs["ref"].workdir, runs["control"].workdir
    gap = _param_gap(ref, control, 1)
    assert gap > 10 * PARAM_ATOL, gap
    with pytest.raises(AssertionError):
        _assert_same_losses(_history(ref)[0], _history(control)[0])


@pytest.mark.parametrize("name", ["resumed2", "resumed1"])
def test_resume_with_two_or_one_process_ends_like_the_uninterrupted_run(runs, name):
    run = runs[name]
    _assert_ok(run)
    assert "resumed from the checkpoint of epoch 1" in run.log(0)
    ref = runs["ref"].workdir
    assert _param_gap(ref, run.workdir, 2) < PARAM_ATOL
    assert [m["epoch"] for m in _history(run.workdir)] == [1, 2]
    for a, b in zip(_history(ref), _history(run.workdir)):
        _assert_same_losses(a, b)


def test_only_process_zero_writes_and_prints(runs):
    run = runs["resumed2"]
    assert "epoch   2 |" in run.log(0) and '"test_accuracy"' in run.log(0)
    assert "epoch" not in run.log(1) and "test_accuracy" not in run.log(1), run.log(1)
    assert {p.name for p in run.workdir.iterdir()} >= {"metrics.jsonl", "summary.json", "curves.png", "solver.png"}


def test_a_dead_peer_ends_the_run(runs):
    run = runs["killed"]
    assert run.returncodes[1] == -signal.SIGKILL, run.log(1)[-2000:]
    assert run.returncodes[0] != 0
    assert run.exit_times[0] - run.exit_times[1] < DEAD_PEER_BOUND_S
    assert (run.workdir / "checkpoints" / "1").is_dir() and not (run.workdir / "checkpoints" / "2").exists()


# Start-up faults are caught before JAX connects anything, so they run in this process.
def test_a_busy_coordinator_port_is_a_one_line_error(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(SystemExit, match="port .* is already in use on this host"):
            main.main(["--workdir", str(tmp_path), "--coordinator-address", f"127.0.0.1:{busy.getsockname()[1]}",
                       "--num-processes", "2", "--process-id", "0"])


def test_an_unreachable_coordinator_is_a_one_line_error_after_the_init_timeout(tmp_path):
    cluster = distributed.Cluster(f"127.0.0.1:{_free_port()}", 2, 1, init_timeout_s=1)
    with pytest.raises(ValueError, match="process 1 could not reach the coordinator .* within --init-timeout 1 s"):
        distributed.initialize(cluster)


def test_a_detected_cluster_that_cannot_be_joined_is_an_error_not_one_process(monkeypatch):
    # A SLURM task as JAX detects it; its initialize() then fails, as it does when JAX is already in use.
    slurm = {"SLURM_JOB_ID": "42", "SLURM_STEP_NODELIST": "node1", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
             "SLURM_LOCALID": "1"}
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    assert distributed.detected_cluster() == "SlurmCluster"

    def fails(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("UNAVAILABLE: failed to connect to the coordinator")

    monkeypatch.setattr(jax.distributed, "initialize", fails)
    with pytest.raises(errors.UsageError, match="detected a SlurmCluster cluster but this process could not join"):
        distributed.initialize(distributed.Cluster())
    for name in slurm:
        monkeypatch.delenv(name)
    assert distributed.detected_cluster() is None
    distributed.initialize(distributed.Cluster())  # no cluster: one process, JAX's initialize never called


def test_the_coordinator_bypasses_a_proxy(monkeypatch):
    monkeypatch.setenv("http_proxy", "http://proxy:3128")
    monkeypatch.setenv("no_proxy", "localhost")
    monkeypatch.delenv("NO_PROXY", raising=False)  # recorded, so the teardown removes what the code sets
    distributed._bypass_proxy("10.0.0.7")
    assert os.environ["no_proxy"] == "localhost,10.0.0.7" and os.environ["NO_PROXY"] == "10.0.0.7"


@pytest.mark.parametrize("flags, message", [
    (["--num-processes", "0"], "--num-processes must be >= 1"),
    (["--num-processes", "2", "--process-id", "2"], "--process-id must be in 0 .. --num-processes - 1"),
    (["--coordinator-address", "host"], "--coordinator-address must be HOST:PORT"),
    (["--heartbeat-timeout", "0"], "--heartbeat-timeout must be >= 1 second"),
])
def test_bad_cluster_flags_exit_before_anything_runs(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main.main(["--workdir", str(tmp_path), *flags])
    assert message in capsys.readouterr().err
