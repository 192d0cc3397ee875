"""What every benchmark shares: problems, side-by-side timing, tables, the chapter's PyTorch code.

Timings on a shared machine drift with the load other processes put on it, so a
benchmark never compares numbers taken at different moments: the contenders run
in alternation, one call each per round, and each reports the median over rounds
(:func:`interleaved`); every table records the load average while it ran and the
device each framework ran on (:func:`devices`).

JAX runs on its default device; PyTorch on CUDA when ``torch.cuda.is_available()``
(:func:`torch_device`), else on the CPU. Both frameworks return before the device
has finished (JAX dispatches asynchronously, CUDA kernels are queued), so every
timed callable waits for its results: :func:`block` for JAX, :func:`torch_synchronized`
for PyTorch.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import inspect
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import deq_jax as dj

# Where ../shared does not travel (a device machine), these variables point at copies.
REFERENCE = Path(os.environ.get("DEQ_JAX_REFERENCE")
                 or Path(__file__).resolve().parents[3] / "shared" / "reference" / "seed_deq_torch.py")


@dataclasses.dataclass
class Result:
    """What a benchmark returns.

    Attributes:
      title: one line saying what was measured.
      table: the markdown table.
      rows: the table's rows as dicts (numbers, for tests and further use).
      notes: lines printed under the table (what each column means, settings).
      load: ``os.getloadavg()`` before and after the measurements.
    """

    title: str
    table: str
    rows: list[dict]
    notes: list[str]
    load: tuple[tuple[float, float, float], tuple[float, float, float]]

    def markdown(self) -> str:
        """The title, the table, the notes and the load average, ready to print."""
        (b1, b5, b15), (a1, a5, a15) = self.load
        lines = [f"### {self.title}", "", self.table, ""]
        lines += [f"- {note}" for note in self.notes]
        lines.append(f"- load average (1/5/15 min): {b1:.2f}/{b5:.2f}/{b15:.2f} before, "
                     f"{a1:.2f}/{a5:.2f}/{a15:.2f} after; {environment()}")
        lines.append(f"- devices: {devices()}")
        return "\n".join(lines)

    def write_json(self, path: str | Path) -> None:
        """Writes the title, rows, notes, load, software and devices to ``path`` as JSON."""
        record = {**dataclasses.asdict(self), "environment": environment(), "devices": devices()}
        # Rows hold numpy scalars from the measurements; .item() makes them JSON numbers.
        Path(path).write_text(json.dumps(record, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def environment() -> str:
    """The software and the machine's CPU cores a table was measured on, in one line."""
    versions = f"jax {jax.__version__} ({jax.default_backend()}), flax {flax.__version__}"
    if importlib.util.find_spec("torch") is not None:
        import torch

        versions += f", torch {torch.__version__}"
    return f"{versions}; {os.cpu_count()} CPU cores"


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def jax_device_name() -> str:
    """JAX's default device, e.g. ``'cuda:0 NVIDIA H100 80GB HBM3'`` or ``'cpu (AMD EPYC 7B13)'``."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return f"cpu ({cpu_model()})"
    return f"{device} {device.device_kind}"


def torch_device():
    """The ``torch.device`` the PyTorch side runs on: CUDA when available, else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_device_name() -> str:
    """PyTorch's device, e.g. ``'cuda NVIDIA H100 80GB HBM3'`` or ``'cpu (AMD EPYC 7B13)'``."""
    import torch

    if torch_device().type == "cuda":
        return f"cuda {torch.cuda.get_device_name()}"
    return f"cpu ({cpu_model()})"


def devices() -> str:
    """Each framework's device in one line: ``'JAX: <device> / torch: <device>'`` (no torch part without torch)."""
    line = f"JAX: {jax_device_name()}"
    if importlib.util.find_spec("torch") is not None:
        line += f" / torch: {torch_device_name()}"
    return line


def torch_synchronized(fn: Callable) -> Callable:
    """``fn`` followed by ``torch.cuda.synchronize()`` when PyTorch runs on CUDA.

    CUDA kernels run asynchronously: without the synchronisation a timer around the
    call would stop when the work is queued, not done. On the CPU ``fn`` is returned as is.
    """
    import torch

    if torch_device().type != "cuda":
        return fn

    def call(*args):
        out = fn(*args)
        torch.cuda.synchronize()
        return out

    return call


