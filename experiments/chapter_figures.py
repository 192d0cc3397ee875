"""The chapter's two residual figures, rebuilt with deq_jax.

(a) ``anderson_vs_forward.png``: relative residual per f evaluation of Anderson
    acceleration and forward iteration on the chapter's demo problem
    (``ResNetCell(64, 128)``, x ~ N(0, 1) of shape (10, 32, 32, 64), z0 = 0,
    tol 1e-4, max_iter 50, beta 1).
(b) ``forward_vs_backward.png``: residuals of the forward solve and of the
    backward linear solve ``g = J_f(z*)^T g + y`` of one DEQ forward+backward pass
    (Anderson, tol 1e-4, max_iter 100, beta 2; loss = sum(z* * randn)).

deq_jax reports only summary statistics of the backward solve, so the script
repeats that solve explicitly (exactly as ``dj.fixed_point``'s backward does) to
get its per-step trace, and checks that the resulting gradient equals ``jax.grad``
through ``dj.fixed_point``. It prints a markdown table of the numbers; with
``--torch`` it also runs the chapter's PyTorch functions on the same inputs and
weights and prints theirs beside them.

Usage:
  python -m experiments.chapter_figures --out DIR [--torch]
  python -m experiments.chapter_figures --out DIR --batch 2 --size 8 --channels 8 --inner 16
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

import deq_jax as dj
from deq_jax._implicit import solve_linear
from experiments.benchmarks.common import REFERENCE, load_reference, relative_diff

TOL = 1e-4
SOLVERS_A = {
    "Anderson": dj.Anderson(m=5, lam=1e-4, beta=1.0, tol=TOL, max_iter=50),
    "Forward iteration": dj.ForwardIteration(tol=TOL, max_iter=50),
}
SOLVER_B = dj.Anderson(m=5, lam=1e-4, beta=2.0, tol=TOL, max_iter=100)


def parse_args(argv=None) -> argparse.Namespace:
    """Parses the command line; the defaults are the chapter's sizes.

    Args:
      argv: arguments without the program name; ``sys.argv[1:]`` if None.

    Returns:
      The parsed flags.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory for the PNGs")
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--size", type=int, default=32, help="spatial height and width")
    parser.add_argument("--channels", type=int, default=64, help="channels of z and x (a multiple of 8)")
    parser.add_argument("--inner", type=int, default=128, help="inner channels of the cell (a multiple of 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch", action="store_true", help="also run the chapter's PyTorch code")
    return parser.parse_args(argv)


def progress(message: str) -> None:
    """Prints a progress line at once, so a slow run shows where it is."""
    print(f"... {message}", flush=True)


def make_problem(flags: argparse.Namespace):
    """Builds the chapter's cell, its injection ``x`` and the loss weights ``w``.

    Args:
      flags: the parsed flags (sizes and seed).

    Returns:
      ``(cell, f, params, x, w)``: the NNX cell, ``f(z, (params, x))`` with the
      parameters explicit, its state, x ~ N(0, 1) in NHWC and w ~ N(0, 1) like x.
    """
    cell = dj.nn.ResNetCell(flags.channels, flags.inner, rngs=nnx.Rngs(flags.seed))
    f, params = dj.nn.explicit_cell(cell)

    key_x, key_w = jax.random.split(jax.random.key(flags.seed))
    shape = (flags.batch, flags.size, flags.size, flags.channels)
    return cell, f, params, jax.random.normal(key_x, shape), jax.random.normal(key_w, shape)


def run_compiled(fn, *args):
    """Compiles ``fn`` ahead of time, then runs it once.

    Args:
      fn: a jittable function.
      *args: its arguments.

    Returns:
      ``(output, compile_seconds, run_seconds)``; the run time excludes compilation.
    """
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compiled_at = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    return out, compiled_at - start, time.perf_counter() - compiled_at


def summarize(solution: dj.Solution, compile_s: float, run_s: float) -> dict:
    """The table row of one solve: per-example statistics plus timings."""
    steps, residual = np.asarray(solution.num_steps), np.asarray(solution.residual)
    return {
        "steps_mean": float(steps.mean()), "steps_max": int(steps.max()),
        "residual_mean": float(residual.mean()), "residual_max": float(residual.max()),
        "converged": float(np.asarray(solution.converged).mean()),
        "compile_s": compile_s, "run_s": run_s,
    }


