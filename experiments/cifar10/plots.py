"""PNG plots of a run's per-epoch metrics (``metrics.jsonl`` records)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

import matplotlib

matplotlib.use("Agg")  # files only; no display on a training machine
import matplotlib.pyplot as plt  # noqa: E402  (must follow the backend choice)
from matplotlib.ticker import MaxNLocator  # noqa: E402


def plot_history(history: list[dict], workdir: str | Path, *, f_tol: float, b_tol: float) -> None:
    """Writes ``curves.png`` (loss, accuracy) and ``solver.png`` (solver steps, residuals, spectral
    radius and Jacobian penalty).

    Args:
      history: one dict per epoch, as in ``metrics.jsonl``.
      workdir: output folder.
      f_tol, b_tol: forward and backward tolerances, drawn as reference lines.
    """
    workdir = Path(workdir)
    # Solver stats are None for epochs spent in the warm-up (no solve): gaps in the lines.
    history = [{k: float("nan") if v is None else v for k, v in m.items()} for m in history]
    epochs = [m["epoch"] for m in history]
    marker = "o" if len(epochs) < 20 else None  # a single epoch still shows up

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for split in ("train", "test"):
        loss_ax.plot(epochs, [m[f"{split}_loss"] for m in history], marker=marker, label=split)
        acc_ax.plot(epochs, [m[f"{split}_accuracy"] for m in history], marker=marker, label=split)
    exact = [m["test_exact_accuracy"] for m in history]
    if not all(np.isnan(exact)):
        acc_ax.plot(epochs, exact, marker=marker, linestyle="--", label="test, bit-exact images")
    loss_ax.set(xlabel="epoch", ylabel="mean cross-entropy", title="loss")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    fig.tight_layout()
    fig.savefig(workdir / "curves.png", dpi=100)
    plt.close(fig)

    fig, (steps_ax, res_ax, stability_ax) = plt.subplots(1, 3, figsize=(15, 4))
    solves = [("fwd", "forward", f_tol, "C0"), ("bwd", "backward", b_tol, "C1")]
    for prefix, name, tol, color in solves:
        if f"{prefix}_steps_mean" not in history[0]:  # no backward solve with phantom gradients
            continue
        for ax, quantity in ((steps_ax, "steps"), (res_ax, "residual")):
            ax.plot(epochs, [m[f"{prefix}_{quantity}_mean"] for m in history], marker=marker, color=color,
                    label=f"{name} mean")
            ax.plot(epochs, [m[f"{prefix}_{quantity}_max"] for m in history], linestyle=":", color=color,
                    label=f"{name} max")
        res_ax.axhline(tol, color=color, linestyle="--", linewidth=0.8, label=f"{name} tol")
    stability_ax.plot(epochs, [m["test_spectral_radius_mean"] for m in history], marker=marker, color="C2",
                      label="spectral radius of J_f(z*), test mean")
    stability_ax.plot(epochs, [m["test_spectral_radius_max"] for m in history], linestyle=":", color="C2",
                      label="spectral radius, test max")
    if "jac_penalty" in history[0]:
        stability_ax.plot(epochs, [m["jac_penalty"] for m in history], marker=marker, color="C3",
                          label="Jacobian penalty ||J||_F^2/D (train)")
    steps_ax.set(xlabel="epoch", ylabel="steps per solve", title="solver steps (train)")
    res_ax.set(xlabel="epoch", ylabel="relative residual", yscale="log", title="final residuals (train)")
    stability_ax.set(xlabel="epoch", ylabel="value", title="stability of the fixed point")
    for ax in (steps_ax, res_ax, stability_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(workdir / "solver.png", dpi=100)
    plt.close(fig)


def plot_budgets(rows: list[dict], workdir: str | Path, *, trained_with: int) -> None:
    """Writes ``budget.png``: test accuracy (and converged fraction) against the forward budget.

    Args:
      rows: one dict per budget, as :func:`train.evaluate_budgets` returns them.
      workdir: output folder.
      trained_with: the training run's ``--f-max-iter``, drawn as a reference line.
    """
    budgets = [row["budget"] for row in rows]
    fig, (acc_ax, steps_ax) = plt.subplots(1, 2, figsize=(10, 4))
    acc_ax.plot(budgets, [row["test_accuracy"] for row in rows], marker="o", label="test accuracy")
    acc_ax.plot(budgets, [row["converged"] for row in rows], marker="s", linestyle=":", label="converged fraction")
    steps_ax.plot(budgets, [row["steps_mean"] for row in rows], marker="o", color="C2", label="mean f evaluations")
    steps_ax.plot(budgets, budgets, linestyle="--", color="gray", linewidth=0.8, label="budget")
    for ax in (acc_ax, steps_ax):
        ax.axvline(trained_with, color="C3", linestyle="--", linewidth=0.8, label="training --f-max-iter")
        ax.set(xlabel="forward budget (f evaluations)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    acc_ax.set(ylabel="fraction", title="test-time compute: accuracy")
    steps_ax.set(ylabel="f evaluations per example", title="f evaluations spent")
    fig.tight_layout()
    fig.savefig(Path(workdir) / "budget.png", dpi=100)
    plt.close(fig)
