"""Training and evaluation of the chapter's CIFAR-10 DEQ: compiled once, data parallel, resumable.

The model is split once into a static graph and explicit states (parameters, BatchNorm
statistics); ``train_step`` and ``eval_step`` are pure functions of those states, compiled
ahead of time over a ``Mesh`` of every device: the batch is sharded along ``'data'``,
everything else is replicated, and XLA inserts the gradient all-reduce and the
global-batch BatchNorm statistics itself, so 1 GPU, 8 GPUs or a TPU slice compute the
same step.

Example:
  >>> config = Config(epochs=1, train_limit=200, eval_limit=100, data_dir="../shared/data/tfds")
  >>> summary = train_and_evaluate(config, "/tmp/cifar_smoke")  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

import deq_jax as dj

from . import distributed
from . import input_pipeline as ip
from . import plots
from .model import CifarDEQ, param_count

CHAPTER_PARAM_COUNT = 64_842  # `sum(a.numel() for a in model.parameters())` in the chapter
ANDERSON_M = 5
END_LR = 1e-6  # the chapter's CosineAnnealingLR(eta_min=1e-6)
PROGRESS_EVERY = 10  # steps between progress-bar updates, the training loop's only host syncs
SOLVERS = ("anderson", "forward", "broyden")
GRADIENTS = ("implicit", "phantom")
# Computation dtypes: parameters, solver state and the loss stay float32 (see CifarDEQ).
DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}
RADIUS_BATCHES = 1  # test batches whose fixed points get a spectral radius each epoch
RADIUS_ITERS = 50  # power iterations (VJPs) per spectral radius
TIMING_FIELDS = ("epoch_s", "train_s", "eval_s", "images_per_s")
# Fields that may change between a run and its resumption without changing the result.
RESUMABLE_FIELDS = ("data_dir", "resume", "time_budget")


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run depends on, one field per command-line flag; the defaults are the chapter's.

    Attributes:
      data_dir: a TFDS data dir holding ``cifar10``, or a folder of ``export_npz`` parts; None
        uses TFDS's default.
      epochs: passes over the training set.
      batch_size: global batch, split evenly over the devices (train and eval).
      lr: Adam's initial learning rate; it decays to ``END_LR`` along a cosine over all steps.
      seed: initial weights and, with the epoch number, each epoch's shuffling and augmentation.
      train_limit: train on the first N training examples only (None: all 50,000).
      eval_limit: evaluate on the first N test examples only (None: all 10,000).
      augment: random crop (4 px zero padding) and horizontal flip of training images.
      resume: continue the run checkpointed in the workdir.
      solver: 'anderson' (m=5), 'broyden' or 'forward' iteration, for both the forward and
        backward solves.
      f_tol, f_max_iter: forward solver tolerance and most f evaluations.
      b_tol, b_max_iter: backward solver tolerance and most steps (implicit gradient only).
      gradient: 'implicit' (exact) or 'phantom' (``dj.Phantom(phantom_steps, phantom_damping)``).
      phantom_steps, phantom_damping: the phantom gradient's unrolled steps and damping.
      jac_reg: weight of the Jacobian penalty ``||J_f(z*)||_F^2 / D`` in the loss; 0 is off.
      jac_reg_freq: the fraction of training steps that add it, drawn in the compiled step.
      weight_norm: weight-normalise the cell's convolutions.
      dtype: 'float32', or 'bfloat16': every layer computes in bfloat16 while parameters,
        the solvers' state and the loss stay float32.
      time_budget: seconds this invocation may run; it stops cleanly (checkpoint, metrics,
        summary) before an epoch that the last one's duration says would end later, and
        ``--resume`` continues. None: no limit.
    """

    data_dir: str | None = None
    epochs: int = 50
    batch_size: int = 100
    lr: float = 1e-3
    seed: int = 0
    train_limit: int | None = None
    eval_limit: int | None = None
    augment: bool = False
    resume: bool = False
    solver: str = "anderson"
    f_tol: float = 1e-2
    f_max_iter: int = 25
    b_tol: float = 1e-2
    b_max_iter: int = 25
    gradient: str = "implicit"
    phantom_steps: int = 1
    phantom_damping: float = 1.0
    jac_reg: float = 0.0
    jac_reg_freq: float = 1.0
    weight_norm: bool = False
    dtype: str = "float32"
    time_budget: float | None = None

    def __post_init__(self):
        def check(name, ok, expected):
            if not ok(getattr(self, name)):
                raise ValueError(f"--{name.replace('_', '-')} must be {expected}, got {getattr(self, name)!r}")

        def is_int(value):
            return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

        def is_number(value):
            return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value)

        for name in ("epochs", "batch_size", "f_max_iter", "b_max_iter", "phantom_steps"):
            check(name, lambda v: is_int(v) and v >= 1, "an int >= 1")
        for name in ("train_limit", "eval_limit"):
            check(name, lambda v: v is None or is_int(v) and v >= 1, "an int >= 1 (or unset: the whole split)")
        for name in ("lr", "f_tol", "b_tol"):
            check(name, lambda v: is_number(v) and v > 0, "a finite number > 0")
        check("seed", lambda v: is_int(v) and v >= 0, "an int >= 0")
        check("solver", lambda v: v in SOLVERS, f"one of {SOLVERS}")
        check("gradient", lambda v: v in GRADIENTS, f"one of {GRADIENTS}")
        check("dtype", lambda v: v in DTYPES, f"one of {tuple(DTYPES)}")
        check("phantom_damping", lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]")
        check("jac_reg", lambda v: is_number(v) and v >= 0, "a finite number >= 0")
        check("jac_reg_freq", lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]")
        check("time_budget", lambda v: v is None or is_number(v) and v > 0, "a number of seconds > 0")

    def solver_and_gradient(self):
        """Returns the DEQ's forward solver and gradient strategy these settings describe."""
        make = {
            "anderson": lambda tol, max_iter: dj.Anderson(m=ANDERSON_M, tol=tol, max_iter=max_iter),
            "broyden": dj.Broyden,
            "forward": dj.ForwardIteration,
        }[self.solver]
        if self.gradient == "phantom":
            gradient = dj.Phantom(self.phantom_steps, self.phantom_damping)
        else:
            gradient = dj.Implicit(make(self.b_tol, self.b_max_iter))
        return make(self.f_tol, self.f_max_iter), gradient