def parse_args(description: str, argv=None, add_flags: Callable | None = None) -> argparse.Namespace:
    """The flags every benchmark takes (``--quick``, ``--repeats``, ``--json``, ``--synthetic-data``) and those
    ``add_flags(parser)`` adds."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that it runs, measures nothing")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default: 5, quick: 2)")
    parser.add_argument("--json", metavar="PATH", help="also write the result (rows, notes, devices) to PATH as JSON")
    parser.add_argument("--synthetic-data", action="store_true",
                        help="benchmarks on CIFAR-10 batches (vs_pytorch's training steps, scaling, backward_scale): "
                             "uniform random pixels instead, e.g. without the data; solver step counts and times "
                             "then differ from CIFAR-10's. Without it they stop when CIFAR-10 cannot be read.")
    if add_flags is not None:
        add_flags(parser)
    return parser.parse_args(argv)


def cli(run, doc: str, argv=None, add_flags: Callable | None = None) -> "Result":
    """One benchmark's command line: parses the flags, runs it, prints its table (and writes ``--json``).

    Args:
      run: the benchmark's ``run(quick, repeats, **flags) -> Result``; ``flags`` are
        those ``add_flags`` defines, by their argparse names.
      doc: its module docstring, for ``--help``.
      argv: arguments; ``sys.argv[1:]`` if None.
      add_flags: adds the benchmark's own flags to the parser.

    Returns:
      The :class:`Result`.
    """
    flags = vars(parse_args(doc, argv, add_flags))
    quick, repeats, json_path = flags.pop("quick"), flags.pop("repeats"), flags.pop("json")
    with synthetic_data(flags.pop("synthetic_data")):
        result = run(quick, repeats, **flags)
    print(result.markdown())
    if json_path:
        result.write_json(json_path)
    return result


def repeats_or_default(repeats: int | None, quick: bool) -> int:
    """``repeats`` if given, else 2 in quick mode and 5 otherwise."""
    return repeats if repeats is not None else (2 if quick else 5)


def block(tree):
    """Waits for every array in ``tree``, a pytree of any nesting (JAX dispatches asynchronously)."""
    return jax.block_until_ready(tree)


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: bool = True) -> dict[str, float]:
    """Times several contenders side by side and returns each one's median seconds.

    Each round calls every contender once, in an order rotated from round to round,
    so drifting machine load hits all of them alike.

    Args:
      fns: name -> a callable that runs to completion: JAX results blocked inside it
        (:func:`block`), PyTorch ones synchronised (:func:`torch_synchronized`).
      repeats: rounds.
      warmup: call each once, untimed, first (compilation, caches).

    Returns:
      name -> median wall-clock seconds.
    """
    names = list(fns)
    if warmup:
        for name in names:
            fns[name]()
    samples = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - start)
    return {name: float(np.median(s)) for name, s in samples.items()}


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table; floats are printed as given (format them before)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def cell_problem(channels: int, inner: int, batch: int, size: int, seed: int = 0, num_groups: int = 8):
    """The chapter's cell with explicit parameters, an injection and loss weights.

    Args:
      channels, inner: the cell's ``n_channels`` and ``n_inner_channels``.
      batch, size: ``x`` is ``[batch, size, size, channels]``, N(0, 1).
      seed: weights, ``x`` and ``w``.
      num_groups: GroupNorm groups.

    Returns:
      ``(cell, f, params, x, w)``: the NNX cell, ``f(z, (params, x))``, the cell's
      state, the injection and loss weights ``w`` ~ N(0, 1) shaped like ``x``.
    """
    cell = dj.nn.ResNetCell(channels, inner, num_groups=num_groups, rngs=nnx.Rngs(seed))
    f, params = dj.nn.explicit_cell(cell)

    key_x, key_w = jax.random.split(jax.random.key(seed))
    shape = (batch, size, size, channels)
    return cell, f, params, jax.random.normal(key_x, shape), jax.random.normal(key_w, shape)


def load_reference():
    """The chapter's PyTorch module from ``../shared/reference`` (or ``$DEQ_JAX_REFERENCE``), or None without it or torch."""
    if not REFERENCE.is_file() or importlib.util.find_spec("torch") is None:
        return None
    spec = importlib.util.spec_from_file_location("seed_deq_torch", REFERENCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpu_threads() -> int:
    """Threads XLA:CPU uses: one per core."""
    return os.cpu_count() or 1


def set_torch_threads() -> int:
    """Gives PyTorch on the CPU as many threads as XLA:CPU uses and returns the number."""
    import torch

    threads = cpu_threads()
    torch.set_num_threads(threads)
    return threads


def nchw(a):
    """A torch tensor on :func:`torch_device` holding the NHWC array ``a`` as NCHW."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2))).to(torch_device())


def conv_weight(kernel):
    """A torch Conv2d weight (OIHW) holding an NNX conv kernel (HWIO)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.asarray(kernel).transpose(3, 2, 0, 1)))


