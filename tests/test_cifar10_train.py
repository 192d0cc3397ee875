"""CIFAR-10 experiment: mocked runs (chapter, toolkit, MDEQ with warm-up), real-data smoke runs (float32 and
bfloat16, MDEQ-tiny), exact resume, time budget, bad input.

Runs are tiny (batches of 10, solves capped at 4 steps) so the file takes a few minutes
on two busy CPU cores.
"""
import dataclasses
import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments.cifar10 import batch_stats_check, main, metrics, steps, train
from experiments.cifar10.config import Config

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tfds"
TINY = dict(batch_size=10, f_max_iter=4, b_max_iter=4)
MOCK_EXAMPLES = 30  # per split: 3 train steps; eval_limit=25 leaves a padded last eval batch
PER_EPOCH_FIELDS = (
    "epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "test_exact_accuracy", "lr",
    *(f"{p}_{s}" for p in ("fwd", "bwd") for s in ("steps_mean", "steps_max", "residual_mean", "residual_max")),
    "test_spectral_radius_mean", "test_spectral_radius_max", *metrics.TIMING_FIELDS,
)
# Every training aid at once: the chapter's recipe is the other parametrisation (weight norm: the MDEQ's).
TOOLKIT = dict(solver="broyden", gradient="phantom", phantom_steps=2, phantom_damping=0.8, jac_reg=0.5,
               jac_reg_freq=0.5, norm="spectral", fp_correction=2, fp_gamma=0.5, eval_budgets=(1, 6))
# The MDEQ-tiny recipe (Broyden, dropout, weight norm, weight decay) with a warm-up of 4 steps: epoch 1
# (3 steps) is all unrolled, epoch 2 switches to the equilibrium after one step. Depth 2, not the
# recipe's 10: the unrolled step's program is the suite's largest to compile.
MDEQ = dict(model="mdeq-tiny", warmup_steps=4, warmup_depth=2)


def mocked_config(settings: dict) -> Config:
    """A mocked run's settings: 2 epochs of 3 steps, 25 test examples, ``settings`` over the model's recipe."""
    return Config.for_model(**{"model": "chapter", "epochs": 2, "eval_limit": 25, **TINY, **settings})


class _CompileLog(logging.Handler):
    """Collects the names in JAX's 'Finished XLA compilation of jit(NAME)' log lines."""

    def __init__(self):
        super().__init__()
        self.names = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("Finished XLA compilation of "):
            self.names.append(message.split()[4])


