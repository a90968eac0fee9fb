"""Checkpoints verify against their manifest; resume skips a bad one and takes the previous one."""

from __future__ import annotations

import errno
import json
import math

import pytest
import torch

import tau2cl.runs.checkpoint as checkpoint_module
from tau2cl.errors import UserError
from tau2cl.runs.checkpoint import (
    CheckpointSaveError,
    build_manifest,
    checkpoint_problem,
    find_checkpoint,
    load_model_weights,
    non_finite_count,
    save_checkpoint,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_model, tiny_tokenizer):
    """A log_dir with checkpoints at global steps 1 and 2 (fresh copies per test via `log_dir`)."""
    root = tmp_path_factory.mktemp("saved")
    for step in (1, 2):
        save_checkpoint(root / f"checkpoint_step_{step}", tiny_model, tiny_tokenizer, {"progress": {"global_step": step}})
    return root


@pytest.fixture
def log_dir(saved, tmp_path):
    import shutil

    shutil.copytree(saved, tmp_path / "run")
    return tmp_path / "run"


def _flip_a_byte(path, at=-100):
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_the_manifest_lists_every_file_with_its_size_and_checksum(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"abc")
    (tmp_path / "manifest.json").write_text("{}")  # never lists itself
    files = build_manifest(tmp_path)["files"]
    # sha256("abc"), the standard test vector
    assert files == {"adapter/adapter_model.safetensors": {
        "size": 3, "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}}


def test_flipped_bytes_are_skipped_with_one_line_and_the_previous_checkpoint_is_used(log_dir):
    assert checkpoint_problem(log_dir / "checkpoint_step_2") is None
    _flip_a_byte(log_dir / "checkpoint_step_2" / "model.safetensors")
    lines = []
    assert find_checkpoint(log_dir, lines.append) == log_dir / "checkpoint_step_1"
    assert lines == [
        f"skipping checkpoint '{log_dir / 'checkpoint_step_2'}': model.safetensors does not match its checksum "
        "(changed or corrupted after the save)."
    ]


def test_incomplete_truncated_or_unreadable_checkpoints_are_skipped(log_dir):
    (log_dir / "checkpoint_step_2" / "trainer_state.pt").write_bytes(b"")  # truncated
    lines = []
    assert find_checkpoint(log_dir, lines.append) == log_dir / "checkpoint_step_1"
    assert "trainer_state.pt has 0 bytes, not the" in lines[0]
    (log_dir / "checkpoint_step_1" / "progress.json").write_text("{not json")  # unreadable: tried last
    lines.clear()
    with pytest.raises(UserError, match="no complete checkpoint"):
        find_checkpoint(log_dir, lines.append)
    assert [line.split("'")[1].rsplit("/", 1)[1] for line in lines] == ["checkpoint_step_2", "checkpoint_step_1"]
    (log_dir / "checkpoint_step_1" / "manifest.json").unlink()
    assert checkpoint_problem(log_dir / "checkpoint_step_1") == "it has no manifest.json, so its save never finished"


def test_non_finite_weights_and_optimizer_values_are_counted_and_refused(tmp_path, tiny_model):
    assert non_finite_count({"a": torch.tensor([1.0, math.nan, math.inf]), "b": [torch.ones(2), 0.5, float("-inf")],
                             "steps": torch.tensor([3])}) == 3  # nan, inf, -inf; integers never count
    import copy

    from safetensors.torch import save_file

    state = {k: v.clone().contiguous() for k, v in tiny_model.state_dict().items() if not k.endswith("lm_head.weight")}
    first = next(iter(state))
    state[first].view(-1)[:2] = math.nan
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match="holds 2 non-finite weights"):
        load_model_weights(copy.deepcopy(tiny_model), tmp_path)


def test_a_full_disk_during_a_save_removes_the_temporary_folder_and_keeps_the_old_one(
    log_dir, tiny_model, tiny_tokenizer, monkeypatch
):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", no_space)
    target = log_dir / "checkpoint_step_2"
    with pytest.raises(CheckpointSaveError) as error:
        save_checkpoint(target, tiny_model, tiny_tokenizer, {"progress": {"global_step": 3}})
    assert str(error.value) == f"could not save checkpoint '{target}' (No space left on device)"
    assert not (log_dir / "checkpoint_step_2.tmp").exists()
    assert checkpoint_problem(target) is None
    assert json.loads((target / "progress.json").read_text()) == {"global_step": 2}
