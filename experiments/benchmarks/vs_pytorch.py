"""Q2. deq_jax against the chapter's PyTorch code: same problems, inputs, weights, machine.

Four workloads, each run back to back (alternating, median over rounds):
  1. forward solve of the chapter's demo (``ResNetCell(64, 128)``, x ~ N(0, 1) of
     10x32x32x64, z0 = 0, tol 1e-4, max_iter 50), Anderson (m=5, beta=1) and forward
     iteration: the chapter's ``anderson`` / ``forward_iteration`` under
     ``torch.no_grad()`` against ``dj.Anderson`` / ``dj.ForwardIteration`` (jitted);
  2. forward + backward of the chapter's DEQ layer (Anderson, beta=2, tol 1e-4,
     max_iter 100; loss sum(z* * w), w ~ N(0, 1); gradients for the cell's weights and
     x): ``DEQFixedPoint(...)`` + ``.backward()`` against ``jax.grad`` through
     ``dj.fixed_point`` (jitted);
  3. one training step of the chapter's CIFAR-10 model (Adam, cross-entropy, the
     chapter's solver settings: Anderson m=5, tol 1e-2, max_iter 25 forward and
     backward) at batch 32 and 100 (``--batches``) on CIFAR-10 training images:
     ``make_cifar_model()`` + ``optim.Adam`` against the experiment's jitted
     ``train_step``, all starting from the same weights and training on the same
     batches. deq_jax runs once per form of the cell's convolution
     (``loop_friendly_conv``, ``lax.conv_general_dilated``; ``common.CONVS``) and, where
     the experiment's ``CifarDEQ`` takes a ``dtype``, also in bfloat16 (``--dtypes``),
     all in the same interleaved rounds, so one run says which form is faster; in the
     same rounds, on the same batches, deq_jax also trains with the recommended (docs/benchmarks.md, Q8)
     setting (``--gradient phantom --f-max-iter 12``: Anderson capped at 12 f evaluations,
     Phantom(1)) and with Broyden (``--solver broyden``, the chapter's settings otherwise),
     in the first convolution form and dtype (``--settings``);
  4. one MDEQ-tiny training step (official recipe, batch 128) against the official
     PyTorch code on the same weights and batches (``mdeq_vs_official``; skipped where
     the official code is absent).

Weights are copied from JAX to PyTorch (HWIO -> OIHW kernels, GroupNorm/BatchNorm
scale/bias -> weight/bias, the linear layer's inputs reordered from HWC to CHW) and
inputs go NHWC -> NCHW. JAX runs on its default device, PyTorch on CUDA when
available (synchronised inside every timed call), else on the CPU with one thread
per core and with one thread; the ratio uses its faster setting.

Usage:
  python -m experiments.benchmarks.vs_pytorch [--quick] [--repeats N] [--batches B ...]
      [--dtypes float32 bfloat16] [--workloads solve layer train]
      [--settings chapter recommended broyden] [--json PATH] [--synthetic-data]
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import deq_jax as dj
from experiments.cifar10.input_pipeline import normalize

from . import common

try:
    import torch
except ImportError:  # the PyTorch column is n/a; nothing below touches torch without the reference
    torch = None

SIZES = {
    "full": {"cell": (64, 128, 10, 32), "batches": (32, 100)},
    "quick": {"cell": (8, 16, 2, 8), "batches": (4,)},
}
TOL = 1e-4
WORKLOADS = ("solve", "layer", "train", "mdeq")
DTYPES = ("float32", "bfloat16")
# deq_jax's training-step settings: overrides of the experiment's Config (its defaults are the
# chapter's). "recommended" is docs/benchmarks.md's (and ablation.RECOMMENDED's) setting.
SETTINGS = {
    "chapter": (),
    "recommended": (("gradient", "phantom"), ("f_max_iter", 12)),
    "broyden": (("solver", "broyden"),),
}
CHAPTER = "chapter's"  # the setting column of rows at the chapter's settings


def setting_label(name: str) -> str:
    """A setting's name for the table, with the ``experiments.cifar10`` flags that train with it."""
    overrides = SETTINGS[name]
    if not overrides:
        return CHAPTER
    flags = " ".join(f"--{key.replace('_', '-')} {value}" for key, value in overrides)
    return f"{name} ({flags})"


