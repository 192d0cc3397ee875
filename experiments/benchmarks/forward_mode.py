"""Q12. Forward-mode differentiation of a fixed point against reverse mode, at equal solver work.

``dj.fixed_point`` with ``dj.Implicit`` differentiates in both modes: reverse mode
(``jax.grad``, ``jax.vjp``) solves the transposed system ``g = J^T g + y`` with VJPs,
forward mode (``jax.jvp``, ``jax.jacfwd``) the tangent system ``t = J t + (df/dargs) v``
with JVPs. Measured on the CIFAR model's cell ``ResNetCell(48, 64)``, batch 32 of 32x32,
``z0 = 0``, ``x ~ N(0, 1)``, Anderson (m=5) at tol 1e-12 so that every solve spends its
``max_iter`` (the same work in every row):
  - forward solve: ``dj.fixed_point(...).value``, jitted;
  - reverse mode: ``jax.grad`` of ``sum(w * z*)`` w.r.t. the cell's parameters and ``x``
    (``w ~ N(0, 1)``): all their gradients from one backward solve;
  - forward mode: ``jax.jvp`` of ``z*`` along one direction ``v ~ N(0, 1)`` in the cell's
    parameters and ``x``: one directional derivative from one tangent solve.

Rows alternate in one process (``common.interleaved``), each reports its median and its
ratio to the forward solve.

Usage:
  python -m experiments.benchmarks.forward_mode [--quick] [--repeats N]
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

import deq_jax as dj

from . import common

PROBLEMS = {"full": ("CIFAR cell: ResNetCell(48,64), B=32, 32x32", 48, 64, 32, 32, 25),
            "quick": ("tiny: ResNetCell(8,16), B=2, 8x8", 8, 16, 2, 8, 6)}


def programs(f, solver, w, direction) -> dict:
    """The three jitted workloads of the table, each a function of ``(params, x)``."""

    def z_star(args):
        return dj.fixed_point(f, jnp.zeros_like(args[1]), args, solver=solver, gradient=dj.Implicit(solver)).value

    return {
        "forward solve": jax.jit(z_star),
        "reverse mode: grad of sum(w z*)": jax.jit(jax.grad(lambda args: jnp.sum(w * z_star(args)))),
        "forward mode: jvp of z* along v": jax.jit(lambda args: jax.jvp(z_star, (args,), (direction,))),
    }


def run(quick: bool = False, repeats: int | None = None) -> common.Result:
    """Measures the three workloads; see the module docstring."""
    repeats = common.repeats_or_default(repeats, quick)
    name, channels, inner, batch, size, max_iter = PROBLEMS["quick" if quick else "full"]
    before = common.load()
    _, f, params, x, w = common.cell_problem(channels, inner, batch, size)
    args = (params, x)
    leaves, treedef = jax.tree_util.tree_flatten(args)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    direction = jax.tree_util.tree_unflatten(
        treedef, [jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)])
    solver = dj.Anderson(m=5, lam=1e-4, tol=1e-12, max_iter=max_iter)
    jitted = programs(f, solver, w, direction)
    for fn in jitted.values():
        common.block(fn(args))  # compiled before timing
    times = common.interleaved({label: (lambda fn=fn: common.block(fn(args))) for label, fn in jitted.items()}, repeats)
    base = times["forward solve"]
    rows = [{"workload": label, "ms": t * 1e3, "vs_forward": t / base} for label, t in times.items()]
    table = common.markdown_table(["workload", "ms", "vs forward solve"],
                                  [[r["workload"], f"{r['ms']:.1f}", f"**{r['vs_forward']:.2f}**"] for r in rows])
    notes = [
        f"{name}; z0 = 0, x ~ N(0, 1); Anderson m=5, lam=1e-4, tol 1e-12: {max_iter} f evaluations forward and "
        f"{max_iter} VJPs (reverse) or JVPs (forward) in the implicit solve, dj.Implicit with the same solver.",
        "reverse mode gives the gradient w.r.t. every parameter and pixel; forward mode one directional "
        "derivative (jax.jacfwd runs one per input direction, batched).",
        f"times: median of {repeats} rounds, the three workloads alternating in each round (after a warm-up call).",
    ]
    return common.Result("Q12. Forward mode against reverse mode through a fixed point (CIFAR cell)", table, rows,
                         notes, (before, common.load()))


def main(argv=None) -> common.Result:
    """Command-line entry point: prints the table."""
    return common.cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
