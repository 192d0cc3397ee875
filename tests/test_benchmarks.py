"""Every benchmark runs in quick mode and produces a sane table (never an assertion on time)."""
import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.benchmarks import __main__ as run_all
from experiments.benchmarks import (backward_scale, common, mdeq_cost, memory, ops, scaling, solver_overhead,
                                   vs_jax_peers, vs_pytorch)
from experiments.cifar10 import official_mdeq


def check_table(result: common.Result, columns: int) -> None:
    """A markdown table with a header, a separator and one line per row, plus the load average."""
    lines = result.table.splitlines()
    assert len(lines) == 2 + len(result.rows)
    assert all(line.startswith("| ") and line.count("|") == columns + 1 for line in lines[:1] + lines[2:])
    text = result.markdown()
    assert text.startswith("### ") and "load average" in text and result.table in text


def positive(value) -> bool:
    return value is not None and math.isfinite(value) and value > 0


# Benchmarks on CIFAR-10 batches read the workspace's copy (../shared/data/tfds or $DEQ_JAX_DATA_DIR);
# without one (a user's checkout) they run as a user without the data would: on --synthetic-data.
NO_CIFAR = not common.DATA_DIR.exists()


def test_ops():
    result = ops.run(quick=True)
    check_table(result, columns=4)
    assert {r["op"] for r in result.rows} == {"GroupNorm forward", "GroupNorm VJP", "conv 64->48 input VJP",
                                              "ResNetCell(48,64) forward", "ResNetCell(48,64) VJP"}
    assert all(positive(r["ms"]) and positive(r["vs_first"]) for r in result.rows)


def test_mdeq_cost():
    result = mdeq_cost.run(quick=True)
    check_table(result, columns=6)
    assert [r["cell"] for r in result.rows] == ["chapter", "MDEQ-tiny"]
    for r in result.rows:
        assert positive(r["f_ms"]) and positive(r["vjp_ms"])
        # XLA counts the compiled f (norms too) without the taps on zero padding (1 - 2/24 per side at 8x8
        # for 3x3 convs): the hand count of the convolutions must agree with it to that.
        assert 0.75 < r["xla_mflops"] / r["paper_mflops"] < 1.1, r


def test_backward_scale():
    with common.synthetic_data(NO_CIFAR):
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


