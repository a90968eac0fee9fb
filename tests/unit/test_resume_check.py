"""Resume compares the saved config with the new one; only RESUME_MAY_CHANGE may differ."""

from __future__ import annotations

from tau2cl.config import RESUME_MAY_CHANGE, GRPOConfig, field_names
from tau2cl.runs.resume_check import config_differences, refusal


def test_every_flag_that_may_change_is_a_field():
    assert set(RESUME_MAY_CHANGE) <= set(field_names())


def test_differences_name_the_flags_and_both_values_and_ignore_what_may_change():
    saved = GRPOConfig(cl_algorithm="ewc", learning_rate=1e-5, log_interval=5).to_dict()
    now = GRPOConfig(cl_algorithm="sequential", learning_rate=1e-5, log_interval=1, seed=7).to_dict()
    diffs = config_differences(saved, now, RESUME_MAY_CHANGE, GRPOConfig().to_dict())
    assert diffs == [("seed", 42, 7), ("cl_algorithm", "ewc", "sequential")]  # field order; log_interval may change
    line = refusal("runs/x/checkpoint_task_0", diffs)
    assert line == (
        "cannot resume from 'runs/x/checkpoint_task_0': it was trained with --seed 42 (now 7); "
        "--cl_algorithm ewc (now sequential); resume with the saved values, or start a new run in another --log_dir."
    )


def test_a_flag_older_than_the_checkpoint_counts_as_its_default():
    defaults = {"a": 1, "b": 2}
    assert config_differences({"a": 1}, {"a": 1, "b": 2}, (), defaults) == []
    assert config_differences({"a": 1}, {"a": 1, "b": 3}, (), defaults) == [("b", 2, 3)]
    assert config_differences({"a": 1, "gone": 0}, {"a": 1}, (), defaults) == []