class ModelDef(NamedTuple):
    """The static part of the split model.

    Attributes:
      graphdef: the module structure.
      probe: the DEQ's ``BackwardStatsProbe`` (zeros); its gradient is the backward stats.
      scratch: the remaining variables (the DEQ's ``ForwardStats``), rewritten on each call.
    """

    graphdef: nnx.GraphDef
    probe: nnx.State
    scratch: nnx.State

    def merge(self, params, batch_stats, probe=None) -> CifarDEQ:
        """Rebuilds the model from explicit states (``probe`` replaces the zeros if given)."""
        # copy=True: the states can hold Variables created at an outer trace level (jit),
        # which NNX refuses to update inside grad; fresh copies belong to the current one.
        probe = self.probe if probe is None else probe
        return nnx.merge(self.graphdef, params, batch_stats, probe, self.scratch, copy=True)


def make_optimizer(config: Config, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Adam (PyTorch's defaults) on a cosine schedule, as ``CosineAnnealingLR(T_max=total_steps, eta_min=END_LR)``.

    Args:
      config: the initial learning rate.
      total_steps: optimizer steps of the whole run.

    Returns:
      ``(optimizer, schedule)``.
    """
    schedule = optax.cosine_decay_schedule(config.lr, total_steps, alpha=END_LR / config.lr)
    return optax.adam(schedule, b1=0.9, b2=0.999, eps=1e-8), schedule


def init_state(config: Config, total_steps: int):
    """Initialises the model and the optimizer, and splits the model into static and state parts.

    Args:
      config: the run's settings (seed, solvers, learning rate).
      total_steps: optimizer steps of the whole run (for the schedule).

    Returns:
      ``(model_def, state, tx, schedule)``; state is ``{"params", "opt_state", "batch_stats",
      "step"}`` (optimizer steps taken) on the default device.
    """
    solver, gradient = config.solver_and_gradient()
    model = CifarDEQ(solver=solver, gradient=gradient, weight_norm=config.weight_norm, dtype=DTYPES[config.dtype],
                     rngs=nnx.Rngs(config.seed))
    graphdef, params, batch_stats, probe, scratch = nnx.split(
        model, nnx.Param, nnx.BatchStat, dj.nn.BackwardStatsProbe, ...
    )
    tx, schedule = make_optimizer(config, total_steps)
    state = {"params": params, "opt_state": tx.init(params), "batch_stats": batch_stats,
             "step": jnp.zeros((), jnp.int32)}
    return ModelDef(graphdef, probe, scratch), state, tx, schedule


def _solve_metrics(prefix: str, stats: dj.SolveStats) -> dict[str, jax.Array]:
    """One batch's solver stats; keys ending in '_max' are maxima, the others batch means.

    ``{prefix}_batch_steps`` is the batch's longest solve: the batch runs until its slowest
    example stops, so this is how many times the batched f (or VJP) ran.
    """
    return {
        f"{prefix}_steps_mean": stats.mean_steps, f"{prefix}_steps_max": stats.max_steps,
        f"{prefix}_batch_steps": stats.max_steps,
        f"{prefix}_residual_mean": stats.mean_residual, f"{prefix}_residual_max": stats.max_residual,
        f"{prefix}_converged": stats.converged_fraction,
    }


def _jacobian_penalty(model: CifarDEQ, x, z, step, config: Config) -> tuple[jax.Array, jax.Array]:
    """Bai et al.'s Jacobian penalty at the fixed point, on a ``jac_reg_freq`` fraction of steps.

    Whether a step adds it is drawn inside the compiled step (as the DEQ repo draws it
    on the host), from a key that depends only on the seed and the step number, so a
    resumed run draws the same; a ``lax.cond`` skips the penalty on the other steps.
    With ``jac_reg_freq == 1`` there is no draw and no ``lax.cond``: on XLA:CPU the
    penalty's gradient inside a conditional runs about 77x slower at batch 100
    (``python -m experiments.benchmarks.jacobian_cost``; presumably the convolutions' kernel
    gradients, which XLA:CPU also runs slowly inside loops).

    Returns:
      ``(penalty, applied)``: the batch-mean penalty (0 when skipped) and 1.0 or 0.0.
    """
    key_draw, key_vectors = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), step))

    def penalty():
        return model.deq.jacobian_penalty(x, jax.lax.stop_gradient(z), key_vectors).mean()

    if config.jac_reg_freq == 1:
        return penalty(), jnp.ones((), jnp.float32)
    applied = jax.random.bernoulli(key_draw, config.jac_reg_freq)
    return jax.lax.cond(applied, penalty, lambda: jnp.zeros((), z.dtype)), applied.astype(jnp.float32)


def train_step(state: dict, images: jax.Array, labels: jax.Array, *, model_def: ModelDef, tx,
               config: Config) -> tuple[dict, dict]:
    """One optimizer step: forward solve, mean cross-entropy (+ Jacobian penalty), backward, Adam.

    Args:
      state: ``{"params", "opt_state", "batch_stats", "step"}``.
      images: uint8 [B, 32, 32, 3].
      labels: int32 [B].
      model_def: from :func:`init_state`.
      tx: the optimizer.
      config: the gradient strategy and Jacobian regularisation settings (and the seed).

    Returns:
      ``(new_state, metrics)``; metrics holds this batch's summed loss, correct count,
      example count, the forward (and, for implicit gradients, backward) solver stats
      and, with ``jac_reg > 0``, the Jacobian penalty (see :func:`summarize`).
    """

    def loss_fn(params, probe, batch_stats):
        model = model_def.merge(params, batch_stats, probe)
        x = model.inject(ip.normalize(images), train=True)
        z = model.deq(x)
        logits = model.classify(z, train=True)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        penalty, applied = (0.0, 0.0) if config.jac_reg == 0 else _jacobian_penalty(model, x, z, state["step"], config)
        forward = dj.SolveStats.from_array(model.deq.forward_stats[...])
        aux = (loss, logits, nnx.state(model, nnx.BatchStat), forward, penalty, applied)
        return loss + config.jac_reg * penalty, aux

    grad_fn = jax.grad(loss_fn, argnums=(0, 1), has_aux=True)
    (grads, probe_grads), (loss, logits, batch_stats, forward, penalty, applied) = grad_fn(
        state["params"], model_def.probe, state["batch_stats"]
    )
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_state = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
                 "batch_stats": batch_stats, "step": state["step"] + 1}
    count = jnp.asarray(labels.shape[0], jnp.float32)
    metrics = {
        "loss": loss * count,
        "correct": (logits.argmax(-1) == labels).sum().astype(jnp.float32),
        "count": count,
        "batches": jnp.ones((), jnp.float32),
        **_solve_metrics("fwd", forward),
    }
    if config.gradient == "implicit":
        # The probe's gradient is the backward solve's stats, not a direction for optax.
        metrics.update(_solve_metrics("bwd", dj.SolveStats.from_array(jax.tree.leaves(probe_grads)[0])))
    if config.jac_reg > 0:
        metrics.update(jac_penalty=penalty * applied, jac_steps=applied)
    return new_state, metrics


def eval_step(state: dict, images, labels, mask, exact, *, model_def: ModelDef) -> dict:
    """Loss and accuracy of a padded batch with BatchNorm's running statistics.

    Args:
      state: as in :func:`train_step`.
      images: uint8 [B, 32, 32, 3].
      labels: int32 [B].
      mask: bool [B], False for padding.
      exact: bool [B], True for real examples among the bit-exact test images.

    Returns:
      Sums over the real examples: ``loss``, ``correct``, ``count``, ``exact_correct``, ``exact_count``.
    """
    logits = model_def.merge(state["params"], state["batch_stats"])(ip.normalize(images), train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = logits.argmax(-1) == labels
    return {
        "loss": jnp.sum(loss * mask), "correct": jnp.sum(correct & mask, dtype=jnp.float32),
        "count": jnp.sum(mask, dtype=jnp.float32),
        "exact_correct": jnp.sum(correct & exact, dtype=jnp.float32), "exact_count": jnp.sum(exact, dtype=jnp.float32),
    }


def radius_step(state: dict, images, mask, *, model_def: ModelDef) -> dict:
    """Spectral radius of the cell's Jacobian at each test example's fixed point (a fixed key).

    Args:
      state: as in :func:`train_step`.
      images: uint8 [B, 32, 32, 3].
      mask: bool [B], False for padding.

    Returns:
      ``radius_sum``, ``radius_max`` and ``radius_count`` over the real examples.
    """
    model = model_def.merge(state["params"], state["batch_stats"])
    x = model.inject(ip.normalize(images), train=False)
    radius = model.deq.spectral_radius(x, model.deq(x), jax.random.key(0), RADIUS_ITERS)
    return {"radius_sum": jnp.sum(radius * mask), "radius_max": jnp.max(jnp.where(mask, radius, 0)),
            "radius_count": jnp.sum(mask, dtype=jnp.float32)}


@jax.jit
def accumulate(total: dict, new: dict) -> dict:
    """Adds a batch's metrics to the running totals on device ('_max' keys take the maximum)."""
    return {k: jnp.maximum(total[k], v) if k.endswith("_max") else total[k] + v for k, v in new.items()}


def summarize(total: dict, prefix: str) -> dict[str, float]:
    """Turns summed metrics (host numbers) into means, e.g. ``{prefix}loss``, ``fwd_steps_mean``.

    Args:
      total: accumulated :func:`train_step` or :func:`eval_step` metrics.
      prefix: put before loss/accuracy names, e.g. 'train_' or 'test_'.

    Returns:
      Plain floats; ``{prefix}exact_accuracy`` is None when no exact examples were seen.
    """
    out = {f"{prefix}loss": total["loss"] / total["count"], f"{prefix}accuracy": total["correct"] / total["count"]}
    if "exact_count" in total:
        out[f"{prefix}exact_accuracy"] = (
            total["exact_correct"] / total["exact_count"] if total["exact_count"] else None
        )
    if "jac_steps" in total:  # the mean over the steps that added the penalty
        out["jac_penalty"] = total["jac_penalty"] / total["jac_steps"] if total["jac_steps"] else None
    for key, value in sorted(total.items(), key=lambda item: item[0].startswith("bwd_")):  # fwd first
        if key.startswith(("fwd_", "bwd_")):
            out[key] = value if key.endswith("_max") else value / total["batches"]
    return {k: None if v is None else float(v) for k, v in out.items()}


class Steps(NamedTuple):
    """The compiled steps and the shardings their inputs need."""

    train: Any  # (state, images, labels) -> (state, metrics)
    eval: Any  # (state, images, labels, mask, exact) -> metrics
    radius: Any  # (state, images, mask) -> spectral radius sums
    replicated: NamedSharding
    data: NamedSharding
    batch_size: int  # the global batch
    rows: slice  # the rows of each global batch this process feeds

    def batch(self, *local: np.ndarray) -> tuple[jax.Array, ...]:
        """Global batch arrays from this process's ``rows`` of them."""
        return distributed.global_batch(self.data, self.batch_size, *local)


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis 'data' over ``devices`` (default: all of ``jax.devices()``)."""
    return Mesh(np.asarray(jax.devices() if devices is None else devices), ("data",))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """Raises ValueError unless the batch splits evenly over the mesh's devices."""
    if batch_size % mesh.size:
        raise ValueError(
            f"--batch-size {batch_size} does not split evenly over {mesh.size} devices "
            f"({mesh.devices.flat[0].device_kind}); use a multiple of {mesh.size}."
        )


def compile_steps(model_def: ModelDef, tx, state: dict, config: Config, mesh: Mesh) -> Steps:
    """Compiles the train, eval and spectral radius steps ahead of time, once.

    A compiled step refuses inputs of another shape, dtype or sharding instead of
    silently recompiling, so a whole run provably uses one executable of each.

    Args:
      model_def: from :func:`init_state`.
      tx: the optimizer.
      state: an example (or abstract) train state, for shapes.
      config: the run's settings; ``batch_size`` must divide over ``mesh``.
      mesh: from :func:`make_mesh`.

    Returns:
      :class:`Steps`.
    """
    batch_size = config.batch_size
    check_batch_size(batch_size, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    data = NamedSharding(mesh, PartitionSpec("data"))

    def batch_spec(dtype, *shape):
        return jax.ShapeDtypeStruct((batch_size, *shape), dtype, sharding=data)

    images, labels, flags = batch_spec(jnp.uint8, 32, 32, 3), batch_spec(jnp.int32), batch_spec(jnp.bool_)
    train_jit = jax.jit(
        functools.partial(train_step, model_def=model_def, tx=tx, config=config),
        in_shardings=(replicated, data, data), out_shardings=replicated, donate_argnums=0,
    )
    eval_jit = jax.jit(
        functools.partial(eval_step, model_def=model_def),
        in_shardings=(replicated, data, data, data, data), out_shardings=replicated,
    )
    radius_jit = jax.jit(
        functools.partial(radius_step, model_def=model_def),
        in_shardings=(replicated, data, data), out_shardings=replicated,
    )
    return Steps(
        train=train_jit.lower(state, images, labels).compile(),
        eval=eval_jit.lower(state, images, labels, flags, flags).compile(),
        radius=radius_jit.lower(state, images, flags).compile(),
        replicated=replicated, data=data, batch_size=batch_size, rows=distributed.process_rows(data, batch_size),
    )


def evaluate(steps: Steps, state: dict, split: ip.Split, exact: np.ndarray) -> dict[str, float]:
    """Test loss and accuracy over a whole split (the last batch padded), each example counted once.

    Each process reads and feeds only its rows of each batch.

    Args:
      steps: the compiled steps.
      state: the train state.
      split: the evaluation data.
      exact: bool [N], the bit-exact test examples.

    Returns:
      ``test_loss``, ``test_accuracy``, ``test_exact_accuracy``, and the mean and largest
      spectral radius of the cell's Jacobian at the fixed points of the first
      ``RADIUS_BATCHES`` batches, ``test_spectral_radius_mean`` / ``_max``.
    """
    total, radius, rows = None, None, steps.rows
    batches = ip.epoch_batches(split, steps.batch_size, rng=None, drop_remainder=False, rows=rows)
    for i, (images, labels) in enumerate(batches):
        # Padding fills the last batch's end, so a process's real rows come first in its block.
        first = i * steps.batch_size + rows.start
        is_exact = np.zeros(rows.stop - rows.start, bool)
        is_exact[: len(labels)] = exact[first : first + len(labels)]
        images, labels, mask, is_exact = steps.batch(*ip.pad_batch(images, labels, len(is_exact)), is_exact)
        metrics = steps.eval(state, images, labels, mask, is_exact)
        total = metrics if total is None else accumulate(total, metrics)
        if i < RADIUS_BATCHES:
            metrics = steps.radius(state, images, mask)
            radius = metrics if radius is None else accumulate(radius, metrics)
    radius = jax.device_get(radius)
    return {**summarize(jax.device_get(total), "test_"),
            "test_spectral_radius_mean": float(radius["radius_sum"] / radius["radius_count"]),
            "test_spectral_radius_max": float(radius["radius_max"])}


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
            state, metrics = steps.train(state, *steps.batch(images, labels))
            total = metrics if total is None else accumulate(total, metrics)
            bar.update()
            # The loop's only host sync. It also keeps the host (and the bar, which counts
            # dispatched steps) at most PROGRESS_EVERY steps ahead of the device.
            if i % PROGRESS_EVERY == 0 or i == num_steps:
                m = summarize(jax.device_get(total), "train_")
                bwd = {"bwd": f"{m['bwd_steps_mean']:.1f}"} if "bwd_steps_mean" in m else {}
                bar.set_postfix(loss=f"{m['train_loss']:.3f}", acc=f"{m['train_accuracy']:.3f}",
                                fwd=f"{m['fwd_steps_mean']:.1f}", **bwd)
    return state, summarize(jax.device_get(total), "train_")


def _checkpoint_manager(workdir: Path, resume: bool) -> ocp.CheckpointManager:
    """Opens ``workdir/checkpoints``, refusing to overwrite a run or to resume from nothing."""
    directory = workdir / "checkpoints"
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=3, create=True))
    latest = manager.latest_step()
    if resume and latest is None:
        contents = sorted(p.name for p in directory.iterdir())
        raise FileNotFoundError(
            f"--resume: no complete checkpoint in {directory}"
            + (f" (it holds {contents}; a corrupt or unfinished save?)" if contents else "")
        )
    if not resume and latest is not None:
        raise FileExistsError(
            f"{workdir} already holds a checkpoint (epoch {latest}); pass --resume to continue "
            "that run, or choose another --workdir"
        )
    return manager


def _restore(manager: ocp.CheckpointManager, state: dict, config: Config) -> tuple[dict, list[dict]]:
    """Restores the latest checkpoint into ``state``'s shapes and shardings.

    Returns:
      ``(state, history)``: the train state and the per-epoch metrics so far.
    """
    epoch = manager.latest_step()
    try:
        restored = manager.restore(
            epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore(state), meta=ocp.args.JsonRestore())
        )
    except Exception as e:  # orbax raises many types; name the checkpoint, keep the cause
        raise ValueError(
            f"--resume: cannot read the checkpoint of epoch {epoch} in {manager.directory} "
            f"(corrupt, or written by different code?): {type(e).__name__}: {e}"
        ) from e
    meta = restored.meta
    saved = {k: v for k, v in meta["config"].items() if k not in RESUMABLE_FIELDS}
    current = {k: v for k, v in dataclasses.asdict(config).items() if k not in RESUMABLE_FIELDS}
    if saved != current:
        diff = {k: (saved.get(k), current.get(k)) for k in sorted(saved | current) if saved.get(k) != current.get(k)}
        raise ValueError(f"--resume: these settings differ from the checkpointed run's (saved, given): {diff}")
    return restored.state, meta["history"]


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


