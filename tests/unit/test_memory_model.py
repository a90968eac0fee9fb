"""The memory model behind docs/memory.md (benchmarks/memory.py) against real models and hand sums."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def memory():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("memory")
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_counts_match_the_tiny_model_and_peft(memory, tiny_model):
    import copy

    from tau2cl.config import GRPOConfig
    from tau2cl.rl.lora import add_lora

    shape = memory.Shape.from_config("tiny", tiny_model.config.to_dict())
    assert memory.parameter_count(shape) == sum(p.numel() for p in tiny_model.parameters())
    lora = add_lora(copy.deepcopy(tiny_model), GRPOConfig(model_name_or_path="tiny", lora_r=4))
    assert memory.lora_parameter_count(shape, 4) == sum(p.numel() for p in lora.trainable_parameters())


def test_qwen25_3b_by_hand(memory):
    s = memory.Shape.from_config("3B", memory.QWEN3B_SHAPE)
    # embeddings 151936 * 2048 = 311,164,928 (tied: no separate head); per block:
    # q 2048^2 + 2048 = 4,196,352; k, v 2048*256 + 256 = 524,544 each; o 4,194,304;
    # MLP 3 * 2048 * 11008 = 67,633,152; norms 4,096 -> 77,076,992; x 36 = 2,774,771,712; + norm 2048
    assert memory.parameter_count(s) == 3_085_938_688
    full = memory.per_gpu_bytes(s, "full", reference=False, gpus=1, parallelism="ddp")
    assert sum(full.values()) == 16 * 3_085_938_688  # 49.4 GB
    # FSDP x4: (4 + 4 + 8) / 4 = 4 bytes of shards + a 4-byte fp32 rollout copy = 8 bytes per parameter
    fsdp = memory.per_gpu_bytes(s, "full", reference=False, gpus=4, parallelism="fsdp")
    assert sum(fsdp.values()) == 8 * 3_085_938_688
    # LoRA r=16 with the reference: bf16 base 2P + 16 bytes per adapter parameter, nothing for the reference
    # adapters per block 16 * (4096 + 2304 + 2304 + 4096 + 3 * 13056) = 831,488; x 36 = 29,933,568
    lora = memory.per_gpu_bytes(s, "lora", reference=True, gpus=1, parallelism="ddp")
    assert memory.lora_parameter_count(s, 16) == 29_933_568
    assert sum(lora.values()) == 2 * 3_085_938_688 + 16 * 29_933_568 and lora["reference"] == 0
    # KV cache per token: 2 * 36 layers * 256 * 2 bytes = 36,864; 16 x 8192 tokens = 4.83 GB
    assert memory.kv_cache_bytes(s, 16 * 8192) == 36_864 * 131_072
    assert memory.smallest_gpu(sum(full.values())) == "80 GB" and memory.smallest_gpu(200e9) == "none"
