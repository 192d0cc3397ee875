"""Orbax checkpoints of the experiment: one per epoch, the train state plus the config and metrics history as JSON."""
from __future__ import annotations

from pathlib import Path

import orbax.checkpoint as ocp

from .config import RESUMABLE_FIELDS, Config
from .errors import BadInputError, ExistsError, MissingError

MAX_TO_KEEP = 3


def open_manager(workdir: Path, resume: bool) -> ocp.CheckpointManager:
    """Opens ``workdir/checkpoints``, refusing to overwrite a run or to resume from nothing."""
    directory = workdir / "checkpoints"
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=MAX_TO_KEEP,
                                                                                    create=True))
    latest = manager.latest_step()
    if resume and latest is None:
        contents = sorted(p.name for p in directory.iterdir())
        raise MissingError(
            f"--resume: no complete checkpoint in {directory}"
            + (f" (it holds {contents}; a corrupt or unfinished save?)" if contents else "")
        )
    if not resume and latest is not None:
        raise ExistsError(
            f"{workdir} already holds a checkpoint (epoch {latest}); pass --resume to continue "
            "that run, or choose another --workdir"
        )
    return manager


def save(manager: ocp.CheckpointManager, epoch: int, state: dict, config: Config, history: list[dict]) -> None:
    """Saves epoch ``epoch``: every process takes part, orbax writes each one's files."""
    meta = {"epoch": epoch, "config": config.as_json(), "history": history}
    manager.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))


def saved_config(manager: ocp.CheckpointManager) -> dict:
    """The settings (``Config.as_json()``) saved with the latest checkpoint."""
    epoch = manager.latest_step()
    return manager.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta["config"]


# What orbax (and tensorstore, whose errors are ValueErrors) raises for a checkpoint that is damaged, half
# written, unreadable or of another model's shapes: the user's to fix, said in one line. Other exceptions
# (a TypeError from a bug, say) keep their type and traceback.
CHECKPOINT_PROBLEMS = (ValueError, KeyError, OSError)


def restore(manager: ocp.CheckpointManager, state: dict, config: Config) -> tuple[dict, list[dict]]:
    """Restores the latest checkpoint into ``state``'s shapes and shardings.

    Returns:
      ``(state, history)``: the train state and the per-epoch metrics so far.

    Raises:
      BadInputError: an unreadable checkpoint, or one written with other settings.
    """
    epoch = manager.latest_step()
    try:
        restored = manager.restore(
            epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore(state), meta=ocp.args.JsonRestore())
        )
    except CHECKPOINT_PROBLEMS as e:  # what a damaged or mismatched checkpoint raises; anything else is a bug
        raise BadInputError(
            f"--resume: cannot read the checkpoint of epoch {epoch} in {manager.directory} "
            f"(corrupt, or written by different code?): {type(e).__name__}: {e}"
        ) from e
    saved = {k: v for k, v in restored.meta["config"].items() if k not in RESUMABLE_FIELDS}
    current = config.resumable_view()
    if saved != current:
        diff = {k: (saved.get(k), current.get(k)) for k in sorted(saved | current) if saved.get(k) != current.get(k)}
        raise BadInputError(f"--resume: these settings differ from the checkpointed run's (saved, given): {diff}")
    return restored.state, restored.meta["history"]

