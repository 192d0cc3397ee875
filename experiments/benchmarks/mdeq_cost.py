"""Q11. One MDEQ-tiny f against one chapter f: FLOPs on paper, XLA's count, and measured time.

A DEQ step's cost is (f evaluations) x (one f) forward plus (VJPs) x (one VJP)
backward, so the cost of one f is what a projection from the chapter's model to
MDEQ-tiny needs. Both cells as the CIFAR-10 experiment builds them, weights at
initialisation, at batch 32 of 32x32 images:

  - chapter: ``ResNetCell(48, 64)`` (``--model chapter``), state ``[B, 32, 32, 48]``;
  - MDEQ-tiny: ``MDEQCell((24, 24), expansion=5, num_groups=8, norm="weight",
    post_affine=False)`` (``--model mdeq-tiny``, cls_mdeq_TINY.yaml), states
    ``[B, 32, 32, 24]`` and ``[B, 16, 16, 24]``, dropout off (a fixed f).

Columns: FLOPs per example on paper (every convolution's ``2 x outputs x fan_in``, from
the architecture; normalisations and activations left out, see :func:`paper_flops`);
XLA's FLOP count of the compiled program (``cost_analysis()``, per example); and the
median time of one jitted f and of one jitted VJP of f w.r.t. ``z`` (the backward
solve's unit), the two cells alternating in one process.

Usage:
  python -m experiments.benchmarks.mdeq_cost [--quick] [--repeats N]
"""
from __future__ import annotations

import jax
from flax import nnx

import deq_jax as dj

from . import common

SIZES = {"full": (32, 32), "quick": (2, 8)}  # (batch, image side)
CHAPTER = dict(channels=48, inner=64)
MDEQ_TINY = dict(channels=(24, 24), expansion=5, num_groups=8)


def paper_flops(name: str, side: int) -> int:
    """FLOPs per example of one f from the architecture: ``2 x output positions x out x in x k x k`` per conv.

    Chapter: two 3x3 convs (48 -> 64 -> 48) at ``side``. MDEQ-tiny, per branch ``i`` at
    ``side / 2^i``: the block's two 3x3 convs (``c -> 5c -> c``); fusion into branch 0
    from branch 1: a 1x1 conv at branch 1's resolution; into branch 1 from branch 0: a
    stride-2 3x3 conv with branch 1's outputs; post fusion: a 1x1 conv per branch.
    """
    def conv(positions, cin, cout, k):
        return 2 * positions * cin * cout * k * k

    if name == "chapter":
        c, inner = CHAPTER["channels"], CHAPTER["inner"]
        return 2 * conv(side ** 2, c, inner, 3)
    c0, c1 = MDEQ_TINY["channels"]
    hw0, hw1 = side ** 2, (side // 2) ** 2
    expansion = MDEQ_TINY["expansion"]
    blocks = 2 * conv(hw0, c0, expansion * c0, 3) + 2 * conv(hw1, c1, expansion * c1, 3)
    fusion = conv(hw1, c1, c0, 1) + conv(hw1, c0, c1, 3)
    post = conv(hw0, c0, c0, 1) + conv(hw1, c1, c1, 1)
    return blocks + fusion + post


def problems(batch: int, side: int) -> dict:
    """name -> ``(f, params, z, x)``: each cell's explicit f, its state, a state ~ N(0, 1) and an injection."""
    key_z, key_x = jax.random.split(jax.random.key(0))
    chapter = dj.nn.ResNetCell(CHAPTER["channels"], CHAPTER["inner"], rngs=nnx.Rngs(0))
    mdeq = dj.nn.MDEQCell(MDEQ_TINY["channels"], expansion=MDEQ_TINY["expansion"], num_groups=MDEQ_TINY["num_groups"],
                          norm="weight", post_affine=False, rngs=nnx.Rngs(0))
    out = {}
    for name, cell, channels in (("chapter", chapter, CHAPTER["channels"]), ("MDEQ-tiny", mdeq, MDEQ_TINY["channels"][0])):
        x = jax.random.normal(key_x, (batch, side, side, channels))
        z0 = cell.initial_state(x) if hasattr(cell, "initial_state") else x
        z = jax.tree.map(lambda a: jax.random.normal(key_z, a.shape), z0)
        f, params = dj.nn.explicit_cell(cell)
        out[name] = (f, params, z, x)
    return out


def measure(batch: int, side: int, repeats: int) -> list[dict]:
    """One row per cell: FLOPs (paper, XLA) per example and median ms of one f and one VJP."""
    timed, rows = {}, []
    for name, (f, params, z, x) in problems(batch, side).items():
        apply = jax.jit(lambda z, params, x, f=f: f(z, (params, x)))
        vjp = jax.jit(lambda z, g, params, x, f=f: jax.vjp(lambda z: f(z, (params, x)), z)[1](g)[0])
        xla = apply.lower(z, params, x).compile().cost_analysis()
        xla = xla[0] if isinstance(xla, list) else xla  # a list of one dict on older jax
        rows.append({"cell": name, "paper_mflops": paper_flops("chapter" if name == "chapter" else "mdeq", side) / 1e6,
                     "xla_mflops": xla["flops"] / batch / 1e6})
        timed[f"{name} f"] = lambda apply=apply, z=z, params=params, x=x: common.block(apply(z, params, x))
        timed[f"{name} vjp"] = lambda vjp=vjp, z=z, params=params, x=x: common.block(vjp(z, z, params, x))
    medians = common.interleaved(timed, repeats)
    for row in rows:
        row["f_ms"], row["vjp_ms"] = (1e3 * medians[f"{row['cell']} {kind}"] for kind in ("f", "vjp"))
    return rows


def run(quick: bool = False, repeats: int | None = None) -> common.Result:
    """Measures both cells; see the module docstring."""
    repeats = common.repeats_or_default(repeats, quick)
    batch, side = SIZES["quick" if quick else "full"]
    before = common.load()
    rows = measure(batch, side, repeats)
    chapter = rows[0]
    header = ["cell", "MFLOPs / example (paper)", "MFLOPs / example (XLA)", "f (ms)", "VJP (ms)",
              "ratio to chapter: paper / XLA / f / VJP"]
    table = common.markdown_table(header, [
        [r["cell"], f"{r['paper_mflops']:.1f}", f"{r['xla_mflops']:.1f}", f"{r['f_ms']:.1f}", f"{r['vjp_ms']:.1f}",
         " / ".join(f"{r[k] / chapter[k]:.2f}" for k in ("paper_mflops", "xla_mflops", "f_ms", "vjp_ms"))]
        for r in rows])
    notes = [f"batch {batch} of {side}x{side}, float32, weights at initialisation; median of {repeats} alternated "
             "rounds; paper FLOPs count convolutions only (paper_flops); XLA's count is the whole compiled f and "
             "leaves out the taps that fall on a convolution's zero padding."]
    return common.Result("Q11. One MDEQ-tiny f against one chapter f", table, rows, notes, (before, common.load()))


def main(argv=None) -> common.Result:
    """Command-line entry point: prints the table."""
    return common.cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