def _history(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module", params=[{}, TOOLKIT, MDEQ], ids=["chapter", "toolkit", "mdeq"])
def mocked_run(mock_cifar10, tmp_path_factory, request):
    """Two short epochs on mocked data; returns (workdir, config, summary, compiled jit names)."""
    workdir = tmp_path_factory.mktemp("mocked")
    config = mocked_config(request.param)
    log, jax_logger = _CompileLog(), logging.getLogger("jax")
    jax_logger.addHandler(log)
    try:
        with mock_cifar10(MOCK_EXAMPLES), jax.log_compiles():
            summary = train.train_and_evaluate(config, workdir)
    finally:
        jax_logger.removeHandler(log)
    return workdir, config, summary, log.names


def test_mocked_run_writes_metrics_summary_plots_and_compiles_once(mocked_run):
    workdir, config, summary, compiled = mocked_run
    # With 0 < --jac-reg-freq < 1: one train step with the penalty and one without; with a warm-up
    # ending inside the run, an unrolled and an equilibrium one of each; all chosen on the host.
    penalties = 1 + (config.jac_reg > 0 and config.jac_reg_freq < 1)
    modes = 1 + (config.warmup_steps > 0)
    budgets = int(bool(config.eval_budgets))  # one more eval step, for every budget
    for name, count in (("train_step", penalties * modes), ("eval_step", modes + budgets), ("radius_step", 1)):
        assert compiled.count(f"jit({name})") == count, compiled
    history = _history(workdir)
    assert [m["epoch"] for m in history] == [1, 2]
    implicit = config.gradient == "implicit"
    for m in history:
        assert set(PER_EPOCH_FIELDS) - {k for k in PER_EPOCH_FIELDS if k.startswith("bwd") and not implicit} <= set(m)
        assert implicit == ("bwd_steps_mean" in m) and (config.jac_reg > 0) == ("jac_penalty" in m)
        assert m["test_exact_accuracy"] is None  # mocked ids are not test_NNNNN
        assert all(np.isfinite(v) for k, v in m.items() if v is not None), m  # jac_penalty: None if never drawn
        all_unrolled = m["epoch"] * 3 <= config.warmup_steps  # 3 steps per epoch: no solve, no solver stats
        assert all_unrolled == all(v is None for k, v in m.items() if k.startswith(("fwd_", "bwd_"))), m
        if all_unrolled:
            continue
        assert 1 <= m["fwd_steps_mean"] <= m["fwd_steps_max"] <= 4 and 1 <= m.get("bwd_steps_mean", 1) <= 4
        assert 0 < m["fwd_residual_mean"] <= m["fwd_residual_max"]
        assert 0 < m["test_spectral_radius_mean"] <= m["test_spectral_radius_max"]
    assert 1e-6 < history[1]["lr"] < history[0]["lr"] < 1e-3
    if config.jac_reg:
        assert any(m["jac_penalty"] is not None for m in history), "jac_reg_freq 0.5 drew no step in 6"
    assert json.loads((workdir / "summary.json").read_text()) == summary
    # On the chapter's cell, weight norm adds one scale per output channel of each convolution: 64 + 48.
    extra = 112 * (config.norm == "weight") if config.model == "chapter" else 0
    assert summary["param_count"] == train.REFERENCE_PARAM_COUNTS[config.model][1] + extra
    assert summary["exact_test_accuracy"] is None and 0 <= summary["test_accuracy"] <= 1
    assert (summary["epochs"], summary["train_examples"], summary["test_examples"]) == (2, 30, 25)
    assert summary["wall_s"] > 0 and summary["images_per_s"] > 0 and "cpu" in summary["device"]
    for png in ("curves.png", "solver.png") + (("budget.png",) if budgets else ()):
        assert (workdir / png).read_bytes().startswith(b"\x89PNG")
    if budgets:  # budget 1: f(z0) only; budget 6, above the training --f-max-iter 4: the ceiling was raised
        one, six = summary["eval_budgets"]
        assert (one["budget"], one["steps_mean"], six["budget"]) == (1, 1.0, 6) and 4 < six["steps_mean"] <= 6
        assert all(0 <= row[k] <= 1 for row in (one, six) for k in ("test_accuracy", "converged"))


def test_resume_reproduces_the_uninterrupted_run(mocked_run, mock_cifar10, tmp_path):
    # The uninterrupted run's epoch-1 checkpoint is exactly what a run stopped after epoch 1 leaves.
    workdir, config, _, _ = mocked_run
    shutil.copytree(workdir / "checkpoints" / "1", tmp_path / "checkpoints" / "1")
    with mock_cifar10(MOCK_EXAMPLES):
        train.train_and_evaluate(dataclasses.replace(config, resume=True), tmp_path)

    def final_state(run):
        return ocp.StandardCheckpointer().restore(run / "checkpoints" / "2" / "state")

    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 final_state(workdir), final_state(tmp_path))
    strip = [{k: v for k, v in m.items() if k not in metrics.TIMING_FIELDS} for m in _history(workdir)]
    assert [{k: v for k, v in m.items() if k not in metrics.TIMING_FIELDS} for m in _history(tmp_path)] == strip


def test_time_budget_stops_cleanly_after_an_epoch(mocked_run, mock_cifar10, tmp_path):
    workdir, config, _, _ = mocked_run
    if config.solver != "anderson":
        pytest.skip("the time budget does not depend on the training settings")
    with mock_cifar10(MOCK_EXAMPLES):
        # Any budget is spent by the end of epoch 1, so the run stops before epoch 2.
        stopped = train.train_and_evaluate(dataclasses.replace(config, time_budget=1e-3), tmp_path)
    assert stopped["stopped_early"] and stopped["epochs"] == 1
    assert json.loads((tmp_path / "summary.json").read_text())["epochs"] == 1
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]
    # The same checkpoint as the uninterrupted run's, whose resumption test_resume_... checks.
    epoch1 = [ocp.StandardCheckpointer().restore(run / "checkpoints" / "1" / "state") for run in (workdir, tmp_path)]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), *epoch1)