def held_trace(solution: dj.Solution) -> np.ndarray:
    """The per-example residual after each step, a stopped example holding its last value.

    A stopped example is frozen, so its residual stays what it was; holding it
    (instead of the trace's NaN) makes the batch mean meaningful at every step.

    Args:
      solution: a solve's result.

    Returns:
      float[steps, B], ``steps`` = the most steps any example took.
    """
    trace = np.asarray(solution.trace)[: int(np.max(solution.num_steps))]
    steps = np.arange(trace.shape[0])[:, None]
    last_valid = np.maximum.accumulate(np.where(np.isnan(trace), 0, steps), axis=0)
    return np.take_along_axis(trace, last_valid, axis=0)


def compare_solvers(f, params, x) -> tuple[dict, dict]:
    """Figure (a): runs each solver of ``SOLVERS_A`` from z0 = 0.

    Returns:
      ``(rows, traces)``: table rows and :func:`held_trace` curves by solver name.
    """
    rows, traces = {}, {}
    for name, solver in SOLVERS_A.items():
        progress(f"(a) {name}: compile and solve")
        solution, compile_s, run_s = run_compiled(
            lambda p, x_, solver=solver: solver(lambda z: f(z, (p, x_)), jnp.zeros_like(x_)), params, x)
        rows[name], traces[name] = summarize(solution, compile_s, run_s), held_trace(solution)
    return rows, traces


def explicit_backward(f, solver, z_star, args, y):
    """The backward solve of ``dj.fixed_point``, written out to keep its trace.

    Args:
      f: ``f(z, args) -> z``.
      solver: the backward solver.
      z_star: the forward fixed point (``Solution.value``).
      args: what ``f`` is differentiated against.
      y: the cotangent of ``z_star``.

    Returns:
      ``(solution, args_bar)``: the solve of ``g = J_f(z*)^T g + y`` (the one
      ``dj.fixed_point`` runs) and the gradient ``(d f / d args)^T g``.
    """
    _, vjp = jax.vjp(f, z_star, args)
    solution = solve_linear(lambda g: vjp(g)[0], y, z_star, solver)
    return solution, vjp(solution.value)[1]


def implicit_grad(f, solver, args, w):
    """``jax.grad`` of ``sum(z* * w)`` through ``dj.fixed_point``.

    Returns:
      ``(args_bar, backward_stats)``: the gradient and the backward solve's
      :class:`dj.SolveStats`, read off the stats probe.
    """
    def loss(args, probe):
        solution = dj.fixed_point(f, jnp.zeros_like(w), args, solver=solver, backward_stats_probe=probe)
        return jnp.vdot(solution.value, w)

    probe = jnp.zeros(len(dj.SolveStats._fields), jnp.float32)
    args_bar, probe_bar = jax.grad(loss, argnums=(0, 1))(args, probe)
    return args_bar, dj.SolveStats.from_array(probe_bar)


def deq_pass(f, params, x, w) -> dict:
    """Figure (b): one DEQ forward + backward pass with ``SOLVER_B``.

    Returns:
      A dict with table ``rows`` and ``traces`` for "DEQ forward" / "DEQ backward",
      ``z_star``, the explicit gradient ``grad`` (``(params_bar, x_bar)``), its
      ``grad_rel_diff`` from ``jax.grad`` through ``dj.fixed_point``, the probe's
      ``probe_stats`` and the ``jax_grad_s`` timings of that ``jax.grad``.
    """
    args = (params, x)
    progress("(b) DEQ forward: compile and solve")
    forward, fwd_compile, fwd_run = run_compiled(
        lambda a: dj.fixed_point(f, jnp.zeros_like(a[1]), a, solver=SOLVER_B), args)
    progress("(b) DEQ backward, explicit solve: compile and solve")
    (backward, grad), bwd_compile, bwd_run = run_compiled(
        lambda z, a, y: explicit_backward(f, SOLVER_B, z, a, y), forward.value, args, w)
    progress("(b) jax.grad through dj.fixed_point: compile and run")
    (reference_grad, probe_stats), grad_compile, grad_run = run_compiled(
        lambda a, y: implicit_grad(f, SOLVER_B, a, y), args, w)
    return {
        "rows": {"DEQ forward": summarize(forward, fwd_compile, fwd_run),
                 "DEQ backward": summarize(backward, bwd_compile, bwd_run)},
        "traces": {"DEQ forward": held_trace(forward), "DEQ backward": held_trace(backward)},
        "z_star": forward.value,
        "grad": grad,
        "grad_rel_diff": relative_diff(grad, reference_grad),
        "probe_stats": probe_stats,
        "jax_grad_s": (grad_compile, grad_run),
    }


