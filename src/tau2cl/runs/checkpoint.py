"""Checkpoints: a from_pretrained-loadable model + tokenizer, and the trainer state to resume.

The model is saved as plain safetensors in every case: a model read from a GGUF file (which
transformers dequantizes on load but refuses to save) is written as the tensors the trainer holds,
with a config that names no quantization, so a checkpoint loads without the GGUF reader.

A checkpoint is written into a temporary sibling folder and renamed into place, so a kill during a
save leaves the previous checkpoint intact. Its last file is `manifest.json`: the size and SHA-256
of every other file in the folder (whatever wrote them: weights, adapters, tokenizer, state), so a
checkpoint is complete only when its manifest is there and every file still matches it. Resuming
from a log_dir takes the latest checkpoint that verifies and names each one it skips.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from tau2cl.errors import UserError
from tau2cl.runs.checkpoint_files import (
    MANIFEST_FILE,
    PROGRESS_FILE,
    RUN_CONFIG_FILE,
    STATE_FILE,
    build_manifest,
    checkpoint_candidates,
    checkpoint_problem,
    is_checkpoint,
)


class CheckpointSaveError(Exception):
    """A checkpoint could not be written; its temporary folder is already removed."""

    def __init__(self, path: Path, cause: BaseException):
        text = str(cause).strip()
        reason = getattr(cause, "strerror", None) or (text.splitlines()[0] if text else type(cause).__name__)
        super().__init__(f"could not save checkpoint '{path}' ({reason})")
        self.path = path


def domain_checkpoint_name(domain_idx: int) -> str:
    return f"checkpoint_task_{domain_idx}"


def step_checkpoint_name(global_step: int) -> str:
    return f"checkpoint_step_{global_step}"


def sft_checkpoint_name(domain_idx: int, sft_step: int) -> str:
    """A checkpoint taken during a domain's supervised warm-start steps (they do not count as global steps)."""
    return f"checkpoint_task_{domain_idx}_sft_{sft_step}"


def save_checkpoint(path: Path, model: Any, tokenizer: Any, state: dict) -> Path:
    """Write model, tokenizer and `state` (torch-saveable) to `path` atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        if read_from_gguf(model):
            write_plain_model(model, tmp)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save(state, tmp / STATE_FILE)
        # the position alone, so finding the latest checkpoint never loads optimizer states
        (tmp / PROGRESS_FILE).write_text(json.dumps(state.get("progress", {})))
        if "config" in state:  # the flags alone, so a resume's check needs no torch
            (tmp / RUN_CONFIG_FILE).write_text(json.dumps(state["config"], indent=1))
        (tmp / MANIFEST_FILE).write_text(json.dumps(build_manifest(tmp), indent=1))  # last: marks it complete
    except (OSError, RuntimeError) as exc:  # disk full, folder gone or unwritable (torch wraps OSErrors)
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointSaveError(path, exc) from exc
    old = path.with_name(path.name + ".old")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)
    return path


def read_from_gguf(model: Any) -> bool:
    """Whether transformers loaded this model from a GGUF file (its config names the gguf quantization)."""
    quantization = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(quantization, dict):
        return quantization.get("quant_method") == "gguf"
    return getattr(quantization, "quant_method", None) == "gguf"


def write_plain_model(model: Any, folder: str | Path, named_tensors: Iterable[tuple[str, torch.Tensor]] | None = None) -> None:
    """The model's config (without a quantization_config: the tensors are plain) and its weights
    (safetensors, Hugging Face names), as `from_pretrained` loads them.

    `named_tensors`: the weights to write (e.g. LoRA's merged ones); by default the parameters as
    held, those of a model with LoRA adapters injected under the plain model's names (its base
    weights; the adapters left out). A tied lm_head is written once, as its embedding.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(config, indent=1, default=str))
    tensors = {name: t.detach().cpu().contiguous() for name, t in named_tensors or base_parameters(model)}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def base_parameters(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's parameters under the plain model's names: LoRA adapters left out, the layers
    they wrap named as before injection (`q_proj.base_layer.weight` -> `q_proj.weight`)."""
    for name, param in model.named_parameters():
        if ".lora_" not in name:
            yield name.replace(".base_layer.", "."), param


def find_checkpoint(path: str | Path, skipped: Callable[[str], None] = lambda line: None) -> Path:
    """A checkpoint folder, or the latest complete checkpoint inside a log_dir.

    Candidates are tried from the latest back; each one that does not verify is reported through
    `skipped` (one line) and the previous one is tried.
    """
    path = Path(path)
    if is_checkpoint(path):
        problem = checkpoint_problem(path)
        if problem:
            raise UserError(f"checkpoint '{path}' cannot be resumed: {problem}; give an earlier checkpoint or its log_dir.")
        return path
    for checkpoint in checkpoint_candidates(path):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint
        skipped(f"skipping checkpoint '{checkpoint}': {problem}.")
    raise UserError(f"no complete checkpoint in '{path}': every one failed verification (see the lines above).")


def load_state(path: Path) -> dict:
    try:
        return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated, empty or garbled: the user's file, not a bug
        raise UserError(f"cannot read '{Path(path) / STATE_FILE}' ({type(exc).__name__}); resume from an earlier checkpoint.") from None


def non_finite_count(tensors) -> int:
    """Elements that are NaN or infinite, over floating-point tensors found in nested containers."""
    if isinstance(tensors, torch.Tensor):
        return int((~torch.isfinite(tensors)).sum()) if tensors.is_floating_point() else 0
    if isinstance(tensors, dict):
        return sum(non_finite_count(v) for v in tensors.values())
    if isinstance(tensors, (list, tuple)):
        return sum(non_finite_count(v) for v in tensors)
    if isinstance(tensors, float):
        return int(not math.isfinite(tensors))
    return 0


def load_model_weights(model: Any, path: Path) -> None:
    """Copy a checkpoint's weights into an already-built model (same architecture)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(path).glob("*.safetensors")):
        try:
            state.update(load_file(str(shard)))
        except Exception as exc:  # truncated or garbled file
            raise UserError(f"cannot read '{shard}' ({exc}); resume from an earlier checkpoint.") from None
    bad = non_finite_count(state)
    if bad:
        raise UserError(f"checkpoint '{path}' holds {bad} non-finite weights; resume from an earlier checkpoint.")
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise UserError(f"checkpoint '{path}' does not match the model (missing {sorted(missing)[:3]}, unexpected {unexpected[:3]}).")


# ---- run files and random states ---------------------------------------------------------
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
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():  # the current GPU's default generator: a vLLM engine samples with it
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(generator: torch.Generator, state: dict) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
