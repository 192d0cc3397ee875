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
from .model import CifarDEQ, CifarMDEQ, set_mode

RADIUS_ITERS = 50  # power iterations (VJPs) per spectral radius
# Random streams of a step, each its own branch of the seed's key, never one NNX draws
# weights from (nnx.Rngs(seed) folds the draw count into key(seed) itself).
PENALTY_STREAM = 1  # the Jacobian penalty's Hutchinson vectors
DROPOUT_STREAM = 2  # the MDEQ cell's dropout masks


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

    def merge(self, params, batch_stats, probe=None) -> CifarDEQ | CifarMDEQ:
        """Rebuilds the model from explicit states (``probe`` replaces the zeros if given)."""
        # copy=True: the states can hold Variables created at an outer trace level (jit),
        # which NNX refuses to update inside grad; fresh copies belong to the current one.
        probe = self.probe if probe is None else probe
        return nnx.merge(self.graphdef, params, batch_stats, probe, self.rest, copy=True)


def split_model(model: CifarDEQ | CifarMDEQ) -> tuple[ModelDef, nnx.State, nnx.State]:
    """``(model_def, params, batch_stats)`` of a model."""
    graphdef, params, batch_stats, probe, rest = nnx.split(
        model, nnx.Param, nnx.BatchStat, dj.nn.BackwardStatsProbe, ...)
    return ModelDef(graphdef, probe, rest), params, batch_stats


