"""The training loop of the CIFAR-10 DEQs (the chapter's, MDEQ): compiled once, data parallel, resumable.

The model is split once into a static graph and explicit states (parameters, BatchNorm
statistics); the steps of :mod:`steps` are pure functions of those states, compiled
ahead of time over a ``Mesh`` of every device: the batch is sharded along ``'data'``,
everything else is replicated, and XLA inserts the gradient all-reduce and the
global-batch BatchNorm statistics itself, so 1 GPU, 8 GPUs or a TPU slice compute the
same step. Settings are in :mod:`config`, metrics in :mod:`metrics`, checkpoints in
:mod:`checkpoints`.

Example:
  >>> config = Config(epochs=1, train_limit=200, eval_limit=100, data_dir="../shared/data/tfds")
  >>> summary = train_and_evaluate(config, "/tmp/cifar_smoke")  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from . import checkpoints, distributed
from . import input_pipeline as ip
from . import plots
from .config import Config
from .errors import BadInputError, DivergedError
from .metrics import accumulate, epoch_line, summarize
from .model import param_count
from .steps import (ModelDef, build_model, eval_step, in_warmup, init_state, penalty_applies, penalty_weight,
                    radius_step, split_model, train_step)

# `sum(a.numel() for a in model.parameters())` of the chapter's model and of the official MDEQClsNet
# for each yaml (tests/test_mdeq.py builds the official model to check the MDEQ counts).
REFERENCE_PARAM_COUNTS = {"chapter": ("the chapter's PyTorch model", 64_842),
                          "mdeq-tiny": ("the official MDEQ, cls_mdeq_TINY.yaml", 158_890),
                          "mdeq-large": ("the official MDEQ, cls_mdeq_LARGE.yaml", 11_097_438)}
PROGRESS_EVERY = 10  # steps between progress-bar updates, the training loop's only host syncs
RADIUS_BATCHES = 1  # test batches whose fixed points get a spectral radius each epoch


class Steps(NamedTuple):
    """The compiled steps and the shardings their inputs need."""

    train: dict[tuple[bool, bool], Any]  # (warm-up, penalty) -> (state, images, labels) -> (state, metrics)
    eval: dict[bool, Any]  # warm-up -> (state, images, labels, mask, exact) -> metrics
    radius: Any  # (state, images, mask) -> spectral radius sums
    replicated: NamedSharding
    data: NamedSharding
    batch_size: int  # the global batch
    rows: slice  # the rows of each global batch this process feeds

    def train_for(self, config: Config, step: int):
        """The compiled train step for optimizer step ``step`` (0-based): unrolled or not, penalised or not."""
        return self.train[in_warmup(config, step), penalty_applies(config, step)]

    def eval_for(self, config: Config, steps_taken: int):
        """The compiled eval step after ``steps_taken`` optimizer steps (unrolled during the warm-up)."""
        return self.eval[in_warmup(config, steps_taken)]

    def batch(self, *local: np.ndarray) -> tuple[jax.Array, ...]:
        """Global batch arrays from this process's ``rows`` of them."""
        return distributed.global_batch(self.data, self.batch_size, *local)


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis 'data' over ``devices`` (default: all of ``jax.devices()``)."""
    return Mesh(np.asarray(jax.devices() if devices is None else devices), ("data",))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """Raises :class:`BadInputError` unless the batch splits evenly over the mesh's devices."""
    if batch_size % mesh.size:
        raise BadInputError(
            f"--batch-size {batch_size} does not split evenly over {mesh.size} devices "
            f"({mesh.devices.flat[0].device_kind}); use a multiple of {mesh.size}."
        )


