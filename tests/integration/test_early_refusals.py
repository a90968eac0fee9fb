"""Refusals that the flags, the files and the network probe decide come before torch, transformers and
tau2 are imported: each case runs `tau2cl.train.main` in a fresh interpreter and reads which of them
it had loaded when main returned."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tau2cl.config import GRPOConfig
from tau2cl.runs.checkpoint_files import sha256_of
from tiny_run import tiny_flags

HEAVY = ("torch", "transformers", "tau2")
PROBE = (
    "import json, sys; from tau2cl.train import main; code = main(sys.argv[1:]); "
    f"print(json.dumps({{'code': code, 'loaded': [m for m in {HEAVY!r} if m in sys.modules]}}))"
)
HOLD = "import sys, time; from tau2cl.runs.run_folder import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)"


def _main(*flags: str, env: dict | None = None) -> tuple[dict, str]:
    """main(flags) in a new interpreter: ({"code", "loaded"}, its stderr)."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *flags], capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def _assert_refused_light(outcome: tuple[dict, str], *phrases: str) -> None:
    answer, stderr = outcome
    lines = stderr.strip().splitlines()
    assert answer == {"code": 2, "loaded": []}, stderr
    assert len(lines) == 1 and lines[0].startswith("tau2cl: error: "), stderr
    for phrase in phrases:
        assert phrase in lines[0]


def _checkpoint(folder: Path, progress: dict, config: dict) -> None:
    folder.mkdir(parents=True)
    (folder / "progress.json").write_text(json.dumps(progress))
    (folder / "run_config.json").write_text(json.dumps(config))
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_of(p)} for p in folder.iterdir()}
    (folder / "manifest.json").write_text(json.dumps({"files": files}))


def test_a_model_path_that_does_not_exist(tmp_path):
    outcome = _main("--model_name_or_path", str(tmp_path / "no-such-model"), "--log_dir", str(tmp_path / "r"))
    _assert_refused_light(outcome, "model path", "does not exist")
    assert not (tmp_path / "r").exists()


def test_an_uncached_hub_id_when_the_hub_cannot_be_reached(tmp_path):
    env = {"HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    outcome = _main("--model_name_or_path", "nobody/not-cached-anywhere", "--log_dir", str(tmp_path / "r"), env=env)
    _assert_refused_light(outcome, "is not in the local Hugging Face cache and the hub cannot be reached")


def test_the_vllm_backend_without_vllm_installed(tmp_path):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed in this environment; tests/vllm_backend covers the backend there")
    outcome = _main(*tiny_flags(), "--rollout_backend", "vllm", "--log_dir", str(tmp_path / "r"))
    _assert_refused_light(outcome, "needs the vllm package", "pip install -e '.[vllm]'", "install_vllm_cpu.sh")
    assert not (tmp_path / "r").exists()


def test_a_log_dir_that_holds_another_run(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    outcome = _main("--model_name_or_path", "tiny", "--log_dir", str(tmp_path))
    _assert_refused_light(outcome, "already holds a run (metrics.jsonl)", "--overwrite_log_dir")


def test_a_log_dir_beside_a_live_run(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        outcome = _main("--model_name_or_path", "tiny", "--log_dir", str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    _assert_refused_light(outcome, "is in use by a live run", f"pid {holder.pid}")


def test_a_resume_under_a_changed_flag(tmp_path):
    saved = GRPOConfig(model_name_or_path="tiny", task_order=["retail", "airline"]).to_dict()
    _checkpoint(tmp_path / "old" / "checkpoint_task_0", {"global_step": 3, "stages_done": 2}, saved)
    outcome = _main("--model_name_or_path", "tiny", "--log_dir", str(tmp_path / "r"), "--resume_from", str(tmp_path / "old"))
    _assert_refused_light(outcome, "cannot resume from", "--task_order retail airline (now airline retail telecom)")


def test_a_resume_path_without_checkpoints(tmp_path):
    outcome = _main("--model_name_or_path", "tiny", "--log_dir", str(tmp_path / "r"), "--resume_from", str(tmp_path))
    _assert_refused_light(outcome, "no checkpoint found")


def test_a_resume_of_a_finished_run_says_there_is_nothing_left_and_trains_nothing(tmp_path):
    saved = GRPOConfig(model_name_or_path="tiny", task_order=["airline", "retail"]).to_dict()
    _checkpoint(tmp_path / "run" / "checkpoint_task_1", {"global_step": 4, "stages_done": 3}, saved)
    answer, stderr = _main("--model_name_or_path", "tiny", "--task_order", "airline", "retail",
                           "--log_dir", str(tmp_path / "run"), "--resume_from", str(tmp_path / "run"))
    assert answer == {"code": 0, "loaded": []}
    assert stderr.strip().splitlines() == [
        f"tau2cl: nothing left to do: checkpoint '{tmp_path / 'run' / 'checkpoint_task_1'}' is the end of its run "
        f"(every domain trained and evaluated: airline, retail); its results are in '{tmp_path / 'run'}'."
    ]



@pytest.mark.slow  # ~20 s: one domain of the tiny run, then its resume
def test_resuming_a_real_finished_run_leaves_its_files_as_they_are(tmp_path):
    flags = [*tiny_flags(task_order=["airline"], num_steps_per_task=1), "--log_dir", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{Path(__file__).parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    first = subprocess.run([sys.executable, "-m", "tau2cl.train", *flags], capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr
    before = {p.name: p.read_bytes() for p in (tmp_path / "summary.json", tmp_path / "metrics.jsonl", tmp_path / "train.log")}
    answer, stderr = _main(*flags, "--resume_from", str(tmp_path), env={"PYTHONPATH": env["PYTHONPATH"]})
    assert answer == {"code": 0, "loaded": []}
    assert stderr.strip().splitlines() == [
        f"tau2cl: nothing left to do: checkpoint '{tmp_path / 'checkpoint_task_0'}' is the end of its run "
        f"(every domain trained and evaluated: airline); its results are in '{tmp_path}'."
    ]
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
