"""What a run's files decide before anything heavy loads: a log_dir that a live run holds or another
run has used, a resume that the checkpoint's saved flags refuse, and a resume with nothing left to do.

Everything here reads small files (the lock, the folder's names, a checkpoint's progress.json and
run_config.json), so a refusal comes in a fraction of a second rather than after torch,
transformers and tau2 have loaded. The trainer checks the same again when it starts (it holds the
lock for the run's life, every rank agrees, and it reads the full trainer state); these checks only
answer sooner, and never create or delete anything but the lock file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tau2cl.errors import UserError
from tau2cl.runs.checkpoint_files import (
    MANIFEST_FILE,
    PROGRESS_FILE,
    RUN_CONFIG_FILE,
    checkpoint_candidates,
    checkpoint_problem,
    is_checkpoint,
    read_listed_json,
)
from tau2cl.runs.resume_check import config_differences, refusal
from tau2cl.runs.run_folder import RunLock, log_dir_refusal, write_refusal


def check_log_dir(log_dir: str, resume_from: str | None, overwrite: bool) -> None:
    """Refuse a log_dir that cannot be written, that a live run holds or whose files belong to another run."""
    problem = write_refusal(log_dir)
    if problem:
        raise UserError(problem)
    if not Path(log_dir).is_dir():
        return  # a new folder: nobody holds it and it holds nothing
    lock = RunLock(log_dir)
    try:
        lock.acquire()
    except OSError:
        return  # a file system that refuses the lock file: the trainer's own check words that
    lock.release()
    problem = log_dir_refusal(log_dir, resume_from, overwrite)
    if problem:
        raise UserError(problem)


@dataclass
class SavedRun:
    """The checkpoint a resume would take, as its small files tell it."""

    checkpoint: Path
    config: dict[str, Any] | None  # its run's flags; None when it holds no run_config.json
    progress: dict[str, Any] | None  # how far its run got (progress.json)


def saved_run(resume_from: str) -> SavedRun | None:
    """The latest complete checkpoint that `--resume_from` names (a checkpoint folder or a log_dir);
    None when there is none to read here (the trainer's full check then says why). A UserError
    when the path holds no checkpoint at all."""
    path = Path(resume_from)
    for checkpoint in [path] if is_checkpoint(path) else checkpoint_candidates(path):
        if (checkpoint / MANIFEST_FILE).exists():  # a finished save, as a resume takes
            return SavedRun(
                checkpoint, read_listed_json(checkpoint, RUN_CONFIG_FILE), read_listed_json(checkpoint, PROGRESS_FILE)
            )
    return None


def check_resume(
    saved: SavedRun, current: Mapping[str, Any], may_change: Iterable[str], defaults: Mapping[str, Any]
) -> None:
    """Refuse a resume under flags the checkpoint's run did not have (those in `may_change` aside)."""
    if saved.config is None:
        return
    differences = config_differences(saved.config, current, may_change, defaults)
    if differences:
        raise UserError(refusal(str(saved.checkpoint), differences))


def nothing_left(saved: SavedRun) -> str | None:
    """The line for a resume from a checkpoint that ends its run (every domain trained and
    evaluated, all rows of the accuracy matrix filled), or None when there is work left.

    Such a checkpoint must verify against its manifest (every file hashed): a damaged one is left
    to the resume, which falls back to the checkpoint before it and redoes what followed.
    """
    if saved.config is None or saved.progress is None:
        return None
    order = list(saved.config.get("task_order") or [])
    if not order or int(saved.progress.get("stages_done", 0)) <= len(order):
        return None
    if checkpoint_problem(saved.checkpoint) is not None:
        return None
    return (
        f"nothing left to do: checkpoint '{saved.checkpoint}' is the end of its run (every domain trained "
        f"and evaluated: {', '.join(order)}); its results are in '{saved.checkpoint.parent}'."
    )