def _print_epoch(m: dict) -> None:
    def solve(prefix):
        return (f"{prefix} steps {m[f'{prefix}_steps_mean']:.1f} res {m[f'{prefix}_residual_mean']:.4f} "
                f"(max {m[f'{prefix}_residual_max']:.4f}) | ")

    exact = "n/a" if m["test_exact_accuracy"] is None else f"{m['test_exact_accuracy']:.4f}"
    jac = "off" if "jac_penalty" not in m else "n/a" if m["jac_penalty"] is None else f"{m['jac_penalty']:.3f}"
    print(
        f"epoch {m['epoch']:3d} | train loss {m['train_loss']:.4f} acc {m['train_accuracy']:.4f} | "
        f"test loss {m['test_loss']:.4f} acc {m['test_accuracy']:.4f} (exact {exact}) | "
        + solve("fwd") + (solve("bwd") if "bwd_steps_mean" in m else "")
        + f"jac {jac} | "
        f"radius {m['test_spectral_radius_mean']:.3f} (max {m['test_spectral_radius_max']:.3f}) | "
        f"{m['images_per_s']:.0f} img/s | lr {m['lr']:.2e} | {m['epoch_s']:.1f} s",
        flush=True,
    )


def train_and_evaluate(config: Config, workdir: str | Path) -> dict:
    """Trains the chapter's DEQ on CIFAR-10, evaluating and checkpointing every epoch.

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
      ValueError: a batch size that does not divide over the devices, too few training
        examples for one batch, a corrupt checkpoint or one from other settings, bad data.
      FileNotFoundError: no data, or ``--resume`` without a checkpoint.
      FileExistsError: a checkpoint in ``workdir`` without ``--resume``.
    """
    began = time.perf_counter()
    mesh = make_mesh()
    check_batch_size(config.batch_size, mesh)
    workdir = Path(workdir).resolve()
    manager = _checkpoint_manager(workdir, config.resume)
    train_split = ip.load_split("train", data_dir=config.data_dir, limit=config.train_limit)
    test_split = ip.load_split("test", data_dir=config.data_dir, limit=config.eval_limit)
    if len(train_split) < config.batch_size:
        raise ValueError(f"{len(train_split)} training examples make no batch of --batch-size {config.batch_size}")
    exact = np.zeros(len(test_split), bool) if test_split.ids is None else ip.exact_test_mask(test_split.ids)
    steps_per_epoch = ip.steps_per_epoch(len(train_split), config.batch_size)

    model_def, state, tx, schedule = init_state(config, config.epochs * steps_per_epoch)
    count = param_count(state["params"])
    _log(f"CifarDEQ: {count:,} trainable parameters (the chapter's PyTorch model: {CHAPTER_PARAM_COUNT:,})")
    state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    history = []
    if config.resume:
        state, history = _restore(manager, state, config)
        _log(f"resumed from the checkpoint of epoch {len(history)} in {manager.directory}")
    device = f"{mesh.size} x {mesh.devices.flat[0].device_kind}" + (
        f" in {jax.process_count()} processes" if jax.process_count() > 1 else "")
    start = time.perf_counter()
    steps = compile_steps(model_def, tx, state, config, mesh)
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
        state, train_metrics = train_epoch(steps, state, train_split, config, epoch)
        train_s = time.perf_counter() - start
        test_metrics = evaluate(steps, state, test_split, exact)
        epoch_s = time.perf_counter() - start
        history.append({
            "epoch": epoch, **train_metrics, **test_metrics,
            # The rate the optimizer used for this epoch's last step.
            "lr": float(schedule(epoch * steps_per_epoch - 1)),
            "images_per_s": steps_per_epoch * config.batch_size / train_s,
            "train_s": train_s, "eval_s": epoch_s - train_s, "epoch_s": epoch_s,
        })
        # Every process takes part in the save; orbax writes each one's files.
        manager.save(epoch, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave({"epoch": epoch, "config": dataclasses.asdict(config), "history": history}),
        ))
        if distributed.is_primary():
            _print_epoch(history[-1])
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
        "compile_s": compile_s, "device": device, "config": dataclasses.asdict(config),
    }
    if distributed.is_primary():
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps({k: v for k, v in summary.items() if k != "config"}))
    return summary
