"""The official PyTorch MDEQ (locuslab/deq, ``MDEQ-Vision``) beside deq_jax's, for comparisons only.

Loads the official code, builds its ``MDEQClsNet`` from a CIFAR-10 yaml, copies its weights
and running statistics into deq_jax's modules, and trains it one step at a time as its
``lib/core/cls_function.py`` ``train`` does (Adam with PyTorch's L2 weight decay, a cosine
schedule stepped per batch, the warm-up switch at ``PRETRAIN_STEPS``). The parity tests
(``tests/test_mdeq.py``, ``tests/test_mdeq_training.py``), the learning comparison
(``experiments.cifar10.compare_official``) and the speed benchmark use it.

It needs torch and PyYAML, and the official code -- never part of this project -- at
``$DEQ_MDEQ_REFERENCE``, by default ``../shared/reference/locuslab-deq`` beside the
repository: its ``lib/``, ``MDEQ-Vision/lib``, ``MDEQ-Vision/tools`` and
``MDEQ-Vision/experiments/cifar``. :func:`missing` says what is absent.

Example:
  >>> official = load()  # doctest: +SKIP
  >>> net = official.build("TINY", seed=0)  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import re
import sys
import types
from pathlib import Path

import jax.numpy as jnp
import numpy as np

DEFAULT_REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference" / "locuslab-deq"
_MODULE_NAMES = ("mdeq", "mdeq_core", "utils", "lib", "models", "core", "config")


def reference_dir() -> Path:
    """Where the official code is: ``$DEQ_MDEQ_REFERENCE``, else :data:`DEFAULT_REFERENCE`."""
    return Path(os.environ.get("DEQ_MDEQ_REFERENCE", DEFAULT_REFERENCE))


def missing() -> str | None:
    """Why the official model cannot be built here (torch, PyYAML or the code absent), or None."""
    for package in ("torch", "yaml"):
        if importlib.util.find_spec(package) is None:
            return f"{package} is not installed"
    if not (reference_dir() / "MDEQ-Vision/lib/models/mdeq.py").exists():
        return f"the official MDEQ code is not at {reference_dir()} (set DEQ_MDEQ_REFERENCE)"
    return None


@contextlib.contextmanager
def _on_path(root: Path):
    """Puts the official code first on sys.path (hiding same-named modules); undoes both afterwards."""
    hidden = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] in _MODULE_NAMES}
    saved_path = list(sys.path)
    sys.path[:0] = [str(root / "MDEQ-Vision/lib/models"), str(root / "MDEQ-Vision/lib"), str(root)]
    try:
        yield
    finally:
        sys.path[:] = saved_path
        for k in [k for k in sys.modules if k.split(".")[0] in _MODULE_NAMES]:
            del sys.modules[k]
        sys.modules.update(hidden)


def official_normalization(root: Path | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The CIFAR-10 channel ``(mean, std)`` the official ``tools/cls_train.py`` normalises with, read from it."""
    text = ((root or reference_dir()) / "MDEQ-Vision/tools/cls_train.py").read_text()
    # The CIFAR branch: transforms.Normalize((m, m, m), (s, s, s)); the ImageNet one uses lists.
    found = re.search(r"Normalize\(\(([^)]*)\),\s*\(([^)]*)\)\)", text)
    return tuple(tuple(float(v) for v in group.split(",")) for group in found.groups())


class Official(types.SimpleNamespace):
    """The loaded official code: ``torch``, its ``mdeq`` and ``solvers`` modules, and :meth:`build`."""

    def config(self, name: str, **model_changes) -> dict:
        """The yaml ``cls_mdeq_{name}.yaml`` as a dict, with default.py's affine flags and ``model_changes``
        (keys of ``MODEL`` or of ``MODEL.EXTRA.FULL_STAGE``)."""
        import yaml

        cfg = yaml.safe_load((self.root / f"MDEQ-Vision/experiments/cifar/cls_mdeq_{name}.yaml").read_text())
        stage = cfg["MODEL"]["EXTRA"]["FULL_STAGE"]
        for key in ("BLOCK_GN_AFFINE", "FUSE_GN_AFFINE", "POST_GN_AFFINE"):  # lib/config/default.py
            cfg["MODEL"].setdefault(key, True)
        for key, value in model_changes.items():
            (stage if key in stage or key == "NUM_BRANCHES" else cfg["MODEL"])[key] = value
        return cfg

    def build(self, name: str, *, seed: int = 0, **model_changes):
        """``get_cls_net`` of the yaml (see :meth:`config`), its weights drawn after ``torch.manual_seed(seed)``."""
        self.torch.manual_seed(seed)
        return self.mdeq.get_cls_net(self.config(name, **model_changes))


@functools.cache
def _load(root: Path) -> Official:
    import torch

    if importlib.util.find_spec("termcolor") is None:  # only used for printing
        sys.modules["termcolor"] = types.SimpleNamespace(colored=lambda text, *args, **kwargs: text)
    with _on_path(root):
        mdeq = importlib.import_module("mdeq")
        solvers = importlib.import_module("lib.solvers")
    return Official(torch=torch, mdeq=mdeq, solvers=solvers, root=root)


