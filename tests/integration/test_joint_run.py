"""A joint run learns every domain in one mixed stream, with the sequential run's step budget.

The quick test's setting on airline -> retail (the tiny model, one task per domain that needs an
action, so the do-nothing floor is 0). A sequential run learns airline, then forgets it while it
learns retail (the quick test shows that); a joint run's stages each draw from both domains, so
its final row solves both.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tau2cl.config import parse_config
from tau2cl.trainer import GRPOTrainer

pytestmark = pytest.mark.slow  # ~70 s: two stages of 60 warm-start and 2 GRPO steps

ROOT = Path(__file__).resolve().parents[2]


def test_joint_run_solves_both_domains_at_the_end_with_the_sequential_budget(tmp_path, single_torch_thread):
    config = parse_config([
        "--config", str(ROOT / "configs" / "quick_test.yaml"), "--cl_algorithm", "joint",
        "--task_order", "airline", "retail", "--log_dir", str(tmp_path), "--no-use_progress_bar",
    ])
    summary = GRPOTrainer(config).train()
    assert summary["accuracy_matrix"][-1] == [1.0, 1.0]
    assert summary["global_step"] == 2 * config.num_steps_per_task  # the same GRPO steps as sequential

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    sft = [r for r in records if r["type"] == "sft"]
    assert len(sft) == 2 * config.sft_steps_per_task  # the same warm-start steps as sequential
    log = (tmp_path / "train.log").read_text()
    for part in ("Task 0", "Task 1"):  # both demonstrations feed every stage's warm start
        assert f"[SFT] {part} (airline+retail): 2 of 2 golden demonstrations score 1.0" in log
    assert "joint part 1/2: warm start and GRPO steps draw from all domains' train tasks mixed" in log
