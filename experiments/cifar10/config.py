"""The experiment's settings: one dataclass field per command-line flag, the flags generated from the fields.

Each field carries its help text (and, where needed, its type, choices and metavar) in
its metadata; :func:`add_flags` turns the fields into ``argparse`` flags, so a setting is
written once. The field defaults are the chapter's; ``--model mdeq-tiny`` and
``--model mdeq-large`` start from the official recipes instead (:data:`MODEL_DEFAULTS`),
and every flag given on the command line overrides them.

Example:
  >>> config = Config(epochs=2, gradient="phantom")
  >>> config.solver_and_gradient()[1]
  Phantom(steps=1, damping=1.0)
  >>> Config.for_model("mdeq-tiny", epochs=3).batch_size
  128
"""
from __future__ import annotations

import argparse
import dataclasses
import math

import jax.numpy as jnp
import numpy as np

import deq_jax as dj

from . import input_pipeline as ip
from .errors import BadInputError

ANDERSON_M = 5
END_LR = 1e-6  # the chapter's CosineAnnealingLR(eta_min=1e-6)
MODELS = ("chapter", "mdeq-tiny", "mdeq-large")
SOLVERS = ("anderson", "forward", "broyden", "reversible")
GRADIENTS = ("implicit", "phantom", "neumann", "backprop", "gdeq", "reversible")
# Computation dtypes: parameters, solver state and the loss stay float32 (see CifarDEQ).
DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}
# Fields that may change between a run and its resumption without changing the result.
RESUMABLE_FIELDS = ("data_dir", "resume", "time_budget", "eval_budgets")

# The official MDEQ recipes (locuslab/deq, MDEQ-Vision/experiments/cifar/cls_mdeq_{TINY,LARGE}.yaml and
# the defaults of MDEQ-Vision/lib/config/default.py) as this experiment's flags: DEQ.F_SOLVER/B_SOLVER ->
# solver, STOP_MODE 'rel' at lib/solvers.py broyden's eps 1e-3 -> f/b_tol, TRAIN.BATCH_SIZE_PER_GPU x GPUS
# (64 x 2, 32 x 4) -> batch_size, END_EPOCH -> epochs, LR (Adam, cosine to 1e-6 over all steps) -> lr, WD ->
# weight_decay, MODEL.DROPOUT -> dropout, WNORM -> norm 'weight', PRETRAIN_STEPS -> warmup_steps, NUM_LAYERS
# -> warmup_depth, LOSS.PRETRAIN_JAC_LOSS_WEIGHT (0) -> warmup_jac_reg, DATASET.AUGMENT (LARGE: default.py's
# True), tools/cls_train.py's Normalize -> input_scaling 'mean-std'. The caps: broyden(threshold=T) evaluates
# f at x0 and after each of its T steps, T + 1 evaluations, so F_THRES 18 -> f_max_iter 19. Backward, it starts
# from 0 (its first of T + 1 VJPs is of a zero vector) and its first step reaches y, where deq_jax's backward
# solve starts: B_THRES 20 -> b_max_iter 20, the same 20 VJPs of non-zero vectors.
_MDEQ_RECIPE = dict(solver="broyden", f_max_iter=19, b_max_iter=20, f_tol=1e-3, b_tol=1e-3, batch_size=128, lr=1e-3,
                    norm="weight", warmup_depth=10, warmup_jac_reg=0.0, input_scaling="mean-std")
MODEL_DEFAULTS = {
    "chapter": {},
    "mdeq-tiny": dict(_MDEQ_RECIPE, epochs=50, weight_decay=2.5e-6, dropout=0.25, warmup_steps=3000, augment=False),
    "mdeq-large": dict(_MDEQ_RECIPE, epochs=220, weight_decay=0.0, dropout=0.3, warmup_steps=20000, augment=True),
}