def test_vs_pytorch(tmp_path):
    path = tmp_path / "q2.json"
    everything = vs_pytorch.main(["--quick", "--json", str(path), *(["--synthetic-data"] if NO_CIFAR else [])])
    check_table(everything, columns=10)
    mdeq = [r for r in everything.rows if r["workload"].startswith("MDEQ-tiny")]
    result = dataclasses.replace(everything, rows=[r for r in everything.rows if r not in mdeq])
    dtypes = ("", ", bfloat16") if common.model_takes_dtype() else ("",)
    first = next(iter(common.CONVS))
    recommended = "recommended (--gradient phantom --f-max-iter 12)"
    training = [(f"training step, batch 4, {conv}{dtype}", "chapter's") for dtype in dtypes for conv in common.CONVS]
    training += [(f"training step, batch 4, {first}", setting) for setting in (recommended, "broyden (--solver broyden)")]
    assert [(r["workload"], r["setting"]) for r in result.rows] == [
        ("forward solve, Anderson", "chapter's"), ("forward solve, forward iteration", "chapter's"),
        ("DEQ layer forward + backward (beta=2)", "chapter's"), *training]
    # The headline side by side: every training row against the same PyTorch step, in one table.
    table_lines = result.table.splitlines()
    assert any(f"| {recommended} |" in line for line in table_lines)
    assert len({r["torch_s"] for r in result.rows[3:]}) == 1
    recommended_row, broyden_row = result.rows[-2:]
    assert recommended_row["deq_jax_evals"].endswith("1 f, 1 VJP (phantom)")
    assert float(recommended_row["deq_jax_evals"].split()[0]) <= 12  # the recommended cap
    assert "phantom" not in broyden_row["deq_jax_evals"] and broyden_row["deq_jax_evals"].endswith(" VJP")
    assert "chapter's setting" in recommended_row["note"] and "chapter's setting" in broyden_row["note"]
    source = result.rows[3]["note"]
    assert source == ("random pixels (--synthetic-data), not CIFAR-10" if NO_CIFAR else "CIFAR-10 train images")
    assert ("bfloat16 training step skipped" in result.markdown()) == (len(dtypes) == 1)
    has_torch = common.load_reference() is not None
    for r in result.rows:
        assert positive(r["deq_jax_s"]) and r["deq_jax_evals"]
        assert (positive(r["ratio"]) and positive(r["torch_s"]) and r["torch_evals"]) if has_torch else r["ratio"] is None
    for r in result.rows[3:]:
        assert r["deq_jax_images_per_s"] == pytest.approx(4 / r["deq_jax_s"])
    # Both convolution forms train the same weights on the same batches, up to rounding (their programs
    # differ): the same forward steps, and backward solves that may stop one VJP apart at the tolerance.
    (f3, vjp3), (f4, vjp4) = (result.rows[i]["deq_jax_evals"].split(", ") for i in (3, 4))
    assert f3 == f4 and abs(float(vjp3.split()[0]) - float(vjp4.split()[0])) <= 1
    if has_torch:  # the same weights and inputs give the same gradient, to solver tolerance
        assert float(result.rows[2]["note"].split()[-1]) < 1e-2
    # The MDEQ rows: deq_jax at two Broyden memories against the official code's step, where that code is.
    if official_mdeq.missing() is None:
        assert [r["setting"] for r in mdeq] == ["official recipe, default memory", "official recipe, --broyden-memory 20"]
        for r in mdeq:
            assert positive(r["ratio"]) and r["deq_jax_evals"] == r["torch_evals"] == "19.0 f + 1 f, 20.0 VJP"
    else:
        assert not mdeq and "MDEQ row skipped" in everything.markdown()
    record = json.loads(path.read_text())
    assert record["rows"] == json.loads(json.dumps(everything.rows)) and record["devices"] == common.devices()


def test_vs_pytorch_flags(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(vs_pytorch, "run", lambda quick, repeats, **flags: calls.append((quick, repeats, flags)) or
                        common.Result("t", "| a |\n|---|", [{"a": 1}], [], ((0, 0, 0), (0, 0, 0))))
    vs_pytorch.main(["--repeats", "3", "--batches", "100", "512", "--workloads", "train", "--dtypes", "bfloat16",
                     "--json", str(tmp_path / "out.json")])
    assert calls == [(False, 3, {"batches": [100, 512], "dtypes": ["bfloat16"], "workloads": ["train"],
                                 "settings": tuple(vs_pytorch.SETTINGS)})]
    assert json.loads((tmp_path / "out.json").read_text())["rows"] == [{"a": 1}]


def test_devices_on_cpu():
    if jax.default_backend() != "cpu":
        pytest.skip("JAX is not on the CPU here")
    torch = pytest.importorskip("torch")
    cpu = f"cpu ({common.cpu_model()})"
    assert common.cpu_model()
    assert common.jax_device_name() == cpu
    expected = cpu if not torch.cuda.is_available() else f"cuda {torch.cuda.get_device_name()}"
    assert common.devices() == f"JAX: {cpu} / torch: {expected}"


@pytest.fixture
def fake_cuda(monkeypatch):
    """PyTorch believing CUDA is there; ``torch.cuda.synchronize()`` appends 'sync' to the returned list."""
    torch = pytest.importorskip("torch")
    events = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *_: events.append("sync"))
    return events


def test_devices_names_cuda(fake_cuda):
    assert common.torch_device().type == "cuda"
    assert common.devices().endswith(" / torch: cuda Fake GPU")


