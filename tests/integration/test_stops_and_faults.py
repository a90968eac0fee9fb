"""Stops inside an evaluation and reward-function faults: a boundary checkpoint, one line, a clean resume."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tau2cl.errors import UserError
from tau2cl.runs.checkpoint import checkpoint_problem, load_state
from tau2cl.runs.interrupt import StoppedWithCheckpoint
from tau2cl.trainer import GRPOTrainer
from tiny_run import tiny_config

HERE = Path(__file__).parent
BASE = dict(learning_rate=1e-3, seed=3)  # over tiny_run.TINY_RUN


def _records(log_dir: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["type"], r["task_idx"], r.get("eval_domain"), r["step"], r.get("loss"), r.get("reward_mean")) for r in rows]


@pytest.mark.slow
def test_a_stop_inside_the_final_evaluation_resumes_without_redoing_the_fisher(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    cfg = dict(BASE, task_order=["airline"], num_steps_per_task=1, cl_algorithm="ewc", ewc_fisher_samples=2)
    full = GRPOTrainer(tiny_config(**cfg, log_dir=str(tmp_path / "full"))).train()

    cut = tmp_path / "cut"
    trainer = GRPOTrainer(tiny_config(**cfg, log_dir=str(cut)))
    real = trainer.tracker.eval_progress

    def signal_during_the_final_evaluation(label, domain, done, total):
        real(label, domain, done, total)
        if (label, done) == ("after_task0", 0):
            trainer.signals.signum = signal.SIGTERM  # as the handler does
    monkeypatch.setattr(trainer.tracker, "eval_progress", signal_during_the_final_evaluation)
    with pytest.raises(StoppedWithCheckpoint) as stop:
        trainer.train()
    assert stop.value.where == "during the evaluation after Task 0 (airline)"
    saved = Path(stop.value.checkpoint)
    assert checkpoint_problem(saved) is None
    state = load_state(saved)
    assert state["progress"] == {"task_idx": 0, "step": 1, "global_step": 1, "stages_done": 1, "pending": "stage", "sft_step": 0}
    assert len(state["strategy"]["fishers"]) == 1  # the Fisher was done and is kept

    resumed = GRPOTrainer(tiny_config(**cfg, log_dir=str(cut), resume_from=str(cut)))
    assert len(resumed.strategy.fishers) == 1
    summary = resumed.train()
    assert len(resumed.strategy.fishers) == 1  # the domain's Fisher was not estimated twice
    for key in ("accuracy_matrix", "pass_rate_matrix", "final_measures", "global_step", "stages_completed"):
        assert summary[key] == full[key], key
    assert _records(cut) == _records(tmp_path / "full")  # nothing missing, nothing twice


def test_a_reward_function_that_raises_stops_with_one_line_after_a_boundary_checkpoint(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    import reward_fns

    reward_fns.CALLS["n"] = 0
    config = tiny_config(**dict(BASE, reward_fn="reward_fns:fails_on_fourth_call"), task_order=["airline"],
                         num_steps_per_task=3, log_dir=str(tmp_path))
    trainer = GRPOTrainer(config)
    with pytest.raises(UserError) as error:
        trainer.train()  # calls: 1 = evaluation before training, 2-3 = step 1, 4 = step 2 raises
    checkpoint = tmp_path / "checkpoint_step_1"
    task_ids = [t.id for t in trainer.domains["airline"].train_tasks]
    assert str(error.value) in [
        f"reward_fn reward_fns:fails_on_fourth_call on airline task {task_id} raised ZeroDivisionError: division by "
        f"zero; stopped at Task 0 (airline) step 1/3, checkpoint saved to {checkpoint}: fix the cause and resume "
        f"with --resume_from {checkpoint}."
        for task_id in task_ids
    ]
    assert checkpoint_problem(checkpoint) is None
    assert load_state(checkpoint)["progress"]["global_step"] == 1
    assert [r[3] for r in _records(tmp_path) if r[0] == "train"] == [1]  # step 2 never logged


def test_a_context_too_small_for_the_prompt_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    config = tiny_config(**dict(BASE, max_context_tokens=100, compact_domains=False), task_order=["airline"],
                         num_steps_per_task=1, log_dir=str(tmp_path))
    with pytest.raises(UserError, match=r"^--max_context_tokens 100 leaves no room for the airline prompt \((\d+) tokens\) "
                       r"plus --max_new_tokens 8; raise it to at least \d+\.$") as error:
        GRPOTrainer(config)
    prompt = int(str(error.value).split("(")[1].split(" ")[0])
    assert f"at least {prompt + 8}." in str(error.value) and prompt > 1000  # airline's policy and tools


def test_a_cpu_run_computes_in_float32_and_says_so(capsys):
    import torch

    from tau2cl.distributed import DistInfo
    from tau2cl.recipe.models import compute_dtype_for

    cpu, gpu = DistInfo(0, 0, 1, torch.device("cpu")), DistInfo(0, 0, 1, torch.device("cuda", 0))
    assert compute_dtype_for("bfloat16", cpu) is None
    assert "computing in float32 instead of --model_dtype bfloat16" in capsys.readouterr().err
    assert compute_dtype_for("bfloat16", gpu) is torch.bfloat16 and compute_dtype_for("float32", gpu) is None


def test_a_full_disk_while_saving_is_one_line_naming_the_folder_and_the_last_complete_checkpoint(tmp_path, monkeypatch):
    import errno

    import tau2cl.runs.checkpoint as checkpoint_module

    monkeypatch.syspath_prepend(str(HERE))
    trainer = GRPOTrainer(tiny_config(**BASE, task_order=["airline"], num_steps_per_task=1, log_dir=str(tmp_path)))
    good = trainer.checkpointer.save("checkpoint_step_0")
    real_save = checkpoint_module.torch.save

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", no_space)
    with pytest.raises(UserError) as error:
        trainer.checkpointer.save("checkpoint_step_1")
    assert str(error.value) == (
        f"could not save checkpoint '{tmp_path / 'checkpoint_step_1'}' (No space left on device); the last complete "
        f"checkpoint is '{good}'. Free space or fix the folder's permissions, then resume from it."
    )
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*")) == ["checkpoint_step_0"]
    assert checkpoint_problem(good) is None
    trainer.tracker.close()
    trainer.lock.release()