def test_checkpoint_mistakes_are_clear_errors(mocked_run, mock_cifar10, tmp_path):
    workdir, config, _, _ = mocked_run
    resume = dataclasses.replace(config, resume=True)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(workdir / "checkpoints" / "2", corrupt / "checkpoints" / "2")
    for path in (corrupt / "checkpoints" / "2" / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"")
    with mock_cifar10(MOCK_EXAMPLES):
        with pytest.raises(FileExistsError, match="already holds a checkpoint \\(epoch 2\\); pass --resume"):
            train.train_and_evaluate(config, workdir)
        with pytest.raises(FileNotFoundError, match="--resume: no complete checkpoint"):
            train.train_and_evaluate(resume, tmp_path / "empty")
        with pytest.raises(ValueError, match="differ from the checkpointed run's.*'seed': \\(0, 1\\)"):
            train.train_and_evaluate(dataclasses.replace(resume, seed=1), workdir)
        with pytest.raises(ValueError, match="cannot read the checkpoint of epoch 2"):
            train.train_and_evaluate(resume, corrupt)
        with pytest.raises(ValueError, match="30 training examples make no batch of --batch-size 40"):
            train.train_and_evaluate(dataclasses.replace(config, batch_size=40), tmp_path / "big_batch")


def test_the_batch_statistics_check_reproduces_the_runs_evaluation(mocked_run, mock_cifar10, tmp_path, capsys):
    workdir, config, _, _ = mocked_run
    if config.model != "mdeq-tiny":
        pytest.skip("one model is enough: the script only restores and evaluates (MDEQ: with dropout to turn off)")
    # Epoch 1's checkpoint (after 3 steps, still in the warm-up: evaluated unrolled) and epoch 2's (solved).
    shutil.copytree(workdir / "checkpoints" / "1", tmp_path / "checkpoints" / "1")
    with mock_cifar10(MOCK_EXAMPLES):
        # One batch of all 25 test images: with running statistics each example is classified alone,
        # so this must be the run's own evaluation (batches of 10, padded); with the batch's
        # statistics it is something else.
        results = [batch_stats_check.main(["--workdir", str(run), "--limit", "25", "--batch-size", "25"])
                   for run in (tmp_path, workdir)]
        with pytest.raises(SystemExit, match="--limit \\(25\\) must be a positive multiple of --batch-size \\(10\\)"):
            batch_stats_check.main(["--workdir", str(workdir), "--limit", "25", "--batch-size", "10"])
    for result, evaluated in zip(results, _history(workdir)):
        assert result["epoch"] == evaluated["epoch"]
        assert result["running"]["accuracy"] == pytest.approx(evaluated["test_accuracy"], abs=1e-6)  # steps of 1/25
        np.testing.assert_allclose(result["running"]["loss"], evaluated["test_loss"], rtol=1e-5)
        assert abs(result["batch"]["loss"] - result["running"]["loss"]) > 1e-3, result
    assert "| the batch's own |" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_real_data_loss_goes_down(tmp_path, dtype):
    if not (REAL_DATA / "cifar10").is_dir():
        pytest.skip(f"no prepared CIFAR-10 at {REAL_DATA}")
    config = Config(data_dir=str(REAL_DATA), epochs=3, train_limit=100, eval_limit=100, dtype=dtype, **TINY)
    summary = train.train_and_evaluate(config, tmp_path)
    losses = [m["train_loss"] for m in _history(tmp_path)]
    assert losses[2] < losses[0], losses
    assert summary["exact_test_examples"] > 0 and 0 <= summary["exact_test_accuracy"] <= 1