def test_torch_side_synchronizes_on_cuda(fake_cuda):
    contenders = vs_pytorch.torch_contenders(lambda: fake_cuda.append("work") or "out", quick=False)
    assert list(contenders) == ["PyTorch cuda"]  # no CPU thread settings on CUDA
    timed = contenders["PyTorch cuda"]
    assert [timed(), timed()] == ["out", "out"]
    assert fake_cuda == ["work", "sync", "work", "sync"]  # the timer stops after the device has finished


def test_torch_side_on_cpu_does_not_synchronize(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *_: pytest.fail("synchronize on the CPU"))
    fn = lambda: "out"
    assert common.torch_synchronized(fn) is fn
    threads = common.cpu_threads()
    assert set(vs_pytorch.torch_contenders(fn, quick=False)) == {f"PyTorch {threads}t", "PyTorch 1t"}


@pytest.mark.parametrize("conv", list(common.CONVS))
def test_cell_with_conv(conv):
    cell, _, _, x, _ = common.cell_problem(8, 16, 2, 5)
    new = common.cell_with_conv(cell, conv)
    assert new.conv1.conv_general_dilated is common.CONVS[conv] and new.conv2.conv_general_dilated is common.CONVS[conv]
    assert jnp.allclose(new(x, x), cell(x, x), atol=1e-6)


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
    with common.synthetic_data(NO_CIFAR):
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
    costs, steps = result.rows[:7], result.rows[7:]
    assert [r["computation"] for r in costs][0] == "f" and costs[0]["vs_f"] == 1
    assert all(positive(r["ms"]) and positive(r["vs_f"]) for r in costs)
    # The --jac-reg-freq table: plain, penalised and the mixed run, measured against its prediction.
    assert len(steps) == 3 and all(positive(r["ms"]) for r in steps) and positive(steps[2]["vs_predicted"])
    first, second = result.table.split("\n\n")
    assert len(first.splitlines()) == 2 + len(costs) and len(second.splitlines()) == 2 + len(steps)


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


@pytest.fixture
def unreadable_data(tmp_path, monkeypatch, request):
    """``common.DATA_DIR`` pointed at a folder CIFAR-10 cannot be read from: empty, or with a corrupt part."""
    folder = tmp_path / "data"
    folder.mkdir()
    if request.param == "corrupt part":
        (folder / "train-00000-of-00001.npz").write_bytes(b"not an npz file")
    monkeypatch.setattr(common, "DATA_DIR", folder)
    return folder


@pytest.mark.parametrize("unreadable_data", ["empty", "corrupt part"], indirect=True)
def test_cifar_batches_fail_clearly_without_the_data(unreadable_data):
    with pytest.raises(RuntimeError) as error:
        common.cifar_batches(2, 3)
    message = str(error.value)
    assert str(unreadable_data) in message and "$DEQ_JAX_DATA_DIR" in message and "--synthetic-data" in message
    cause = error.value.__cause__
    assert cause is not None and f"{type(cause).__name__}: " in message  # the cause, by name and message


@pytest.mark.parametrize("unreadable_data", ["corrupt part"], indirect=True)
def test_synthetic_data_flag_gives_random_pixels_and_says_so(unreadable_data):
    def run(quick, repeats):
        batches, source = common.cifar_batches(2, 3)
        return common.Result("t", "| a |\n|---|", [{"source": source, "batches": batches}], [], ((0, 0, 0),) * 2)

    result = common.cli(run, "doc", ["--quick", "--synthetic-data"])
    (r,) = result.rows
    assert "random pixels" in r["source"] and "--synthetic-data" in r["source"]
    assert [(images.shape, images.dtype, labels.shape) for images, labels in r["batches"]] == [
        ((2, 32, 32, 3), np.uint8, (2,))] * 3
    assert not common.SYNTHETIC_DATA  # only for that run
    with pytest.raises(RuntimeError, match="--synthetic-data"):
        common.cli(run, "doc", ["--quick"])