def load() -> Official:
    """The official code (imported once per process).

    Raises:
      RuntimeError: torch, PyYAML or the code is missing (see :func:`missing`).
    """
    reason = missing()
    if reason is not None:
        raise RuntimeError(f"official_mdeq: {reason}")
    return _load(reference_dir().resolve())


def transfer(stem, cell, head, net, torch) -> set[int]:
    """Copies the official ``net``'s parameters and running statistics into deq_jax's ``stem``, ``cell``, ``head``.

    Kernels go from OIHW to HWIO, weight norm's ``weight_g``/``weight_v`` to ``scale`` and
    ``layer.kernel``. The modules may be abstract (``nnx.eval_shape``); every variable set
    takes the tensor's dtype.

    Returns:
      The ids of the torch tensors used (every parameter and running statistic, if the
      architectures agree).
    """
    from deq_jax.nn import WeightNorm

    used = set()

    def put(variable, tensor, layout=None, flatten=False):
        value = tensor.detach().numpy()
        value = value.transpose(layout) if layout else value.reshape(-1) if flatten else value
        assert variable.get_value().shape == value.shape, (variable.get_value().shape, value.shape)
        variable.set_value(jnp.asarray(value))
        used.add(id(tensor))

    def conv(ours, theirs):
        if isinstance(ours, WeightNorm):  # g [O, 1, 1, 1], v OIHW
            put(ours.layer.kernel, theirs.weight_v, (2, 3, 1, 0))
            put(ours.scale, theirs.weight_g, flatten=True)
        else:
            put(ours.kernel, theirs.weight, (2, 3, 1, 0))  # OIHW -> HWIO
        if theirs.bias is not None:
            put(ours.bias, theirs.bias)

    def norm(ours, theirs):
        if theirs.weight is not None:
            put(ours.scale, theirs.weight)
            put(ours.bias, theirs.bias)
        if isinstance(theirs, torch.nn.BatchNorm2d):
            put(ours.mean, theirs.running_mean)
            put(ours.var, theirs.running_var)

    layers = [m for m in net.downsample if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d))]
    for layer, (c, n) in zip(stem.layers, zip(layers[::2], layers[1::2])):
        conv(layer.conv, c), norm(layer.norm, n)
    if net.stage0 is not None:
        conv(stem.stage0.conv, net.stage0[0]), norm(stem.stage0.norm, net.stage0[1])
    stage = net.fullstage
    for ours, theirs in zip(cell.branches, stage.branches):
        for block, tblock in zip(ours, theirs.blocks):
            conv(block.conv1, tblock.conv1), conv(block.conv2, tblock.conv2)
            for k in (1, 2, 3):
                norm(getattr(block, f"norm{k}"), getattr(tblock, f"gn{k}"))
    for i, row in enumerate(cell.fuse):
        for j, fusion in enumerate(row):
            theirs = stage.fuse_layers[i][j]
            steps = theirs.net if j < i else [theirs.net] if j > i else []
            ours = zip(fusion.convs, fusion.norms) if j < i else [(fusion.conv, fusion.norm)] if j > i else []
            for (c, n), step in zip(ours, steps):
                conv(c, step.conv), norm(n, step.gnorm)
    for post, theirs in zip(cell.post, stage.post_fuse_layers):
        conv(post.conv, theirs.conv), norm(post.norm, theirs.gnorm)
    for ours, theirs in zip(head.increase, net.incre_modules):
        theirs = theirs[0]
        for k in (1, 2, 3):
            conv(getattr(ours, f"conv{k}"), getattr(theirs, f"conv{k}"))
            norm(getattr(ours, f"norm{k}"), getattr(theirs, f"bn{k}"))
        if theirs.downsample is not None:
            conv(ours.project, theirs.downsample[0]), norm(ours.project_norm, theirs.downsample[1])
    for ours, theirs in zip([*head.downsample, head.final], [*net.downsamp_modules, net.final_layer]):
        conv(ours.conv, theirs[0]), norm(ours.norm, theirs[1])
    put(head.classifier.kernel, net.classifier.weight, (1, 0))
    put(head.classifier.bias, net.classifier.bias)
    return used


