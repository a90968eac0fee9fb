"""The rollout backend: which sampler the engines ask for turns, and, for a sampler with its own
copy of the weights (vLLM), keeping that copy equal to the trained weights.

A vLLM engine starts on the model's folder (a GGUF model is written out as a plain folder first)
and is given the policy's weights at once, then after every change of the rollout model's weights
(TrainingModel.follow: each optimizer step, supervised or GRPO; a resume; a strategy's edit; each
swap in and out of a strategy's evaluation weights). With LoRA the adapters are folded into the
weights pushed (merge, push; the live weights are never changed), so the engine needs no LoRA
support of its own and runs at full speed.

Under torchrun every rank starts its own engine, seeded per rank, on its own shard of the episodes
(the engines join the ranks' process group and never talk to each other). With --vllm_sleep_mode
(CUDA only) the engine sleeps through each GRPO update and wakes for the push that follows it.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tau2cl.agent.sampler import Sampler
from tau2cl.agent.tiny_model import resolve_model_path
from tau2cl.distributed import group_rank_and_size
from tau2cl.errors import UserError
from tau2cl.recipe.models import Models
from tau2cl.rl.lora import merged_weights
from tau2cl.runs.checkpoint import write_plain_model

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class EngineSync:
    """Pushes the rollout model's weights into a sampler; counts the pushes and their seconds."""

    def __init__(self, sampler: Sampler, models: Models, sleep_during_updates: bool = False):
        self.sampler = sampler
        self.models = models
        self.sleep_during_updates = sleep_during_updates  # the sampler has `sleep` (vLLM's sleep mode)
        self.seconds = 0.0  # since the last `take`
        self.pushes = 0

    def before_update(self) -> None:
        """With sleep mode, free the engine's GPU memory for the update (the push after it wakes it);
        the sleep's seconds count as sync time, as the wake's do."""
        if self.sleep_during_updates:
            start = time.perf_counter()
            self.sampler.sleep()
            self.seconds += time.perf_counter() - start

    def __call__(self) -> None:
        self.seconds += self.sampler.load_weights(plain_weights(self.models))
        self.pushes += 1

    def take(self) -> dict[str, float]:
        """The pushes and their seconds since the last call."""
        figures = {"weight_syncs": float(self.pushes), "time_weight_sync": self.seconds}
        self.seconds, self.pushes = 0.0, 0
        return figures


def plain_weights(models: Models) -> Iterator[tuple[str, torch.Tensor]]:
    """The rollout model's weights under the plain model's parameter names, one at a time (LoRA:
    with the adapters folded in). The rollout model is whole on every rank, also under FSDP."""
    if models.lora is not None:
        yield from merged_weights(models.policy.model)
    else:
        yield from models.policy.model.named_parameters()


def start_sampler(config: Any, models: Models, is_cuda: bool) -> tuple[Sampler, EngineSync]:
    """A vLLM sampler on this rank, already holding the policy's weights, and its sync."""
    from tau2cl.agent.vllm_sampler import VLLMSampler, VLLMSettings, import_vllm

    if config.vllm_sleep_mode and not is_cuda:
        raise UserError("--vllm_sleep_mode needs a CUDA GPU (vLLM's sleep mode is CUDA-only).")
    base = models.lora.lm if models.lora is not None else models.policy.model  # adapters injected
    if not is_cuda:
        check_cpu_kv_cache(base.config, config.max_context_tokens, config.vllm_cpu_kv_cache_gib)
    import_vllm()  # a missing vllm is one line, before any work
    rank, ranks = group_rank_and_size()
    settings = VLLMSettings(
        max_model_len=config.max_context_tokens,
        dtype=_DTYPE_NAMES.get(models.compute_dtype or torch.float32, "float32") if is_cuda else "float32",
        seed=config.seed * 1000 + rank,  # as the rank's own generator: the ranks' samples differ
        gpu_memory_utilization=config.vllm_gpu_memory_utilization,
        cpu_kv_cache_gib=config.vllm_cpu_kv_cache_gib,
        sleep_mode=config.vllm_sleep_mode,
        external_launcher=ranks > 1,
    )
    with model_folder(config.model_name_or_path, base) as folder:
        sampler = VLLMSampler.start(folder, models.policy.stop_ids, settings)
    sync = EngineSync(sampler, models, sleep_during_updates=config.vllm_sleep_mode)
    sync()  # the policy's own weights (a resumed or LoRA-merged policy differs from the folder's)
    models.training.follow(sync)
    return sampler, sync


def check_cpu_kv_cache(model_config: Any, max_context_tokens: int, gib: int) -> None:
    """Refuse a KV cache that cannot hold one full context (fp32 keys and values of every layer)."""
    layers = model_config.num_hidden_layers
    heads = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    needed = 2 * layers * heads * head_dim * 4 * max_context_tokens
    if needed > gib << 30:
        raise UserError(
            f"--vllm_cpu_kv_cache_gib {gib} cannot hold one --max_context_tokens {max_context_tokens} "
            f"context ({needed / 2**30:.2f} GiB of keys and values); raise it or lower --max_context_tokens."
        )


@contextlib.contextmanager
def model_folder(name: str, model: Any) -> Iterator[str]:
    """A folder vLLM can start on: the model's own, or, for a GGUF file, the dequantized model
    written out for the engine's start and removed after (the engine holds its weights by then)."""
    path = Path(resolve_model_path(name)).expanduser()
    if path.is_dir():
        yield str(path)
    elif path.suffix == ".gguf":
        with tempfile.TemporaryDirectory(prefix="tau2cl-vllm-model-") as folder:
            write_plain_model(model, folder)
            yield folder
    else:
        yield name  # a hub id: vLLM reads it from the Hugging Face cache
