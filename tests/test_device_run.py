"""The device script's dry run on this CPU, with TFDS blocked from import as on the device machine."""
import json
import os
import subprocess
import sys
from pathlib import Path

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
    assert "## recipe: ok" in markdown and "projected time of all 1 epochs" in markdown and "| 1 |" in markdown


def test_a_part_past_its_share_is_cut_off_and_reported(tmp_path):
    command = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    result = device_run.run_part("tests", command, 1, tmp_path, dict(os.environ))
    assert result["status"] == "cut off" and result["returncode"] != 0
    assert "started" in (tmp_path / "tests.log").read_text()
