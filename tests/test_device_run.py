"""The device script's dry run on this CPU, with TFDS blocked from import as on the device machine."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import device_run

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference" / "seed_deq_torch.py"


def test_dry_run_writes_every_part_without_tfds(tmp_path, write_cifar_parts):
    parts = write_cifar_parts(tmp_path / "parts", train=100, test=50)
    blocked = tmp_path / "blocked" / "tensorflow_datasets"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"tensorflow_datasets is blocked, as on the device\", name=\"tensorflow_datasets\")\n")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(blocked.parent), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "experiments.device_run", "--data-dir", str(parts), "--out", str(out),
         "--budget", "1200", "--dry-run", "--reference", str(REFERENCE)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert {name: r["status"] for name, r in report.items()} == dict.fromkeys(device_run.SHARES, "ok")
    workdir = out / "cifar10"
    for name in ("metrics.jsonl", "summary.json", "curves.png", "solver.png"):
        assert (workdir / name).is_file(), name
    for name, batch in device_run.DRY_RUN_BATCHES.items():
        variants = {row["workload"] for row in json.loads((out / f"{name}.json").read_text())["rows"]}
        assert len(variants) == 2 and all(f"batch {batch}," in v for v in variants), variants
        assert sum("lax.conv_general_dilated" in v for v in variants) == 1
    tests_log = (out / "tests.log").read_text()
    assert " passed" in tests_log and "1 skipped" in tests_log, tests_log[-2000:]  # test_input_pipeline: no TFDS
    markdown = (out / "report.md").read_text()
    assert "## recipe: ok" in markdown and "projected time of all 2 epochs" in markdown and "| 1 |" in markdown
    # MDEQ's 4 warm-up steps of 3 per epoch: epoch 1 unrolled, epoch 2 on the equilibrium after one step.
    assert (out / "cifar10_mdeq" / "summary.json").is_file()
    assert "## recipe_mdeq: ok" in markdown and "projected time of all 2 epochs" in markdown
    assert "1.3 unrolled epochs at" in markdown and "0.7 equilibrium epochs at" in markdown


def test_a_kind_of_epoch_the_run_needs_but_never_measured_gets_no_projection():
    # One epoch of two steps, one of them unrolled: the epoch solved, so no unrolled epoch was measured alone.
    history = [{"epoch": 1, "epoch_s": 8.0, "fwd_steps_mean": 6.0}]
    config = {"epochs": 1, "batch_size": 50, "warmup_steps": 1}
    assert device_run._projection(history, config, train_examples=100) == (
        "no projection: the run needs 0.5 unrolled epochs and measured none")
    assert device_run._projection(history, {**config, "warmup_steps": 0}, train_examples=100) == (
        "projected time of all 1 epochs: 0.1 min (1.0 equilibrium epochs at 8.0 s)")


def test_a_part_past_its_share_is_cut_off_and_reported(tmp_path):
    command = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    result = device_run.run_part("tests", command, 1, tmp_path, dict(os.environ))
    assert result["status"] == "cut off" and result["returncode"] != 0
    assert "started" in (tmp_path / "tests.log").read_text()


def live_group_members(group: int) -> list[int]:
    """Pids of the processes of a process group still running (zombies excluded), from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:  # pid (comm) state ppid pgrp ...
            pid = int(stat.parent.name)
            state, _, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError, IndexError):
            continue
        if int(pgrp) == group and state not in "ZX":
            members.append(pid)
    return members


def children(pid: int) -> list[int]:
    """Pids of the live children of ``pid``, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, IndexError):
            continue
        if int(ppid) == pid and state not in "ZX":
            found.append(int(stat.parent.name))
    return found


def wait_for(condition, seconds: float, step: float = 0.05):
    """Polls ``condition()`` until it returns something truthy (returned) or ``seconds`` pass (None)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    return None


