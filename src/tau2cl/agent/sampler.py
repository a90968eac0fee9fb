"""The sampler seam: token-id contexts in, one sampled assistant turn per context out.

The rollout engine owns the episodes (rendering, tools, users, termination, loss masks); a sampler
owns only the model's side of a turn. Every context goes in as the exact token ids of its episode
and each turn comes back as a `Generation`: the sampled ids (ending with one of the policy's stop
tokens when `finished`), and the log-prob of each sampled id under softmax(logits / temperature)
over the whole vocabulary (temperature 1 when greedy), the distribution the GRPO update recomputes.

Two samplers implement it: `PolicySampler` (the project's own engine, with each episode's KV cache
kept across turns and the shared prompt prefix attended once) and `vllm_sampler.VLLMSampler`.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Iterable
from typing import Any, Protocol

import torch

from tau2cl.agent.decode import Generation
from tau2cl.agent.kv_cache import KVSlot

NamedTensors = Iterable[tuple[str, torch.Tensor]]  # (parameter name as in the HF model, full tensor)


class Sampler(Protocol):
    """What the rollout engine asks of a sampling backend."""

    keeps_episode_caches: bool  # takes the engine's per-episode KV slots (`caches`) and fills them

    def sample(
        self,
        contexts: list[list[int]],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        generator: torch.Generator | None = None,
        *,
        caches: list[KVSlot | None] | None = None,
        groups: list[Hashable] | None = None,
    ) -> list[Generation]:
        """One turn per context (temperature 0: greedy). `caches` and `groups` are hints a backend
        may ignore: each context's KV slot from its previous turn, and a key per context (its
        domain) whose contexts share a prompt prefix."""
        ...

    def reset_prefix_cache(self) -> None:
        """Forget cached prompt prefixes (their keys and values belong to older weights)."""
        ...

    def load_weights(self, named_tensors: NamedTensors) -> float:
        """Take these parameters (streamed one at a time), then reset the prefix cache; seconds taken."""
        ...


class PolicySampler:
    """The project's own engine: the policy's batched decode (decode.py) over its own weights."""

    keeps_episode_caches = True

    def __init__(self, policy: Any):
        self.policy = policy

    def sample(
        self,
        contexts: list[list[int]],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        generator: torch.Generator | None = None,
        *,
        caches: list[KVSlot | None] | None = None,
        groups: list[Hashable] | None = None,
    ) -> list[Generation]:
        return self.policy.generate(contexts, max_new_tokens, temperature, top_p, generator,
                                    caches=caches, groups=groups)

    def reset_prefix_cache(self) -> None:
        self.policy.reset_prefix_cache()

    def load_weights(self, named_tensors: NamedTensors) -> float:
        """Copy each tensor into the policy model's parameter of that name (a tensor that already is
        that parameter is left alone: a policy that samples from the trained model itself)."""
        start = time.perf_counter()
        params = dict(self.policy.model.named_parameters())
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name not in params:
                    raise KeyError(f"the policy model has no parameter named {name!r}")
                if params[name].data_ptr() != tensor.data_ptr():
                    params[name].copy_(tensor)
        self.reset_prefix_cache()
        return time.perf_counter() - start