def nchw(images, torch):
    """NHWC numpy/JAX array -> contiguous NCHW torch tensor of the same dtype."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2)))


class Trainer:
    """The official training loop's step (``cls_function.train`` with its Jacobian factor 0, no clipping).

    ``torch.optim.Adam(lr, weight_decay)`` and ``CosineAnnealingLR(T_max=total_steps,
    eta_min=1e-6)`` stepped per batch, as ``tools/cls_train.py`` builds them; the model sees
    ``train_step = scheduler._step_count - 1`` (the steps taken), so it runs its unrolled
    warm-up while that is below the yaml's ``PRETRAIN_STEPS`` (``net.pretrain_steps``).

    Args:
      net: the official ``MDEQClsNet``.
      official: :func:`load`'s result.
      lr, weight_decay: the yaml's ``TRAIN.LR``, ``TRAIN.WD``.
      total_steps: the schedule's ``T_max`` (batches per epoch x epochs).
      f_thres, b_thres: the solvers' thresholds (the yaml's ``DEQ.F_THRES``, ``B_THRES``).
      eps: the solvers' tolerance (the official code calls them with ``broyden``'s default, 1e-3).
    """

    def __init__(self, net, official: Official, *, lr: float, weight_decay: float, total_steps: int,
                 f_thres: int, b_thres: int, eps: float = 1e-3):
        torch = official.torch
        self.net, self.torch, self.f_thres, self.b_thres = net, torch, f_thres, b_thres
        net.f_solver = net.b_solver = functools.partial(official.solvers.broyden, eps=eps)
        self.optimizer = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, total_steps, eta_min=1e-6)
        self.criterion = torch.nn.CrossEntropyLoss()

    @property
    def steps(self) -> int:
        """Optimizer steps taken."""
        return self.scheduler._step_count - 1

    def step(self, images, labels) -> tuple[float, np.ndarray]:
        """One training step on float NCHW ``images`` (already normalised) and int64 ``labels``.

        Returns:
          ``(loss, logits)`` of the batch before the update.
        """
        self.net.train()
        with _no_cuda_sync(self.torch):
            output, _, _ = self.net(images, train_step=self.steps, compute_jac_loss=False, f_thres=self.f_thres,
                                    b_thres=self.b_thres)
            loss = self.criterion(output, labels)
            self.optimizer.zero_grad()
            loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return loss.item(), output.detach().numpy()

    def logits(self, images, *, batch_statistics: bool = False) -> np.ndarray:
        """Evaluation logits (``cls_function.validate``: eval mode, the warm-up switch by the steps taken).

        With ``batch_statistics`` the BatchNorms normalise by the batch's own statistics (the rest
        still in eval mode: no dropout); their running statistics are left as they were.
        """
        torch, net = self.torch, self.net
        net.eval()
        norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)] if batch_statistics else []
        saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
        for m in norms:
            m.train()
        with torch.no_grad():
            logits = net(images, train_step=self.steps, compute_jac_loss=False, f_thres=self.f_thres)[0].numpy()
            for m, (mean, var, count) in zip(norms, saved):
                m.running_mean.copy_(mean), m.running_var.copy_(var), m.num_batches_tracked.copy_(count)
        return logits


class SolveLog:
    """Wraps the official solver (``net.f_solver = net.b_solver = SolveLog(net.f_solver)``): records each
    solve's lowest (batch-wide) residual and its evaluations -- f evaluations forward; VJPs backward, less
    the first, of a zero vector (deq_jax's backward solve starts after it)."""

    def __init__(self, solver):
        self.solver, self.records = solver, []

    def __call__(self, func, z, **kwargs):
        calls = []

        def counted(y):
            calls.append(1)
            return func(y)

        result = self.solver(counted, z, **kwargs)
        name = kwargs.get("name")
        self.records.append((name, result["lowest"], len(calls) - (name == "backward")))
        return result

    def mean(self, name: str) -> tuple[float | None, float | None]:
        """Mean ``(residual, evaluations)`` of the ``"forward"`` or ``"backward"`` solves recorded."""
        rows = [(r, n) for who, r, n in self.records if who == name]
        return (float(np.mean([r for r, _ in rows])), float(np.mean([n for _, n in rows]))) if rows else (None, None)


@contextlib.contextmanager
def _no_cuda_sync(torch):
    """The official backward hook calls ``torch.cuda.synchronize()``, which a CPU build refuses: a no-op here."""
    saved = torch.cuda.synchronize
    torch.cuda.synchronize = lambda *args, **kwargs: None
    try:
        yield
    finally:
        torch.cuda.synchronize = saved


def experiment_state(net, config, total_steps: int, torch):
    """deq_jax's experiment state for ``config`` (an MDEQ model) holding the official ``net``'s weights.

    Args:
      net: the official ``MDEQClsNet`` (of the configuration ``config.model`` names).
      config: the experiment's ``Config``.
      total_steps: the schedule's length.
      torch: the torch module.

    Returns:
      ``(model_def, state, tx, schedule)`` as ``steps.init_state``; the arrays take the
      tensors' dtype (float64 from a ``net.double()`` under ``jax.enable_x64``).
    """
    from .steps import build_model, make_optimizer, split_model

    model = build_model(config)
    transfer(model.stem, model.deq.cell, model.head, net, torch)
    model_def, params, batch_stats = split_model(model)
    tx, schedule = make_optimizer(config, total_steps)
    state = {"params": params, "opt_state": tx.init(params), "batch_stats": batch_stats,
             "step": jnp.zeros((), jnp.int32)}
    return model_def, state, tx, schedule
