"""Q3. deq_jax against JAX peers on the same fixed-point problem: optimistix, jaxopt and banax.

The chapter's demo problem (``ResNetCell(64, 128)``, x ~ N(0, 1) of 10x32x32x64,
z0 = 0; loss sum(z* * w), w ~ N(0, 1); gradients w.r.t. the cell's weights and x),
solved to the same accuracy by:
  - ``dj.Anderson`` / ``dj.ForwardIteration`` through ``dj.fixed_point`` (backward:
    the same solver on ``g = J^T g + y``);
  - ``jaxopt.AndersonAcceleration`` and ``jaxopt.FixedPointIteration``, vmapped over
    the examples as jaxopt's docs do for batches, implicit differentiation with their
    default linear solver (normal-equation CG);
  - ``optimistix.fixed_point`` with ``optx.FixedPointIteration`` (optimistix has no
    Anderson solver), vmapped over the examples, ``ImplicitAdjoint`` with lineax's
    GMRES (the default, a dense LU, would materialise a 65536^2 Jacobian per example);
  - banax's ``Anderson`` (depth 5, ridge 1e-4, undamped) under its ``Implicit`` adjoint
    (the same Anderson backward), on the whole batch as banax runs it (one norm and one
    stop for the batch) and ``jax.vmap``-ed over the examples (banax needs Python >= 3.12).

Same stopping rule everywhere, per example: ``||f(z) - z|| < tol * ||f(z)||`` with
tol = 1e-4. The cell ends in a GroupNorm with unit scale and zero bias, so
``||f(z)|| = sqrt(D)`` (D = values per example) and the rule becomes jaxopt's
``||f(z) - z||_2 < tol * sqrt(D)`` and optimistix's ``rms_norm(f(z) - z) < tol``
(``atol=tol, rtol=0``); banax's relative residual is deq_jax's (``rtol=tol``), per example
when vmapped, over the whole batch otherwise.

optimistix differentiates with forward mode (JVPs), which deq_jax's default
convolution (``loop_friendly_conv``, a ``custom_vjp``) does not support; it gets the
same cell with ``jax.lax.conv_general_dilated``, and deq_jax is shown with that cell
too. Gradients are compared with a float64 reference (deq_jax, Anderson, tol 1e-10).

Usage:
  python -m experiments.benchmarks.vs_jax_peers [--quick] [--repeats N]
"""
from __future__ import annotations

import importlib.util
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import deq_jax as dj

from . import common

SIZES = {"full": (64, 128, 10, 32), "quick": (8, 16, 2, 8)}
TOL, MAX_ITER = 1e-4, 50


def one_example(f):
    """``f`` for a single example (no batch axis), as vmapped peers call it."""
    def f1(z, args):
        params, x = args
        return f(z[None], (params, x[None]))[0]
    return f1


def deq_jax_contender(f, solver):
    """``(solve, loss)`` for deq_jax: forward solve -> (z*, f evals), loss -> (value, aux)."""
    def solve(args):
        sol = solver(lambda z: f(z, args), jnp.zeros_like(args[1]))
        return sol.value, jnp.max(sol.num_steps)

    def loss(args, w):
        probe = jnp.zeros(len(dj.SolveStats._fields), jnp.float32)
        sol = dj.fixed_point(f, jnp.zeros_like(args[1]), args, solver=solver, backward_stats_probe=probe)
        return jnp.vdot(sol.value, w)

    return solve, loss


def vmapped_contender(per_example):
    """``(solve, loss)`` from a one-example solve ``(params, x) -> (z*, steps)``, vmapped over x."""
    def solve(args):
        z, steps = jax.vmap(per_example, in_axes=(None, 0))(*args)
        return z, jnp.max(steps)

    def loss(args, w):
        return jnp.vdot(solve(args)[0], w)

    return solve, loss


def jaxopt_contender(f, solver_cls, dim, **kwargs):
    """jaxopt's solver, vmapped over examples; tol = TOL * sqrt(D) on the 2-norm (see module doc)."""
    f1 = one_example(f)
    make = lambda: solver_cls(f1, tol=TOL * math.sqrt(dim), maxiter=MAX_ITER, **kwargs)

    def per_example(params, x):
        out = make().run(jnp.zeros_like(x), (params, x))
        return out.params, out.state.iter_num

    return vmapped_contender(per_example)


