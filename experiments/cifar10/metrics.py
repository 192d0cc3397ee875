"""Metrics of the experiment: per-batch sums kept on device, turned into per-epoch means and one log line."""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Per-epoch fields that measure time: they differ between a run and its resumption.
TIMING_FIELDS = ("epoch_s", "train_s", "eval_s", "images_per_s")


@jax.jit
def accumulate(total: dict, new: dict) -> dict:
    """Adds a batch's metrics to the running totals on device ('_max' keys take the maximum)."""
    return {k: jnp.maximum(total[k], v) if k.endswith("_max") else total[k] + v for k, v in new.items()}


def summarize(total: dict, prefix: str) -> dict[str, float]:
    """Turns summed metrics (host numbers) into means, e.g. ``{prefix}loss``, ``fwd_steps_mean``.

    Args:
      total: accumulated ``train_step`` or ``eval_step`` metrics.
      prefix: put before loss/accuracy names, e.g. 'train_' or 'test_'.

    Returns:
      Plain floats; ``{prefix}skipped_steps`` counts the training steps skipped for a
      non-finite loss or gradient, whose loss and accuracy are left out (None when
      every step was); ``{prefix}exact_accuracy`` is None when no exact examples were seen,
      ``jac_penalty`` (the mean over the steps that added it) None when no step did,
      solver stats (means over the batches that solved, ``deq_batches``; the warm-up's
      unrolled batches have none) None when none did.
    """
    kept = total["count"] > 0  # every step of the epoch skipped (non-finite): no loss to report
    out = {f"{prefix}loss": total["loss"] / total["count"] if kept else None,
           f"{prefix}accuracy": total["correct"] / total["count"] if kept else None}
    if "skipped_steps" in total:
        out[f"{prefix}skipped_steps"] = total["skipped_steps"]
    if "exact_count" in total:
        out[f"{prefix}exact_accuracy"] = (
            total["exact_correct"] / total["exact_count"] if total["exact_count"] else None
        )
    if "jac_steps" in total:
        out["jac_penalty"] = total["jac_penalty"] / total["jac_steps"] if total["jac_steps"] else None
    for key, value in sorted(total.items(), key=lambda item: item[0].startswith("bwd_")):  # fwd first
        if key.startswith(("fwd_", "bwd_")):
            solved = total["deq_batches"]
            out[key] = None if not solved else value if key.endswith("_max") else value / solved
    return {k: None if v is None else float(v) for k, v in out.items()}


def _number(value) -> str:
    """A loss or accuracy with 4 decimals, or 'n/a' where there is none."""
    return "n/a" if value is None else f"{value:.4f}"


def epoch_line(m: dict) -> str:
    """One epoch's record as the log line the run prints."""
    def solve(prefix):
        if m[f"{prefix}_steps_mean"] is None:
            return f"{prefix} unrolled | "
        diverged = m.get(f"{prefix}_diverged") or 0
        return (f"{prefix} steps {m[f'{prefix}_steps_mean']:.1f} res {m[f'{prefix}_residual_mean']:.4f} "
                f"(max {m[f'{prefix}_residual_max']:.4f}){f' DIVERGED {diverged:.1%}' if diverged else ''} | ")

    jac = "off" if "jac_penalty" not in m else "n/a" if m["jac_penalty"] is None else f"{m['jac_penalty']:.3f}"
    return (
        f"epoch {m['epoch']:3d} | train loss {_number(m['train_loss'])} acc {_number(m['train_accuracy'])} "
        + (f"(SKIPPED {m['train_skipped_steps']:.0f} non-finite steps) " if m.get("train_skipped_steps") else "")
        + f"| "
        f"test loss {m['test_loss']:.4f} acc {m['test_accuracy']:.4f} (exact {_number(m['test_exact_accuracy'])}) | "
        + solve("fwd") + (solve("bwd") if "bwd_steps_mean" in m else "")
        + f"jac {jac} | "
        f"radius {m['test_spectral_radius_mean']:.3f} (max {m['test_spectral_radius_max']:.3f}) | "
        f"{m['images_per_s']:.0f} img/s | lr {m['lr']:.2e} | {m['epoch_s']:.1f} s"
    )
