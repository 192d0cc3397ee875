"""The experiment's settings: one dataclass field per command-line flag, the flags generated from the fields.

Each field carries its help text (and, where needed, its type, choices and metavar) in
its metadata; :func:`add_flags` turns the fields into ``argparse`` flags, so a setting is
written once.

Example:
  >>> config = Config(epochs=2, gradient="phantom")
  >>> config.solver_and_gradient()[1]
  Phantom(steps=1, damping=1.0)
"""
from __future__ import annotations

import argparse
import dataclasses
import math

import jax.numpy as jnp
import numpy as np

import deq_jax as dj

from .errors import BadInputError

ANDERSON_M = 5
END_LR = 1e-6  # the chapter's CosineAnnealingLR(eta_min=1e-6)
SOLVERS = ("anderson", "forward", "broyden")
GRADIENTS = ("implicit", "phantom")
# Computation dtypes: parameters, solver state and the loss stay float32 (see CifarDEQ).
DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}
# Fields that may change between a run and its resumption without changing the result.
RESUMABLE_FIELDS = ("data_dir", "resume", "time_budget")


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
    f_tol: float = option(1e-2, "forward relative residual tolerance (%(default)s)")
    f_max_iter: int = option(25, "most forward f evaluations (%(default)s)")
    b_tol: float = option(1e-2, "backward relative residual tolerance, implicit gradient (%(default)s)")
    b_max_iter: int = option(25, "most backward solver steps, implicit gradient (%(default)s)")
    gradient: str = option("implicit", "implicit (exact) or phantom (backprop through a few damped steps from z*) "
                           "(%(default)s)", choices=GRADIENTS)
    phantom_steps: int = option(1, "phantom gradient: unrolled steps (%(default)s)", metavar="K")
    phantom_damping: float = option(1.0, "phantom gradient: damping in (0, 1] (%(default)s)", metavar="T")
    jac_reg: float = option(0.0, "weight of the Jacobian penalty ||J_f(z*)||_F^2 / D in the loss; 0 is off "
                            "(%(default)s)", metavar="WEIGHT")
    jac_reg_freq: float = option(1.0, "fraction of training steps that add the Jacobian penalty, drawn per step "
                                 "from (seed, step) (%(default)s)", metavar="P")
    weight_norm: bool = option(False, "weight-normalise the DEQ cell's convolutions")
    dtype: str = option("float32", "computation dtype; parameters, solver state and loss stay float32 "
                        "(%(default)s)", choices=tuple(DTYPES))
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

        for name in ("epochs", "batch_size", "f_max_iter", "b_max_iter", "phantom_steps"):
            check(name, lambda v: is_int(v) and v >= 1, "an int >= 1")
        for name in ("train_limit", "eval_limit"):
            check(name, lambda v: v is None or is_int(v) and v >= 1, "an int >= 1 (or unset: the whole split)")
        for name in ("lr", "f_tol", "b_tol"):
            check(name, lambda v: is_number(v) and v > 0, "a finite number > 0")
        check("seed", lambda v: is_int(v) and v >= 0, "an int >= 0")
        for field in dataclasses.fields(self):
            if field.metadata["choices"] is not None:
                check(field.name, lambda v, c=field.metadata["choices"]: v in c, f"one of {field.metadata['choices']}")
        check("phantom_damping", lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]")
        check("jac_reg", lambda v: is_number(v) and v >= 0, "a finite number >= 0")
        check("jac_reg_freq", lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]")
        check("time_budget", lambda v: v is None or is_number(v) and v > 0, "a number of seconds > 0")

    def solver_and_gradient(self):
        """Returns the DEQ's forward solver and gradient strategy these settings describe."""
        make = {
            "anderson": lambda tol, max_iter: dj.Anderson(m=ANDERSON_M, tol=tol, max_iter=max_iter),
            "broyden": dj.Broyden,
            "forward": dj.ForwardIteration,
        }[self.solver]
        if self.gradient == "phantom":
            gradient = dj.Phantom(self.phantom_steps, self.phantom_damping)
        else:
            gradient = dj.Implicit(make(self.b_tol, self.b_max_iter))
        return make(self.f_tol, self.f_max_iter), gradient

    def resumable_view(self) -> dict:
        """The settings a resumed run must share with the checkpointed one (all but ``RESUMABLE_FIELDS``)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in RESUMABLE_FIELDS}


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Adds one flag per :class:`Config` field: ``--field-name``, typed by its default (or metadata)."""
    for field in dataclasses.fields(Config):
        meta = field.metadata
        flag = "--" + field.name.replace("_", "-")
        if field.default is False:
            parser.add_argument(flag, action="store_true", help=meta["help"])
            continue
        parser.add_argument(flag, type=meta["type"] or type(field.default), default=field.default,
                            choices=meta["choices"], metavar=meta["metavar"], help=meta["help"])


def from_flags(flags: dict) -> Config:
    """The :class:`Config` of parsed flags (``vars(namespace)``), ignoring keys that are not fields."""
    names = {field.name for field in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in flags.items() if k in names})
