"""Q15. How far ``ReversibleBackprop``'s reconstruction can go: its gradient's error against the unrolled loop.

``dj.ReversibleBackprop`` undoes each update of a ``dj.Reversible`` solve to backpropagate
through it without storing the trajectory; undoing an update multiplies rounding errors
by ``1 / (1 - beta)`` or more. On ``f(z) = tanh(z W + x)`` (``W`` orthogonal times 0.7,
16 features, 4 examples; every evaluation runs, ``tol`` 1e-30), the gradient w.r.t. ``W``
of a random projection of the newest iterate, by reconstruction in float64 and in
float32 and by plain backprop through the Python-unrolled loop in float32, each against
that unrolled loop in float64 (relative error, 2-norm).

Usage:
  python -m experiments.benchmarks.reversible_error [--quick]
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

import deq_jax as dj

from . import common

SIZES = {"full": (16, 4), "quick": (4, 2)}
EVALUATIONS = {"full": (12, 24, 50, 200), "quick": (6, 12)}
BETAS = (0.5, 0.8)


def unrolled(f, a, z0, evaluations: int, beta: float):
    """The ``Reversible`` solver's iterations from ``y = z = z0``, in Python: the newest iterate."""
    y = z = z0
    for k in range(evaluations):
        if k % 2 == 0:
            y = (1 - beta) * y + beta * f(z, a)
        else:
            z = (1 - beta) * z + beta * f(y, a)
    return y if evaluations % 2 else z


def run(quick: bool = False, repeats: int | None = None) -> common.Result:
    """Tabulates the reconstruction's gradient error per beta and number of evaluations."""
    del repeats  # errors, not times
    before = common.load()
    features, batch = SIZES["quick" if quick else "full"]
    f = lambda z, a: jnp.tanh(z @ a[0] + a[1])
    rows = []
    with jax.enable_x64(True):
        w = 0.7 * jax.random.orthogonal(jax.random.key(0), features, dtype=jnp.float64)
        args64 = (w, jax.random.normal(jax.random.key(1), (batch, features), jnp.float64))
        y64 = jax.random.normal(jax.random.key(2), (batch, features), jnp.float64)
        args32, y32 = jax.tree.map(lambda a: a.astype(jnp.float32), (args64, y64))
        for beta in BETAS:
            for n in EVALUATIONS["quick" if quick else "full"]:
                solver = dj.Reversible(tol=1e-30, max_iter=n, beta=beta)
                reconstructed = lambda a, y: jax.vjp(lambda a: dj.fixed_point(
                    f, jnp.zeros_like(a[1]), a, solver=solver, gradient=dj.ReversibleBackprop()).value, a)[1](y)[0][0]
                plain = lambda a, y: jax.vjp(lambda a: unrolled(f, a, jnp.zeros_like(a[1]), n, beta), a)[1](y)[0][0]
                want = plain(args64, y64)
                error = lambda got: float(jnp.linalg.norm(got.astype(jnp.float64) - want) / jnp.linalg.norm(want))
                rows.append({"beta": beta, "evaluations": n, "reconstructed_64": error(jax.jit(reconstructed)(args64, y64)),
                             "reconstructed_32": error(jax.jit(reconstructed)(args32, y32)),
                             "unrolled_32": error(plain(args32, y32))})
    table = common.markdown_table(
        ["beta", "f evaluations", "reconstruction, float64", "reconstruction, float32", "unrolled backprop, float32"],
        [[r["beta"], r["evaluations"], f"{r['reconstructed_64']:.1e}", f"{r['reconstructed_32']:.1e}",
          f"{r['unrolled_32']:.1e}"] for r in rows])
    notes = [f"relative error of the gradient w.r.t. W against backprop through the unrolled loop in float64; "
             f"{features} features, batch {batch}; NaN: the reconstruction overflowed."]
    return common.Result("Q15. ReversibleBackprop: the reconstruction's gradient error", table, rows, notes,
                         (before, common.load()))


def main(argv=None) -> common.Result:
    """Command-line entry point: prints the table."""
    return common.cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