def batch_specs(batch_size: int, data: NamedSharding) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Abstract ``(images, labels, flags)`` of a global batch sharded along ``data``, for compiling steps."""
    return tuple(jax.ShapeDtypeStruct((batch_size, *shape), dtype, sharding=data)
                 for dtype, shape in ((jnp.uint8, (32, 32, 3)), (jnp.int32, ()), (jnp.bool_, ())))


def compile_steps(model_def: ModelDef, tx, state: dict, config: Config, mesh: Mesh, total_steps: int) -> Steps:
    """Compiles the train, eval and spectral radius steps ahead of time, once.

    Of the train step, one program per (warm-up, penalty) pair the run can ask for (see
    :meth:`Steps.train_for`); of the eval step, the unrolled one only with a warm-up.

    A compiled step refuses inputs of another shape, dtype or sharding instead of
    silently recompiling, so a whole run provably uses one executable of each.

    Args:
      model_def: from :func:`init_state`.
      tx: the optimizer.
      state: an example (or abstract) train state, for shapes.
      config: the run's settings; ``batch_size`` must divide over ``mesh``.
      mesh: from :func:`make_mesh`.
      total_steps: optimizer steps of the whole run (whether it reaches the end of the warm-up).

    Returns:
      :class:`Steps`.
    """
    batch_size = config.batch_size
    check_batch_size(batch_size, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    data = NamedSharding(mesh, PartitionSpec("data"))

    images, labels, flags = batch_specs(batch_size, data)

    def train_jit(warmup, penalty):
        return jax.jit(
            functools.partial(train_step, model_def=model_def, tx=tx, config=config, penalty=penalty, warmup=warmup),
            in_shardings=(replicated, data, data), out_shardings=replicated, donate_argnums=0,
        ).lower(state, images, labels).compile()

    def eval_jit(warmup):
        return jax.jit(
            functools.partial(eval_step, model_def=model_def, config=config, warmup=warmup),
            in_shardings=(replicated, data, data, data, data), out_shardings=replicated,
        ).lower(state, images, labels, flags, flags).compile()

    # The programs in_warmup and penalty_applies can ask for: warm-up programs if it has steps,
    # equilibrium ones if the run goes past it; each with the penalty where its weight is > 0, and
    # also without it where 0 < --jac-reg-freq < 1.
    warmups = [warmup for warmup, needed in ((True, config.warmup_steps > 0),
                                             (False, config.warmup_steps < total_steps)) if needed]

    def penalties(warmup):
        on = penalty_weight(config, warmup) > 0
        return (False, True) if on and config.jac_reg_freq < 1 else (on,)
    first_eval = total_steps // config.epochs  # steps taken at the first evaluation
    radius_jit = jax.jit(
        functools.partial(radius_step, model_def=model_def, config=config),
        in_shardings=(replicated, data, data), out_shardings=replicated,
    )
    return Steps(
        train={(warmup, penalty): train_jit(warmup, penalty) for warmup in warmups for penalty in penalties(warmup)},
        # After the last step too: an evaluation after a run that ends inside its warm-up is unrolled.
        eval={warmup: eval_jit(warmup) for warmup in {in_warmup(config, first_eval), in_warmup(config, total_steps)}},
        radius=radius_jit.lower(state, images, flags).compile(),
        replicated=replicated, data=data, batch_size=batch_size, rows=distributed.process_rows(data, batch_size),
    )


def eval_batches(steps: Steps, split: ip.Split, exact: np.ndarray):
    """The split in global eval batches, the last padded: ``(images, labels, mask, exact)`` per batch.

    Each process reads and feeds only its rows; ``mask`` is False for padding, ``exact``
    True for real examples among the bit-exact test images.
    """
    rows = steps.rows
    batches = ip.epoch_batches(split, steps.batch_size, rng=None, drop_remainder=False, rows=rows)
    for i, (images, labels) in enumerate(batches):
        # Padding fills the last batch's end, so a process's real rows come first in its block.
        first = i * steps.batch_size + rows.start
        is_exact = np.zeros(rows.stop - rows.start, bool)
        is_exact[: len(labels)] = exact[first : first + len(labels)]
        yield steps.batch(*ip.pad_batch(images, labels, len(is_exact)), is_exact)


def evaluate(steps: Steps, state: dict, split: ip.Split, exact: np.ndarray, config: Config,
             steps_taken: int) -> dict[str, float]:
    """Test loss and accuracy over a whole split (the last batch padded), each example counted once.

    Each process reads and feeds only its rows of each batch.

    Args:
      steps: the compiled steps.
      state: the train state.
      split: the evaluation data.
      exact: bool [N], the bit-exact test examples.
      config: the warm-up settings.
      steps_taken: optimizer steps so far (during the warm-up, the unrolled network is evaluated).

    Returns:
      ``test_loss``, ``test_accuracy``, ``test_exact_accuracy``, and the mean and largest
      spectral radius of the cell's Jacobian at the fixed points of the first
      ``RADIUS_BATCHES`` batches, ``test_spectral_radius_mean`` / ``_max``.
    """
    total, radius = None, None
    eval_step_now = steps.eval_for(config, steps_taken)
    for i, (images, labels, mask, is_exact) in enumerate(eval_batches(steps, split, exact)):
        metrics = eval_step_now(state, images, labels, mask, is_exact)
        total = metrics if total is None else accumulate(total, metrics)
        if i < RADIUS_BATCHES:
            metrics = steps.radius(state, images, mask)
            radius = metrics if radius is None else accumulate(radius, metrics)
    radius = jax.device_get(radius)
    return {**summarize(jax.device_get(total), "test_"),
            "test_spectral_radius_mean": float(radius["radius_sum"] / radius["radius_count"]),
            "test_spectral_radius_max": float(radius["radius_max"])}


def evaluate_budgets(state: dict, split: ip.Split, config: Config, steps: Steps) -> list[dict]:
    """The test-time-compute curve: test loss, accuracy, mean f evaluations and converged fraction per forward budget.

    One eval step compiled for all of ``config.eval_budgets`` (the budget is a traced
    argument), on a model whose solver ceiling is the largest budget (or ``f_max_iter``
    if larger), so a budget above the training one is honoured.

    Returns:
      One dict per budget: ``budget``, ``test_loss``, ``test_accuracy``, ``steps_mean``, ``converged``.
    """
    ceiling = dataclasses.replace(config, f_max_iter=max(config.f_max_iter, *config.eval_budgets))
    budget_def, _, _ = split_model(build_model(ceiling))
    images, labels, flags = batch_specs(steps.batch_size, steps.data)
    budget_spec = jax.ShapeDtypeStruct((), jnp.int32, sharding=steps.replicated)
    step = jax.jit(functools.partial(eval_step, model_def=budget_def, config=config),
                   in_shardings=(steps.replicated, *(steps.data,) * 4, steps.replicated),
                   out_shardings=steps.replicated).lower(state, images, labels, flags, flags, budget_spec).compile()
    rows, exact = [], np.zeros(len(split), bool)  # the exact-image accuracy is not reported per budget
    for budget in tqdm(config.eval_budgets, desc="eval budgets", leave=False, disable=not distributed.is_primary()):
        value = jax.make_array_from_callback((), steps.replicated, lambda _, b=budget: np.int32(b))
        total = None
        for batch in eval_batches(steps, split, exact):
            metrics = step(state, *batch, value)
            total = metrics if total is None else accumulate(total, metrics)
        total = jax.device_get(total)
        means = summarize(total, "test_")
        rows.append({"budget": budget, "test_loss": means["test_loss"], "test_accuracy": means["test_accuracy"],
                     "steps_mean": float(total["steps"] / total["count"]),
                     "converged": float(total["converged"] / total["count"])})
    return rows


def train_epoch(steps: Steps, state: dict, split: ip.Split, config: Config, epoch: int) -> tuple[dict, dict]:
    """One pass over the training set, metrics kept on device.

    Shuffling and augmentation draw from generators seeded with ``(seed, epoch)``, so a
    resumed run sees exactly the batches an uninterrupted one would.

    Args:
      steps: the compiled steps.
      state: the train state (donated).
      split: the training data.
      config: batch size, augmentation, seed.
      epoch: 1-based epoch number.

    Returns:
      ``(state, metrics)``, metrics as :func:`summarize` returns them with prefix 'train_'.
    """
    shuffle_rng, augment_rng = (np.random.default_rng(s) for s in np.random.SeedSequence([config.seed, epoch]).spawn(2))
    total = None
    num_steps = ip.steps_per_epoch(len(split), config.batch_size)
    bar = tqdm(total=num_steps, desc=f"epoch {epoch}/{config.epochs}", unit="step", leave=False,
               disable=not distributed.is_primary())
    with bar:
        # Every process draws the same permutation and augmentation of the whole batch; each
        # reads and augments only its own rows, so N processes compute what one would.
        batches = ip.epoch_batches(split, config.batch_size, rng=shuffle_rng, drop_remainder=True, rows=steps.rows)
        for i, (images, labels) in enumerate(batches, 1):
            if config.augment:
                images = ip.augment(images, augment_rng, rows=steps.rows, batch_size=config.batch_size)
            step = steps.train_for(config, (epoch - 1) * num_steps + i - 1)
            state, metrics = step(state, *steps.batch(images, labels))
            total = metrics if total is None else accumulate(total, metrics)
            # The loop's only host sync: it keeps the host at most PROGRESS_EVERY steps ahead of the
            # device, and the bar counts the steps finished by then, not the steps dispatched.
            if i % PROGRESS_EVERY == 0 or i == num_steps:
                host_total, skipped_in_a_row = jax.device_get((total, state["opt_state"].notfinite_count))
                bar.update(i - bar.n)
                stop_if_diverged(int(skipped_in_a_row), (epoch - 1) * num_steps + i, config)
                m = summarize(host_total, "train_")
                solves = {name: f"{m[f'{name}_steps_mean']:.1f}" for name in ("fwd", "bwd")
                          if m.get(f"{name}_steps_mean") is not None}  # none in the warm-up
                if m["train_loss"] is not None:
                    bar.set_postfix(loss=f"{m['train_loss']:.3f}", acc=f"{m['train_accuracy']:.3f}", **solves)
    return state, m  # the last step always syncs: m summarises the whole epoch


def stop_if_diverged(skipped_in_a_row: int, steps_done: int, config: Config) -> None:
    """Raises :class:`DivergedError` once ``config.max_skipped_steps`` steps in a row were skipped.

    Called at the loop's host syncs, before the epoch's checkpoint: the run stops with the
    last checkpoint (of a finished epoch) as it was.

    Args:
      skipped_in_a_row: the optimizer's count of consecutive non-finite steps, at ``steps_done``.
      steps_done: optimizer steps taken so far in the run.
      config: ``max_skipped_steps``.
    """
    if skipped_in_a_row >= config.max_skipped_steps:
        first = steps_done - skipped_in_a_row + 1
        raise DivergedError(
            f"training diverged: steps {first}-{steps_done} (1-based) had a non-finite loss or gradient and "
            f"were skipped ({skipped_in_a_row} in a row, --max-skipped-steps {config.max_skipped_steps}); the "
            "last checkpoint is kept. Try a lower --lr, a Jacobian penalty (--jac-reg) or another solver")


def _out_of_time(config: Config, began: float, epoch_s: float) -> bool:
    """Whether one more epoch of ``epoch_s`` seconds would end past ``config.time_budget``.

    Process 0 decides for all, so that every process stops at the same epoch.
    """
    if config.time_budget is None:
        return False
    late = time.perf_counter() - began + epoch_s > config.time_budget
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(late)))


def _log(message: str) -> None:
    """Prints on process 0 only, so N processes print one log."""
    if distributed.is_primary():
        print(message, flush=True)


def train_and_evaluate(config: Config, workdir: str | Path) -> dict:
    """Trains the DEQ ``config.model`` names on CIFAR-10, evaluating and checkpointing every epoch.

    Writes to ``workdir``: ``metrics.jsonl`` (one line per epoch), ``summary.json``,
    ``curves.png`` and ``solver.png`` (see :mod:`plots`), and ``checkpoints/`` (orbax,
    the last 3 epochs: parameters, optimizer state, BatchNorm statistics, and as JSON the
    epoch, the config and the metrics history; the epoch and the seed are the whole RNG
    state, since each epoch's generators are seeded with ``(seed, epoch)``). Every check
    of flags, devices, workdir, data and checkpoint happens before anything compiles.

    Args:
      config: the run's settings.
      workdir: output folder; must not hold a checkpoint unless ``config.resume``.

    Returns:
      The summary also written to ``summary.json``.

    Raises:
      errors.BadInputError: a batch size that does not divide over the devices, too few
        training examples for one batch, a corrupt checkpoint or one from other settings, bad data.
      errors.MissingError: no data, or ``--resume`` without a checkpoint.
      errors.ExistsError: a checkpoint in ``workdir`` without ``--resume``.
      errors.DivergedError: ``config.max_skipped_steps`` steps in a row had a non-finite
        loss or gradient (each was skipped); the last epoch's checkpoint is kept.
    """
    began = time.perf_counter()
    mesh = make_mesh()
    check_batch_size(config.batch_size, mesh)
    workdir = Path(workdir).resolve()
    manager = checkpoints.open_manager(workdir, config.resume)
    train_split = ip.load_split("train", data_dir=config.data_dir, limit=config.train_limit)
    test_split = ip.load_split("test", data_dir=config.data_dir, limit=config.eval_limit)
    if len(train_split) < config.batch_size:
        raise BadInputError(f"{len(train_split)} training examples make no batch of --batch-size {config.batch_size}")
    exact = np.zeros(len(test_split), bool) if test_split.ids is None else ip.exact_test_mask(test_split.ids)
    steps_per_epoch = ip.steps_per_epoch(len(train_split), config.batch_size)

    total_steps = config.epochs * steps_per_epoch
    model_def, state, tx, schedule = init_state(config, total_steps)
    count = param_count(state["params"])
    reference, reference_count = REFERENCE_PARAM_COUNTS[config.model]
    _log(f"{config.model}: {count:,} trainable parameters ({reference}: {reference_count:,})")
    if config.model_defaults_line() is not None:
        _log(f"{config.model} recipe (official yaml; flags given override it): {config.model_defaults_line()}")
    state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    history = []
    if config.resume:
        state, history = checkpoints.restore(manager, state, config)
        _log(f"resumed from the checkpoint of epoch {len(history)} in {manager.directory}")
    device = f"{mesh.size} x {mesh.devices.flat[0].device_kind}" + (
        f" in {jax.process_count()} processes" if jax.process_count() > 1 else "")
    start = time.perf_counter()
    steps = compile_steps(model_def, tx, state, config, mesh, total_steps)
    compile_s = time.perf_counter() - start
    distributed.barrier("compiled")
    _log(f"compiled the train and eval steps for {device} in {compile_s:.1f} s; "
          f"{len(train_split)} train / {len(test_split)} test examples, {steps_per_epoch} steps per epoch")

    for epoch in range(len(history) + 1, config.epochs + 1):
        if history and _out_of_time(config, began, history[-1]["epoch_s"]):
            _log(f"stopping before epoch {epoch}: it would end past --time-budget {config.time_budget:g} s; "
                 "--resume continues the run")
            break
        start = time.perf_counter()
        try:
            state, train_metrics = train_epoch(steps, state, train_split, config, epoch)
        except DivergedError:
            manager.wait_until_finished()  # the last epoch's checkpoint may still be being written
            raise
        train_s = time.perf_counter() - start
        test_metrics = evaluate(steps, state, test_split, exact, config, epoch * steps_per_epoch)
        epoch_s = time.perf_counter() - start
        history.append({
            "epoch": epoch, **train_metrics, **test_metrics,
            # The rate the optimizer used for this epoch's last step.
            "lr": float(schedule(epoch * steps_per_epoch - 1)),
            "images_per_s": steps_per_epoch * config.batch_size / train_s,
            "train_s": train_s, "eval_s": epoch_s - train_s, "epoch_s": epoch_s,
        })
        checkpoints.save(manager, epoch, state, config, history)
        if distributed.is_primary():
            print(epoch_line(history[-1]), flush=True)
            # Rewritten whole from the history, so a resumed run never duplicates lines.
            (workdir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in history))
            plots.plot_history(history, workdir, f_tol=config.f_tol, b_tol=config.b_tol)
        distributed.barrier(f"epoch {epoch} written")
    manager.wait_until_finished()

    last = history[-1]
    train_s = sum(m["train_s"] for m in history)
    summary = {
        "test_accuracy": last["test_accuracy"], "exact_test_accuracy": last["test_exact_accuracy"],
        "test_loss": last["test_loss"], "train_accuracy": last["train_accuracy"], "train_loss": last["train_loss"],
        "param_count": count, "epochs": len(history), "stopped_early": len(history) < config.epochs, "train_examples": len(train_split),
        "test_examples": len(test_split), "exact_test_examples": int(exact.sum()),
        "wall_s": sum(m["epoch_s"] for m in history),
        "images_per_s": len(history) * steps_per_epoch * config.batch_size / train_s,
        "compile_s": compile_s, "device": device, "config": config.as_json(),
    }
    if config.eval_budgets:
        summary["eval_budgets"] = evaluate_budgets(state, test_split, config, steps)
        if distributed.is_primary():
            plots.plot_budgets(summary["eval_budgets"], workdir, trained_with=config.f_max_iter)
    if distributed.is_primary():
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps({k: v for k, v in summary.items() if k != "config"}))
    return summary