def optimistix_contender(f):
    """optimistix's FixedPointIteration, vmapped; rms_norm(f(z) - z) < TOL (see module doc)."""
    import lineax as lx
    import optimistix as optx

    f1 = one_example(f)
    solver = optx.FixedPointIteration(rtol=0.0, atol=TOL, norm=optx.rms_norm)
    adjoint = optx.ImplicitAdjoint(linear_solver=lx.GMRES(rtol=TOL, atol=0.0))

    def per_example(params, x):
        sol = optx.fixed_point(f1, solver, jnp.zeros_like(x), (params, x), max_steps=MAX_ITER, throw=False,
                               adjoint=adjoint)
        return sol.value, sol.stats["num_steps"]

    return vmapped_contender(per_example)


def banax_contenders(f):
    """banax's Anderson under its Implicit adjoint: on the whole batch, and vmapped over the examples."""
    from banax.adjoint import Implicit
    from banax.solver import Anderson

    anderson = Anderson(rtol=TOL, atol=0.0, max_steps=MAX_ITER, depth=5, ridge=1e-4, damp=1.0)
    adjoint = Implicit(solver=anderson, b_solver=anderson)

    def whole_batch(params, x):
        sol = adjoint((lambda z, params, x: f(z, (params, x)), (params, x)), jnp.zeros_like(x))
        return sol.value, sol.stats.steps

    def per_example(params, x):
        f1 = one_example(f)
        sol = adjoint((lambda z, params, x: f1(z, (params, x)), (params, x)), jnp.zeros_like(x))
        return sol.value, sol.stats.steps

    batch_solve = lambda args: whole_batch(*args)
    return {"banax Anderson, whole batch": (batch_solve, lambda args, w: jnp.vdot(batch_solve(args)[0], w)),
            "banax Anderson, vmapped": vmapped_contender(per_example)}


def reference_gradient(cell, x, w):
    """dL/d(params, x) in float64 with a tight Anderson solve both ways."""
    with jax.enable_x64(True):
        f, params = dj.nn.explicit_cell(cell)
        params64, x64, w64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), (params, x, w))
        solver = dj.Anderson(m=5, lam=1e-12, tol=1e-10, max_iter=300)
        _, loss = deq_jax_contender(f, solver)
        grads = jax.jit(jax.grad(loss))((params64, x64), w64)
        return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), grads)


def contenders(channels, inner, batch, size, quick=False):
    """name -> (cell label, solve, loss) for every available library (quick: one per library)."""
    cell, f, params, x, w = common.cell_problem(channels, inner, batch, size)
    plain_cell = dj.nn.ResNetCell(channels, inner, conv_general_dilated=jax.lax.conv_general_dilated,
                                  rngs=nnx.Rngs(0))
    plain_f, _ = dj.nn.explicit_cell(plain_cell)
    dim = int(np.prod(x.shape[1:]))
    anderson = dj.Anderson(m=5, lam=1e-4, beta=1.0, tol=TOL, max_iter=MAX_ITER)
    out = {"deq_jax Anderson": ("loop_friendly_conv", *deq_jax_contender(f, anderson))}
    if not quick:
        out["deq_jax ForwardIteration"] = ("loop_friendly_conv",
                                           *deq_jax_contender(f, dj.ForwardIteration(tol=TOL, max_iter=MAX_ITER)))
        out["deq_jax Anderson (lax conv)"] = ("lax.conv_general_dilated", *deq_jax_contender(plain_f, anderson))
    if importlib.util.find_spec("jaxopt") is not None:
        import jaxopt

        out["jaxopt AndersonAcceleration"] = ("loop_friendly_conv", *jaxopt_contender(
            f, jaxopt.AndersonAcceleration, dim, history_size=5, ridge=1e-4))
        if not quick:
            out["jaxopt FixedPointIteration"] = ("loop_friendly_conv", *jaxopt_contender(
                f, jaxopt.FixedPointIteration, dim))
    if importlib.util.find_spec("optimistix") is not None and importlib.util.find_spec("lineax") is not None:
        out["optimistix FixedPointIteration"] = ("lax.conv_general_dilated", *optimistix_contender(plain_f))
    if importlib.util.find_spec("banax") is not None:
        out.update({name: ("loop_friendly_conv", *fns) for name, fns in banax_contenders(f).items()})
    return cell, params, x, w, out


def error_summary(error: Exception) -> str:
    """The message of the innermost Python exception in a JAX runtime error (a callback's), else its first line."""
    messages = [m.group(1) for m in re.finditer(r"^[\w.]*(?:Error|Exception): (.+)$", str(error), re.MULTILINE)]
    lines = [line for line in str(error).splitlines() if line.strip()]
    return (messages[-1] if messages else lines[0] if lines else type(error).__name__)[:140]


