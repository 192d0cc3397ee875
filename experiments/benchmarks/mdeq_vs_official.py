"""Q2's MDEQ row: one MDEQ-tiny training step of deq_jax against the official PyTorch code (locuslab/deq).

Both start from the official initialisation of ``cls_mdeq_TINY.yaml`` (copied into deq_jax's
model) and train on the same sequence of CIFAR-10 batches with the official recipe past its
warm-up: Broyden at tol 1e-3 capped at 18 steps forward (19 f evaluations) and 20 backward,
Adam with weight decay, dropout 0.25, the official input normalisation. The official side
is its own training step (``experiments.cifar10.official_mdeq.Trainer``: its model's forward,
backward hook and batch-wide Broyden, ``torch.optim.Adam``); deq_jax's is the experiment's
jitted ``train_step``. So early in training neither solve reaches tol 1e-3 and both spend their
caps: the row compares equal f evaluations (each side's counts are in the table). deq_jax runs
twice in the same rounds, from the same weights: at its default Broyden memory (6 rank-one
updates on MDEQ-tiny) and keeping every update (``--broyden-memory 20``), as the official code.

Run as part of ``python -m experiments.benchmarks.vs_pytorch --workloads mdeq``.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from experiments.cifar10 import input_pipeline as ip
from experiments.cifar10 import official_mdeq
from experiments.cifar10.config import Config
from experiments.cifar10.steps import train_step

from . import common, vs_pytorch

BATCHES = {"full": 128, "quick": 4}  # the official batch (64 per GPU x 2 GPUs); quick: checks that it runs


def training_rows(repeats: int, quick: bool) -> tuple[list[dict], list[str]]:
    """The MDEQ-tiny training-step row, or none (with the reason) where the official code is absent.

    Args:
      repeats: timed rounds.
      quick: a batch of 4 instead of 128.

    Returns:
      ``(rows, notes)``.
    """
    reason = official_mdeq.missing()
    if reason is not None:
        return [], [f"MDEQ row skipped: {reason}."]
    official = official_mdeq.load()
    torch = official.torch
    batch_size = BATCHES["quick" if quick else "full"]
    batches, source = common.cifar_batches(batch_size, repeats + 1)
    config = Config.for_model("mdeq-tiny", batch_size=batch_size, warmup_steps=0)
    net = official.build("TINY", seed=0)
    net.pretrain_steps = config.warmup_steps
    total = 10_000  # the schedule's length: any run's, the rate hardly moves over these steps
    model_def, state, tx, _ = official_mdeq.experiment_state(net, config, total, torch)
    trainer = official_mdeq.Trainer(net, official, lr=config.lr, weight_decay=config.weight_decay,
                                    total_steps=total, f_thres=config.f_max_iter - 1, b_thres=config.b_max_iter,
                                    eps=config.f_tol)
    log = official_mdeq.SolveLog(net.f_solver)
    net.f_solver = net.b_solver = log
    # deq_jax at its default Broyden memory (6 on MDEQ-tiny) and keeping every update, as the official code.
    every = dataclasses.replace(config, broyden_memory=max(config.f_max_iter, config.b_max_iter))
    contenders = {"default memory": config, "--broyden-memory 20": every}
    fns, histories = {}, {}
    for name, settings in contenders.items():
        step = jax.jit(functools.partial(train_step, model_def=model_def, tx=tx, config=settings), donate_argnums=0)
        fns[name], histories[name] = vs_pytorch.jax_training(step, jax.tree.map(jnp.copy, state), batches)

    def official_step(images, labels):
        pixels = official_mdeq.nchw(ip.normalize(images, config.input_scaling), torch)
        trainer.step(pixels, torch.from_numpy(labels.astype(np.int64)))

    fns.update({name: vs_pytorch.on_batches(fn, batches)
                for name, fn in vs_pytorch.torch_contenders(official_step, quick).items()})
    times = common.interleaved(fns, repeats)
    torch_times = {k: v for k, v in times.items() if k.startswith("PyTorch")}
    theirs = f"{log.mean('forward')[1]:.1f} f + 1 f, {log.mean('backward')[1]:.1f} VJP"
    rows, default = [], times[next(iter(contenders))]
    for name, history in histories.items():
        fwd, bwd = np.mean(history, axis=0)
        r = vs_pytorch.row(f"MDEQ-tiny training step, batch {batch_size}, vs the official code", times[name],
                           torch_times, f"{fwd:.1f} f + 1 f, {bwd:.1f} VJP", theirs, batch_size,
                           setting=f"official recipe, {name}")
        r["note"] = source if not rows else f"{times[name] / default:.2f}x the default memory's time"
        rows.append(r)
    notes = ["MDEQ row: the official cls_mdeq_TINY.yaml model at its initialisation and recipe past the warm-up "
             "(Broyden 18/20 at tol 1e-3, dropout 0.25), the official code's own training step against the "
             "experiment's train_step; f evals: deq_jax's are the batch's slowest example's, the official's its "
             "batch-wide solve's (VJPs less the first, of a zero vector); + 1 f: the linearisation at z* (official: "
             "f(z*) on the tape)."]
    return rows, notes