def make_optimizer(config: Config, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Adam (PyTorch's defaults) on a cosine schedule, as ``CosineAnnealingLR(T_max=total_steps, eta_min=END_LR)``.

    With ``config.weight_decay > 0``, ``weight_decay * params`` is added to the gradient
    before Adam, as ``torch.optim.Adam(weight_decay=...)`` does (an L2 term, not AdamW's
    decoupled decay), on every parameter.

    Args:
      config: the initial learning rate and the weight decay.
      total_steps: optimizer steps of the whole run.

    Returns:
      ``(optimizer, schedule)``; the optimizer is wrapped in ``optax.apply_if_finite``,
      whose state counts the consecutive skipped steps (``notfinite_count``).
    """
    schedule = optax.cosine_decay_schedule(config.lr, total_steps, alpha=END_LR / config.lr)
    adam = optax.adam(schedule, b1=0.9, b2=0.999, eps=1e-8)
    if config.weight_decay > 0:
        adam = optax.chain(optax.add_decayed_weights(config.weight_decay), adam)
    # A step whose gradient is not finite (see train_step) leaves parameters and Adam's moments as
    # they were, however many in a row: stopping a run that keeps failing is the training loop's call.
    return optax.apply_if_finite(adam, max_consecutive_errors=np.iinfo(np.int32).max), schedule


def build_model(config: Config) -> CifarDEQ | CifarMDEQ:
    """The model ``config.model`` names, with the config's solvers, gradient, dtype and cell options.

    Weights come from ``nnx.Rngs(config.seed)``; the MDEQ's dropout stream is reseeded
    every training step (:func:`stream_key`), so its initial key does not matter.
    """
    solver, gradient = config.solver_and_gradient()
    options = dict(solver=solver, gradient=gradient, norm=config.norm, dtype=DTYPES[config.dtype])
    if config.model == "chapter":
        return CifarDEQ(rngs=nnx.Rngs(config.seed), **options)
    return CifarMDEQ(config.model, dropout=config.dropout, rngs=nnx.Rngs(config.seed, dropout=0), **options)


def init_state(config: Config, total_steps: int):
    """Initialises the model and the optimizer, and splits the model into static and state parts.

    Args:
      config: the run's settings (seed, solvers, learning rate).
      total_steps: optimizer steps of the whole run (for the schedule).

    Returns:
      ``(model_def, state, tx, schedule)``; state is ``{"params", "opt_state", "batch_stats",
      "step"}`` (optimizer steps taken) on the default device.
    """
    model_def, params, batch_stats = split_model(build_model(config))
    tx, schedule = make_optimizer(config, total_steps)
    state = {"params": params, "opt_state": tx.init(params), "batch_stats": batch_stats,
             "step": jnp.zeros((), jnp.int32)}
    return model_def, state, tx, schedule


def stream_key(seed: int, stream: int, step) -> jax.Array:
    """The key of random ``stream`` (e.g. :data:`PENALTY_STREAM`) at optimizer step ``step`` (a traced int is fine).

    The seed's key split in ``stream + 1``, the last of them, folded with the step: every
    process, and a resumed run, draws the same.
    """
    return jax.random.fold_in(jax.random.split(jax.random.key(seed), stream + 1)[stream], step)


def in_warmup(config: Config, step: int) -> bool:
    """Whether optimizer step ``step`` (0-based; also: steps taken, for an evaluation) uses the unrolled network.

    As the official MDEQ code: training step ``step`` and an evaluation after ``step``
    steps are unrolled while ``step < config.warmup_steps``, on the equilibrium after.
    """
    return step < config.warmup_steps


def penalty_weight(config: Config, warmup: bool) -> float:
    """The Jacobian penalty's weight in a warm-up step (``warmup_jac_reg``) or an equilibrium step (``jac_reg``)."""
    return config.warmup_jac_reg if warmup else config.jac_reg


def penalty_applies(config: Config, step: int) -> bool:
    """Whether optimizer step ``step`` adds the Jacobian penalty, drawn on the host.

    Never where the step's weight (:func:`penalty_weight`) is 0; else a deterministic draw
    of ``(seed, step)`` with probability ``jac_reg_freq``: every process, and a resumed run,
    draws the same. The loop then runs one of two compiled steps, so a step without the
    penalty costs a plain step (a ``lax.cond`` inside one step ran about 77x slower on
    XLA:CPU, ``python -m experiments.benchmarks.jacobian_cost``).
    """
    if penalty_weight(config, in_warmup(config, step)) == 0:
        return False
    if config.jac_reg_freq == 1:
        return True
    return bool(np.random.default_rng([config.seed, PENALTY_STREAM, step]).random() < config.jac_reg_freq)


def penalised(config: Config) -> bool:
    """Whether any step of the run can add the Jacobian penalty (then its metrics are recorded)."""
    return config.jac_reg > 0 or config.warmup_jac_reg > 0 and config.warmup_steps > 0


def _solve_metrics(prefix: str, stats: dj.SolveStats | None) -> dict[str, jax.Array]:
    """One batch's solver stats; keys ending in '_max' are maxima, the others batch means.

    ``{prefix}_batch_steps`` is the batch's longest solve: the batch runs until its slowest
    example stops, so this is how many times the batched f (or VJP) ran. ``stats`` None (a
    warm-up step, no solve): zeros, which ``deq_batches`` leaves out of the means.
    """
    if stats is None:
        stats = dj.SolveStats(*(jnp.zeros((), jnp.float32) for _ in dj.SolveStats._fields))
    return {
        f"{prefix}_steps_mean": stats.mean_steps, f"{prefix}_steps_max": stats.max_steps,
        f"{prefix}_batch_steps": stats.max_steps,
        f"{prefix}_residual_mean": stats.mean_residual, f"{prefix}_residual_max": stats.max_residual,
        f"{prefix}_converged": stats.converged_fraction, f"{prefix}_diverged": stats.diverged_fraction,
    }


def chained_stats(solutions) -> dj.SolveStats:
    """The statistics of one solve run as consecutive segments (:meth:`dj.nn.DEQ.solve_states`).

    Steps add up per example; residuals and convergence are the last segment's; an
    example diverged if any of its segments did.
    """
    steps = sum(s.num_steps for s in solutions).astype(jnp.float32)
    diverged = jnp.any(jnp.stack([s.diverged for s in solutions]), axis=0)
    last = solutions[-1].stats()
    return last._replace(mean_steps=steps.mean(), max_steps=steps.max(),
                         diverged_fraction=diverged.astype(jnp.float32).mean())


def train_step(state: dict, images: jax.Array, labels: jax.Array, *, model_def: ModelDef, tx,
               config: Config, penalty: bool | None = None, warmup: bool = False) -> tuple[dict, dict]:
    """One optimizer step: forward solve, mean cross-entropy (+ Jacobian penalty), backward, Adam.

    The cell's dropout masks (MDEQ) come from :func:`stream_key` of the seed and the step.
    With ``config.fp_correction = N > 1`` the loss is :func:`deq_jax.fp_correction` of the
    cross-entropies of N states along the solve (each classified by the head, whose
    BatchNorm statistics thus update N times per step); accuracy and the Jacobian
    penalty are the last state's, and the forward steps count every segment.

    Args:
      state: ``{"params", "opt_state", "batch_stats", "step"}``.
      images: uint8 [B, 32, 32, 3].
      labels: int32 [B].
      model_def: from :func:`init_state`.
      tx: the optimizer.
      config: the gradient strategy and Jacobian regularisation settings (and the seed).
      penalty: add the Jacobian penalty, weighted by :func:`penalty_weight` (static: compile one
        step with and one without, see :func:`penalty_applies`); None: whenever that weight is > 0.
        It is evaluated with the cell's state of this step's solve (its dropout mask).
      warmup: train the unrolled network of ``config.warmup_depth`` cell applications by
        plain backprop instead of the equilibrium (static, see :func:`in_warmup`); the
        Jacobian penalty is then taken at its output.

    A step whose loss or gradient is not finite (a diverging solve, say) is skipped: the
    parameters, Adam's state and the BatchNorm statistics stay as they were, and
    ``opt_state.notfinite_count`` counts the skipped steps in a row.

    Returns:
      ``(new_state, metrics)``; metrics holds this batch's summed loss, correct count,
      example count (0 for a skipped step), ``skipped_steps`` (1 or 0), ``deq_batches`` (0 in the warm-up, else 1), the forward (and, for
      implicit gradients, backward) solver stats (zeros in the warm-up) and, with
      :func:`penalised` settings, the Jacobian penalty and whether it was added (``jac_penalty``,
      ``jac_steps``; see :func:`metrics.summarize`).
    """
    weight = penalty_weight(config, warmup)
    penalty = weight > 0 if penalty is None else penalty

    def loss_fn(params, probe, batch_stats):
        model = model_def.merge(params, batch_stats, probe)
        nnx.reseed(model, dropout=stream_key(config.seed, DROPOUT_STREAM, state["step"]))
        x = model.inject(ip.normalize(images, config.input_scaling), train=True)
        # A copy of the cell's state as this step's f sees it (its dropout mask); the solve then advances it.
        solved_with = nnx.clone(nnx.state(model.deq.cell))
        if warmup:
            states, stats = [model.deq.unrolled(x, config.warmup_depth)], None
        else:
            solutions = model.deq.solve_states(x, config.fp_correction)
            states, stats = [s.value for s in solutions], chained_stats(solutions)
        # One loss per supervised state (one without fixed-point correction), the last one's logits reported.
        losses, logits = [], None
        for z in states:
            logits = model.classify(z, train=True)
            losses.append(optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean())
        loss, z = dj.fp_correction(losses, config.fp_gamma), states[-1]
        jac = jnp.zeros((), jnp.float32)
        if penalty:
            key = stream_key(config.seed, PENALTY_STREAM, state["step"])
            jac = model.deq.jacobian_penalty(x, jax.lax.stop_gradient(z), key, cell_state=solved_with).mean()
        aux = (loss, logits, nnx.state(model, nnx.BatchStat), stats, jac)
        return loss + weight * jac, aux

    grad_fn = jax.grad(loss_fn, argnums=(0, 1), has_aux=True)
    (grads, probe_grads), (loss, logits, batch_stats, forward, jac) = grad_fn(
        state["params"], model_def.probe, state["batch_stats"]
    )
    # A non-finite loss skips the step as a non-finite gradient does (a loss can be NaN with finite
    # gradients: an out-of-range label, say); make_optimizer's apply_if_finite then changes nothing,
    # and the BatchNorm statistics are kept here by the same test, all on the device.
    loss_finite = jnp.isfinite(loss + weight * jac)
    grads = jax.tree.map(lambda g: jnp.where(loss_finite, g, jnp.nan), grads)
    skipped = ~jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_state = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
                 "batch_stats": jax.tree.map(lambda new, old: jnp.where(skipped, old, new), batch_stats,
                                             state["batch_stats"]),
                 "step": state["step"] + 1}
    count = jnp.where(skipped, 0.0, jnp.asarray(labels.shape[0], jnp.float32))  # loss and accuracy: kept steps
    metrics = {
        "loss": jnp.where(skipped, 0.0, loss) * count,
        "correct": jnp.where(skipped, 0, (logits.argmax(-1) == labels).sum()).astype(jnp.float32),
        "count": count,
        "skipped_steps": skipped.astype(jnp.float32),
        "deq_batches": jnp.asarray(0.0 if warmup else 1.0, jnp.float32),
        **_solve_metrics("fwd", forward),
    }
    if config.gradient == "implicit":
        # The probe's gradient is the backward solve's stats, not a direction for optax.
        _, backward = dj.nn.split_backward_stats(probe_grads)
        metrics.update(_solve_metrics("bwd", None if warmup else backward["deq"]))
    if penalised(config):
        metrics.update(jac_penalty=jac, jac_steps=jnp.asarray(float(penalty), jnp.float32))
    return new_state, metrics


def eval_logits(state: dict, images, budget=None, *, model_def: ModelDef, config: Config, warmup: bool = False,
                batch_statistics: bool = False) -> tuple[jax.Array, dj.Solution | None]:
    """The evaluation's logits of a batch and its forward solve (None in the warm-up); see :func:`eval_step`.

    The head classifies the solve's ``value``, ``f(z)`` at the lowest-residual iterate ``z``
    (the official MDEQ code classifies ``z``; see the CIFAR-10 guide for what that changes).
    """
    model = model_def.merge(state["params"], state["batch_stats"])
    x = model.inject(ip.normalize(images, config.input_scaling), train=batch_statistics)
    set_mode(model.deq, False)  # the cell as evaluated: no dropout mask, no power-iteration update
    if warmup:
        z, solution = model.deq.unrolled(x, config.warmup_depth), None
    else:
        solution = model.deq.solve(x, budget=budget)
        z = solution.value
    return model.classify(z, train=batch_statistics), solution


def eval_step(state: dict, images, labels, mask, exact, budget=None, *, model_def: ModelDef, config: Config,
              warmup: bool = False, batch_statistics: bool = False) -> dict:
    """Loss and accuracy of a padded batch with BatchNorm's running statistics (or the batch's own).

    Args:
      state: as in :func:`train_step`.
      images: uint8 [B, 32, 32, 3].
      labels: int32 [B].
      mask: bool [B], False for padding.
      exact: bool [B], True for real examples among the bit-exact test images.
      model_def: from :func:`init_state`.
      config: the warm-up depth.
      budget: optional traced int, the forward solve's cap on f evaluations (see
        :meth:`deq_jax.nn.DEQ.solve`); one compiled step serves every budget.
      warmup: evaluate the unrolled network (static; during the warm-up, as the official MDEQ code).
      batch_statistics: normalise every BatchNorm by the batch's statistics, as in training, with
        the cell still as evaluated (no dropout) and nothing updated (static; see
        ``batch_stats_check``). The batch must then hold no padding.

    Returns:
      Sums over the real examples: ``loss``, ``correct``, ``count``, ``exact_correct``,
      ``exact_count``, and (not in the warm-up) ``steps``, ``converged``: f evaluations and
      converged examples.
    """
    logits, solution = eval_logits(state, images, budget, model_def=model_def, config=config, warmup=warmup,
                                   batch_statistics=batch_statistics)
    solves = {} if solution is None else {
        "steps": jnp.sum(solution.num_steps * mask, dtype=jnp.float32),
        "converged": jnp.sum(solution.converged & mask, dtype=jnp.float32)}
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = logits.argmax(-1) == labels
    return {
        "loss": jnp.sum(loss * mask), "correct": jnp.sum(correct & mask, dtype=jnp.float32),
        "count": jnp.sum(mask, dtype=jnp.float32),
        "exact_correct": jnp.sum(correct & exact, dtype=jnp.float32), "exact_count": jnp.sum(exact, dtype=jnp.float32),
        **solves,
    }


def radius_step(state: dict, images, mask, *, model_def: ModelDef, config: Config) -> dict:
    """Spectral radius of the cell's Jacobian at each test example's fixed point (a fixed key).

    Args:
      state: as in :func:`train_step`.
      images: uint8 [B, 32, 32, 3].
      mask: bool [B], False for padding.
      model_def: from :func:`init_state`.
      config: the input scaling.

    Returns:
      ``radius_sum``, ``radius_max`` and ``radius_count`` over the real examples.
    """
    model = model_def.merge(state["params"], state["batch_stats"])
    x = model.inject(ip.normalize(images, config.input_scaling), train=False)
    radius = model.deq.spectral_radius(x, model.deq(x), jax.random.key(0), RADIUS_ITERS)
    return {"radius_sum": jnp.sum(radius * mask), "radius_max": jnp.max(jnp.where(mask, radius, 0)),
            "radius_count": jnp.sum(mask, dtype=jnp.float32)}
