"""Q4. Memory of forward + backward as max_iter grows: implicit (deq_jax) vs unrolled backprop.

One gradient of ``sum(z_N * w)`` w.r.t. the cell's weights and x, where ``z_N`` comes
from N = max_iter solver steps on the CIFAR model's cell (``ResNetCell(48, 64)``,
batch 32 of 32x32, x ~ N(0, 1)); tol 1e-30 so every solve runs all N steps:
  - deq_jax: ``dj.fixed_point`` with Anderson (m=5) forward and backward;
  - unrolled: ``jax.grad`` through ``lax.fori_loop(0, N, f)`` (a scan that stores every step);
  - the chapter's PyTorch layer (``DEQFixedPoint`` with its ``anderson``), same cell
    weights and inputs, ``.backward()``.

Two measures, both per contender and N:
  - XLA temp (JAX only): ``jit(grad).lower(...).compile().memory_analysis()``'s
    ``temp_size_in_bytes``, the scratch memory XLA allocates for every intermediate
    (arguments and outputs excluded). Exact, no run needed.
  - peak RSS increase: in a fresh subprocess, once everything is built (JAX: compiled
    ahead of time), the kernel's peak-RSS counter is reset (``/proc/self/clear_refs``)
    and the first forward + backward runs; reported is that peak minus the RSS just
    before it, i.e. the extra resident memory the call needed, whatever allocated it
    (XLA, PyTorch, Python). The first call, because allocators keep memory resident
    afterwards: XLA:CPU's scratch buffer stays mapped (a second call needs ~0 new MB)
    while PyTorch returns large tensors to the OS. Linux only; n/a elsewhere. On an
    accelerator (JAX's default device, PyTorch on CUDA when available) the peak is of
    device memory instead: JAX's ``memory_stats()`` peak minus bytes in use before,
    PyTorch's ``max_memory_allocated()`` minus ``memory_allocated()`` before.

It takes ~23 minutes on 2 CPU cores, nearly all in the unrolled baseline: its backward
pass needs the convolutions' kernel gradients inside a loop, which XLA:CPU runs slowly
there: 77 s for the whole N = 10 measurement against 7 s for deq_jax and for PyTorch
(``time python -m experiments.benchmarks.memory --child unrolled 10 48 64 32 32``, and
``deq_jax``/``torch`` in place of ``unrolled``).

Usage:
  python -m experiments.benchmarks.memory [--quick] [--repeats N]
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

import deq_jax as dj

from . import common

SIZES = {"full": {"cell": (48, 64, 32, 32), "max_iters": (10, 25, 50, 100)},
         "quick": {"cell": (8, 16, 2, 8), "max_iters": (3, 12)}}  # the chapter's anderson needs >= 3
KINDS = ("deq_jax", "unrolled", "torch")
MB = 2.0 ** 20


def jax_loss(kind: str, n: int, f, w):
    """The loss of ``(params, x)`` whose gradient is measured."""
    if kind == "deq_jax":
        solver = dj.Anderson(m=5, tol=1e-30, max_iter=n)

        def loss(args):
            return jnp.vdot(dj.fixed_point(f, jnp.zeros_like(args[1]), args, solver=solver).value, w)
    else:
        def loss(args):
            return jnp.vdot(jax.lax.fori_loop(0, n, lambda _, z: f(z, args), jnp.zeros_like(args[1])), w)
    return loss


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_peak_mb(call) -> float | None:
    """Extra resident memory (MB) of ``call()``: peak RSS during it minus RSS before; None off Linux."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kb("VmRSS")
    except OSError:
        call()
        return None
    call()
    return (_status_kb("VmHWM") - before) * 1024 / MB


def jax_device_peak_mb(call) -> float:
    """Extra accelerator memory (MB) of ``call()``: the device's peak bytes in use minus those in use before.

    The peak counter cannot be reset, so this relies on running in a fresh process
    whose setup needed less memory than the call.
    """
    device = jax.devices()[0]
    before = device.memory_stats()["bytes_in_use"]
    call()
    return (device.memory_stats()["peak_bytes_in_use"] - before) / MB


def torch_cuda_peak_mb(call) -> float:
    """Extra CUDA memory (MB) PyTorch's tensors needed during ``call()``."""
    import torch

    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / MB


