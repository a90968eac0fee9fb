"""A checkpoint folder as files, without torch: the files' names, the manifest (every file's size
and checksum: built by a save, checked before a resume), which folders are checkpoints and how far
each got, and the small JSON files a manifest vouches for.

The start of a run reads these before any heavy import, so a resume it must refuse is refused in
well under a second; loading the weights and the trainer state (checkpoint.py) comes later.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from tau2cl.errors import UserError

STATE_FILE = "trainer_state.pt"  # the trainer state (torch.save): optimizer, strategy, random streams
PROGRESS_FILE = "progress.json"  # the position alone, so finding the latest checkpoint loads nothing else
RUN_CONFIG_FILE = "run_config.json"  # the run's flags, as the trainer state holds them
MANIFEST_FILE = "manifest.json"  # size and SHA-256 of every other file; written last
_CHUNK = 1 << 22  # bytes read at a time when hashing


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(folder: Path) -> dict:
    """{"files": {relative path: {"size", "sha256"}}} of every file under `folder` but the manifest."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    return {
        "files": {
            p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_of(p)} for p in files
        }
    }


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be trusted (incomplete, changed, unreadable), or None."""
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.exists():
        return "it has no manifest.json, so its save never finished"
    try:
        listed = json.loads(manifest_path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "its manifest.json is unreadable"
    for name, entry in listed.items():
        file = folder / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry["size"]:
            return f"{name} has {file.stat().st_size} bytes, not the {entry['size']} saved"
        if sha256_of(file) != entry["sha256"]:
            return f"{name} does not match its checksum (changed or corrupted after the save)"
    return None


def is_checkpoint(path: Path) -> bool:
    """Whether `path` is a checkpoint folder itself (rather than a log_dir holding some)."""
    return (path / STATE_FILE).exists() or (path / MANIFEST_FILE).exists()


def checkpoint_candidates(log_dir: Path) -> list[Path]:
    """The checkpoint folders in a log_dir, latest first (unverified); a UserError when there is none."""
    candidates = [
        p for p in (log_dir.glob("checkpoint_*") if log_dir.is_dir() else [])
        if p.is_dir() and p.suffix not in (".tmp", ".old")
    ]
    if not candidates:
        raise UserError(f"no checkpoint found at '{log_dir}' (expected a checkpoint folder or a log_dir holding one).")
    return sorted(candidates, key=_position, reverse=True)


def _position(checkpoint: Path) -> tuple[int, int, int]:
    """How far a checkpoint got: global step, then matrix rows filled (a domain end comes last),
    then supervised steps into the next domain.

    An unreadable progress.json sorts first, so it is tried last (and its verification says why).
    """
    try:
        progress = json.loads((checkpoint / PROGRESS_FILE).read_text())
        return int(progress.get("global_step", 0)), int(progress.get("stages_done", 0)), int(progress.get("sft_step", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return -1, -1, -1


def read_listed_json(checkpoint: Path, name: str) -> Any | None:
    """The JSON file `name` of a checkpoint when its manifest lists it and it still matches (size and
    checksum); None otherwise (no manifest, not listed, changed, unreadable)."""
    try:
        entry = json.loads((checkpoint / MANIFEST_FILE).read_text())["files"][name]
        path = checkpoint / name
        if path.stat().st_size != entry["size"] or sha256_of(path) != entry["sha256"]:
            return None
        return json.loads(path.read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None
