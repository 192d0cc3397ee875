"""Per-backend compilation choices: every workaround for one compiler in one table, each with its reason.

XLA:CPU needs several program shapes that other backends may not want (a convolution
with its own VJP rule, conditionals around writes, unrolled loops). They are read from
``BACKEND_CHOICES`` when a program is traced (the cell's convolution: when the cell is
built), keyed by ``jax.default_backend()``, so a GPU or TPU run flips them in one place
and every variant computes the same numbers (``tests/test_backend.py``).
"""
from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class BackendChoices:
    """How deq_jax shapes its programs for one backend.

    Attributes:
      conv: the cell's default convolution, ``"loop_friendly"``
        (``deq_jax.nn.loop_friendly_conv``, its input gradient written as an
        ordinary convolution) or ``"lax"`` (``jax.lax.conv_general_dilated``, the only
        one with forward mode). XLA:CPU, jax 0.10.2: the input gradient of
        ``ResNetCell(48, 64)``'s conv2 at batch 100 inside a ``while_loop`` took 1452 ms
        with lax's form and 44 ms with the loop-friendly one
        (``python -m experiments.benchmarks.ops``).
      conditional_writes: solver writes of ``[B, D]`` rows read the old rows only inside
        a ``lax.cond`` taken when some example has stopped (a select reads both
        operands whole; usually every example still runs).
      f_in_cond: the solver loop evaluates f as the (always taken) branch of a
        ``lax.cond``, so that f's output is written once; otherwise XLA:CPU fuses f's
        last elementwise ops into each of the loop's four consumers of ``f(x)`` and
        recomputes them there (``lax.optimization_barrier`` does not stop it).
      unrolled_phantom: ``deq_jax.Phantom``'s steps are unrolled in the graph, not
        a ``lax.fori_loop``: XLA:CPU runs a convolution's kernel gradient far slower
        inside a loop (see ``conv``).
      unrolled_hutchinson: ``deq_jax.jacobian_penalty``'s VJPs are a Python loop over
        the vectors, not a ``jax.vmap``: on XLA:CPU (``ResNetCell(48, 64)``, B=25, K=4, a
        one-off measurement) the gradient of the vmapped form took 2.7x as long.
    """

    conv: str = "lax"
    conditional_writes: bool = False
    f_in_cond: bool = False
    unrolled_phantom: bool = False
    unrolled_hutchinson: bool = False

    def __post_init__(self):
        if self.conv not in ("lax", "loop_friendly"):
            raise ValueError(f"BackendChoices: conv must be 'lax' or 'loop_friendly', got {self.conv!r}.")


XLA_CPU = BackendChoices(conv="loop_friendly", conditional_writes=True, f_in_cond=True, unrolled_phantom=True,
                         unrolled_hutchinson=True)

# Only "cpu" is measured. "gpu" copies it and "tpu" takes the plain forms, both unmeasured
# guesses until a device run of the benchmarks sets them.
BACKEND_CHOICES: dict[str, BackendChoices] = {
    "cpu": XLA_CPU,
    "gpu": XLA_CPU,
    "tpu": BackendChoices(),
}


def backend_choices(backend: str | None = None) -> BackendChoices:
    """The ``BackendChoices`` of ``backend`` (default ``jax.default_backend()``), read when called.

    A backend not in ``BACKEND_CHOICES`` gets the plain forms, ``BackendChoices()``.

    Examples:
      >>> import deq_jax as dj
      >>> dj.backend_choices("cpu").conv, dj.backend_choices("some_plugin").conv
      ('loop_friendly', 'lax')
    """
    backend = jax.default_backend() if backend is None else backend
    return BACKEND_CHOICES.get(backend, BackendChoices())
