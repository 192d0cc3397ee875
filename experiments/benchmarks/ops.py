"""Q0. Building blocks: the cell's parts, forward and VJP, as a solver's loop applies them.

Each op runs 10 times inside one jitted ``lax.fori_loop`` (its output feeding its next
input, as in a fixed-point solve) and the table gives milliseconds per application,
median over rounds that alternate the contenders:
  - GroupNorm over [B, 32, 32, 64], 8 groups: ``nnx.GroupNorm(use_fast_variance=False)``
    against ``deq_jax.nn.GroupNorm`` (same values), forward and VJP w.r.t. the input;
  - the VJP w.r.t. the input of a 3x3 convolution (64 -> 48 channels, the cell's
    conv2; its 64-channel result is cut to 48 to loop): ``lax.conv_general_dilated``
    against ``deq_jax.nn.cell.loop_friendly_conv``;
  - the whole ``ResNetCell(48, 64)``, forward and VJP w.r.t. ``z``, built with each
    of those two convolutions (``common.CONVS``; same weights): the VJP is a backward
    solve's step, so this row says which form a training step on this device wants.

Every contender runs on JAX's default device and blocks on its result.

Usage:
  python -m experiments.benchmarks.ops [--quick] [--repeats N]
"""
from __future__ import annotations

from typing import Callable

import jax
from flax import nnx
from jax import lax

import deq_jax as dj
from . import common

BATCH = {"full": 100, "quick": 2}
STEPS = 10


def in_loop(op, *operands):
    """A callable timing ``STEPS`` applications of ``op`` to its own output, in one jitted loop."""
    looped = jax.jit(lambda first, *rest: lax.fori_loop(0, STEPS, lambda _, carry: op(carry, *rest), first))
    return lambda: common.block(looped(*operands))


def vjp_in_loop(fn, primal, cotangent, fit=lambda v: v):
    """As :func:`in_loop` for ``g -> fit(vjp(fn at primal)(g)) + cotangent``: a backward solve's step.

    ``fit`` maps the input gradient back to the cotangent's shape where ``fn`` changes it.
    """
    _, pullback = jax.vjp(fn, primal)
    return in_loop(lambda g, y: fit(pullback(g)[0]) + y, cotangent, cotangent)


def contenders(batch: int) -> dict[str, dict[str, Callable[[], object]]]:
    """op name -> {contender: timed callable}."""
    keys = iter(jax.random.split(jax.random.key(0), 8))
    normal = lambda *shape: jax.random.normal(next(keys), shape)
    h, z, x = normal(batch, 32, 32, 64), normal(batch, 32, 32, 48), normal(batch, 32, 32, 48)
    theirs = nnx.GroupNorm(64, num_groups=8, epsilon=1e-5, use_fast_variance=False, rngs=nnx.Rngs(0))
    ours = dj.nn.GroupNorm(64, 8)
    kernel = 0.01 * normal(3, 3, 64, 48)

    def conv(conv_fn):
        return lambda v: conv_fn(v, kernel, (1, 1), [(1, 1), (1, 1)], dimension_numbers=("NHWC", "HWIO", "NHWC"))

    cells = {name: dj.nn.ResNetCell(48, 64, conv_general_dilated=conv_fn, rngs=nnx.Rngs(0))
             for name, conv_fn in common.CONVS.items()}
    return {
        "GroupNorm forward": {"nnx.GroupNorm": in_loop(theirs, h), "dj.nn.GroupNorm": in_loop(ours, h)},
        "GroupNorm VJP": {"nnx.GroupNorm": vjp_in_loop(theirs, h, h), "dj.nn.GroupNorm": vjp_in_loop(ours, h, h)},
        "conv 64->48 input VJP": {name: vjp_in_loop(conv(conv_fn), h, z, fit=lambda v: v[..., :48])
                                  for name, conv_fn in common.CONVS.items()},
        "ResNetCell(48,64) forward": {name: in_loop(lambda v, c=cell: c(v, x), z) for name, cell in cells.items()},
        "ResNetCell(48,64) VJP": {name: vjp_in_loop(lambda v, c=cell: c(v, x), z, z) for name, cell in cells.items()},
    }


def run(quick: bool = False, repeats: int | None = None) -> common.Result:
    """Times every op's contenders side by side."""
    repeats = common.repeats_or_default(repeats, quick)
    batch = BATCH["quick" if quick else "full"]
    before = common.load()
    rows = []
    for op, fns in contenders(batch).items():
        times = common.interleaved(fns, repeats)
        first = next(iter(times.values()))
        rows += [{"op": op, "contender": name, "ms": 1e3 * seconds / STEPS, "vs_first": seconds / first}
                 for name, seconds in times.items()]
    table = common.markdown_table(["op", "contender", "ms per application", "vs first contender"], [
        [r["op"], r["contender"], f"{r['ms']:.2f}", f"{r['vs_first']:.2f}"] for r in rows])
    notes = [f"batch {batch}; each op applied {STEPS} times in one jitted lax.fori_loop, median of {repeats} "
             "rounds alternating the contenders; VJPs w.r.t. the input, linearised once outside the loop."]
    return common.Result("Q0. Building blocks in a solver's loop", table, rows, notes, (before, common.load()))


def main(argv=None) -> common.Result:
    """Command-line entry point: prints the table."""
    return common.cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