def forward_solves(ref, sizes, repeats, quick) -> list[dict]:
    """Workload 1: the chapter's solvers against ours on the demo problem."""
    cell, f, params, x, _ = common.cell_problem(*sizes)
    layer, xt = (common.torch_cell(ref, cell), common.nchw(x)) if ref else (None, None)
    ours = {
        "Anderson": dj.Anderson(m=5, lam=1e-4, beta=1.0, tol=TOL, max_iter=50),
        "forward iteration": dj.ForwardIteration(tol=TOL, max_iter=50),
    }
    theirs = {
        "Anderson": lambda: ref.anderson(lambda z: layer(z, xt), torch.zeros_like(xt), m=5, lam=1e-4, tol=TOL, beta=1.0),
        "forward iteration": lambda: ref.forward_iteration(lambda z: layer(z, xt), torch.zeros_like(xt), tol=TOL),
    }
    # f evaluations the chapter's functions make before their first residual.
    first = {"Anderson": 2, "forward iteration": 1}
    rows = []
    for name, solver in ours.items():
        solve = jax.jit(lambda a, s=solver: s(lambda z: f(z, a), jnp.zeros_like(a[1])))
        sol = common.block(solve((params, x)))
        fns = {"deq_jax": lambda: common.block(solve((params, x)))}
        torch_evals = None
        if ref is not None:
            def chapter(name=name):
                with torch.no_grad():
                    return theirs[name]()
            torch_evals = len(chapter()[1]) + first[name]
            fns.update(torch_contenders(chapter, quick))
        times = common.interleaved(fns, repeats)
        rows.append(row(f"forward solve, {name}", times.pop("deq_jax"), times, int(np.max(sol.num_steps)),
                        torch_evals))
    return rows


def deq_layer(ref, sizes, repeats, quick) -> list[dict]:
    """Workload 2: one forward + backward pass of the chapter's DEQ layer."""
    cell, f, params, x, w = common.cell_problem(*sizes)
    solver = dj.Anderson(m=5, lam=1e-4, beta=2.0, tol=TOL, max_iter=100)

    def loss(args, probe):
        sol = dj.fixed_point(f, jnp.zeros_like(args[1]), args, solver=solver, backward_stats_probe=probe)
        return jnp.vdot(sol.value, w), sol.num_steps

    grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
    probe = jnp.zeros(len(dj.SolveStats._fields), jnp.float32)
    (args_bar, probe_bar), steps = common.block(grad((params, x), probe))
    backward = dj.SolveStats.from_array(probe_bar)
    # Forward: the solver's f evaluations; backward: one f (the linearisation) + one VJP per step.
    ours_evals = f"{int(np.max(steps))} f + 1 f, {int(backward.max_steps)} VJP"
    fns = {"deq_jax": lambda: common.block(grad((params, x), probe))}
    torch_evals, agreement = None, None
    if ref is not None:
        layer = common.torch_cell(ref, cell)
        deq = ref.DEQFixedPoint(layer, ref.anderson, tol=TOL, max_iter=100, beta=2.0)
        xt, wt = common.nchw(x), common.nchw(w)

        def chapter():
            xg = xt.clone().requires_grad_()
            layer.zero_grad()
            out = deq(xg)
            (out * wt).sum().backward()
            return out, xg.grad

        out, x_grad = chapter()
        # The chapter's layer: solver + 2 f (re-engaging the tape, f0); backward: one VJP per step.
        torch_evals = f"{len(deq.forward_res) + 2} f + 2 f, {len(deq.backward_res) + 2} VJP"
        agreement = common.relative_diff(args_bar[1], x_grad.cpu().numpy().transpose(0, 2, 3, 1))
        fns.update(torch_contenders(chapter, quick))
    times = common.interleaved(fns, repeats)
    r = row("DEQ layer forward + backward (beta=2)", times.pop("deq_jax"), times, ours_evals, torch_evals)
    r["note"] = "" if agreement is None else f"dL/dx rel. diff {agreement:.1e}"
    return [r]


