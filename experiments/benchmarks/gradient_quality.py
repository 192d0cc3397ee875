"""Q14. Gradient quality at equal cost: every gradient strategy against the exact implicit gradient.

The chapter's CIFAR-10 model on one batch of CIFAR-10 training images, at initialisation
(seed 0) and after a short training run (``--train-steps`` steps of the experiment's
training step, implicit gradient, on the next batches). The gradient of the mean
cross-entropy (BatchNorm in training mode) w.r.t. the DEQ cell's parameters and its
injection ``x``, by each strategy in float32 after the experiment's forward solve
(Anderson m=5, tol 1e-2, at most 25 f evaluations; Broyden for GDEQ), is compared with the reference: the
implicit gradient in float64, forward and backward solves to tol 1e-9. Columns: cosine
similarity and relative error (cell parameters / injection), f evaluations and VJPs per
example (mean, of f and its VJPs only: the head's are the same for all), and seconds per
forward solve and gradient (median of interleaved rounds, jitted).

Usage:
  python -m experiments.benchmarks.gradient_quality [--quick] [--repeats N] [--train-steps N] [--batch-size B]
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import deq_jax as dj
from experiments.cifar10.input_pipeline import normalize

from . import common

BATCH = {"full": 32, "quick": 2}
TRAIN_STEPS = {"full": 100, "quick": 1}
SOLVER = dj.Anderson(m=5, tol=1e-2, max_iter=25)  # the experiment's forward solve
REFERENCE_SOLVER = dj.Anderson(m=5, tol=1e-9, max_iter=300, lam=1e-10)


def _costs(name: str, gradient, fwd: float, bwd: float) -> tuple[float, float]:
    """``(f evaluations, VJPs)`` per example of the forward solve plus ``gradient``'s backward pass."""
    if isinstance(gradient, dj.Implicit):
        return fwd + 1, bwd + 1  # one linearisation; the backward steps and one VJP w.r.t. the arguments
    if isinstance(gradient, dj.Phantom):
        return fwd + gradient.steps, gradient.steps
    if isinstance(gradient, dj.Neumann):
        return fwd + 1, gradient.terms
    if isinstance(gradient, dj.GDEQ):
        return fwd + 1, 1
    if isinstance(gradient, dj.Backprop):
        return fwd * (1 if gradient.checkpoint_every is None else 2), fwd
    raise ValueError(f"{name}: no cost model for {gradient!r}")


STRATEGIES = {
    "implicit (Anderson, tol 1e-2, at most 25 VJPs)": dj.Implicit(),
    "Jacobian-free: Phantom(1)": dj.Phantom(1),
    "phantom: Phantom(5, 0.8)": dj.Phantom(5, 0.8),
    "Neumann(5)": dj.Neumann(5),
    "Neumann(10)": dj.Neumann(10),
    "backprop through the solve": dj.Backprop(),
    "backprop through the solve, checkpoint every 5": dj.Backprop(checkpoint_every=5),
    "GDEQ (Broyden forward solve, tol 1e-2, at most 25)": dj.GDEQ(),
}
# GDEQ reads the forward Broyden solve's inverse Jacobian; every other strategy follows the experiment's Anderson.
SOLVERS = {dj.GDEQ: dj.Broyden(tol=1e-2, max_iter=25)}


def trained_model(batch_size: int, train_steps: int):
    """``(model_def, state, batches)``: the experiment's model after ``train_steps`` steps on batches 1.., and batch 0."""
    batches, _ = common.cifar_batches(batch_size, train_steps + 1)
    model_def, state, step = common.cifar_train_step(batch_size)
    initial = jax.tree.map(jnp.copy, state)  # the step donates its state
    for images, labels in batches[1:]:
        state, _ = step(state, images, labels)
    return model_def, {"initialisation": initial, f"after {train_steps} training steps": state}, batches[0]


