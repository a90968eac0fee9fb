"""A saved checkpoint carries its run's flags in run_config.json, which the start of a resume reads
without torch; a checkpoint saved without them is read as having none."""

from __future__ import annotations

import json

from tau2cl.config import GRPOConfig
from tau2cl.runs.checkpoint import checkpoint_problem, find_checkpoint, save_checkpoint
from tau2cl.runs.checkpoint_files import RUN_CONFIG_FILE, read_listed_json
from tau2cl.runs.preflight import saved_run


def test_a_saved_checkpoint_holds_its_flags_beside_the_trainer_state(tmp_path, tiny_model, tiny_tokenizer):
    config = GRPOConfig(model_name_or_path="tiny", task_order=["retail", "airline"], seed=11).to_dict()
    progress = {"task_idx": 1, "global_step": 4, "stages_done": 2}
    path = save_checkpoint(tmp_path / "checkpoint_task_0", tiny_model, tiny_tokenizer, {"config": config, "progress": progress})
    assert checkpoint_problem(path) is None
    assert RUN_CONFIG_FILE in json.loads((path / "manifest.json").read_text())["files"]
    assert read_listed_json(path, RUN_CONFIG_FILE) == config
    saved = saved_run(str(tmp_path))
    assert (saved.checkpoint, saved.config, saved.progress) == (path, config, progress)
    assert find_checkpoint(tmp_path) == path  # the same checkpoint the full resume takes


def test_a_state_without_a_config_writes_no_flags_file(tmp_path, tiny_model, tiny_tokenizer):
    path = save_checkpoint(tmp_path / "c", tiny_model, tiny_tokenizer, {"progress": {"global_step": 1}})
    assert not (path / RUN_CONFIG_FILE).exists() and checkpoint_problem(path) is None
    assert saved_run(str(path)).config is None