def cell_state_dict(cell: dj.nn.ResNetCell, prefix: str = "") -> dict:
    """The chapter's ``ResNetLayer`` state dict holding ``cell``'s weights."""
    import torch

    state = {f"{prefix}{name}.weight": conv_weight(getattr(cell, name).kernel[...]) for name in ("conv1", "conv2")}
    for name in ("norm1", "norm2", "norm3"):
        norm = getattr(cell, name)
        state[f"{prefix}{name}.weight"] = torch.from_numpy(np.array(norm.scale[...]))
        state[f"{prefix}{name}.bias"] = torch.from_numpy(np.array(norm.bias[...]))
    return state


def torch_cell(ref, cell: dj.nn.ResNetCell):
    """The chapter's ``ResNetLayer`` with ``cell``'s weights (strict loading: names must match), on :func:`torch_device`."""
    channels, inner = cell.conv1.in_features, cell.conv1.out_features
    layer = ref.ResNetLayer(channels, inner, num_groups=cell.norm1.num_groups)
    layer.load_state_dict(cell_state_dict(cell), strict=True)
    return layer.to(torch_device())


def relative_diff(a, b) -> float:
    """Largest ``||a - b|| / ||b||`` (2-norms) over the leaves of two matching pytrees.

    A 2-norm, not a max: the chapter's cell has ReLUs, and a ReLU that flips between
    two slightly different fixed points moves single entries of dL/dx by orders of
    magnitude (e.g. 7.8 vs 0.002 on the demo problem at tol 1e-4) while the gradient as
    a whole agrees to ~1e-2.
    """
    diffs = jax.tree_util.tree_map(
        lambda u, v: float(jnp.linalg.norm(jnp.ravel(jnp.asarray(u) - jnp.asarray(v)))
                           / (jnp.linalg.norm(jnp.ravel(jnp.asarray(v))) + 1e-30)), a, b)
    return max(jax.tree_util.tree_leaves(diffs))


