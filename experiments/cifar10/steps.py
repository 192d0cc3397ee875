"""The experiment's pure step functions: model and optimizer set-up, train, eval and spectral-radius steps.

Nothing here touches orbax, TFDS or the host loop: each step is a pure function of
explicit states, ready for ``jax.jit`` over a mesh, and testable alone.

Example:
  >>> from experiments.cifar10.config import Config
  >>> model_def, state, tx, schedule = init_state(Config(f_max_iter=2, b_max_iter=2), total_steps=10)
  >>> images, labels = jnp.zeros((2, 32, 32, 3), jnp.uint8), jnp.zeros(2, jnp.int32)
  >>> state, metrics = train_step(state, images, labels, model_def=model_def, tx=tx, config=Config())
  >>> int(state["step"])
  1
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import deq_jax as dj

from . import input_pipeline as ip
from .config import DTYPES, END_LR, Config
from .model import CifarDEQ

RADIUS_ITERS = 50  # power iterations (VJPs) per spectral radius
# The Jacobian penalty's random streams: its own branch of the seed's key, never one NNX
# draws weights from (nnx.Rngs(seed) folds the draw count into key(seed) itself).
PENALTY_STREAM = 1


class ModelDef(NamedTuple):
    """The static part of the split model.

    Attributes:
      graphdef: the module structure.
      probe: the DEQ's ``BackwardStatsProbe`` (zeros); its gradient is the backward stats.
      rest: the remaining variables (none that a step changes).
    """

    graphdef: nnx.GraphDef
    probe: nnx.State
    rest: nnx.State

    def merge(self, params, batch_stats, probe=None) -> CifarDEQ:
        """Rebuilds the model from explicit states (``probe`` replaces the zeros if given)."""
        # copy=True: the states can hold Variables created at an outer trace level (jit),
        # which NNX refuses to update inside grad; fresh copies belong to the current one.
        probe = self.probe if probe is None else probe
        return nnx.merge(self.graphdef, params, batch_stats, probe, self.rest, copy=True)


def split_model(model: CifarDEQ) -> tuple[ModelDef, nnx.State, nnx.State]:
    """``(model_def, params, batch_stats)`` of a model."""
    graphdef, params, batch_stats, probe, rest = nnx.split(
        model, nnx.Param, nnx.BatchStat, dj.nn.BackwardStatsProbe, ...)
    return ModelDef(graphdef, probe, rest), params, batch_stats


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
    model_def, params, batch_stats = split_model(model)
    tx, schedule = make_optimizer(config, total_steps)
    state = {"params": params, "opt_state": tx.init(params), "batch_stats": batch_stats,
             "step": jnp.zeros((), jnp.int32)}
    return model_def, state, tx, schedule


def penalty_key(seed: int, step) -> jax.Array:
    """The Hutchinson vectors' key of optimizer step ``step`` (a traced int is fine)."""
    return jax.random.fold_in(jax.random.split(jax.random.key(seed))[PENALTY_STREAM], step)


def penalty_applies(config: Config, step: int) -> bool:
    """Whether optimizer step ``step`` adds the Jacobian penalty, drawn on the host.

    A deterministic draw of ``(seed, step)``: every process, and a resumed run, draws
    the same. The loop then runs one of two compiled steps, so a step without the
    penalty costs a plain step (a ``lax.cond`` inside one step ran about 77x slower on
    XLA:CPU, ``python -m experiments.benchmarks.jacobian_cost``).
    """
    if config.jac_reg == 0:
        return False
    if config.jac_reg_freq == 1:
        return True
    return bool(np.random.default_rng([config.seed, PENALTY_STREAM, step]).random() < config.jac_reg_freq)


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


def train_step(state: dict, images: jax.Array, labels: jax.Array, *, model_def: ModelDef, tx,
               config: Config, penalty: bool | None = None) -> tuple[dict, dict]:
    """One optimizer step: forward solve, mean cross-entropy (+ Jacobian penalty), backward, Adam.

    Args:
      state: ``{"params", "opt_state", "batch_stats", "step"}``.
      images: uint8 [B, 32, 32, 3].
      labels: int32 [B].
      model_def: from :func:`init_state`.
      tx: the optimizer.
      config: the gradient strategy and Jacobian regularisation settings (and the seed).
      penalty: add ``config.jac_reg`` times the Jacobian penalty (static: compile one step
        with and one without, see :func:`penalty_applies`); None: whenever ``jac_reg > 0``.

    Returns:
      ``(new_state, metrics)``; metrics holds this batch's summed loss, correct count,
      example count, the forward (and, for implicit gradients, backward) solver stats
      and, with ``jac_reg > 0``, the Jacobian penalty and whether it was added
      (``jac_penalty``, ``jac_steps``; see :func:`metrics.summarize`).
    """
    penalty = config.jac_reg > 0 if penalty is None else penalty

    def loss_fn(params, probe, batch_stats):
        model = model_def.merge(params, batch_stats, probe)
        x = model.inject(ip.normalize(images), train=True)
        solution = model.deq.solve(x)
        logits = model.classify(solution.value, train=True)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        jac = jnp.zeros((), jnp.float32)
        if penalty:
            z = jax.lax.stop_gradient(solution.value)
            jac = model.deq.jacobian_penalty(x, z, penalty_key(config.seed, state["step"])).mean()
        aux = (loss, logits, nnx.state(model, nnx.BatchStat), solution.stats(), jac)
        return loss + config.jac_reg * jac, aux

    grad_fn = jax.grad(loss_fn, argnums=(0, 1), has_aux=True)
    (grads, probe_grads), (loss, logits, batch_stats, forward, jac) = grad_fn(
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
        _, backward = dj.nn.split_backward_stats(probe_grads)
        metrics.update(_solve_metrics("bwd", backward["deq"]))
    if config.jac_reg > 0:
        metrics.update(jac_penalty=jac, jac_steps=jnp.asarray(float(penalty), jnp.float32))
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
