"""Q7. What the Jacobian training aids cost, in evaluations of the cell f.

On the CIFAR model's cell ``ResNetCell(48, 64)`` at batch 100 of 32x32 (NHWC), at
``z = f(f(0, x), x)``, each computation jitted with the cell's parameters as arguments:
  - one f evaluation (the unit);
  - f and one VJP w.r.t. ``z`` (``jax.vjp``): what one backward-solve step costs, plus f;
  - ``dj.jacobian_penalty`` with one vector (f, one VJP, a sum of squares);
  - ``jax.grad`` of the penalty's batch mean w.r.t. the cell's parameters: what a training
    step pays for the regulariser (second-order reverse mode through the cell), with the
    default convolution (``loop_friendly_conv``, a ``custom_vjp``) and with
    ``lax.conv_general_dilated``;
  - the same gradient with the penalty under ``lax.cond`` (a traced predicate, always true):
    why the experiment does not draw ``--jac-reg-freq`` inside one compiled step;
  - ``dj.spectral_radius`` with 100 power iterations (one linearisation, 100 VJPs).

A second table times the experiment's training step at ``--jac-reg-freq P``: the step
without the penalty, the step with it, and a run of steps where the host picks one of
the two compiled programs per step (``steps.penalty_applies``), against the cost
``(1 - p) plain + p penalised`` predicted from the steps actually drawn. Every solve
runs its full ``max_iter`` (tolerances 1e-9), so random pixels cost what images do.

Usage:
  python -m experiments.benchmarks.jacobian_cost [--quick] [--repeats N]
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

import deq_jax as dj

from . import common

PROBLEMS = {"full": ("CIFAR cell: ResNetCell(48,64), B=100, 32x32", 48, 64, 100, 32),
            "quick": ("tiny: ResNetCell(8,16), B=2, 8x8", 8, 16, 2, 8)}
NUM_ITERS = 100


def contenders(channels: int, inner: int, batch: int, size: int) -> dict:
    """name -> a callable running one jitted computation to completion."""
    _, f, params, x, w = common.cell_problem(channels, inner, batch, size)
    plain_f, _ = dj.nn.explicit_cell(dj.nn.ResNetCell(channels, inner, rngs=nnx.Rngs(0),
                                                      conv_general_dilated=lax.conv_general_dilated))

    z = common.block(jax.jit(lambda a: f(f(jnp.zeros_like(a[1]), a), a))((params, x)))
    key = jax.random.key(1)

    def penalty_grad(f):
        return jax.jit(jax.grad(lambda p, z, x, key: jnp.mean(dj.jacobian_penalty(f, z, (p, x), key))))

    jitted = {
        "f": jax.jit(lambda p, z, x, key: f(z, (p, x))),
        "f + one VJP w.r.t. z": jax.jit(lambda p, z, x, key: jax.vjp(lambda u: f(u, (p, x)), z)[1](w)),
        "jacobian_penalty (1 vector)": jax.jit(lambda p, z, x, key: dj.jacobian_penalty(f, z, (p, x), key)),
        "grad of mean penalty w.r.t. params": penalty_grad(f),
        "same, cell with lax.conv_general_dilated": penalty_grad(plain_f),
        # A draw inside one compiled step: the penalty under a traced predicate.
        "grad of mean penalty inside lax.cond": jax.jit(jax.grad(lambda p, z, x, key: jax.lax.cond(
            jnp.sum(z) > -jnp.inf, lambda: jnp.mean(dj.jacobian_penalty(f, z, (p, x), key)), lambda: 0.0))),
        f"spectral_radius ({NUM_ITERS} iterations)":
            jax.jit(lambda p, z, x, key: dj.spectral_radius(f, z, (p, x), key, NUM_ITERS)),
    }
    return {name: (lambda fn=fn: common.block(fn(params, z, x, key))) for name, fn in jitted.items()}


def frequency_contenders(batch: int, max_iter: int, freq: float, run_steps: int):
    """``(contenders, drawn)``: the experiment's plain and penalised steps and a run of ``run_steps`` at ``freq``."""
    from experiments.cifar10 import steps
    from experiments.cifar10.config import Config

    config = Config(batch_size=batch, jac_reg=0.5, jac_reg_freq=freq, f_tol=1e-9, b_tol=1e-9, f_max_iter=max_iter,
                    b_max_iter=max_iter)
    model_def, state, tx, _ = steps.init_state(config, total_steps=1000)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, 10, batch, dtype=np.int32))
    compiled = {penalty: jax.jit(lambda s, x, y, penalty=penalty: steps.train_step(
        s, x, y, model_def=model_def, tx=tx, config=config, penalty=penalty)).lower(state, images, labels).compile()
        for penalty in (False, True)}
    drawn = [steps.penalty_applies(config, step) for step in range(run_steps)]

    def run_of_steps():
        current = state
        for penalty in drawn:
            current, metrics = compiled[penalty](current, images, labels)
        common.block(metrics)

    return {"plain step": lambda: common.block(compiled[False](state, images, labels)),
            "penalised step": lambda: common.block(compiled[True](state, images, labels)),
            "run": run_of_steps}, drawn


