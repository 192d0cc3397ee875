"""Every benchmark runs in quick mode and produces a sane table (never an assertion on time)."""
import math

import pytest

from experiments.benchmarks import __main__ as run_all
from experiments.benchmarks import (backward_scale, common, memory, ops, scaling, solver_overhead, vs_jax_peers,
                                   vs_pytorch)


def check_table(result: common.Result, columns: int) -> None:
    """A markdown table with a header, a separator and one line per row, plus the load average."""
    lines = result.table.splitlines()
    assert len(lines) == 2 + len(result.rows)
    assert all(line.startswith("| ") and line.count("|") == columns + 1 for line in lines[:1] + lines[2:])
    text = result.markdown()
    assert text.startswith("### ") and "load average" in text and result.table in text


def positive(value) -> bool:
    return value is not None and math.isfinite(value) and value > 0


def test_ops():
    result = ops.run(quick=True)
    check_table(result, columns=4)
    assert {r["op"] for r in result.rows} == {"GroupNorm forward", "GroupNorm VJP", "conv 64->48 input VJP",
                                              "ResNetCell(48,64) forward", "ResNetCell(48,64) VJP"}
    assert all(positive(r["ms"]) and positive(r["vs_first"]) for r in result.rows)


def test_backward_scale():
    result = backward_scale.run(quick=True)
    check_table(result, columns=4)
    assert len(result.rows) == 4
    for r in result.rows:
        assert 1 <= r["mean_steps"] <= r["max_steps"] <= backward_scale.MAX_ITER
        assert 0 < r["mean_residual"] <= r["max_residual"] and 0 <= r["converged_fraction"] <= 1


def test_solver_overhead():
    result = solver_overhead.run(quick=True)
    check_table(result, columns=10)
    assert {r["solver"] for r in result.rows} == {"Anderson", "Broyden", "ForwardIteration"}
    for r in result.rows:
        assert 1 <= r["f_evals"] <= 10 and positive(r["f_ms"]) and positive(r["bare_ms"]) and positive(r["solve_ms"])
        assert positive(r["ratio"]) and positive(r["bare_ratio"])


def test_vs_pytorch():
    result = vs_pytorch.run(quick=True)
    check_table(result, columns=8)
    assert [r["workload"] for r in result.rows] == [
        "forward solve, Anderson", "forward solve, forward iteration", "DEQ layer forward + backward (beta=2)",
        "training step, batch 4"]
    has_torch = common.load_reference() is not None
    for r in result.rows:
        assert positive(r["deq_jax_s"]) and r["deq_jax_evals"]
        assert (positive(r["ratio"]) and positive(r["torch_s"]) and r["torch_evals"]) if has_torch else r["ratio"] is None
    if has_torch:  # the same weights and inputs give the same gradient, to solver tolerance
        assert float(result.rows[2]["note"].split()[-1]) < 1e-2


def test_vs_jax_peers():
    result = vs_jax_peers.run(quick=True)
    check_table(result, columns=9)
    names = [r["contender"] for r in result.rows]
    assert names[0] == "deq_jax Anderson"
    for r in result.rows:
        assert r["residual_max"] < 10 * vs_jax_peers.TOL, r  # all solve the same problem to the same tolerance
        assert r["grad_rel_diff"] < 1e-2, r
        assert positive(r["solve_s"]) and positive(r["grad_s"]) and r["f_evals"] >= 1


def test_memory_is_flat_for_implicit_and_grows_unrolled():
    result = memory.run(quick=True)
    check_table(result, columns=6)
    temps = [r["deq_jax_temp_mb"] for r in result.rows]
    unrolled = [r["unrolled_temp_mb"] for r in result.rows]
    assert max(temps) == pytest.approx(min(temps), rel=0.05), temps
    assert unrolled[-1] > 2 * unrolled[0], unrolled
    for r in result.rows:
        assert all(r[k] is None or r[k] >= 0 for k in ("deq_jax_peak_mb", "unrolled_peak_mb", "torch_peak_mb"))


def test_scaling():
    result = scaling.run(quick=True)
    check_table(result, columns=8)
    assert [r["batch"] for r in result.rows] == list(scaling.BATCHES["quick"])
    for r in result.rows:
        assert positive(r["step_s"]) and 1 <= r["fwd_mean"] <= r["fwd_max"] <= 25 and 1 <= r["bwd_mean"] <= r["bwd_max"] <= 25


def test_run_all_knows_every_benchmark(monkeypatch, capsys):
    calls = []
    for name in run_all.BENCHMARKS:
        module = __import__(f"experiments.benchmarks.{name}", fromlist=["run"])
        monkeypatch.setattr(module, "run", lambda quick, repeats, name=name: calls.append((name, quick, repeats)) or
                            common.Result(name, "| a |\n|---|", [], [], ((0, 0, 0), (0, 0, 0))))
    run_all.main(["--quick", "--repeats", "1"])
    assert calls == [(name, True, 1) for name in run_all.BENCHMARKS]
    assert capsys.readouterr().out.count("### ") == len(run_all.BENCHMARKS)


def test_jacobian_cost():
    from experiments.benchmarks import jacobian_cost

    result = jacobian_cost.run(quick=True, repeats=1)
    check_table(result, columns=3)
    assert [r["computation"] for r in result.rows][0] == "f" and result.rows[0]["vs_f"] == 1
    assert len(result.rows) == 7 and all(positive(r["ms"]) and positive(r["vs_f"]) for r in result.rows)


def test_ablation(mock_cifar10, tmp_path, monkeypatch):
    from experiments.benchmarks import ablation

    # Two settings and a second seed keep it short; test_cifar10_train runs every training aid.
    monkeypatch.setattr(ablation, "SETTINGS", {k: ablation.SETTINGS[k] for k in (ablation.CHAPTER, ablation.RECOMMENDED)})
    monkeypatch.setattr(ablation, "SECOND_SEED", (ablation.RECOMMENDED,))
    # The workspace's CIFAR-10 copy when present, else mocked TFDS data.
    with mock_cifar10(20):
        result = ablation.run(quick=True, workdir=str(tmp_path))
    check_table(result, columns=11)
    assert [(r["setting"], r["seed"]) for r in result.rows] == ablation.runs()
    for r in result.rows:
        assert positive(r["s_per_step"]) and 1 <= r["fwd_steps_mean"] <= r["fwd_evals"] <= 12
        assert 0 <= r["test_accuracy"] <= 1 and positive(r["radius"])
        assert (r["bwd_converged"] is None) == ("Phantom" in r["setting"])
