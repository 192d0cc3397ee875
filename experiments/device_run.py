"""A time-budgeted run on a GPU or TPU machine you have for a limited time: the CIFAR-10 recipes, the speed table, the test suite.

Installs nothing and needs no network or TFDS: the data comes as ``export_npz`` parts,
and everything is written under ``--out`` (the device's ``$OUT``). The three parts run
in this order, each a subprocess in its own session with its own share of the budget,
its output in ``<out>/<part>.log``:

1. ``recipe``: ``python -m experiments.cifar10`` with the chapter's settings (50 epochs),
   stopping cleanly at its share (``--time-budget``): metrics, summary, plots, checkpoints.
   ``recipe_mdeq``: the same with ``--model mdeq-tiny`` (the official TINY recipe: 50
   epochs, the first 3,000 steps on the unrolled network).
2. ``speed_b100``, then ``speed_b500``: ``experiments.benchmarks.vs_pytorch``'s training
   step, deq_jax against the chapter's PyTorch code on the same device, in float32 and
   bfloat16, with both convolution forms (4 compiled steps per batch size), at batch 100,
   then at batch 500 (two parts, so a cut-off second still leaves the first). At batch
   100, the chapter's, deq_jax also runs the recommended setting (docs/benchmarks.md, Q8) and Broyden in
   the same rounds (2 more compiled steps): the headline ratios, side by side on the device.
3. ``tests``: the test suite (TFDS-only tests skip where TFDS is absent).

After each part ``<out>/report.md`` is rewritten: what each part did, test accuracy per
epoch, seconds per epoch and the projected time of all of a recipe's epochs, the speed
table, the tests' outcome. A part past its share is killed, and the report says so.

No part outlives the script: when it is stopped (SIGTERM, SIGINT/Ctrl-C) or fails while a
part runs, it kills that part's whole process group as it kills a part past its share
(SIGTERM, then SIGKILL after ``KILL_GRACE_S``), records the part as ``interrupted`` in the
report and exits (128 + the signal's number after a signal). Only a SIGKILL of the script
itself leaves a part running.

Usage (on the device, from the repository root)::

    python -m experiments.device_run --data-dir data_parts --out "$OUT" --budget 540

``--dry-run`` shrinks every part (30 images, two epochs, quick benchmarks, two test
files) so the whole script runs on a CPU in about two minutes.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Shares of the budget; what a part leaves unused passes on to the later ones.
# Guessed, GPU compile times unknown: each speed part compiles 4 train steps, the chapter's recipe 3, MDEQ's 5.
SHARES = {"recipe": 0.25, "recipe_mdeq": 0.2, "speed_b100": 0.2, "speed_b500": 0.2, "tests": 0.15}
RECIPES = {"recipe": ("cifar10", []), "recipe_mdeq": ("cifar10_mdeq", ["--model", "mdeq-tiny"])}  # workdir, flags
KILL_GRACE_S = 10  # after SIGTERM, before SIGKILL
RECIPE_MARGIN_S = 30  # kept from the recipe's share for its last save and summary
BATCHES = {"speed_b100": 100, "speed_b500": 500}
# One batch size for both: under a persistent compilation cache (the tests set one) the second part reuses the first's
# programs; batch 4, as tests/test_benchmarks.py's quick vs_pytorch run, whose programs they are then too.
DRY_RUN_BATCHES = {"speed_b100": 4, "speed_b500": 4}
# vs_pytorch's deq_jax settings per speed part (its SETTINGS): all at the chapter's batch, the chapter's at 500.
SPEED_SETTINGS = {"speed_b100": ("chapter", "recommended", "broyden"), "speed_b500": ("chapter",)}
DRY_RUN_TESTS = ("tests/test_errors.py", "tests/test_input_pipeline.py")  # the second skips without TFDS
# The library's numerics first (what a new backend can break); the rest of the suite after.
DEVICE_TESTS = tuple(f"tests/test_{name}.py" for name in (
    "solvers", "fixed_point", "gradients", "broyden", "jacobian", "mixed_precision", "conv", "nn",
    "group_norm", "weight_norm", "errors")) + ("tests",)


def part_commands(args) -> dict[str, list[str]]:
    """The command of each part, full or shrunk for ``--dry-run``."""
    python, out = sys.executable, Path(args.out)
    recipes = {name: [python, "-m", "experiments.cifar10", "--workdir", str(out / workdir), "--data-dir", args.data_dir,
                      *flags] for name, (workdir, flags) in RECIPES.items()}
    speed = {name: [python, "-m", "experiments.benchmarks.vs_pytorch", "--workloads", "train",
                    "--dtypes", "float32", "bfloat16", "--json", str(out / f"{name}.json"),
                    "--batches", str((DRY_RUN_BATCHES if args.dry_run else BATCHES)[name]),
                    "--settings", *SPEED_SETTINGS[name]]
             for name in BATCHES}
    tests = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={out / 'tests.xml'}"]
    if args.dry_run:
        # The settings of tests/test_cifar10_train.py's mocked runs (MDEQ: epoch 1 unrolled, epoch 2 switching
        # to the equilibrium after one step), so that under the tests' shared compilation cache the dry run
        # compiles nothing those runs compiled already.
        tiny = ["--epochs", "2", "--train-limit", "30", "--eval-limit", "25", "--batch-size", "10",
                "--f-max-iter", "4", "--b-max-iter", "4"]
        recipes = {name: command + tiny for name, command in recipes.items()}
        recipes["recipe_mdeq"] += ["--warmup-steps", "4", "--warmup-depth", "2"]
        # float32 at the chapter's settings only: the other variants are exercised by tests/test_benchmarks.py.
        speed = {name: [*command, "--quick", "--repeats", "1", "--dtypes", "float32", "--settings", "chapter"]
                 for name, command in speed.items()}
        tests += list(DRY_RUN_TESTS)
    else:
        tests += list(DEVICE_TESTS)
    return {**recipes, **speed, "tests": tests}


def part_env(args) -> dict[str, str]:
    """The parts' environment: this checkout importable, the benchmarks pointed at the data and reference."""
    return {
        **os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "DEQ_JAX_DATA_DIR": str(Path(args.data_dir).resolve()), "DEQ_JAX_REFERENCE": str(Path(args.reference).resolve()),
        # JAX would take 75% of the GPU up front; PyTorch shares it in the speed part.
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
    }