def budget_list(text: str) -> tuple[int, ...]:
    """``"4,8,12"`` -> ``(4, 8, 12)``: the type of ``--eval-budgets``."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints such as 4,8,12, got {text!r}") from None


def option(default, help: str, *, type=None, choices=None, metavar=None):  # noqa: A002 - argparse's names
    """A :class:`Config` field with its flag's help (``%(default)s`` is filled in), type, choices and metavar."""
    metadata = {"help": help, "type": type, "choices": choices, "metavar": metavar}
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run depends on, one field per command-line flag; the defaults are the chapter's.

    The help text of each field (in its metadata) documents it; ``python -m
    experiments.cifar10 --help`` prints them all.
    """

    model: str = option("chapter", "the chapter's single-stream DEQ, or the official MDEQ CIFAR-10 "
                        "configurations, whose recipe replaces the chapter's defaults below (printed at start; "
                        "flags given override them) (%(default)s)", choices=MODELS)
    data_dir: str | None = option(None, "TFDS data dir holding cifar10 (default: TFDS's own), or a folder of the "
                                  "<split>-NNNNN-of-NNNNN.npz parts written by experiments.cifar10.export_npz",
                                  type=str)
    epochs: int = option(50, "passes over the training set (%(default)s)")
    batch_size: int = option(100, "global batch, split evenly over the devices, train and eval (%(default)s)")
    lr: float = option(1e-3, f"initial Adam rate, cosine decay to {END_LR:g} over all steps (%(default)s)")
    seed: int = option(0, "initial weights and, with the epoch, each epoch's shuffling and augmentation "
                       "(%(default)s)")
    train_limit: int | None = option(None, "train on the first N training examples only", type=int, metavar="N")
    eval_limit: int | None = option(None, "evaluate on the first N test examples only", type=int, metavar="N")
    augment: bool = option(False, "random crop (4 px zero padding) and horizontal flip of training images")
    resume: bool = option(False, "continue the run checkpointed in --workdir")
    solver: str = option("anderson", "forward and backward solver; anderson has m=5 (%(default)s)", choices=SOLVERS)
    broyden_memory: int | None = option(None, "--solver broyden only: rank-one updates kept (default: deq_jax's "
                                        "memory, 6 on the CIFAR models; the official MDEQ code keeps every update)",
                                        type=int, metavar="N")
    damping: float = option(1.0, "--solver forward only: relaxed iteration z <- B f(z) + (1 - B) z, B in (0, 1] "
                            "(%(default)s)", metavar="B")
    reversible_beta: float = option(0.5, "--solver reversible only: the paired relaxation's beta in [0.5, 1) "
                                    "(%(default)s)", metavar="B")
    f_tol: float = option(1e-2, "forward relative residual tolerance (%(default)s)")
    f_max_iter: int = option(25, "most forward f evaluations (%(default)s)")
    b_tol: float = option(1e-2, "backward relative residual tolerance, implicit gradient (%(default)s)")
    b_max_iter: int = option(25, "most backward solver steps, implicit gradient (%(default)s)")
    gradient: str = option("implicit", "implicit (exact), phantom (backprop through a few damped steps from z*) "
                           "neumann (a truncated Neumann series for the inverse), backprop (through the forward solver's "
                           "iterations), gdeq (Jacobian-free, preconditioned by --solver broyden's inverse "
                           "Jacobian) or reversible (backprop through --solver reversible by reconstruction) "
                           "(%(default)s)", choices=GRADIENTS)
    phantom_steps: int = option(1, "phantom gradient: unrolled steps (%(default)s)", metavar="K")
    phantom_damping: float = option(1.0, "phantom gradient: damping in (0, 1] (%(default)s)", metavar="T")
    neumann_terms: int = option(5, "neumann gradient: terms of the series (%(default)s)", metavar="K")
    neumann_damping: float = option(1.0, "neumann gradient: damping in (0, 1] (%(default)s)", metavar="T")
    backprop_checkpoint_every: int | None = option(None, "backprop gradient: recompute the iterations in segments "
                                                   "of N steps instead of storing them (default: store every step)",
                                                   type=int, metavar="N")
    fp_correction: int = option(1, "fixed-point correction: supervise N states along the forward solve (its "
                                "--f-max-iter split into N segments), weighted G^(N-1-k); 1 is off (%(default)s)",
                                metavar="N")
    fp_gamma: float = option(0.8, "fixed-point correction: the weight decay G in (0, 1] (%(default)s)", metavar="G")
    jac_reg: float = option(0.0, "weight of the Jacobian penalty ||J_f(z*)||_F^2 / D in the loss; 0 is off "
                            "(%(default)s)", metavar="WEIGHT")
    warmup_jac_reg: float = option(0.0, "weight of the Jacobian penalty during the warm-up (--warmup-steps), taken "
                                   "at the unrolled network's output; 0 is off (%(default)s)", metavar="WEIGHT")
    jac_reg_freq: float = option(1.0, "fraction of training steps that add the Jacobian penalty, drawn per step "
                                 "from (seed, step) (%(default)s)", metavar="P")
    norm: str = option("none", "kernel normalisation of the DEQ cell's convolutions: weight norm (g v / ||v||) "
                       "or spectral norm (one power iteration per step) (%(default)s)", choices=dj.nn.NORMS)
    weight_decay: float = option(0.0, "L2 weight decay added to the gradient before Adam, as "
                                 "torch.optim.Adam(weight_decay=...) (%(default)s)", metavar="WD")
    dropout: float = option(0.0, "MDEQ models: the cell's variational dropout rate, one mask per example and "
                            "pass (%(default)s; the chapter's cell has none)", metavar="P")
    warmup_steps: int = option(0, "train the first N optimizer steps (and evaluate until then) on the unrolled "
                               "weight-tied network, then on the equilibrium (%(default)s)", metavar="N")
    warmup_depth: int = option(10, "cell applications of the unrolled network during the warm-up (%(default)s)",
                               metavar="D")
    input_scaling: str = option("unit", "pixels / 255 in [0, 1] (unit, the chapter's) or then per channel (x - mean) "
                                "/ std with the official MDEQ loader's CIFAR-10 mean and std (mean-std) (%(default)s)",
                                choices=ip.SCALINGS)
    dtype: str = option("float32", "computation dtype; parameters, solver state and loss stay float32 "
                        "(%(default)s)", choices=tuple(DTYPES))
    eval_budgets: tuple[int, ...] = option((), "after the last epoch, evaluate the test set with each forward "
                                           "budget (f evaluations), e.g. 4,8,12,25,50; into summary.json and "
                                           "budget.png", type=budget_list, metavar="K,K,...")
    max_skipped_steps: int = option(10, "stop the run (with an error, the last checkpoint kept) once N steps in a "
                                    "row had a non-finite loss or gradient; each such step is skipped, no update "
                                    "(%(default)s)", metavar="N")
    time_budget: float | None = option(None, "stop cleanly before an epoch that would end after S seconds of this "
                                       "invocation (judged by the last epoch); --resume continues",
                                       type=float, metavar="S")

    def __post_init__(self):
        def check(name, ok, expected):
            if not ok(getattr(self, name)):
                raise BadInputError(f"--{name.replace('_', '-')} must be {expected}, got {getattr(self, name)!r}")

        def is_int(value):
            return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

        def is_number(value):
            return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value)

        for name in ("epochs", "batch_size", "f_max_iter", "b_max_iter", "phantom_steps", "neumann_terms", "warmup_depth",
                     "fp_correction", "max_skipped_steps"):
            check(name, lambda v: is_int(v) and v >= 1, "an int >= 1")
        for name in ("train_limit", "eval_limit"):
            check(name, lambda v: v is None or is_int(v) and v >= 1, "an int >= 1 (or unset: the whole split)")
        check("broyden_memory", lambda v: v is None or is_int(v) and v >= 1,
              "an int >= 1 (or unset: deq_jax's default)")
        check("backprop_checkpoint_every", lambda v: v is None or is_int(v) and v >= 1,
              "an int >= 1 (or unset: every step stored)")
        for name in ("lr", "f_tol", "b_tol"):
            check(name, lambda v: is_number(v) and v > 0, "a finite number > 0")
        for name in ("seed", "warmup_steps"):
            check(name, lambda v: is_int(v) and v >= 0, "an int >= 0")
        for field in dataclasses.fields(self):
            if field.metadata["choices"] is not None:
                check(field.name, lambda v, c=field.metadata["choices"]: v in c, f"one of {field.metadata['choices']}")
        for name in ("phantom_damping", "neumann_damping", "damping", "fp_gamma"):
            check(name, lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]")
        if self.solver != "forward":
            check("damping", lambda v: v == 1, "1 unless --solver forward (the other solvers are not damped)")
        check("reversible_beta", lambda v: is_number(v) and 0.5 <= v < 1, "a number in [0.5, 1)")
        if self.gradient == "reversible":
            check("solver", lambda v: v == "reversible", "reversible with --gradient reversible (the gradient "
                  "reconstructs its iterations)")
        if self.gradient == "gdeq":
            check("solver", lambda v: v == "broyden", "broyden with --gradient gdeq (its inverse Jacobian "
                  "preconditions the gradient)")
        check("fp_correction", lambda v: v <= self.f_max_iter, f"at most --f-max-iter ({self.f_max_iter}): "
              "each state needs one f evaluation")
        check("eval_budgets", lambda v: isinstance(v, tuple) and all(is_int(b) and b >= 1 for b in v),
              "ints >= 1")
        for name in ("jac_reg", "warmup_jac_reg", "weight_decay"):
            check(name, lambda v: is_number(v) and v >= 0, "a finite number >= 0")
        check("dropout", lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)")
        if self.model == "chapter":
            check("dropout", lambda v: v == 0, "0 with --model chapter (its cell has no dropout)")
        check("jac_reg_freq", lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]")
        check("time_budget", lambda v: v is None or is_number(v) and v > 0, "a number of seconds > 0")

    @classmethod
    def for_model(cls, model: str, **settings) -> Config:
        """The settings of ``model``: its :data:`MODEL_DEFAULTS`, then ``settings`` over them.

        Raises:
          BadInputError: an unknown model, or a bad setting.
        """
        if model not in MODEL_DEFAULTS:
            raise BadInputError(f"--model must be one of {MODELS}, got {model!r}")
        return cls(model=model, **{**MODEL_DEFAULTS[model], **settings})

    def model_defaults_line(self) -> str | None:
        """The model's recipe as this run uses it, e.g. ``"solver=broyden, batch_size=64 (recipe: 128), ..."``;
        None for the chapter, whose recipe is the field defaults."""
        recipe = MODEL_DEFAULTS[self.model]
        if not recipe:
            return None
        return ", ".join(f"{name}={getattr(self, name)!r}" + ("" if getattr(self, name) == value
                                                             else f" (recipe: {value!r})")
                         for name, value in recipe.items())

    def solver_and_gradient(self):
        """Returns the DEQ's forward solver and gradient strategy these settings describe."""
        make = {
            "anderson": lambda tol, max_iter: dj.Anderson(m=ANDERSON_M, tol=tol, max_iter=max_iter),
            "broyden": lambda tol, max_iter: dj.Broyden(tol, max_iter, memory=self.broyden_memory),
            "forward": lambda tol, max_iter: dj.ForwardIteration(tol, max_iter, damping=self.damping),
            "reversible": lambda tol, max_iter: dj.Reversible(tol, max_iter, beta=self.reversible_beta),
        }[self.solver]
        if self.gradient == "phantom":
            gradient = dj.Phantom(self.phantom_steps, self.phantom_damping)
        elif self.gradient == "neumann":
            gradient = dj.Neumann(self.neumann_terms, self.neumann_damping)
        elif self.gradient == "backprop":
            gradient = dj.Backprop(self.backprop_checkpoint_every)
        elif self.gradient == "gdeq":
            gradient = dj.GDEQ()
        elif self.gradient == "reversible":
            gradient = dj.ReversibleBackprop()
        else:
            gradient = dj.Implicit(make(self.b_tol, self.b_max_iter))
        return make(self.f_tol, self.f_max_iter), gradient

    def as_json(self) -> dict:
        """The settings as JSON values, as ``summary.json`` and checkpoints hold them (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, settings: dict) -> Config:
        """The inverse of :meth:`as_json` (lists become tuples again), e.g. for a checkpoint's saved settings."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})

    def resumable_view(self) -> dict:
        """The settings a resumed run must share with the checkpointed one (all but ``RESUMABLE_FIELDS``)."""
        return {k: v for k, v in self.as_json().items() if k not in RESUMABLE_FIELDS}


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Adds one flag per :class:`Config` field: ``--field-name``, typed by its default (or metadata);
    ``--name``/``--no-name`` for a bool.

    A flag not given is absent from the parsed namespace (``argparse.SUPPRESS``), so that
    :func:`from_flags` can tell it from one given with the chapter's value; the help
    shows the field's (the chapter's) default.
    """
    for field in dataclasses.fields(Config):
        meta = field.metadata
        flag = "--" + field.name.replace("_", "-")
        help_text = meta["help"].replace("%(default)s", str(field.default))
        if isinstance(field.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=f"{help_text} (default: {field.default})")
            continue
        parser.add_argument(flag, type=meta["type"] or type(field.default), default=argparse.SUPPRESS,
                            choices=meta["choices"], metavar=meta["metavar"], help=help_text)


def from_flags(flags: dict) -> Config:
    """The :class:`Config` of parsed flags (``vars(namespace)``): the model's defaults, then the flags given.

    Keys that are not fields are ignored.
    """
    names = {field.name for field in dataclasses.fields(Config)}
    settings = {k: v for k, v in flags.items() if k in names}
    return Config.for_model(settings.pop("model", "chapter"), **settings)