def fmt(value: float, digits: int = 3) -> str:
    """A number for a table: fixed point, or scientific when tiny; 'n/a' for None/NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if value != 0 and abs(value) < 10 ** -digits:
        return f"{value:.2e}"
    return f"{value:.{digits}f}"


def load() -> tuple[float, float, float]:
    """``os.getloadavg()``."""
    return tuple(round(v, 2) for v in os.getloadavg())


DATA_DIR = Path(os.environ.get("DEQ_JAX_DATA_DIR") or Path(__file__).resolve().parents[3] / "shared" / "data" / "tfds")
# Whether cifar_batches serves random pixels instead of CIFAR-10: --synthetic-data (cli) or synthetic_data().
SYNTHETIC_DATA = False


class CifarUnavailable(RuntimeError):
    """CIFAR-10 could not be read for a benchmark that needs it, and synthetic data was not asked for."""


@contextlib.contextmanager
def synthetic_data(enabled: bool = True):
    """Within it, :func:`cifar_batches` serves uniform random pixels (``enabled``) or CIFAR-10 only (not ``enabled``).

    What ``--synthetic-data`` does for a benchmark run through :func:`cli`; the previous
    setting comes back on exit.
    """
    global SYNTHETIC_DATA
    previous, SYNTHETIC_DATA = SYNTHETIC_DATA, bool(enabled)
    try:
        yield
    finally:
        SYNTHETIC_DATA = previous


def cifar_batches(batch_size: int, count: int, seed: int = 0,
                  synthetic: bool | None = None) -> tuple[list[tuple[np.ndarray, np.ndarray]], str]:
    """``count`` batches of CIFAR-10 training images (uint8 NHWC) and labels, or of random pixels when asked.

    Real images come from ``../shared/data/tfds`` (or ``$DEQ_JAX_DATA_DIR``: a TFDS data dir
    or ``export_npz`` parts). The solvers' step counts, and so every time measured on the
    batches, depend on the data: a benchmark never swaps in other data silently.

    Args:
      batch_size, count: the batches.
      seed: the random pixels and labels (synthetic data only).
      synthetic: uniform random pixels and labels instead of CIFAR-10; None follows
        ``--synthetic-data`` (:data:`SYNTHETIC_DATA`, :func:`synthetic_data`).

    Returns:
      ``(batches, source)``, source naming where the images came from.

    Raises:
      CifarUnavailable: CIFAR-10 is asked for and cannot be read (or has fewer than
        ``batch_size * count`` training images); the message names the data dir and the cause.
    """
    needed = batch_size * count
    if SYNTHETIC_DATA if synthetic is None else synthetic:
        rng = np.random.default_rng(seed)
        images = rng.integers(0, 256, (needed, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, needed).astype(np.int32)
        source = "random pixels (--synthetic-data), not CIFAR-10"
    else:
        images, labels = _cifar_train_images(needed)
        source = "CIFAR-10 train images"
    batches = [(images[i * batch_size:(i + 1) * batch_size], labels[i * batch_size:(i + 1) * batch_size])
               for i in range(count)]
    return batches, source


def _cifar_train_images(needed: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``needed`` CIFAR-10 training images and labels from :data:`DATA_DIR`, or :class:`CifarUnavailable`."""
    where = (f"{DATA_DIR} ($DEQ_JAX_DATA_DIR)" if os.environ.get("DEQ_JAX_DATA_DIR")
             else f"{DATA_DIR} (the default; set $DEQ_JAX_DATA_DIR to a TFDS data dir or a folder of export_npz parts)")
    advice = ("Point $DEQ_JAX_DATA_DIR at CIFAR-10, or pass --synthetic-data to benchmark on uniform random pixels "
              "(solver step counts and times then differ from CIFAR-10's).")
    try:
        from experiments.cifar10 import input_pipeline

        split = input_pipeline.load_split("train", data_dir=DATA_DIR, limit=needed)
    except Exception as error:  # any failure to read: missing, corrupt, no TFDS; the cause is chained
        raise CifarUnavailable(f"CIFAR-10 training images could not be read from {where}: "
                               f"{type(error).__name__}: {error}. {advice}") from error
    if len(split.labels) < needed:
        raise CifarUnavailable(f"{where} holds {len(split.labels)} CIFAR-10 training images; this benchmark needs "
                               f"{needed}. {advice}")
    return split.images, split.labels


# The two forms of the cell's convolution: loop_friendly_conv works around XLA:CPU's slow
# input gradient of a convolution inside lax.while_loop; on GPUs cuDNN may prefer the plain one.
CONVS = {"loop_friendly_conv": dj.nn.cell.loop_friendly_conv, "lax.conv_general_dilated": jax.lax.conv_general_dilated}