def frequency_table(quick: bool, repeats: int) -> tuple[str, list[dict], str]:
    """The second table: seconds per training step at ``--jac-reg-freq`` 0.5 against the prediction."""
    batch, max_iter, freq, run_steps = (2, 2, 0.5, 8) if quick else (32, 8, 0.5, 8)
    fns, drawn = frequency_contenders(batch, max_iter, freq, run_steps)
    times = common.interleaved(fns, repeats)
    share = sum(drawn) / len(drawn)
    predicted = (1 - share) * times["plain step"] + share * times["penalised step"]
    per_step = times["run"] / run_steps
    rows = [{"step": "plain (no penalty)", "ms": 1e3 * times["plain step"]},
            {"step": "penalised", "ms": 1e3 * times["penalised step"]},
            {"step": f"--jac-reg-freq {freq}: {run_steps} steps, {sum(drawn)} penalised", "ms": 1e3 * per_step,
             "predicted_ms": 1e3 * predicted, "vs_predicted": per_step / predicted}]
    table = common.markdown_table(["training step", "ms per step", "predicted", "measured / predicted"], [
        [r["step"], f"{r['ms']:.1f}", f"{r['predicted_ms']:.1f}" if "predicted_ms" in r else "",
         f"**{r['vs_predicted']:.2f}**" if "vs_predicted" in r else ""] for r in rows])
    note = (f"CifarDEQ training step (experiments.cifar10.steps.train_step), batch {batch}, forward and backward "
            f"solves of {max_iter} steps, --jac-reg 0.5; predicted = (1 - s) plain + s penalised with s = "
            f"{share:.2f} the share of steps drawn; median of {repeats} rounds alternating the three.")
    return table, rows, note


def run(quick: bool = False, repeats: int | None = None) -> common.Result:
    """Times every computation side by side; see the module docstring."""
    repeats = common.repeats_or_default(repeats, quick)
    problem, *sizes = PROBLEMS["quick" if quick else "full"]
    before = common.load()
    times = common.interleaved(contenders(*sizes), repeats)
    one_f = times["f"]
    rows = [{"computation": name, "ms": 1e3 * seconds, "vs_f": seconds / one_f} for name, seconds in times.items()]
    table = common.markdown_table(["computation", "ms per call", "in f evaluations"], [
        [r["computation"], f"{r['ms']:.2f}", f"**{r['vs_f']:.2f}**"] for r in rows])
    radius = rows[-1]["vs_f"]
    notes = [
        f"{problem}; z = f(f(0, x), x), x ~ N(0, 1); every computation jitted with the cell's parameters, z and x "
        f"as arguments; median of {repeats} rounds alternating the computations.",
        "in f evaluations = time / time of one f. The penalty is what one backward-solve step costs plus one f; "
        "its gradient is the extra cost of the regulariser in a training step.",
        f"spectral_radius: {radius:.1f} f evaluations for {NUM_ITERS} VJPs, "
        f"{(radius - 1) / NUM_ITERS:.2f} per power iteration.",
    ]
    freq_table, freq_rows, freq_note = frequency_table(quick, repeats)
    table = f"{table}\n\n{freq_table}"
    notes.append(freq_note)
    return common.Result("Q7. Cost of jacobian_penalty and spectral_radius", table, rows + freq_rows, notes,
                         (before, common.load()))


def main(argv=None) -> common.Result:
    """Command-line entry point: prints the table."""
    return common.cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