def test_real_data_mdeq_loss_goes_down(tmp_path):
    if not (REAL_DATA / "cifar10").is_dir():
        pytest.skip(f"no prepared CIFAR-10 at {REAL_DATA}")
    # The mocked MDEQ run's settings on 30 real images: the same programs, which the compilation cache
    # holds once the mocked run compiled them. Epoch 1 unrolled, epoch 2 mostly on the equilibrium.
    config = dataclasses.replace(mocked_config(MDEQ), data_dir=str(REAL_DATA), train_limit=MOCK_EXAMPLES)
    summary = train.train_and_evaluate(config, tmp_path)
    history = _history(tmp_path)
    assert history[1]["train_loss"] < history[0]["train_loss"], history
    assert history[0]["fwd_steps_mean"] is None and history[1]["fwd_steps_mean"] >= 1
    assert summary["exact_test_examples"] > 0 and 0 <= summary["exact_test_accuracy"] <= 1


def test_a_batch_that_does_not_split_over_the_devices_is_a_clear_error():
    # Several devices (and processes) are tested in tests/test_multiprocess.py; here a stand-in mesh.
    mesh = SimpleNamespace(size=4, devices=np.array([SimpleNamespace(device_kind="cpu")]))
    with pytest.raises(ValueError, match="--batch-size 6 does not split evenly over 4 devices .*multiple of 4"):
        train.check_batch_size(6, mesh)
    train.check_batch_size(8, mesh)


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "--epochs must be an int >= 1, got 0"),
    (["--batch-size", "-2"], "--batch-size must be an int >= 1"),
    (["--lr", "0"], "--lr must be a finite number > 0"),
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--f-tol", "0"], "--f-tol must be"),
    (["--b-tol", "-0.001"], "--b-tol must be"),
    (["--f-max-iter", "0"], "--f-max-iter must be"),
    (["--b-max-iter", "0"], "--b-max-iter must be"),
    (["--train-limit", "0"], "--train-limit must be an int >= 1"),
    (["--eval-limit", "-5"], "--eval-limit must be"),
    (["--seed", "-1"], "--seed must be an int >= 0"),
    (["--solver", "newton"], "invalid choice: 'newton'"),
    (["--gradient", "unrolled"], "invalid choice: 'unrolled'"),
    (["--phantom-steps", "0"], "--phantom-steps must be an int >= 1, got 0"),
    (["--phantom-damping", "1.5"], "--phantom-damping must be a number in (0, 1], got 1.5"),
    (["--neumann-terms", "0"], "--neumann-terms must be an int >= 1, got 0"),
    (["--neumann-damping", "0"], "--neumann-damping must be a number in (0, 1], got 0.0"),
    (["--gradient", "gdeq"], "--solver must be broyden with --gradient gdeq (its inverse Jacobian preconditions "
                             "the gradient), got 'anderson'"),
    (["--gradient", "reversible"], "--solver must be reversible with --gradient reversible (the gradient "
                                   "reconstructs its iterations), got 'anderson'"),
    (["--solver", "reversible", "--reversible-beta", "0.3"], "--reversible-beta must be a number in [0.5, 1), got 0.3"),
    (["--backprop-checkpoint-every", "0"], "--backprop-checkpoint-every must be an int >= 1 (or unset: every step "
                                           "stored), got 0"),
    (["--jac-reg", "-1"], "--jac-reg must be a finite number >= 0"),
    (["--jac-reg-freq", "0"], "--jac-reg-freq must be a number in (0, 1]"),
    (["--epochs", "two"], "invalid int value: 'two'"),
    (["--time-budget", "0"], "--time-budget must be a number of seconds > 0"),
    (["--dtype", "float16"], "invalid choice: 'float16'"),
    (["--model", "mdeq-huge"], "invalid choice: 'mdeq-huge'"),
    (["--dropout", "0.1"], "--dropout must be 0 with --model chapter (its cell has no dropout), got 0.1"),
    (["--model", "mdeq-tiny", "--dropout", "1"], "--dropout must be a number in [0, 1), got 1.0"),
    (["--weight-decay", "-0.001"], "--weight-decay must be a finite number >= 0"),
    (["--warmup-steps", "-1"], "--warmup-steps must be an int >= 0, got -1"),
    (["--model", "mdeq-tiny", "--warmup-depth", "0"], "--warmup-depth must be an int >= 1, got 0"),
    (["--norm", "batch"], "invalid choice: 'batch'"),
    (["--solver", "forward", "--damping", "0"], "--damping must be a number in (0, 1], got 0.0"),
    (["--damping", "0.5"], "--damping must be 1 unless --solver forward (the other solvers are not damped), got 0.5"),
    (["--fp-correction", "0"], "--fp-correction must be an int >= 1, got 0"),
    (["--fp-correction", "30"], "--fp-correction must be at most --f-max-iter (25): each state needs one f evaluation"),
    (["--fp-gamma", "1.2"], "--fp-gamma must be a number in (0, 1], got 1.2"),
    (["--eval-budgets", "4,x"], "expected comma-separated ints such as 4,8,12, got '4,x'"),
    (["--eval-budgets", "4,0"], "--eval-budgets must be ints >= 1, got (4, 0)"),
])
def test_bad_flags_exit_before_anything_runs(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main.main(["--workdir", str(tmp_path / "run"), *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_workdir_is_required(capsys):
    with pytest.raises(SystemExit):
        main.main([])
    assert "--workdir" in capsys.readouterr().err


@pytest.mark.parametrize("data_dir, message", [
    ("nowhere", "does not exist"),
    (".", "CIFAR-10 was not found in data_dir"),
])
def test_bad_data_dir_is_a_one_line_error(data_dir, message, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main.main(["--workdir", str(tmp_path / "run"), "--data-dir", str(tmp_path / data_dir)])
    assert str(exit_info.value.code).startswith("error: ") and message in str(exit_info.value.code)



def test_the_penalty_draw_is_a_function_of_seed_and_step():
    config = Config(jac_reg=0.5, jac_reg_freq=0.3, seed=4)
    draws = [steps.penalty_applies(config, step) for step in range(2000)]
    assert draws == [steps.penalty_applies(config, step) for step in range(2000)]  # a resumed run draws the same
    assert 0.26 < np.mean(draws) < 0.34
    assert draws != [steps.penalty_applies(dataclasses.replace(config, seed=5), s) for s in range(2000)]
    assert all(steps.penalty_applies(dataclasses.replace(config, jac_reg_freq=1.0), s) for s in range(10))
    assert not any(steps.penalty_applies(Config(), s) for s in range(10))
    # During a warm-up the weight is --warmup-jac-reg (the official PRETRAIN_JAC_LOSS_WEIGHT, 0 by default).
    after_warmup = Config(jac_reg=0.5, warmup_steps=3)
    assert [steps.penalty_applies(after_warmup, s) for s in range(5)] == [False, False, False, True, True]
    in_warmup = Config(warmup_jac_reg=0.5, warmup_steps=3)
    assert [steps.penalty_applies(in_warmup, s) for s in range(5)] == [True, True, True, False, False]
    assert steps.penalised(in_warmup) and not steps.penalised(Config(warmup_jac_reg=0.5))


def test_the_step_keys_are_not_keys_nnx_draws_weights_from():
    # nnx.Rngs(seed) draws its n-th key as fold_in(key(seed), n); the penalty's and dropout's must differ.
    def keys(key_of):
        return {tuple(np.asarray(jax.random.key_data(key_of(n)))) for n in range(200)}

    nnx_keys = keys(lambda n: jax.random.fold_in(jax.random.key(0), n))
    penalty_keys = keys(lambda n: steps.stream_key(0, steps.PENALTY_STREAM, n))
    dropout_keys = keys(lambda n: steps.stream_key(0, steps.DROPOUT_STREAM, n))
    assert len(penalty_keys) == len(dropout_keys) == 200
    assert not nnx_keys & penalty_keys and not nnx_keys & dropout_keys and not penalty_keys & dropout_keys


def test_a_model_flag_starts_from_its_recipe_and_given_flags_override_it(tmp_path):
    def config_of(*flags):
        return main.parse_args(["--workdir", str(tmp_path), *flags])[0]

    assert config_of() == Config()  # the chapter: the field defaults
    assert config_of("--norm", "spectral").norm == "spectral" and config_of("--model", "mdeq-tiny").norm == "weight"
    assert config_of("--eval-budgets", "4,8,50").eval_budgets == (4, 8, 50)
    relaxed = config_of("--solver", "forward", "--damping", "0.7").solver_and_gradient()
    assert relaxed[0].damping == relaxed[1].solver.damping == 0.7
    neumann = config_of("--gradient", "neumann", "--neumann-terms", "7", "--neumann-damping", "0.5")
    assert repr(neumann.solver_and_gradient()[1]) == "Neumann(terms=7, damping=0.5)"
    backprop = config_of("--gradient", "backprop", "--backprop-checkpoint-every", "4").solver_and_gradient()[1]
    assert repr(backprop) == "Backprop(checkpoint_every=4)"
    assert repr(config_of("--gradient", "gdeq", "--solver", "broyden").solver_and_gradient()[1]) == "GDEQ()"
    solver, gradient = config_of("--gradient", "reversible", "--solver", "reversible", "--reversible-beta", "0.6",
                                 "--f-max-iter", "12").solver_and_gradient()
    assert (repr(gradient), solver.beta, solver.max_iter) == ("ReversibleBackprop()", 0.6, 12)
    tiny = config_of("--model", "mdeq-tiny")
    assert tiny == Config.for_model("mdeq-tiny")
    assert (tiny.solver, tiny.f_max_iter, tiny.b_max_iter, tiny.batch_size, tiny.dropout, tiny.warmup_steps,
            tiny.weight_decay, tiny.norm, tiny.input_scaling, tiny.warmup_jac_reg, tiny.broyden_memory) == (
        "broyden", 19, 20, 128, 0.25, 3000, 2.5e-6, "weight", "mean-std", 0.0, None)
    assert config_of("--model", "mdeq-tiny", "--broyden-memory", "17").solver_and_gradient()[0].memory == 17
    # A flag given with the chapter's default value (batch 100) still overrides the recipe's 128.
    given = config_of("--model", "mdeq-large", "--batch-size", "100", "--norm", "none", "--dropout", "0")
    assert (given.batch_size, given.norm, given.dropout, given.epochs, given.augment) == (100, "none", 0, 220, True)
    line = given.model_defaults_line()
    assert "batch_size=100 (recipe: 128)" in line and "solver='broyden'," in line and "epochs=220," in line
    assert Config().model_defaults_line() is None


def test_errors_that_are_not_the_users_keep_their_traceback(monkeypatch, tmp_path):
    def fails(config, workdir):
        raise ValueError("raised inside XLA's compiler")  # e.g. a JAX or orbax ValueError

    monkeypatch.setattr(train, "train_and_evaluate", fails)
    with pytest.raises(ValueError, match="inside XLA"):  # not a SystemExit('error: ...')
        main.main(["--workdir", str(tmp_path / "run")])


@pytest.mark.parametrize("raised, expected", [(ValueError("bad header"), ValueError), (OSError("EIO"), ValueError),
                                              (TypeError("a bug"), TypeError)])
def test_a_checkpoint_problem_is_one_line_and_a_bug_keeps_its_type(raised, expected):
    """Damaged or unreadable checkpoints become BadInputError (one line); a TypeError from a bug stays itself."""
    from experiments.cifar10 import checkpoints
    from experiments.cifar10.errors import BadInputError

    def restore(*args, **kwargs):
        raise raised

    manager = SimpleNamespace(latest_step=lambda: 3, restore=restore, directory="/runs/x/checkpoints")
    with pytest.raises(expected) as info:
        checkpoints.restore(manager, {}, mocked_config({}))
    assert isinstance(info.value, BadInputError) == (expected is ValueError)
    if expected is ValueError:
        assert "cannot read the checkpoint of epoch 3" in str(info.value)