def cifar_train_step(batch_size: int, seed: int = 0, conv: str | None = None, dtype: str | None = None,
                     settings=()):
    """The CIFAR-10 experiment's model, a fresh state and its jitted ``train_step``.

    The compiled step is cached per argument set (benchmarks share it); the state is
    new on every call, since the step donates (consumes) the state it is given.

    Args:
      batch_size: the batch the step is compiled for.
      seed: initial weights.
      conv: a key of ``CONVS``: the cell's convolutions call it (:func:`cell_with_conv`);
        None keeps the experiment's model as it is.
      dtype: the model's computation dtype (e.g. ``'bfloat16'``), for a ``CifarDEQ``
        that takes one (:func:`model_takes_dtype`); None keeps the model's default.
      settings: overrides of the experiment's ``Config`` fields other than ``batch_size``
        and ``seed``, as ``(name, value)`` pairs or a dict, e.g.
        ``(("gradient", "phantom"), ("f_max_iter", 12))``; empty: the chapter's settings.

    Returns:
      ``(model_def, state, step)``: ``step(state, images, labels) -> (state, metrics)``,
      compiled ahead of time with the experiment's ``Config`` (its defaults, the chapter's
      settings, with ``settings`` applied); the weights are the same for every ``conv``,
      ``dtype`` and ``settings``.
    """
    settings = train_settings(settings)
    model_def, state, _, _ = _fresh_train_state(batch_size, seed, conv, dtype, settings)
    return model_def, state, _compiled_train_step(batch_size, seed, conv, dtype, settings)


def train_settings(settings) -> tuple[tuple[str, Any], ...]:
    """``Config`` overrides as a hashable key: ``(name, value)`` pairs sorted by name (from pairs or a dict)."""
    return tuple(sorted(dict(settings).items(), key=lambda item: item[0]))


def model_takes_dtype() -> bool:
    """Whether the experiment's ``CifarDEQ`` has a ``dtype`` parameter (mixed precision)."""
    from experiments.cifar10.model import CifarDEQ

    # __init__'s, not the class's: NNX's metaclass gives the class itself a (*args, **kwargs) signature.
    return "dtype" in inspect.signature(CifarDEQ.__init__).parameters


def cell_with_conv(cell: dj.nn.ResNetCell, conv: str) -> dj.nn.ResNetCell:
    """A ``ResNetCell`` like ``cell`` (same weights, sizes, dtypes; no weight norm) built with ``CONVS[conv]``."""
    conv1 = cell.conv1
    new = dj.nn.ResNetCell(conv1.in_features, conv1.out_features, conv1.kernel_size[0], cell.norm1.num_groups,
                           dtype=conv1.dtype, param_dtype=conv1.param_dtype, conv_general_dilated=CONVS[conv],
                           rngs=nnx.Rngs(0))
    nnx.update(new, nnx.state(cell))
    return new


def _fresh_train_state(batch_size: int, seed: int, conv: str | None, dtype: str | None, settings=()):
    from experiments.cifar10 import train
    from experiments.cifar10.model import CifarDEQ

    config = train.Config(batch_size=batch_size, seed=seed, **dict(settings))
    model_def, state, tx, _ = train.init_state(config, total_steps=1000)
    if conv is None and dtype is None:
        return model_def, state, tx, config
    model = model_def.merge(state["params"], state["batch_stats"])
    if dtype is not None:
        solver, gradient = config.solver_and_gradient()
        typed = CifarDEQ(solver=solver, gradient=gradient, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(seed))
        nnx.update(typed, *nnx.state(model, nnx.Param, nnx.BatchStat))
        model = typed
    if conv is not None:
        model.deq.cell = cell_with_conv(model.deq.cell, conv)
    graphdef, params, batch_stats, probe, scratch = nnx.split(
        model, nnx.Param, nnx.BatchStat, dj.nn.BackwardStatsProbe, ...)
    # Same parameter tree as init_state's, so its optimizer state still fits.
    state = {**state, "params": params, "batch_stats": batch_stats}
    return train.ModelDef(graphdef, probe, scratch), state, tx, config


@functools.lru_cache(maxsize=None)
def _compiled_train_step(batch_size: int, seed: int, conv: str | None, dtype: str | None, settings=()):
    from experiments.cifar10 import train

    model_def, state, tx, config = _fresh_train_state(batch_size, seed, conv, dtype, settings)
    step = jax.jit(functools.partial(train.train_step, model_def=model_def, tx=tx, config=config), donate_argnums=0)
    images = jax.ShapeDtypeStruct((batch_size, 32, 32, 3), jnp.uint8)
    labels = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    return step.lower(state, images, labels).compile()
