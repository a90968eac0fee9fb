"""The tests' tiny run is the same run as a GRPOConfig and as `tau2cl train` flags."""

from __future__ import annotations

import pytest

from tau2cl.config import parse_config
from tiny_run import TINY_RUN, tiny_config, tiny_flags


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"compact_domains": False, "use_progress_bar": True, "eval_max_tasks": None},
        {"task_order": ["telecom"], "learning_rate": 3e-2, "kl_coef": 0.04, "fusion_alpha_grid": [0.5, 1.0]},
    ],
)
def test_the_flags_parse_to_the_config(overrides):
    assert parse_config(tiny_flags(**overrides)).to_dict() == tiny_config(**overrides).to_dict()


def test_overrides_replace_the_shared_values_and_the_rest_stay():
    config = tiny_config(max_new_tokens=12, seed=3)
    assert (config.max_new_tokens, config.seed) == (12, 3)
    assert all(getattr(config, name) == value for name, value in TINY_RUN.items() if name != "max_new_tokens")
    flags = tiny_flags(use_progress_bar=True)
    assert "--use_progress_bar" in flags and "--no-use_progress_bar" not in flags
