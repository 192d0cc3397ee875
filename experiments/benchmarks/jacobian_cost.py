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
    what the experiment compiles for ``--jac-reg-freq`` below 1;
  - ``dj.spectral_radius`` with 100 power iterations (one linearisation, 100 VJPs).

Usage:
  python -m experiments.benchmarks.jacobian_cost [--quick] [--repeats N]
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
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
    plain_graphdef = nnx.split(dj.nn.ResNetCell(channels, inner, rngs=nnx.Rngs(0),
                                                conv_general_dilated=lax.conv_general_dilated))[0]

    def plain_f(z, args):
        return nnx.merge(plain_graphdef, args[0])(z, args[1])

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
        # What the experiment's --jac-reg-freq < 1 compiles: the penalty under a traced predicate.
        "grad of mean penalty inside lax.cond": jax.jit(jax.grad(lambda p, z, x, key: jax.lax.cond(
            jnp.sum(z) > -jnp.inf, lambda: jnp.mean(dj.jacobian_penalty(f, z, (p, x), key)), lambda: 0.0))),
        f"spectral_radius ({NUM_ITERS} iterations)":
            jax.jit(lambda p, z, x, key: dj.spectral_radius(f, z, (p, x), key, NUM_ITERS)),
    }
    return {name: (lambda fn=fn: common.block(fn(params, z, x, key))) for name, fn in jitted.items()}


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
    return common.Result("Q7. Cost of jacobian_penalty and spectral_radius", table, rows, notes,
                         (before, common.load()))


def main(argv=None) -> common.Result:
    """Command-line entry point: prints the table."""
    return common.cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
