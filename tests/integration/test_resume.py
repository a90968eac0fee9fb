"""Nothing lost: SIGTERM then resume equals an uninterrupted run; atomic checkpoints; bad input; NaN."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tau2cl.rl.update as update_module
from tau2cl.config import GRPOConfig
from tau2cl.runs.checkpoint import build_manifest, load_state, save_checkpoint
from tau2cl.trainer import GRPOTrainer
from tiny_run import tiny_config, tiny_flags

HERE = Path(__file__).parent
RUN = tiny_flags(num_steps_per_task=3, learning_rate=1e-3, cl_algorithm="replay", kl_coef=0.04, seed=5)


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}


def _command(log_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tau2cl.train", *RUN, "--log_dir", str(log_dir), *extra]


def _train_records(log_dir: Path) -> list[dict]:
    path = log_dir / "metrics.jsonl"
    if not path.exists():
        return []
    text = path.read_text()
    complete = text[: text.rfind("\n") + 1]  # a line the run is still writing waits for the next read
    return [r for r in map(json.loads, complete.splitlines()) if r["type"] == "train"]


@pytest.mark.slow
def test_sigterm_mid_domain_then_resume_ends_like_an_uninterrupted_run(tmp_path):
    # the uninterrupted run and the one to interrupt run side by side (one thread each)
    full = subprocess.Popen(
        _command(tmp_path / "full"), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    cut = tmp_path / "cut"
    proc = subprocess.Popen(_command(cut), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not any(r["task_idx"] == 1 for r in _train_records(cut)):  # mid-way through retail
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be interrupted"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    signalled = time.time()
    _, err = proc.communicate(timeout=600)
    assert time.time() - signalled < 30  # mid-rollout: the step is abandoned, not finished
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err and "--resume_from" in err
    assert "SIGTERM received: stopping within seconds" in err  # acknowledged at once
    assert not (cut / "summary.json").exists() or json.loads((cut / "summary.json").read_text())["stages_completed"] < 2

    resumed = subprocess.run(
        _command(cut, "--resume_from", str(cut)), env=_env(), capture_output=True, text=True, timeout=900
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _, full_err = full.communicate(timeout=900)
    assert full.returncode == 0, full_err[-2000:]
    a = json.loads((tmp_path / "full" / "summary.json").read_text())
    b = json.loads((cut / "summary.json").read_text())
    for key in ("accuracy_matrix", "pass_rate_matrix", "final_measures", "global_step", "stages_completed"):
        assert a[key] == b[key], key
    steps_a = [(r["task_idx"], r["step"], r["reward_mean"], r["loss"]) for r in _train_records(tmp_path / "full")]
    steps_b = [(r["task_idx"], r["step"], r["reward_mean"], r["loss"]) for r in _train_records(cut)]
    assert steps_b == steps_a  # every step once, with the same numbers


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, tiny_model, tiny_tokenizer, monkeypatch):
    from transformers import AutoModelForCausalLM

    path = tmp_path / "checkpoint_step_1"
    save_checkpoint(path, tiny_model, tiny_tokenizer, {"global_step": 1})

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies half-way through writing the new checkpoint

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, tiny_model, tiny_tokenizer, {"global_step": 2})
    monkeypatch.undo()
    assert load_state(path)["global_step"] == 1
    AutoModelForCausalLM.from_pretrained(path)


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tau2cl.train", *args], capture_output=True, text=True, timeout=300)


def _assert_one_line_error(result: subprocess.CompletedProcess, *phrases: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("tau2cl: error:")]
    assert len(lines) == 1, result.stderr
    for phrase in phrases:
        assert phrase in lines[0]


TINY = ["--model_name_or_path", "tiny", "--model_dtype", "float32", "--max_tasks_per_domain", "2", "--batch_size_per_gpu", "1"]


# A refusal that the flags and files decide comes before the heavy imports: a fraction of a second.
# One that needs the model or the domains comes from the trainer: ~15 s of imports and loading (slow).
def test_a_model_that_cannot_be_loaded_offline_is_one_clear_error(tmp_path):
    result = _run_cli("--model_name_or_path", str(tmp_path / "no-such-model"), "--log_dir", str(tmp_path / "r"))
    _assert_one_line_error(result, "model path", "does not exist")


@pytest.mark.slow
def test_a_model_without_a_chat_template_is_one_clear_error(tmp_path, tiny_tokenizer, tiny_model):
    folder = tmp_path / "no-template"
    tiny_model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in folder.glob("chat_template*"):
        extra.unlink()
    result = _run_cli("--model_name_or_path", str(folder), "--log_dir", str(tmp_path / "r"))
    _assert_one_line_error(result, "no chat template")


def test_an_unwritable_log_dir_is_one_clear_error_before_any_heavy_import(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = _run_cli(*TINY, "--log_dir", str(blocker / "run"))
    _assert_one_line_error(result, "cannot write to log_dir")


@pytest.mark.slow
def test_a_batch_larger_than_a_split_is_one_clear_error(tmp_path):
    result = _run_cli(*TINY[:-2], "--batch_size_per_gpu", "3", "--log_dir", str(tmp_path / "r"))
    _assert_one_line_error(result, "batch_size_per_gpu 3 is larger than the airline train split")


@pytest.mark.slow
def test_resuming_from_an_incompatible_run_is_one_clear_error(tmp_path):
    checkpoint = tmp_path / "old" / "checkpoint_task_0"
    checkpoint.mkdir(parents=True)
    old = GRPOConfig(model_name_or_path="tiny", task_order=["retail", "airline"]).to_dict()
    torch.save({"config": old, "progress": {"global_step": 3}}, checkpoint / "trainer_state.pt")
    (checkpoint / "manifest.json").write_text(json.dumps(build_manifest(checkpoint)))
    result = _run_cli(*TINY, "--log_dir", str(tmp_path / "r"), "--resume_from", str(tmp_path / "old"))
    _assert_one_line_error(result, "cannot resume", "task_order")


def test_a_resume_dir_without_checkpoints_is_one_clear_error(tmp_path):
    result = _run_cli(*TINY, "--log_dir", str(tmp_path / "r"), "--resume_from", str(tmp_path))
    _assert_one_line_error(result, "no checkpoint found")


@pytest.mark.slow  # ~10 s: three training steps
def test_a_non_finite_loss_skips_the_update_and_training_goes_on(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    real = update_module.grpo_loss
    calls = {"n": 0}

    def first_call_nan(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 1 else loss), stats

    monkeypatch.setattr(update_module, "grpo_loss", first_call_nan)
    config = tiny_config(
        task_order=["airline"], compact_domains=False, num_steps_per_task=3, learning_rate=1e-3,
        log_dir=str(tmp_path), save_interval=1, save_total_limit=1,
    )
    trainer = GRPOTrainer(config)
    start = [p.detach().clone() for p in trainer.models.training.params]
    summary = trainer.train()
    assert summary["skipped_updates"] == 1
    assert all(torch.isfinite(p).all() for p in trainer.models.training.params)
    assert any(not torch.equal(a, p.detach()) for a, p in zip(start, trainer.models.training.params, strict=True))
    records = _train_records(tmp_path)
    assert [r["skipped_updates"] for r in records] == [1, 1, 1]
    # step checkpoints after steps 1 and 2, only the newest kept; the domain-end one always
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*")) == ["checkpoint_step_2", "checkpoint_task_0"]
