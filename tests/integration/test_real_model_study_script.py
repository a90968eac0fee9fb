"""scripts/real_model_study.sh with a stand-in interpreter that records each call: every arm runs
once with its flags over the study's config, an arm with a checkpoint resumes from its folder (the
trainer ends a finished one at once), one without starts again, a failed one fails the script, and
the report covers every arm that logged."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "real_model_study.sh"
ARMS = ["warm_start_seed1", "grpo_seed1", "replay", "ewc", "joint", "progressive", "warm_start_seed2", "grpo_seed2"]

# Records its arguments; a training call logs (metrics.jsonl), then "finishes" (writes its last
# checkpoint folder) unless its log_dir's name is in $FAIL_ARMS, where it exits 1.
STAND_IN = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
if [[ "$1 $2" == "-m tau2cl.train" ]]; then
    while [[ $# -gt 0 ]]; do [[ "$1" == --log_dir ]] && dir="$2"; shift; done
    mkdir -p "$dir"
    echo '{}' > "$dir/metrics.jsonl"
    [[ " $FAIL_ARMS " == *" $(basename "$dir") "* ]] && exit 1
    mkdir -p "$dir/checkpoint_task_1"
fi
exit 0
"""


def _run(tmp_path: Path, fail: str = "", arms: str | None = None, extra: tuple[str, ...] = ()) -> tuple[subprocess.CompletedProcess, list[str]]:
    stand_in = tmp_path / "python"
    stand_in.write_text(STAND_IN)
    stand_in.chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.unlink(missing_ok=True)
    env = {**os.environ, "PYTHON": str(stand_in), "CALLS": str(calls), "FAIL_ARMS": fail, "MODEL": "model.gguf",
           "STUDY_DIR": str(tmp_path / "study"), "JOBS": "2"}
    if arms is not None:
        env["ARMS"] = arms
    result = subprocess.run(["bash", str(SCRIPT), *extra], env=env, capture_output=True, text=True, timeout=120)
    return result, calls.read_text().splitlines() if calls.exists() else []


def _trained(calls: list[str]) -> dict[str, str]:
    """Arm name -> its training call's arguments."""
    out = {}
    for call in calls:
        if call.startswith("-m tau2cl.train"):
            out[call.split("--log_dir ")[1].split()[0].rsplit("/", 1)[1]] = call
    return out


def test_every_arm_runs_once_with_its_flags_then_the_report_covers_them(tmp_path):
    result, calls = _run(tmp_path)
    assert result.returncode == 0, result.stderr
    trained = _trained(calls)
    assert sorted(trained) == sorted(ARMS)
    for call in trained.values():
        assert "--config configs/real_model_study.yaml --model_name_or_path model.gguf" in call
        assert call.endswith("--overwrite_log_dir")
    assert "--num_steps_per_task 0 --seed 2" in trained["warm_start_seed2"]
    assert "--num_steps_per_task" not in trained["grpo_seed1"] and "--seed 1" in trained["grpo_seed1"]
    assert "--cl_algorithm progressive --lora_r 16" in trained["progressive"]
    assert "--cl_algorithm joint" in trained["joint"]
    report = [c for c in calls if c.startswith("-m tau2cl report")]
    study = tmp_path / "study"
    assert report == [f"-m tau2cl report {' '.join(str(study / a) for a in ARMS)} --out {study}"]
    assert "every arm ended in" in result.stdout


def test_a_second_call_resumes_every_arm_with_a_checkpoint_and_a_failure_fails_the_script(tmp_path):
    first, _ = _run(tmp_path, fail="ewc joint")
    assert first.returncode == 1 and "ewc: failed" in first.stderr
    (tmp_path / "study" / "ewc" / "checkpoint_task_0").mkdir()  # cut after airline
    second, calls = _run(tmp_path)
    assert second.returncode == 0, second.stderr
    trained = _trained(calls)
    assert sorted(trained) == sorted(ARMS)
    for arm in set(ARMS) - {"joint"}:  # the finished arms (the trainer ends them at once) and ewc
        assert trained[arm].endswith(f"--resume_from {tmp_path / 'study' / arm}"), arm
    assert trained["joint"].endswith("--overwrite_log_dir")  # cut before any checkpoint: again
    assert "ewc: resuming from its latest checkpoint" in second.stdout


def test_extra_flags_reach_every_arm_before_its_own(tmp_path):
    result, calls = _run(tmp_path, arms="warm_start_seed1 replay", extra=("--num_steps_per_task", "5"))
    assert result.returncode == 0, result.stderr
    trained = _trained(calls)
    assert "model.gguf --num_steps_per_task 5 --num_steps_per_task 0 --seed 1 --log_dir" in trained["warm_start_seed1"]
    assert "model.gguf --num_steps_per_task 5 --cl_algorithm replay --seed 1 --log_dir" in trained["replay"]


def test_an_unknown_arm_is_refused_before_anything_runs(tmp_path):
    result, calls = _run(tmp_path, arms="grpo_seed1 sft")
    assert result.returncode == 2 and "unknown arm 'sft'" in result.stderr and calls == []