def gradient_program(model_def, gradient, solver):
    """A jitted ``(params, batch_stats, images, labels) -> ((cell grads, x grads), fwd steps, bwd steps)``."""

    @jax.jit
    def run(params, batch_stats, images, labels):
        model = model_def.merge(params, batch_stats)
        x = model.inject(images, train=True)
        cell_def, cell_state = nnx.split(model.deq.cell)
        f = lambda z, a: nnx.merge(cell_def, a[0])(z, a[1])
        probe = jnp.zeros(len(dj.SolveStats._fields), jnp.float32)

        def loss(args, probe):
            solution = dj.fixed_point(f, jnp.zeros_like(x), args, solver=solver, gradient=gradient,
                                      backward_stats_probe=probe)
            logits = model_def.merge(params, batch_stats).classify(solution.value, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), solution.stats()

        (_, stats), (grads, probe_grad) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)((cell_state, x), probe)
        return grads, stats.mean_steps, dj.SolveStats.from_array(probe_grad).mean_steps

    return run


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.asarray(leaf, np.float64).ravel() for leaf in jax.tree.leaves(tree)])


def compare(got, want) -> tuple[float, float]:
    """``(cosine similarity, relative error)`` of two pytrees, flattened."""
    a, b = _flat(got), _flat(want)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))), float(np.linalg.norm(a - b) / np.linalg.norm(b))


def reference_gradient(program, state, images, labels):
    """``program`` (the implicit gradient, ``REFERENCE_SOLVER``'s tolerances) run in float64."""
    with jax.enable_x64(True):
        as64 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)
        grads, _, _ = program(as64(state["params"]), as64(state["batch_stats"]), as64(images), labels)
        return jax.device_get(grads)


def run(quick: bool = False, repeats: int | None = None, train_steps: int | None = None,
        batch_size: int | None = None) -> common.Result:
    """Measures every strategy's gradient against the float64 reference, at initialisation and after training."""
    before = common.load()
    size = "quick" if quick else "full"
    repeats = common.repeats_or_default(repeats, quick)
    train_steps = TRAIN_STEPS[size] if train_steps is None else train_steps
    batch_size = BATCH[size] if batch_size is None else batch_size
    model_def, states, (images, labels) = trained_model(batch_size, train_steps)
    images, labels = jnp.asarray(normalize(images)), jnp.asarray(labels)
    reference = gradient_program(model_def, dj.Implicit(), REFERENCE_SOLVER)
    programs = {name: gradient_program(model_def, gradient, SOLVERS.get(type(gradient), SOLVER))
                for name, gradient in STRATEGIES.items()}
    rows = []
    for when, state in states.items():
        want = reference_gradient(reference, state, images, labels)
        call = lambda name: common.block(programs[name](state["params"], state["batch_stats"], images, labels))
        times = common.interleaved({name: lambda name=name: call(name) for name in programs}, repeats)
        for name, gradient in STRATEGIES.items():
            (cell, x), fwd, bwd = call(name)
            f_evals, vjps = _costs(name, gradient, float(fwd), float(bwd))
            (cos_p, err_p), (cos_x, err_x) = compare(cell, want[0]), compare(x, want[1])
            rows.append({"state": when, "strategy": name, "cos_params": cos_p, "cos_x": cos_x, "error_params": err_p,
                         "error_x": err_x, "f_evals": f_evals, "vjps": vjps, "seconds": times[name]})
    table = common.markdown_table(
        ["model", "strategy", "cosine (params / x)", "rel. error (params / x)", "f evals", "VJPs", "s per gradient"],
        [[r["state"], r["strategy"], f"{r['cos_params']:.4f} / {r['cos_x']:.4f}",
          f"{r['error_params']:.2e} / {r['error_x']:.2e}", f"{r['f_evals']:.1f}", f"{r['vjps']:.1f}",
          common.fmt(r["seconds"])] for r in rows])
    notes = [f"batch {batch_size} of CIFAR-10 training images; reference: implicit gradient in float64, tol "
             f"{REFERENCE_SOLVER.tol:g}; f evaluations and VJPs are per example (means), of the cell only; "
             f"{repeats} interleaved rounds; {common.devices()}."]
    return common.Result("Q14. Gradient quality at equal cost on the chapter's CIFAR-10 model", table, rows, notes,
                         (before, common.load()))


def _flags(parser):
    parser.add_argument("--train-steps", type=int, default=None,
                        help=f"training steps before the second comparison (default {TRAIN_STEPS['full']}, "
                             f"quick {TRAIN_STEPS['quick']})")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"images per batch (default {BATCH['full']}, quick {BATCH['quick']})")


def main(argv=None) -> common.Result:
    """Command-line entry point: prints the table."""
    return common.cli(run, __doc__, argv, add_flags=_flags)


if __name__ == "__main__":
    main()
