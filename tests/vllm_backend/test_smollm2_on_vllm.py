"""SmolLM2-135M-Instruct (read from its GGUF file) trained with vLLM sampling: after each optimizer
step the engine's sampling log-probs equal the trainer's, and the run's checkpoints are plain
safetensors."""

from __future__ import annotations

import json

import pytest
from train_runs import records, run_all, smollm2_gguf, train_command

from tiny_run import tiny_flags

pytestmark = pytest.mark.vllm

LOGPROB_TOLERANCE = 1e-4  # fp32, the design's bound
STEPS = 2


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory):
    """The tiny run's settings on SmolLM2, airline only (compact), its first step at full learning rate."""
    log_dir = tmp_path_factory.mktemp("smollm2") / "run"
    flags = tiny_flags(
        model_name_or_path=str(smollm2_gguf()), task_order=["airline"], num_steps_per_task=STEPS,
        learning_rate=1e-5, warmup_steps=0, max_context_tokens=4096,
    )  # fmt: skip
    result = run_all({"smollm2": train_command(log_dir, *flags, "--rollout_backend", "vllm")})["smollm2"]
    assert result.returncode == 0, result.stderr[-3000:]
    return log_dir


def test_vllm_log_probs_equal_the_trainers_after_each_step(smollm2_run):
    train = records(smollm2_run, "train")
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert train[0]["grad_norm"] > 0 and train[0]["lr"] > 0  # the first step moved the weights
    for r in train:  # step k samples after k - 1 optimizer steps, each pushed
        assert r["logprob_gap_max"] <= LOGPROB_TOLERANCE, r
        assert r["weight_syncs"] >= 1


def test_its_checkpoint_is_plain_safetensors(smollm2_run):
    checkpoint = smollm2_run / "checkpoint_task_0"
    config = json.loads((checkpoint / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (checkpoint / "model.safetensors").is_file() and not list(checkpoint.glob("*.gguf"))
