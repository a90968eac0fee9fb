"""Stop and resume with vLLM sampling: SIGTERM inside a vLLM rollout stops the run within the usual
bound, abandoning the step, and the resumed run ends like an uninterrupted one (the engine
restarts on the checkpoint's weights and samples from the random state saved with it)."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest
from train_runs import records, run_all, summary, train_command

from tiny_run import tiny_flags

pytestmark = pytest.mark.vllm

PROBE = Path(__file__).with_name("stop_probe.py")
STEPS = 3
RUN = [
    *tiny_flags(num_steps_per_task=STEPS, learning_rate=1e-3, cl_algorithm="replay", kl_coef=0.04, seed=5),
    "--rollout_backend", "vllm",
]  # fmt: skip
STOP_AT = (1, 2)  # retail's second GRPO step
STOP_BOUND_S = 30  # as for the own engine's stops


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The uninterrupted run and the interrupted one side by side, then the resume: (uninterrupted
    log_dir, interrupted log_dir, its result, its train records before the resume, seconds from
    the signal to its end, the resumed run's result)."""
    base = tmp_path_factory.mktemp("resume")
    full, cut, probe_out = base / "full", base / "cut", base / "signal.json"
    stop_probe = [sys.executable, str(PROBE), str(probe_out), *map(str, STOP_AT), *RUN, "--log_dir", str(cut)]
    first = run_all({"full": train_command(full, *RUN), "cut": stop_probe})
    assert first["full"].returncode == 0, first["full"].stderr[-3000:]
    stopped = first["cut"]
    seconds = stopped.ended_at - json.loads(probe_out.read_text())["signalled_at"]
    before = [(r["task_idx"], r["step"]) for r in records(cut, "train")]
    resumed = run_all({"resume": train_command(cut, *RUN, "--resume_from", str(cut))})["resume"]
    return full, cut, stopped, before, seconds, resumed


def test_sigterm_inside_a_vllm_rollout_stops_within_the_bound_and_abandons_the_step(runs):
    _, _, stopped, before, seconds, _ = runs
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr and "--resume_from" in stopped.stderr
    assert "SIGTERM received: stopping within seconds" in stopped.stderr
    assert seconds < STOP_BOUND_S
    # back to the boundary before the signalled step: the step's record was never written
    assert before[-1] == (STOP_AT[0], STOP_AT[1] - 1), before


def test_the_resumed_run_ends_like_the_uninterrupted_one(runs):
    full, cut, _, _, _, resumed = runs
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = summary(full), summary(cut)
    for key in ("accuracy_matrix", "pass_rate_matrix", "final_measures", "global_step", "stages_completed"):
        assert a[key] == b[key], key
    steps_a = [(r["task_idx"], r["step"], r["reward_mean"], r["loss"]) for r in records(full, "train")]
    steps_b = [(r["task_idx"], r["step"], r["reward_mean"], r["loss"]) for r in records(cut, "train")]
    assert steps_b == steps_a  # every step once, with the same numbers: the same samples after the resume
    assert len(steps_a) == 2 * STEPS
    assert all(r["logprob_gap_max"] <= 1e-4 for r in records(cut, "train"))