def torch_layer(ref, cell: dj.nn.ResNetCell, channels: int, inner: int):
    """The chapter's ``ResNetLayer`` holding the JAX cell's weights.

    Kernels go HWIO -> OIHW and GroupNorm scale/bias -> weight/bias; ``strict``
    loading fails loudly if a name does not match.
    """
    import torch

    state = {}
    for name in ("conv1", "conv2"):
        kernel = np.asarray(getattr(cell, name).kernel[...]).transpose(3, 2, 0, 1)
        state[f"{name}.weight"] = torch.from_numpy(kernel.copy())
    for name in ("norm1", "norm2", "norm3"):
        norm = getattr(cell, name)
        state[f"{name}.weight"] = torch.from_numpy(np.asarray(norm.scale[...]).copy())
        state[f"{name}.bias"] = torch.from_numpy(np.asarray(norm.bias[...]).copy())
    layer = ref.ResNetLayer(channels, inner)
    layer.load_state_dict(state, strict=True)
    return layer


def torch_row(res: list, evals_before_first_residual: int, seconds: float) -> dict:
    """A row for the chapter's solvers, whose ``res`` is one batch-wide residual per step.

    Args:
      res: the chapter's residual list.
      evals_before_first_residual: f evaluations made before ``res[0]`` is recorded
        (2 for its Anderson, 1 for its forward iteration).
      seconds: wall time.
    """
    return {"steps": len(res) + evals_before_first_residual, "residual": res[-1],
            "converged": res[-1] < TOL, "run_s": seconds, "first_step": evals_before_first_residual + 1,
            "trace": np.asarray(res)}


def run_torch(ref, cell, flags, x, w) -> dict:
    """Runs the chapter's code on the same weights and inputs (NCHW).

    Returns:
      Rows by the same names as the JAX rows, plus ``z_star`` and ``x_grad`` (NHWC)
      of the chapter's DEQ layer.
    """
    import torch

    layer = torch_layer(ref, cell, flags.channels, flags.inner)
    xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
    wt = torch.from_numpy(np.asarray(w).transpose(0, 3, 1, 2).copy())
    rows = {}
    with torch.no_grad():
        layer(xt, xt)  # warm-up: the first call pays oneDNN's set-up, which is not the solver's time
        for name, call, skip in (
            ("Anderson", lambda: ref.anderson(lambda z: layer(z, xt), torch.zeros_like(xt), tol=TOL, beta=1.0), 2),
            ("Forward iteration", lambda: ref.forward_iteration(lambda z: layer(z, xt), torch.zeros_like(xt), tol=TOL), 1),
        ):
            progress(f"(torch) {name}")
            start = time.perf_counter()
            _, res = call()
            rows[name] = torch_row(res, skip, time.perf_counter() - start)
    progress("(torch) DEQ forward + backward")
    deq = ref.DEQFixedPoint(layer, ref.anderson, tol=TOL, max_iter=SOLVER_B.max_iter, beta=SOLVER_B.beta)
    xt.requires_grad_()
    start = time.perf_counter()
    out = deq(xt)
    forward_s = time.perf_counter() - start
    (out * wt).sum().backward()
    backward_s = time.perf_counter() - start - forward_s
    # The chapter's layer adds two f evaluations (tape re-engage, f0), not counted in steps.
    rows["DEQ forward"] = torch_row(deq.forward_res, 2, forward_s)
    rows["DEQ backward"] = torch_row(deq.backward_res, 2, backward_s)
    to_nhwc = lambda t: t.detach().numpy().transpose(0, 2, 3, 1)
    return {"rows": rows, "z_star": to_nhwc(out), "x_grad": to_nhwc(xt.grad)}