def run(quick: bool = False, repeats: int | None = None) -> common.Result:
    """Times every contender's forward solve and forward + backward; see the module docstring."""
    repeats = common.repeats_or_default(repeats, quick)
    before = common.load()
    cell, params, x, w, entries = contenders(*SIZES["quick" if quick else "full"], quick=quick)
    args = (params, x)
    # Quick mode skips the float64 solve (a compilation) and compares with deq_jax instead.
    reference = None if quick else reference_gradient(cell, x, w)
    rows, solve_fns, grad_fns = [], {}, {}
    for name, (conv, solve, loss) in entries.items():
        solve_jit, grad_jit = jax.jit(solve), jax.jit(jax.grad(loss))
        z, steps = common.block(solve_jit(args))
        residual = relative_residual(cell, z, x)
        row = {"contender": name, "conv": conv, "f_evals": int(steps), "residual_max": residual}
        solve_fns[name] = lambda s=solve_jit: common.block(s(args))
        try:
            grads = common.block(grad_jit(args, w))
        except jax.errors.JaxRuntimeError as error:  # e.g. optimistix's GMRES adjoint stagnating
            row.update(grad_error="failed: " + error_summary(error))
        else:
            reference = grads if reference is None else reference
            row.update(grad_rel_diff=common.relative_diff(grads, reference))
            grad_fns[name] = lambda g=grad_jit: common.block(g(args, w))
        rows.append(row)
    solve_times = common.interleaved(solve_fns, repeats)
    grad_times = common.interleaved(grad_fns, repeats)
    base = rows[0]["contender"]
    for r in rows:
        r["solve_s"], r["solve_ratio"] = solve_times[r["contender"]], solve_times[r["contender"]] / solve_times[base]
        if "grad_error" not in r:
            r["grad_s"], r["grad_ratio"] = grad_times[r["contender"]], grad_times[r["contender"]] / grad_times[base]
    header = ["contender", "cell's conv", "forward f evals", "max rel. residual", "forward solve (s)",
              f"vs {base}", "forward + backward (s)", f"vs {base}",
              "gradient rel. diff vs " + (base if quick else "float64")]
    table = common.markdown_table(header, [
        [r["contender"], r["conv"], r["f_evals"], f"{r['residual_max']:.1e}", f"{r['solve_s']:.3f}",
         f"{r['solve_ratio']:.2f}", *((f"{r['grad_s']:.3f}", f"{r['grad_ratio']:.2f}", f"{r['grad_rel_diff']:.1e}")
                                      if "grad_error" not in r else ("failed", "-", r["grad_error"]))]
        for r in rows])
    channels, inner, batch, size = SIZES["quick" if quick else "full"]
    notes = [
        f"ResNetCell({channels},{inner}), x {batch}x{size}x{size}x{channels}, tol {TOL:g} (relative residual, per "
        f"example), max_iter {MAX_ITER}; Anderson m=5, ridge 1e-4 (jaxopt: Anderson steps start once its history "
        "is full).",
        "forward f evals: batched f calls, i.e. the most any example took; max rel. residual: "
        "||f(z*) - z*|| / ||f(z*)|| of the returned z*, worst example (one extra f, untimed).",
        "gradient rel. diff: largest ||g - g_ref|| / ||g_ref|| over dL/dparams and dL/dx, g_ref "
        + (f"from {base} (quick mode)." if quick else "in float64 (deq_jax, Anderson, tol 1e-10)."),
        f"seconds: jitted, compiled before timing, median of {repeats} rounds alternating all contenders.",
    ]
    missing = [name for name, row in (("optimistix/lineax", "optimistix FixedPointIteration"),
                                      ("jaxopt", "jaxopt AndersonAcceleration"), ("banax", "banax Anderson, vmapped"))
               if row not in entries]
    if missing:
        notes.append(f"{', '.join(missing)} not installed: their rows are missing (pip install optimistix jaxopt; "
                     "banax==0.1.5 on Python >= 3.12).")
    return common.Result("Q3. deq_jax vs optimistix, jaxopt and banax on the chapter's fixed point", table, rows, notes,
                         (before, common.load()))


def relative_residual(cell, z, x) -> float:
    """Worst example's ``||f(z) - z|| / ||f(z)||``."""
    fz = cell(z, x)
    num = jnp.linalg.norm((fz - z).reshape(z.shape[0], -1), axis=1)
    return float(jnp.max(num / jnp.linalg.norm(fz.reshape(z.shape[0], -1), axis=1)))


def main(argv=None) -> common.Result:
    """Command-line entry point: prints the table."""
    return common.cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