def run_part(name: str, command: list[str], seconds: float, out: Path, env: dict[str, str]) -> dict:
    """Runs one part in its own session with output in ``<out>/<name>.log``, killed after ``seconds``.

    Returns:
      ``{"status": "ok" | "failed" | "cut off", "returncode", "seconds"}``.
    """
    if name in RECIPES:
        command = [*command, "--time-budget", f"{max(seconds - RECIPE_MARGIN_S, 1):.0f}"]
    start = time.monotonic()
    with (out / f"{name}.log").open("w") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        process, cut_off = None, False
        try:
            with _signals_held():  # a SystemExit inside Popen would orphan the part: no object to stop
                process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True)
            process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            cut_off = True
        finally:
            # Past its share, interrupted (a signal turned into SystemExit, Ctrl-C, any exception), or
            # done but with processes of its own left in its group: none of them outlives this call.
            if process is not None:
                _stop(process)
    status = "cut off" if cut_off else "ok" if process.returncode == 0 else "failed"
    return {"status": status, "returncode": process.returncode, "seconds": round(time.monotonic() - start, 1)}


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the part's whole process group, SIGKILL to what is left of it after ``KILL_GRACE_S``.

    Returns at once when the group is empty (a part that ended and left nothing behind),
    else once the part's own process is reaped and the group is gone.
    """
    group = process.pid  # start_new_session: the part leads its own session and process group
    try:
        if _signal_group(group, signal.SIGTERM):
            deadline = time.monotonic() + KILL_GRACE_S
            try:
                process.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
            # Processes the part started in its group may outlive it: they get the rest of the grace.
            while time.monotonic() < deadline and _group_alive(group):
                time.sleep(0.05)
    finally:  # also when a signal interrupts the grace: then the rest of the group goes at once
        _signal_group(group, signal.SIGKILL)
        process.wait()


def _group_alive(group: int) -> bool:
    """Whether a process of the group is still running: zombies, which need their parent to reap them, do not count."""
    if not Path("/proc/self/stat").is_file():
        return _signal_group(group, 0)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:  # pid (comm) state ppid pgrp ...; comm may hold spaces and parentheses
            state, _, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError):
            continue
        if int(pgrp) == group and state not in "ZX":
            return True
    return False


def _signal_group(group: int, sig: int) -> bool:
    """``os.killpg(group, sig)``; False when no process is left in the group."""
    try:
        os.killpg(group, sig)
        return True
    except ProcessLookupError:
        return False


def recipe_report(out: Path, name: str = "recipe") -> list[str]:
    """Test accuracy per epoch, epoch time and the projected time of all epochs, from the run's files.

    Epochs spent wholly in the warm-up (no solve: ``fwd_steps_mean`` is None) cost what
    the unrolled network costs, the others what the equilibrium costs; the projection
    takes each kind's mean epoch time (leaving out the run's first epoch, which also warms
    caches, when that kind has another) for the epochs of that kind the whole run would have.
    """
    workdir = out / RECIPES[name][0]
    metrics = workdir / "metrics.jsonl"
    if not metrics.is_file():
        return ["no epoch finished"]
    history = [json.loads(line) for line in metrics.read_text().splitlines()]
    summary = json.loads((workdir / "summary.json").read_text()) if (workdir / "summary.json").is_file() else {}
    config = summary.get("config", {})
    lines = ["| epoch | train loss | test acc | exact test acc | fwd steps | bwd steps | epoch s | img/s |",
             "|---|---|---|---|---|---|---|---|"]

    def steps(m, prefix):
        value = m.get(f"{prefix}_steps_mean", float("nan"))
        return "unrolled" if value is None else f"{value:.1f}"

    for m in history:
        exact = "n/a" if m["test_exact_accuracy"] is None else f"{m['test_exact_accuracy']:.4f}"
        lines.append(f"| {m['epoch']} | {m['train_loss']:.4f} | {m['test_accuracy']:.4f} | {exact} | "
                     f"{steps(m, 'fwd')} | {steps(m, 'bwd')} | {m['epoch_s']:.1f} | {m['images_per_s']:.0f} |")
    if summary:
        lines.append(f"\ndevice: {summary['device']}; compiled in {summary['compile_s']:.1f} s; "
                     f"{summary['epochs']} of {config['epochs']} epochs" + (" (stopped at the time budget)"
                                                                            if summary["stopped_early"] else ""))
        lines.append(_projection(history, config, summary["train_examples"]))
    return lines


def _projection(history: list[dict], config: dict, train_examples: int) -> str:
    """The projected time of all ``config['epochs']`` epochs, from the measured epochs of each kind."""
    warmup_epochs = min(config.get("warmup_steps", 0) / (train_examples // config["batch_size"]), config["epochs"])
    kinds = {"unrolled": [m for m in history if m["fwd_steps_mean"] is None],
             "equilibrium": [m for m in history if m["fwd_steps_mean"] is not None]}
    needed = {"unrolled": warmup_epochs, "equilibrium": config["epochs"] - warmup_epochs}
    total, parts = 0.0, []
    for kind, epochs in kinds.items():
        if not needed[kind]:
            continue
        if not epochs:
            return f"no projection: the run needs {needed[kind]:.1f} {kind} epochs and measured none"
        steady = [m["epoch_s"] for m in epochs if m["epoch"] > 1] or [epochs[0]["epoch_s"]]
        epoch_s = sum(steady) / len(steady)
        total += needed[kind] * epoch_s
        parts.append(f"{needed[kind]:.1f} {kind} epochs at {epoch_s:.1f} s")
    return f"projected time of all {config['epochs']} epochs: {total / 60:.1f} min ({', '.join(parts)})"


def speed_report(out: Path, name: str) -> list[str]:
    path = out / f"{name}.json"
    if not path.is_file():
        return ["no speed table"]
    record = json.loads(path.read_text())
    return [record["table"], "", *(f"- {note}" for note in record["notes"]), f"- devices: {record['devices']}",
            f"- {record['environment']}"]


def tests_report(out: Path) -> list[str]:
    log = out / "tests.log"
    lines = log.read_text().splitlines() if log.is_file() else []
    return [line for line in lines[-3:] if line.strip()] or ["no test output"]


def write_report(out: Path, results: dict, args) -> Path:
    sections = {**{name: functools.partial(recipe_report, name=name) for name in RECIPES}, "tests": tests_report,
                **{name: functools.partial(speed_report, name=name) for name in BATCHES}}
    text = [f"# Device run ({'dry run, ' if args.dry_run else ''}budget {args.budget:g} s)", ""]
    for name, result in results.items():
        text += [f"## {name}: {result['status']} after {result['seconds']} s (exit {result['returncode']})", "",
                 *sections[name](out), ""]
    report = out / "report.md"
    report.write_text("\n".join(text))
    (out / "report.json").write_text(json.dumps(results, indent=2))
    return report


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder of export_npz parts (or a TFDS data dir)")
    parser.add_argument("--out", required=True, help="folder for everything the run writes ($OUT)")
    parser.add_argument("--budget", type=float, default=540, help="seconds for all parts (%(default)s)")
    parser.add_argument("--reference", default=str(ROOT.parent / "shared" / "reference" / "seed_deq_torch.py"),
                        help="the chapter's PyTorch code, for the speed table (%(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="tiny parts, to check the script on a CPU")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget
    results = {}
    previous = _exit_on_signals()
    try:
        for name, command in part_commands(args).items():
            parts_left = list(SHARES)[list(SHARES).index(name):]
            left = deadline - time.monotonic()
            seconds = left * SHARES[name] / sum(SHARES[p] for p in parts_left)
            print(f"device_run: {name} ({seconds:.0f} s)", flush=True)
            start = time.monotonic()
            try:
                results[name] = run_part(name, command, seconds, out, part_env(args))
            except BaseException as error:  # the part is already stopped (run_part's finally)
                results[name] = {"status": "interrupted", "returncode": None,
                                 "seconds": round(time.monotonic() - start, 1)}
                _report_interruption(out, results, args, name, error)
                raise
            report = write_report(out, results, args)
            print(f"device_run: {name} {results[name]['status']} after {results[name]['seconds']} s -> {report}",
                  flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return results


def _exit_on_signals() -> dict:
    """Turns SIGTERM and SIGINT into ``SystemExit(128 + signal)``, so ``finally`` blocks stop the running part.

    After the first such signal both are ignored: the part's stop (at most ``KILL_GRACE_S``,
    then SIGKILL) is not cut short by a second one. A SIGINT ignored when the script
    started (a background job of a non-interactive shell) stays ignored.

    Returns:
      The handlers replaced, signal -> handler, to restore.
    """
    def exit_now(signum, frame):
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        if _HELD["holding"]:
            _HELD["signal"] = signum
            return
        raise SystemExit(128 + signum)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        handler = signal.getsignal(sig)
        if handler is not signal.SIG_IGN:
            previous[sig] = handler
            signal.signal(sig, exit_now)
    return previous


_HELD = {"holding": False, "signal": None}  # exit_now's state inside _signals_held


@contextlib.contextmanager
def _signals_held():
    """Defers ``exit_now``'s ``SystemExit`` to the end of the block.

    A signal that arrives while ``subprocess.Popen`` starts a part (after its fork, before
    it returns) would leave the part running with no Popen object to stop it.
    """
    _HELD["holding"] = True
    try:
        yield
    finally:
        _HELD["holding"] = False
        signum, _HELD["signal"] = _HELD["signal"], None
        if signum is not None:
            raise SystemExit(128 + signum)


def _report_interruption(out: Path, results: dict, args, name: str, error: BaseException) -> None:
    """Best effort, on the way out: the report with ``name`` interrupted; never masks ``error``."""
    cause = type(error).__name__
    if isinstance(error, SystemExit) and isinstance(error.code, int) and error.code > 128:
        cause = signal.Signals(error.code - 128).name if error.code - 128 in signal.valid_signals() else cause
    try:
        report = write_report(out, results, args)
        print(f"device_run: {name} interrupted ({cause}) after {results[name]['seconds']} s, its process group "
              f"killed -> {report}", flush=True)
    except Exception as report_error:  # e.g. a part's half-written output
        print(f"device_run: {name} interrupted ({cause}); report not written: {report_error!r}", flush=True)


if __name__ == "__main__":
    main()