def test_vs_pytorch_recommended_setting_is_the_ablations():
    from experiments.benchmarks import ablation

    assert dict(vs_pytorch.SETTINGS["recommended"]) == ablation.SETTINGS[ablation.RECOMMENDED]
    assert dict(vs_pytorch.SETTINGS["broyden"]) == ablation.SETTINGS["Broyden + implicit"]
    assert vs_pytorch.SETTINGS["chapter"] == () and ablation.SETTINGS[ablation.CHAPTER] == {}


def test_train_settings_are_one_cache_key_in_any_order():
    pairs = (("gradient", "phantom"), ("f_max_iter", 12))
    assert common.train_settings(pairs) == common.train_settings(dict(reversed(pairs))) == (
        ("f_max_iter", 12), ("gradient", "phantom"))
    hash(common.train_settings(pairs))  # lru_cache needs it


def test_forward_mode():
    from experiments.benchmarks import forward_mode

    result = forward_mode.run(quick=True, repeats=1)
    check_table(result, columns=3)
    assert [r["workload"].split(":")[0] for r in result.rows] == ["forward solve", "reverse mode", "forward mode"]
    assert result.rows[0]["vs_forward"] == 1 and all(positive(r["ms"]) for r in result.rows)


def test_anderson_ridge():
    from experiments.benchmarks import anderson_ridge

    result = anderson_ridge.run(quick=True, repeats=1)
    check_table(result, columns=4)
    rows = {r["variant"]: r for r in result.rows}
    assert len(rows) == len(anderson_ridge.variants(quick=True))
    tight = [r for name, r in rows.items() if name.startswith("tol 1e-06") and "TF32" not in name]
    assert all(r["converged_fraction"] == 1 and r["max_residual"] < 1e-6 for r in tight)
    # TF32 products stall Anderson far above the tolerance that full precision reaches.
    stalled = rows["tol 1e-06: lam=0.0001 absolute, TF32 products"]
    assert stalled["converged_fraction"] == 0 and stalled["max_residual"] > 1e-5
    # The relative ridge needs fewer f evaluations than the chapter's absolute one at this tolerance.
    assert rows["tol 1e-06: lam=0.0001 relative"]["mean_steps"] < rows["tol 1e-06: lam=0.0001 absolute"]["mean_steps"]
    assert "full precision's cost" in result.markdown()


def test_gradient_quality(monkeypatch):
    from experiments.benchmarks import gradient_quality

    # Three strategies keep it short (tests/test_strategies.py checks every strategy itself).
    names = ["implicit (Anderson, tol 1e-2, at most 25 VJPs)", "Jacobian-free: Phantom(1)",
             "GDEQ (Broyden forward solve, tol 1e-2, at most 25)"]
    monkeypatch.setattr(gradient_quality, "STRATEGIES", {k: gradient_quality.STRATEGIES[k] for k in names})
    with common.synthetic_data(NO_CIFAR):
        result = gradient_quality.run(quick=True, repeats=1)
    check_table(result, columns=7)
    assert [(r["state"], r["strategy"]) for r in result.rows] == [
        (state, name) for state in ("initialisation", "after 1 training steps") for name in names]
    for r in result.rows:
        assert all(-1 <= r[k] <= 1 for k in ("cos_params", "cos_x")) and positive(r["error_params"]), r
        assert r["f_evals"] >= 2 and r["vjps"] >= 1 and positive(r["seconds"]), r
    for state in ("initialisation", "after 1 training steps"):
        implicit, jacobian_free, _ = (r for r in result.rows if r["state"] == state)
        assert implicit["error_params"] < jacobian_free["error_params"], (implicit, jacobian_free)


def test_reversible_error():
    from experiments.benchmarks import reversible_error

    result = reversible_error.run(quick=True)
    check_table(result, columns=5)
    assert len(result.rows) == len(reversible_error.BETAS) * len(reversible_error.EVALUATIONS["quick"])
    for r in result.rows:  # a few evaluations: the reconstruction is as exact as the unrolled loop
        assert r["reconstructed_64"] < 1e-10 and r["reconstructed_32"] < 1e-3 and r["unrolled_32"] < 1e-5, r
