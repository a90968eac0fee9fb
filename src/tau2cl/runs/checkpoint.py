"""Checkpoints: a from_pretrained-loadable model + tokenizer, and the trainer state to resume.

A checkpoint is written into a temporary sibling folder and renamed into place, so a kill during a
save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from tau2cl.errors import UserError

STATE_FILE = "trainer_state.pt"
PROGRESS_FILE = "progress.json"


def domain_checkpoint_name(task_idx: int) -> str:
    return f"checkpoint_task_{task_idx}"


def step_checkpoint_name(global_step: int) -> str:
    return f"checkpoint_step_{global_step}"


def sft_checkpoint_name(task_idx: int, sft_step: int) -> str:
    """A checkpoint taken during a domain's supervised warm-start steps (they do not count as global steps)."""
    return f"checkpoint_task_{task_idx}_sft_{sft_step}"


def save_checkpoint(path: Path, model: Any, tokenizer: Any, state: dict) -> Path:
    """Write model, tokenizer and `state` (torch-saveable) to `path` atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    torch.save(state, tmp / STATE_FILE)
    # the position alone, so finding the latest checkpoint never loads optimizer states
    (tmp / PROGRESS_FILE).write_text(json.dumps(state.get("progress", {})))
    old = path.with_name(path.name + ".old")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)
    return path


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or the latest checkpoint inside a log_dir."""
    path = Path(path)
    if (path / STATE_FILE).exists():
        return path
    candidates = [
        p for p in (path.glob("checkpoint_*") if path.is_dir() else [])
        if p.suffix not in (".tmp", ".old") and (p / STATE_FILE).exists()
    ]
    if not candidates:
        raise UserError(f"no checkpoint found at '{path}' (expected a checkpoint folder or a log_dir holding one).")
    return max(candidates, key=_position)


def _position(checkpoint: Path) -> tuple[int, int, int]:
    """How far a checkpoint got: global step, then matrix rows filled (a domain end comes last),
    then supervised steps into the next domain."""
    small = checkpoint / PROGRESS_FILE
    progress = json.loads(small.read_text()) if small.exists() else load_state(checkpoint).get("progress", {})
    return progress.get("global_step", 0), progress.get("stages_done", 0), progress.get("sft_step", 0)


def load_state(path: Path) -> dict:
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=False)


def load_model_weights(model: Any, path: Path) -> None:
    """Copy a checkpoint's weights into an already-built model (same architecture)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(str(shard)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise UserError(f"checkpoint '{path}' does not match the model (missing {sorted(missing)[:3]}, unexpected {unexpected[:3]}).")


# ---- run files and random states ---------------------------------------------------------
def check_writable(log_dir: str) -> None:
    path = Path(log_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to log_dir '{log_dir}' ({exc.strerror}); choose another --log_dir.") from None


def count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def truncate_lines(path: Path, keep: int) -> None:
    if not path.exists():
        return
    lines = path.read_bytes().splitlines(keepends=True)
    if len(lines) > keep:
        path.write_bytes(b"".join(lines[:keep]))


def rng_state(generator: torch.Generator) -> dict:
    return {"generator": generator.get_state(), "torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(generator: torch.Generator, state: dict) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