def plot_residuals(path: Path, traces: dict, torch_rows: dict | None, title: str, xlabel: str) -> None:
    """Writes a semilog plot: per-example residuals (thin), their batch mean (thick),
    the chapter's batch-wide residual (rings, if given) and the tolerance.

    Args:
      path: the PNG to write.
      traces: :func:`held_trace` arrays by curve name.
      torch_rows: :func:`torch_row` dicts by (at least) the same names, or None.
      title: the plot title.
      xlabel: the x-axis label.
    """
    fig = Figure(figsize=(7, 4.5), dpi=150)
    ax = fig.subplots()
    for i, (name, trace) in enumerate(traces.items()):
        color = f"C{i}"
        steps = np.arange(1, trace.shape[0] + 1)
        ax.semilogy(steps, trace, color=color, lw=0.6, alpha=0.3)
        ax.semilogy(steps, trace.mean(axis=1), color=color, lw=2,
                    label=f"{name}: deq_jax, mean of per-example residuals (thin: each example)")
        if torch_rows is not None:
            row = torch_rows[name]
            ax.semilogy(np.arange(row["first_step"], row["steps"] + 1), row["trace"], color=color, ls="none",
                        marker="o", mfc="none", ms=4, label=f"{name}: chapter's PyTorch code, batch-wide residual")
    ax.axhline(TOL, color="gray", ls=":", lw=1, label=f"tol = {TOL:g}")
    ax.set(title=title, xlabel=xlabel, ylabel="relative residual  ||f(z) - z|| / ||f(z)||")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def format_table(rows: dict, torch_rows: dict | None) -> str:
    """The markdown table of every solve, with the chapter's numbers beside ours if given."""
    header = ["solve", "steps mean", "steps max", "residual mean", "residual max", "converged",
              "compile s", "run s"]
    if torch_rows is not None:
        header += ["chapter steps", "chapter residual (batch-wide)", "chapter converged", "chapter s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in rows.items():
        cells = [name, f"{r['steps_mean']:.1f}", str(r["steps_max"]), f"{r['residual_mean']:.2e}",
                 f"{r['residual_max']:.2e}", f"{r['converged']:.0%}", f"{r['compile_s']:.2f}", f"{r['run_s']:.2f}"]
        if torch_rows is not None:
            t = torch_rows[name]
            cells += [str(t["steps"]), f"{t['residual']:.2e}", "yes" if t["converged"] else "no", f"{t['run_s']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    """Runs both experiments, writes both PNGs into ``--out`` and prints the table.

    Args:
      argv: command-line arguments; ``sys.argv[1:]`` if None.

    Returns:
      ``rows`` (table rows by solve), ``grad_rel_diff`` (explicit backward vs
      ``jax.grad`` through ``dj.fixed_point``), ``probe_stats``, ``figures`` (paths)
      and, with ``--torch``, ``torch`` (the chapter's rows) and ``torch_rel_diff``
      (relative L2 difference of z* and of dL/dx).
    """
    flags = parse_args(argv)
    flags.out.mkdir(parents=True, exist_ok=True)
    cell, f, params, x, w = make_problem(flags)
    rows, traces = compare_solvers(f, params, x)
    deq = deq_pass(f, params, x, w)
    rows.update(deq["rows"])
    result = {"rows": rows, "grad_rel_diff": deq["grad_rel_diff"], "probe_stats": deq["probe_stats"]}

    torch_rows = None
    ref = load_reference() if flags.torch else None
    if flags.torch and ref is None:
        print(f"--torch: {REFERENCE} or torch not found, skipping the chapter's code")
    if ref is not None:
        chapter = run_torch(ref, cell, flags, x, w)
        torch_rows = result["torch"] = chapter["rows"]
        # An L2 norm, not the max: the chapter takes df/dx at its iterate X but J_f at f(X), so
        # the few ReLU inputs whose sign differs between the two points change elementwise.
        result["torch_rel_diff"] = {"z_star": relative_diff(deq["z_star"], chapter["z_star"]),
                                    "dL/dx": relative_diff(deq["grad"][1], chapter["x_grad"])}

    shape = "x".join(map(str, x.shape))
    result["figures"] = [flags.out / "anderson_vs_forward.png", flags.out / "forward_vs_backward.png"]
    plot_residuals(result["figures"][0], traces, torch_rows,
                   f"Anderson (m=5, beta=1) vs forward iteration, x: {shape}", "f evaluations")
    plot_residuals(result["figures"][1], deq["traces"], torch_rows,
                   f"One DEQ pass, Anderson (beta=2, max_iter={SOLVER_B.max_iter}), x: {shape}",
                   "solver steps (forward: f evaluations, backward: VJPs)")

    print(f"\nx: {shape}, tol {TOL:g}; steps = f evaluations (backward: VJPs), residuals per example, "
          f"run s excludes compilation\n")
    print(format_table(rows, torch_rows))
    print(f"\nexplicit backward solve vs jax.grad through dj.fixed_point: relative L2 difference "
          f"{deq['grad_rel_diff']:.2e}")
    print("backward stats from dj.fixed_point's probe: "
          + ", ".join(f"{k} {float(v):.3g}" for k, v in deq["probe_stats"]._asdict().items()))
    print(f"jax.grad (forward + backward) compile {deq['jax_grad_s'][0]:.2f} s, run {deq['jax_grad_s'][1]:.2f} s")
    if "torch_rel_diff" in result:
        print("deq_jax vs chapter's DEQ layer, relative L2 difference: "
              + ", ".join(f"{k} {v:.2e}" for k, v in result["torch_rel_diff"].items()))
    print("figures: " + ", ".join(map(str, result["figures"])))
    return result


if __name__ == "__main__":
    main()
