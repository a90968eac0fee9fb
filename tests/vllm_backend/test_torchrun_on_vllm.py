"""vLLM sampling under torchrun: two gloo processes on CPU, each rank with its own engine on its own
shard of the episodes, under DDP and under FSDP2.

Each run is tests/distributed/dist_probe.py's `train` (tau2cl.train.main inside each rank, digests
of the parameters before and after, gathered over the ranks' process group once training is over,
so the group must outlive the engines' shutdown).
"""

from __future__ import annotations

import json
import sys

import pytest
from train_runs import ROOT, records, run_all

from tiny_run import tiny_flags

pytestmark = pytest.mark.vllm

PROBE = ROOT / "tests" / "distributed" / "dist_probe.py"
WORLD = 2
STEPS = 2
RUN = [*tiny_flags(num_steps_per_task=STEPS, learning_rate=1e-3), "--rollout_backend", "vllm"]


def _probe_train(tmp, parallelism: str) -> tuple[dict, object]:
    out, log_dir, plan = tmp / "probe.json", tmp / "run", tmp / "plan.json"
    plan.write_text(json.dumps([{"out": str(out), "argv": [*RUN, "--parallelism", parallelism, "--log_dir", str(log_dir)]}]))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
        str(PROBE), "train", str(plan),
    ]  # fmt: skip
    result = run_all({parallelism: command}, timeout=600)[parallelism]
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text()), log_dir


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_ranks_train_with_their_own_engines_and_end_bit_identical(tmp_path, parallelism):
    probe, log_dir = _probe_train(tmp_path, parallelism)
    ranks = probe["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == WORLD for r in ranks)
    assert len({r["initial_digest"] for r in ranks}) == 1
    assert ranks[0]["final_digest"] != ranks[0]["initial_digest"], "training did not change the weights"
    assert ranks[1]["final_digest"] == ranks[0]["final_digest"], "the ranks' parameters diverged"
    # each rank sampled its own shard: the step's tasks differ between the ranks
    for mine, theirs in zip(ranks[0]["steps"], ranks[1]["steps"], strict=True):
        assert set(mine["tasks"]).isdisjoint(theirs["tasks"])
    train = records(log_dir, "train")
    assert len(train) == 2 * STEPS
    for r in train:  # over both ranks' tokens: each engine follows the trained weights
        assert r["logprob_gap_max"] <= 1e-4 and r["weight_syncs"] >= 1
        assert r["num_episodes"] == WORLD * 2  # 2 samples of one task per rank