def kill_groups(*groups: int) -> None:
    """SIGKILL to whatever is left of each group (test cleanup, whether or not the code under test did it)."""
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds processes through /proc (Linux)")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stopping_the_script_kills_the_running_part(tmp_path, write_cifar_parts, sig):
    """The dry run's first part (the recipe, a minute of work here) dies with the script, well within the grace."""
    parts = write_cifar_parts(tmp_path / "parts", train=100, test=50)
    out = tmp_path / "out"
    script = subprocess.Popen(
        [sys.executable, "-m", "experiments.device_run", "--data-dir", str(parts), "--out", str(out),
         "--budget", "600", "--dry-run", "--reference", str(REFERENCE)],
        cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
        # As from a terminal: a SIGINT ignored by whoever runs pytest (a background job) would stay ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    part = None
    try:
        part = wait_for(lambda: children(script.pid), 30)
        assert part, "no part started"
        part = part[0]
        assert os.getpgid(part) == part  # the part leads its own group, out of reach of the script's
        os.kill(script.pid, sig)
        gone = wait_for(lambda: not live_group_members(part), device_run.KILL_GRACE_S + 5)
        output = script.communicate(timeout=30)[0]
        assert gone, f"the part's group {part} outlived the script: {live_group_members(part)}\n{output[-2000:]}"
        assert script.returncode == 128 + sig, output[-2000:]
        assert json.loads((out / "report.json").read_text())["recipe"]["status"] == "interrupted"
        assert f"recipe interrupted ({signal.Signals(sig).name})" in output
    finally:
        kill_groups(script.pid, *([part] if part else []))
        script.wait(timeout=30)


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds processes through /proc (Linux)")
def test_a_part_is_killed_when_the_script_fails_while_it_runs(tmp_path):
    command = [sys.executable, "-c", "import os, time; print(os.getpid(), flush=True); time.sleep(60)"]
    log = tmp_path / "tests.log"

    def fail(signum, frame):
        raise RuntimeError("the script fails while the part runs")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.setitimer(signal.ITIMER_REAL, 2.0)
    try:
        with pytest.raises(RuntimeError, match="the script fails"):
            device_run.run_part("tests", command, 30, tmp_path, dict(os.environ))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    part = int(log.read_text().splitlines()[1])
    try:
        assert not live_group_members(part)
    finally:
        kill_groups(part)


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds processes through /proc (Linux)")
def test_a_signal_while_the_part_starts_still_stops_it(tmp_path, monkeypatch):
    """SIGTERM after the part's fork, before Popen returns (the race a CI run once lost): the part still dies."""
    command = [sys.executable, "-c", "import time; time.sleep(60)"]
    real_popen, started = subprocess.Popen, []

    def popen_then_signal(*args, **kwargs):
        process = real_popen(*args, **kwargs)
        started.append(process.pid)
        os.kill(os.getpid(), signal.SIGTERM)  # handled at the next bytecode: still inside this call
        return process

    monkeypatch.setattr(device_run.subprocess, "Popen", popen_then_signal)
    previous = device_run._exit_on_signals()
    try:
        with pytest.raises(SystemExit) as stopped:
            device_run.run_part("tests", command, 30, tmp_path, dict(os.environ))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    try:
        assert stopped.value.code == 128 + signal.SIGTERM
        assert not live_group_members(started[0])
    finally:
        kill_groups(*started)


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds processes through /proc (Linux)")
def test_processes_a_part_leaves_behind_are_killed(tmp_path):
    # The part exits at once, leaving a child of its own, in its process group, sleeping.
    command = [sys.executable, "-c", "import os, subprocess, sys; print(os.getpid(), flush=True); "
               "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])"]
    result = device_run.run_part("tests", command, 30, tmp_path, dict(os.environ))
    part = int((tmp_path / "tests.log").read_text().splitlines()[1])
    try:
        assert result["status"] == "ok"
        assert not live_group_members(part)
    finally:
        kill_groups(part)


def test_full_run_speed_parts_parse_and_compare_every_setting_at_the_chapters_batch():
    from experiments.benchmarks import common, vs_pytorch

    args = device_run.argparse.Namespace(out="out", data_dir="parts", dry_run=False, reference=str(REFERENCE))
    commands = device_run.part_commands(args)
    flags = {name: common.parse_args("", commands[name][3:], vs_pytorch.add_flags) for name in device_run.BATCHES}
    assert flags["speed_b100"].settings == list(vs_pytorch.SETTINGS) and flags["speed_b100"].batches == [100]
    assert flags["speed_b500"].settings == ["chapter"] and flags["speed_b500"].batches == [500]
