"""The result of a fixed-point solve: the estimate plus per-example statistics."""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class SolveStats(NamedTuple):
    """Batch summary of a solve, cheap to log from inside ``jit``.

    Attributes:
      mean_steps: mean number of f evaluations per example.
      max_steps: largest number of f evaluations of any example.
      mean_residual: mean final relative residual.
      max_residual: largest final relative residual.
      converged_fraction: fraction of examples whose residual reached ``tol``.
      diverged_fraction: fraction of examples whose iterate became NaN or Inf
        (``Solution.diverged``).
    """

    mean_steps: jax.Array
    max_steps: jax.Array
    mean_residual: jax.Array
    max_residual: jax.Array
    converged_fraction: jax.Array
    diverged_fraction: jax.Array

    def to_array(self) -> jax.Array:
        """Packs the fields into a float32 vector of length ``len(SolveStats._fields)``."""
        return jnp.stack([jnp.asarray(v, jnp.float32) for v in self])

    @classmethod
    def from_array(cls, array) -> "SolveStats":
        """Inverse of ``to_array``."""
        return cls(*(array[i] for i in range(len(cls._fields))))


NUM_STATS = len(SolveStats._fields)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Solution:
    """What a solver returns; a pytree, so it can leave ``jit`` and ``vmap``.

    Attributes:
      value: the fixed-point estimate, same structure, shape and dtype as ``z0``.
      num_steps: int32[B], f evaluations spent on each example.
      residual: float[B], relative residual ``||f(z)-z|| / (||f(z)|| + 1e-5)`` of the
        iterate ``z`` whose image ``f(z)`` is returned as ``value`` (the lowest one
        reached); ``inf`` where no iterate had a finite one.
      trace: float[max_iter, B], the residual after each f evaluation (``inf`` where
        it was not finite); NaN once an example has stopped.
      converged: bool[B], ``residual < tol``.
      diverged: bool[B], the solve of this example produced a NaN or Inf (in ``z`` or
        ``f(z)``) and stopped there. ``value`` and ``residual`` are then those of its
        best finite iterate, which can look harmless (a finite residual well above
        ``tol``): check this flag, not the residual, to tell divergence from slow
        convergence.
      aux: with ``fixed_point(..., has_aux=True)``, ``f``'s second output at ``value``
        (differentiable like ``value``); else None.
    """

    value: jax.Array
    num_steps: jax.Array
    residual: jax.Array
    trace: jax.Array
    converged: jax.Array
    diverged: jax.Array
    aux: Any = None

    def stats(self) -> SolveStats:
        """Returns the batch summary of this solve (no extra f evaluation)."""
        steps = self.num_steps.astype(jnp.float32)
        return SolveStats(
            mean_steps=steps.mean(),
            max_steps=steps.max(),
            mean_residual=self.residual.mean(),
            max_residual=self.residual.max(),
            converged_fraction=self.converged.astype(jnp.float32).mean(),
            diverged_fraction=self.diverged.astype(jnp.float32).mean(),
        )
