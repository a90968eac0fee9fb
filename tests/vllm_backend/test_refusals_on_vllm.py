"""What the vLLM backend cannot serve is refused before training: one line, exit code 2, nothing in
the log_dir but the run's lock. (Without vllm installed: tests/integration/test_vllm_missing.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from train_runs import one_line_error, run_all, smollm2_gguf, train_command

from tau2cl.runs.files import LOCK_FILE
from tiny_run import tiny_flags

pytestmark = pytest.mark.vllm

# SmolLM2-135M's keys and values per token in fp32: 2 (k, v) x 30 layers x 3 KV heads x 64 dims x 4
# bytes = 46,080 bytes, so a 1 GiB cache holds 2**30 / 46,080 = 23,301.7 tokens and one 24,000-token
# context needs 24,000 x 46,080 / 2**30 = 1.03 GiB
TOO_LONG_FOR_1_GIB = 24000


def _gpt_neo_folder(folder: Path, tokenizer) -> Path:
    """A random GPT-Neo (an architecture transformers trains and vLLM does not run) with the tiny
    model's tokenizer and chat template."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    config = GPTNeoConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_layers=2, num_heads=2, attention_types=[[["global"], 2]],
        max_position_embeddings=4096, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    GPTNeoForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def refusals(tmp_path_factory, tiny_tokenizer):
    """name -> (result, log_dir) of three runs that must be refused."""
    base = tmp_path_factory.mktemp("refusals")
    neo = _gpt_neo_folder(base / "gpt-neo", tiny_tokenizer)
    vllm = ("--rollout_backend", "vllm")
    flags = {
        "kv_cache": tiny_flags(model_name_or_path=str(smollm2_gguf()), max_context_tokens=TOO_LONG_FOR_1_GIB)
        + [*vllm, "--vllm_cpu_kv_cache_gib", "1"],
        "architecture": tiny_flags(model_name_or_path=str(neo), max_context_tokens=4096) + list(vllm),
        "sleep_mode": tiny_flags() + [*vllm, "--vllm_sleep_mode"],
    }
    results = run_all({name: train_command(base / name, *f) for name, f in flags.items()}, timeout=300)
    return {name: (results[name], base / name) for name in flags}


def _written(log_dir: Path) -> set[str]:
    """What the run left in its log_dir besides its lock."""
    return {p.name for p in log_dir.iterdir()} - {LOCK_FILE} if log_dir.exists() else set()


def test_a_kv_cache_smaller_than_one_context(refusals):
    result, log_dir = refusals["kv_cache"]
    line = one_line_error(result)
    assert f"--vllm_cpu_kv_cache_gib 1 cannot hold one --max_context_tokens {TOO_LONG_FOR_1_GIB} context" in line
    assert "(1.03 GiB of keys and values)" in line
    assert _written(log_dir) == set()


def test_a_model_vllm_cannot_run(refusals):
    result, log_dir = refusals["architecture"]
    line = one_line_error(result)
    assert "vLLM cannot start on" in line and "GPTNeoForCausalLM" in line and "not supported" in line
    assert "Supported architectures" not in line  # the reason, not vLLM's list
    assert _written(log_dir) == set()


def test_sleep_mode_on_cpus(refusals):
    result, log_dir = refusals["sleep_mode"]
    assert "needs a CUDA GPU" in one_line_error(result)
    assert _written(log_dir) == set()