def torch_cifar_model(ref, model_def, state):
    """The chapter's ``make_cifar_model()`` holding the JAX model's weights and BN statistics."""
    model = model_def.merge(state["params"], state["batch_stats"])
    net = ref.make_cifar_model()
    sd = {"0.weight": common.conv_weight(model.stem.kernel[...]), "0.bias": torch.from_numpy(np.array(model.stem.bias[...]))}
    for index, norm in ((1, model.norm_in), (3, model.norm_out)):
        sd[f"{index}.weight"] = torch.from_numpy(np.array(norm.scale[...]))
        sd[f"{index}.bias"] = torch.from_numpy(np.array(norm.bias[...]))
        sd[f"{index}.running_mean"] = torch.from_numpy(np.array(norm.mean[...]))
        sd[f"{index}.running_var"] = torch.from_numpy(np.array(norm.var[...]))
        sd[f"{index}.num_batches_tracked"] = torch.tensor(0)
    sd.update(common.cell_state_dict(model.deq.cell, prefix="2.f."))
    kernel = np.asarray(model.head.kernel[...])  # [768, 10], inputs in (h, w, c) order
    channels = model.norm_out.num_features
    side = int(round((kernel.shape[0] // channels) ** 0.5))
    sd["6.weight"] = torch.from_numpy(np.ascontiguousarray(
        kernel.reshape(side, side, channels, -1).transpose(3, 2, 0, 1).reshape(kernel.shape[1], -1)))
    sd["6.bias"] = torch.from_numpy(np.array(model.head.bias[...]))
    net.load_state_dict(sd, strict=True)
    return net.to(common.torch_device())


def training_steps(ref, batch_size, repeats, quick, dtypes, settings=tuple(SETTINGS)) -> list[dict]:
    """Workload 3: optimizer steps of the CIFAR-10 model, every contender from the same weights.

    Every contender trains on the same sequence of batches (its warm-up call on the
    first, round r on batch r + 1), as training would: a step on one batch over and over
    overfits it and drifts into harder fixed points than training meets. At the chapter's
    settings one row per deq_jax variant (convolution form x dtype); at each other setting
    one row, in the first variant's form and dtype; all against the same PyTorch times.
    """
    batches, source = common.cifar_batches(batch_size, repeats + 1)
    first_conv, first_dtype = next(iter(common.CONVS)), dtypes[0]
    # (setting, conv, dtype) of every deq_jax contender; the chapter's setting first, when asked for.
    runs = [("chapter", conv, dtype) for dtype in dtypes for conv in common.CONVS] if "chapter" in settings else []
    runs += [(name, first_conv, first_dtype) for name in settings if name != "chapter"]
    # float32 is the model's own default: no dtype argument, so it runs whether or not CifarDEQ takes one.
    variants = {(name, conv, dtype): common.cifar_train_step(
        batch_size, conv=conv, dtype=None if dtype == "float32" else dtype, settings=SETTINGS[name])
        for name, conv, dtype in runs}
    fns, histories, torch_history = {}, {}, None
    if ref is not None:  # built before any step runs: the steps donate (delete) the states they are given
        model_def, state, _ = next(iter(variants.values()))
        torch_fns, torch_history = torch_training(ref, model_def, state, batches, quick)
        fns.update(torch_fns)
    for key, (_, state, step) in variants.items():
        fns[contender_name(*key)], histories[key] = jax_training(step, state, batches)
    times = common.interleaved(fns, repeats)
    torch_times = {k: v for k, v in times.items() if k.startswith("PyTorch")}
    first = next(iter(variants))
    first_name = variant_name(*first[1:]) + ("" if len(settings) == 1 else f", {setting_label(first[0])} setting")
    rows = []
    for key, history in histories.items():
        name, conv, dtype = key
        config = dict(SETTINGS[name])
        phantom_steps = config.get("phantom_steps", 1) if config.get("gradient") == "phantom" else None
        ours = times[contender_name(*key)]
        r = row(f"training step, batch {batch_size}, {variant_name(conv, dtype)}", ours, torch_times,
                evals(history, 1, phantom_steps), None if torch_history is None else evals(torch_history, 2),
                batch_size, setting=setting_label(name))
        r["vs_first"] = ours / times[contender_name(*first)]
        r["note"] = source if key == first else f"{r['vs_first']:.2f}x the time of {first_name}"
        rows.append(r)
    return rows


def contender_name(setting: str, conv: str, dtype: str) -> str:
    """A deq_jax training-step contender's name in the timed rounds (never 'PyTorch ...')."""
    return f"deq_jax {setting}: {variant_name(conv, dtype)}"


def variant_name(conv: str, dtype: str) -> str:
    """A deq_jax training-step variant's name: the convolution form, and the dtype unless float32."""
    return conv if dtype == "float32" else f"{conv}, {dtype}"


def jax_training(step, state, batches):
    """A deq_jax contender training from ``state`` on ``batches``, and its list of (fwd, bwd) solver steps."""
    ours = {"state": state}
    history = []

    def jax_step(images, labels):
        # Block on the new state as well as the metrics: the timed call covers the whole step.
        ours["state"], metrics = common.block(step(ours["state"], images, labels))
        metrics = jax.device_get(metrics)
        # No backward solve (phantom gradients), no backward stats.
        history.append((metrics["fwd_steps_max"], metrics.get("bwd_steps_max", np.nan)))

    return on_batches(jax_step, batches), history


def torch_training(ref, model_def, state, batches, quick):
    """The chapter's model and Adam, holding the JAX weights, as timed contenders on ``batches``.

    Returns:
      ``(contenders, history)``: name -> callable, and the list of (fwd, bwd) solver steps per call.
    """
    net = torch_cifar_model(ref, model_def, state)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    deq, device = net[2], common.torch_device()
    history = []

    def torch_step(images, labels):
        opt.zero_grad()
        logits = net(common.nchw(normalize(images)))
        target = torch.from_numpy(labels.astype(np.int64)).to(device)
        torch.nn.functional.cross_entropy(logits, target).backward()
        opt.step()
        history.append((len(deq.forward_res) + 2, len(deq.backward_res) + 2))

    return {name: on_batches(fn, batches) for name, fn in torch_contenders(torch_step, quick).items()}, history


def evals(history, extra, phantom_steps=None) -> str:
    """Mean forward f evaluations (+ ``extra`` layer calls) and backward VJPs over a contender's calls.

    With ``phantom_steps`` (a phantom gradient, no backward solve) the backward is that
    many f evaluations, each with its VJP, unrolled from the fixed point.
    """
    fwd, bwd = np.mean(history, axis=0)
    if phantom_steps is not None:
        return f"{fwd:.1f} f + {phantom_steps} f, {phantom_steps} VJP (phantom)"
    return f"{fwd:.1f} f + {extra} f, {bwd:.1f} VJP"


def on_batches(step, batches):
    """A no-argument callable whose n-th call runs ``step(images, labels)`` on batch n."""
    position = iter(range(len(batches)))
    return lambda: step(*batches[next(position)])


def torch_contenders(fn, quick: bool) -> dict:
    """``fn`` as timed PyTorch contenders: on CUDA one, synchronised; on the CPU one per thread setting.

    On CUDA the callable ends with ``torch.cuda.synchronize()`` (:func:`common.torch_synchronized`).
    On the CPU, ``fn`` runs with one thread per core and with a single thread: on a 2-core
    machine that other processes also load, PyTorch's OpenMP regions wait for a
    descheduled second thread at every operation (measured here, the chapter's Anderson
    solve took 4.6 s with 2 threads and 0.7 s with 1). Both settings are timed and the
    ratio uses the faster, so PyTorch is never handicapped (quick mode: one thread only).
    """
    if common.torch_device().type == "cuda":
        return {"PyTorch cuda": common.torch_synchronized(fn)}

    def with_threads(n):
        def call(*args):
            torch.set_num_threads(n)
            return fn(*args)
        return call

    many = common.set_torch_threads()
    if quick or many == 1:
        return {"PyTorch 1t": with_threads(1)}
    return {f"PyTorch {many}t": with_threads(many), "PyTorch 1t": with_threads(1)}


def row(workload, ours, torch_times, ours_evals, torch_evals, batch=None, setting=CHAPTER) -> dict:
    """A table row: deq_jax's seconds, PyTorch's per thread setting, the ratio to PyTorch's faster one.

    With ``batch`` (training steps) it also holds both sides' images per second;
    ``setting`` is deq_jax's solver and gradient setting (:func:`setting_label`).
    """
    best = min(torch_times, key=torch_times.get) if torch_times else None
    torch_s = torch_times.get(best)
    per_s = lambda seconds: None if batch is None or seconds is None else batch / seconds
    return {"workload": workload, "setting": setting, "deq_jax_s": ours, "torch_s": torch_s, "torch_threads": best,
            "torch_all": torch_times, "ratio": None if best is None else ours / torch_s,
            "deq_jax_images_per_s": per_s(ours), "torch_images_per_s": per_s(torch_s),
            "deq_jax_evals": ours_evals, "torch_evals": torch_evals, "note": ""}


def run(quick: bool = False, repeats: int | None = None, batches=None, dtypes=DTYPES,
        workloads=WORKLOADS, settings=tuple(SETTINGS)) -> common.Result:
    """The chosen workloads; the PyTorch column is n/a where torch or the chapter's code is absent.

    Args:
      quick: tiny sizes (checks that it runs).
      repeats: timed rounds (default: 5, quick: 2).
      batches: training-step batch sizes (default: 32 and 100; quick: 4).
      dtypes: deq_jax's training-step dtypes; 'bfloat16' is skipped, with a note, when
        the experiment's ``CifarDEQ`` has no ``dtype`` parameter.
      workloads: any of ``WORKLOADS``: forward solves, the DEQ layer, training steps, the MDEQ step.
      settings: deq_jax's training-step settings, keys of ``SETTINGS``: the chapter's (every
        convolution form and dtype), and each other one in the first form and dtype.
    """
    repeats = common.repeats_or_default(repeats, quick)
    sizes = SIZES["quick" if quick else "full"]
    ref = common.load_reference()
    before = common.load()
    notes, dtypes = dtype_notes(dtypes)
    rows = []
    if "solve" in workloads:
        rows += forward_solves(ref, sizes["cell"], repeats, quick)
    if "layer" in workloads:
        rows += deq_layer(ref, sizes["cell"], repeats, quick)
    if "train" in workloads:
        for batch_size in batches or sizes["batches"]:
            rows += training_steps(ref, batch_size, repeats, quick, dtypes, settings)
    if "mdeq" in workloads:
        from . import mdeq_vs_official  # it builds on this module's rows

        mdeq_rows, mdeq_notes = mdeq_vs_official.training_rows(repeats, quick)
        rows, notes = rows + mdeq_rows, notes + mdeq_notes
    notes = table_notes(ref, sizes) + notes
    return common.Result("Q2. deq_jax vs the chapter's PyTorch code", table(rows), rows, notes,
                         (before, common.load()))


def dtype_notes(dtypes) -> tuple[list[str], list[str]]:
    """Notes on the dtypes that cannot run, and the dtypes that can."""
    if "bfloat16" in dtypes and not common.model_takes_dtype():
        return (["bfloat16 training step skipped: experiments.cifar10.model.CifarDEQ has no dtype parameter."],
                [d for d in dtypes if d != "bfloat16"])
    return [], list(dtypes)


def table(rows) -> str:
    """The markdown table of the rows."""
    header = ["workload", "setting", "deq_jax (s)", "PyTorch (s), best", "PyTorch (s), all settings", "deq_jax / PyTorch",
              "images/s: deq_jax / PyTorch", "deq_jax f evals", "PyTorch f evals", "note"]
    number = lambda value, digits: "n/a" if value is None else f"{value:.{digits}f}"
    return common.markdown_table(header, [
        [r["workload"], r["setting"], f"{r['deq_jax_s']:.3f}",
         "n/a" if r["torch_s"] is None else f"{r['torch_s']:.3f} ({r['torch_threads'].split()[1]})",
         ", ".join(f"{k.split()[1]}: {v:.3f}" for k, v in r["torch_all"].items()) or "n/a",
         "n/a" if r["ratio"] is None else f"**{r['ratio']:.2f}**",
         "n/a" if r["deq_jax_images_per_s"] is None else
         f"{r['deq_jax_images_per_s']:.1f} / {number(r['torch_images_per_s'], 1)}",
         r["deq_jax_evals"], r["torch_evals"] or "n/a", r["note"]] for r in rows])


def table_notes(ref, sizes) -> list[str]:
    """What the columns mean and how each side ran."""
    if ref is None:
        return ["PyTorch or ../shared/reference/seed_deq_torch.py not found: deq_jax only."]
    channels, inner, batch, size = sizes["cell"]
    notes = [
        f"solve and layer rows: ResNetCell({channels},{inner}), x {batch}x{size}x{size}x{channels} ~ N(0, 1), "
        f"tol {TOL:g}; training steps: the chapter's CIFAR-10 model and settings (Anderson m=5, tol 1e-2, "
        "max_iter 25 both ways), one row per deq_jax variant (the cell's convolution form, dtype), all against "
        "the same PyTorch times (float32).",
        "seconds: median over rounds in which all contenders alternate; deq_jax's functions are jitted and compiled "
        "before timing, every timed call blocks on all its outputs (PyTorch on CUDA: torch.cuda.synchronize()); "
        "warm-up calls are not timed. images/s: batch / median seconds.",
        "f evals: forward f evaluations (+ the extra f calls of the layer), backward VJPs; deq_jax's solve stops each "
        "example on its own residual and runs until the slowest one stops, the chapter's stops on one batch-wide residual.",
        "training steps: all start from identical weights and train on the same sequence of CIFAR-10 batches (one "
        "per round), so their step counts drift apart slightly; f evals are means over the rounds; the note of "
        f"each later variant gives its time relative to the first ({variant_name(next(iter(common.CONVS)), 'float32')}"
        ", the chapter's setting).",
        "setting: deq_jax's solver and gradient, with the flags of python -m experiments.cifar10 that train with it; "
        "chapter's: Anderson (m=5, tol 1e-2, at most 25 f evaluations) and the implicit gradient (backward solve: "
        "Anderson, tol 1e-2, at most 25 steps); recommended: the same Anderson capped at 12 f evaluations and "
        "Phantom(1) (one f evaluation and its VJP from the fixed point, no backward solve); broyden: Broyden for "
        "both solves, the chapter's tolerances and caps.",
    ]
    if common.torch_device().type == "cuda":
        notes.append(f"PyTorch on CUDA: cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
                     f"cuda.matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}; "
                     f"JAX's jax_default_matmul_precision={jax.config.jax_default_matmul_precision}.")
    else:
        notes.append(
            f"PyTorch runs with {common.cpu_threads()} threads (one per core, as XLA:CPU uses) and with 1 "
            "thread, alternating with deq_jax; the ratio uses PyTorch's faster setting (when other jobs load this "
            "2-core machine that is 1 thread: with 2, every OpenMP region waits for a descheduled thread). deq_jax "
            "uses XLA:CPU's default thread pool.")
    return notes


def add_flags(parser: argparse.ArgumentParser) -> None:
    """vs_pytorch's own flags (see the module docstring)."""
    parser.add_argument("--batches", type=int, nargs="+", help="training-step batch sizes (default: 32 100)")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=DTYPES,
                        help="deq_jax's training-step dtypes (bfloat16 only where CifarDEQ takes a dtype)")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=WORKLOADS,
                        help="solve: forward solves; layer: DEQ layer forward + backward; train: training steps; "
                             "mdeq: an MDEQ-tiny training step against the official PyTorch code")
    parser.add_argument("--settings", nargs="+", choices=tuple(SETTINGS), default=tuple(SETTINGS),
                        help="deq_jax's training-step settings: the chapter's (every convolution form and dtype), "
                             "recommended (--gradient phantom --f-max-iter 12) and broyden (--solver broyden), "
                             "each in the first form and dtype")


def main(argv=None) -> common.Result:
    """Command-line entry point: prints the table."""
    return common.cli(run, __doc__, argv, add_flags)


if __name__ == "__main__":
    main()