def measure(kind: str, n: int, sizes) -> dict:
    """Both measures of one contender, in this process.

    Args:
      kind: 'deq_jax', 'unrolled' or 'torch'.
      n: solver steps.
      sizes: ``(channels, inner, batch, size)``.

    Returns:
      ``{"temp_mb": XLA temp (None for torch), "peak_mb": extra MB of the first forward +
      backward: resident memory on the CPU (None off Linux), device memory on an
      accelerator (None for torch without the chapter's code)}``.
    """
    cell, f, params, x, w = common.cell_problem(*sizes)
    temp_mb = None
    if kind == "torch":
        ref = common.load_reference()
        if ref is None:
            return {"temp_mb": None, "peak_mb": None}
        import torch

        on_cuda = common.torch_device().type == "cuda"
        if not on_cuda:
            torch.set_num_threads(1)  # as fast as 2 here (see vs_pytorch); memory does not depend on it
        deq = ref.DEQFixedPoint(common.torch_cell(ref, cell), ref.anderson, tol=1e-30, max_iter=n, m=5)
        xt, wt = common.nchw(x), common.nchw(w)

        def call():
            xg = xt.clone().requires_grad_()
            (deq(xg) * wt).sum().backward()

        peak = torch_cuda_peak_mb if on_cuda else rss_peak_mb
    else:
        grad = jax.jit(jax.grad(jax_loss(kind, n, f, w))).lower((params, x)).compile()
        temp_mb = grad.memory_analysis().temp_size_in_bytes / MB

        def call():
            common.block(grad((params, x)))

        peak = rss_peak_mb if jax.devices()[0].platform == "cpu" else jax_device_peak_mb
    return {"temp_mb": temp_mb, "peak_mb": peak(call)}


def child_main(argv) -> None:
    """``--child KIND N C I B S``: prints :func:`measure` as JSON (run in a fresh process)."""
    kind, n, *sizes = argv
    print(json.dumps(measure(kind, int(n), tuple(int(s) for s in sizes))))


def measure_in_subprocess(kind: str, n: int, sizes) -> dict:
    """:func:`measure` in a fresh Python, so earlier measurements leave nothing behind."""
    cmd = [sys.executable, "-m", "experiments.benchmarks.memory", "--child", kind, str(n), *map(str, sizes)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[2])
    return json.loads(out.stdout.strip().splitlines()[-1])


def mb(value) -> str:
    """Megabytes for the table, n/a for None."""
    return "n/a" if value is None else f"{value:.1f}"


def run(quick: bool = False, repeats: int | None = None) -> common.Result:
    """Both measures for every contender and max_iter; see the module docstring.

    In quick mode the RSS measures run in this process (no subprocesses), so they are
    only indicative; ``repeats`` is unused (memory does not need repeating).
    """
    del repeats
    sizes = SIZES["quick" if quick else "full"]
    before = common.load()
    torch_ok = common.load_reference() is not None
    rows = []
    for n in sizes["max_iters"]:
        r = {"max_iter": n}
        for kind in KINDS:
            m = measure(kind, n, sizes["cell"]) if quick else measure_in_subprocess(kind, n, sizes["cell"])
            r[f"{kind}_temp_mb"], r[f"{kind}_peak_mb"] = m["temp_mb"], m["peak_mb"]
        rows.append(r)
    header = ["max_iter", "deq_jax: XLA temp (MB)", "unrolled: XLA temp (MB)", "deq_jax: peak +MB",
              "unrolled: peak +MB", "PyTorch (chapter): peak +MB"]
    table = common.markdown_table(header, [
        [r["max_iter"], f"{r['deq_jax_temp_mb']:.1f}", f"{r['unrolled_temp_mb']:.1f}", mb(r["deq_jax_peak_mb"]),
         mb(r["unrolled_peak_mb"]), mb(r["torch_peak_mb"])] for r in rows])
    channels, inner, batch, size = sizes["cell"]
    z_mb = batch * size * size * channels * 4 / MB
    notes = [
        f"ResNetCell({channels},{inner}), batch {batch} of {size}x{size}: one z is {z_mb:.1f} MB (float32); "
        "every solve runs exactly max_iter steps forward (and backward for the implicit ones).",
        "XLA temp: compiled.memory_analysis().temp_size_in_bytes of jit(grad(loss)), i.e. XLA's scratch "
        "allocation for all intermediates (the 5-slot Anderson history, the backward solve, the stored steps of "
        "the unrolled scan); arguments and outputs excluded.",
        "peak +MB: on the CPU, peak resident memory during the first forward + backward (JAX: compiled before) "
        "minus the resident memory just before it, including whatever the framework allocates (XLA buffers, "
        "PyTorch tensors and autograd graph); on an accelerator, device memory (JAX: the device's "
        "peak_bytes_in_use minus bytes_in_use before; PyTorch: torch.cuda.max_memory_allocated minus "
        "memory_allocated before); " + ("in this process (quick mode)" if quick else "each in a fresh subprocess") + ".",
    ]
    if not torch_ok:
        notes.append("PyTorch or the chapter's code not found: no PyTorch column.")
    return common.Result("Q4. Memory of forward + backward vs max_iter", table, rows, notes, (before, common.load()))


def main(argv=None) -> common.Result | None:
    """Command-line entry point: prints the table (or, with ``--child``, one measurement)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child_main(argv[1:])
        return None
    return common.cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
