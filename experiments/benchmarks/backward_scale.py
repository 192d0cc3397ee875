"""Q6. The backward solve of the CIFAR-10 model: raw cotangent vs rescaled to ||z*||.

The chapter's model at initialisation (seed 0) on one batch of CIFAR-10 training
images: the forward solve (Anderson m=5, tol 1e-2, max_iter 25, as the experiment),
the cotangent ``y = dL/dz*`` of the mean cross-entropy (BatchNorm in training mode),
then ``g = J_f(z*)^T g + y`` solved to tol 1e-2 in at most 25 steps:
  - Anderson on the raw ``y`` -- what the chapter's layer solves; its ridge
    ``lam = 1e-4`` is absolute, and ``y`` is tiny;
  - Anderson with ``lam = 1e-8`` on the raw ``y``;
  - forward iteration on the raw ``y`` (scale-free);
  - Anderson on ``y`` rescaled per example to ``||z*||`` -- what ``dj.fixed_point`` does.

Usage:
  python -m experiments.benchmarks.backward_scale [--quick]
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import deq_jax as dj
from deq_jax._implicit import solve_linear
from experiments.cifar10.input_pipeline import normalize
from experiments.cifar10.model import CifarDEQ

from . import common

BATCH = {"full": 32, "quick": 4}
TOL, MAX_ITER = 1e-2, 25


def backward_problem(batch_size: int):
    """``(f, cell_state, x, y, z_star)`` of the CIFAR-10 model's DEQ at initialisation on real images.

    ``f(z, cell_state, x)`` is the cell; ``y`` the loss's cotangent at ``z*``.
    """
    solver = dj.Anderson(m=5, tol=TOL, max_iter=MAX_ITER)
    model = CifarDEQ(solver=solver, gradient=dj.Implicit(), rngs=nnx.Rngs(0))
    (images, labels), = common.cifar_batches(batch_size, 1)[0]
    model_def, model_state = nnx.split(model)
    cell_def, cell_state = nnx.split(model.deq.cell)
    f = lambda z, cell_state, x: nnx.merge(cell_def, cell_state)(z, x)

    @jax.jit  # one program: op by op, each small operation would compile on its own
    def solve_and_differentiate(model_state, cell_state, images, labels):
        model = lambda: nnx.merge(model_def, model_state, copy=True)  # a copy per trace level: BatchNorm writes
        x = model().inject(images, train=True)
        z_star = solver(lambda z: f(z, cell_state, x), jnp.zeros_like(x)).value
        loss = lambda z: optax.softmax_cross_entropy_with_integer_labels(model().classify(z, train=True), labels).mean()
        return x, jax.grad(loss)(z_star), z_star

    x, y, z_star = solve_and_differentiate(model_state, cell_state, jnp.asarray(normalize(images)), jnp.asarray(labels))
    return f, cell_state, x, y, z_star


def run(quick: bool = False, repeats: int | None = None) -> common.Result:
    """Solves the backward system four ways and tabulates steps and residuals."""
    del repeats  # step counts, not times
    before = common.load()
    f, cell_state, x, y, z_star = backward_problem(BATCH["quick" if quick else "full"])
    anderson = dj.Anderson(m=5, tol=TOL, max_iter=MAX_ITER)

    raw = lambda solver: lambda vjp_z, y, z_star: solver(lambda g: vjp_z(g) + y, y)
    solvers = {
        "Anderson, raw y (the chapter's)": raw(anderson),
        "Anderson lam=1e-8, raw y": raw(dj.Anderson(m=5, lam=1e-8, tol=TOL, max_iter=MAX_ITER)),
        "forward iteration, raw y": raw(dj.ForwardIteration(tol=TOL, max_iter=MAX_ITER)),
        "Anderson, y rescaled to the norm of z* (deq_jax)": lambda vjp_z, y, z_star: solve_linear(vjp_z, y, z_star, anderson),
    }

    @jax.jit  # one program, not op by op
    def backward_solves(cell_state, x, y, z_star):
        _, vjp = jax.vjp(lambda z: f(z, cell_state, x), z_star)
        return [solve(lambda g: vjp(g)[0], y, z_star) for solve in solvers.values()]

    solves = zip(solvers, backward_solves(cell_state, x, y, z_star))
    rows = []
    for name, solution in solves:
        stats = jax.device_get(solution.stats())
        rows.append({"solve": name, **{k: float(v) for k, v in stats._asdict().items()}})
    table = common.markdown_table(
        ["backward solve", "steps mean / max", "residual mean / max", "converged"],
        [[r["solve"], f"{r['mean_steps']:.1f} / {r['max_steps']:.0f}",
          f"{r['mean_residual']:.1e} / {r['max_residual']:.1e}", f"{r['converged_fraction']:.0%}"] for r in rows])
    norms = lambda a: np.asarray(jnp.linalg.norm(a.reshape(a.shape[0], -1), axis=1))
    notes = [f"batch {len(y)}; per example ||y|| = {norms(y).mean():.1e} (mean), ||z*|| = {norms(z_star).mean():.0f}; "
             f"tol {TOL:g}, at most {MAX_ITER} steps (VJPs), relative residual per example."]
    return common.Result("Q6. The CIFAR-10 model's backward solve: raw vs rescaled cotangent", table, rows, notes,
                         (before, common.load()))


def main(argv=None) -> common.Result:
    """Command-line entry point: prints the table."""
    return common.cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
