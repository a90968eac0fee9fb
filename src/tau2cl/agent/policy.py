"""The policy: a Hugging Face causal LM, its tokenizer and chat renderer, and batched sampling.

Sampling (decode.py) runs its own decode loop over KV caches so that the log-prob of every sampled
token is taken from the same temperature-scaled distribution the GRPO update recomputes
(`grpo.token_logprobs`); the policy supplies each prompt's starting cache: its episode's cache
from the previous turn, or the batch's shared prompt prefix (system prompt and tool schemas).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import torch

from tau2cl.agent.chat import ChatRenderer, template_end_of_turn_id
from tau2cl.agent.compute import autocast_for, common_prefix_length
from tau2cl.agent.decode import (
    Generation,
    Row,
    Sampling,
    cache_kwarg,
    last_logits_kwargs,
    sample_batch,
)
from tau2cl.agent.kv_cache import KVSlot, Prefix, layers_of
from tau2cl.agent.model_source import check_model_source
from tau2cl.agent.tiny_model import resolve_model_path
from tau2cl.errors import UserError

__all__ = ["DTYPES", "Generation", "Policy", "load_model", "load_tokenizer", "pad_token_id", "stop_token_ids"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _split_gguf(path: str) -> tuple[str, dict]:
    """A `.gguf` file loads from its folder with `gguf_file=`."""
    if path.endswith(".gguf"):
        p = Path(path)
        return str(p.parent), {"gguf_file": p.name}
    return path, {}


def load_tokenizer(name_or_path: str) -> Any:
    from transformers import AutoTokenizer

    check_model_source(resolve_model_path(name_or_path))
    path, extra = _split_gguf(resolve_model_path(name_or_path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **extra)
    except (OSError, ValueError) as exc:
        raise UserError(_load_error(name_or_path, exc)) from None
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"model '{name_or_path}' has no chat template; use an instruct/chat model.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str, dtype: str, device: torch.device | str, gradient_checkpointing: bool = False) -> Any:
    from transformers import AutoModelForCausalLM

    check_model_source(resolve_model_path(name_or_path))
    path, extra = _split_gguf(resolve_model_path(name_or_path))
    torch_dtype = "auto" if dtype == "auto" else DTYPES[dtype]
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **extra)
    except (OSError, ValueError) as exc:
        raise UserError(_load_error(name_or_path, exc)) from None
    model.to(device)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def _load_error(name: str, exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        f"cannot load model '{name}' (not a local folder or file, and not in the local Hugging Face "
        f"cache; this machine may be offline): {first}"
    )


def stop_token_ids(tokenizer: Any, model: Any) -> list[int]:
    """Every id that ends an assistant turn: the chat template's end-of-turn token, the
    tokenizer's eos and the generation config's."""
    ids = {tokenizer.eos_token_id, template_end_of_turn_id(tokenizer)}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(gen_eos)
    return sorted(i for i in ids if i is not None)


def pad_token_id(tokenizer: Any) -> int:
    """The id written into padding, which is never attended to nor trained: the tokenizer's pad
    token, else its eos, else 0 (any id would do)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


class Policy:
    """Model + tokenizer + renderer; samples batches of assistant turns."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        compute_dtype: torch.dtype | None = None,
        weights: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ):
        self.model = model
        self.compute_dtype = compute_dtype  # autocast dtype over fp32 master weights (None: plain)
        self.weights = weights  # entered around every generation (LoRA's reference: adapters off)
        self.tokenizer = tokenizer
        self.renderer = ChatRenderer(tokenizer)
        self.stop_ids = stop_token_ids(tokenizer, model)
        self.pad_id = pad_token_id(tokenizer)
        eot = template_end_of_turn_id(tokenizer)
        self.end_of_turn_id = eot if eot is not None else tokenizer.eos_token_id  # what closes a turn
        self.end_of_turn_text = tokenizer.decode([self.end_of_turn_id])
        self.prefix_caches: dict[tuple, Prefix] = {}
        self.cascade = True  # attend the batch's shared prompt prefix once (False: copied into every row)

    def reset_prefix_cache(self) -> None:
        """Forget cached prompt prefixes; call whenever the weights may have changed."""
        self.prefix_caches = {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def closes_turn(self, generation: Generation) -> bool:
        """Whether the turn ended with the template's own end-of-turn token. A turn cut by
        max_new_tokens or ended by another stop id (e.g. `<|endoftext|>` where the template writes
        `<|im_end|>`) is closed with that token as context before the conversation goes on."""
        return generation.finished and generation.token_ids[-1] == self.end_of_turn_id

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=False)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        caches: list[KVSlot | None] | None = None,
        groups: list[Hashable] | None = None,
    ) -> list[Generation]:
        """Sample one turn for each prompt (temperature 0 = greedy), all prompts in one batch.

        `caches`: one KVSlot per prompt (cross-turn reuse): a slot holding a prefix of its prompt
        saves prefilling that prefix, and after sampling holds the prompt and the sampled turn
        (its last token aside). None: every prompt is prefilled after its group's shared prefix.
        `groups`: a key per prompt (e.g. its domain); a group's prompts share one cached prompt
        prefix, their longest common one (None: all prompts are one group).
        """
        slots = caches if caches is not None else [None] * len(prompts)
        sampling = Sampling(max_new_tokens, temperature, top_p, generator, self.stop_ids, self.pad_id,
                            self.cascade)
        was_training = self.model.training
        self.model.eval()
        try:
            with self.weights(), autocast_for(self.device, self.compute_dtype):
                rows = _rows(self, prompts, slots, groups or [None] * len(prompts))
                return sample_batch(self.model, rows, sampling, self.device)
        finally:
            self.model.train(was_training)


_MIN_SHARED_PREFIX = 32  # shorter common prefixes are not worth a cache
_MAX_PREFIX_CACHES = 4  # one per domain of a batch (replay mixes domains)


def _run_body(model: Any, ids: torch.Tensor, cache: Any) -> None:
    """Fill `cache` with the keys and values of `ids`: the transformer body only, no LM head."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    if body is None or body is model:
        model(input_ids=ids, use_cache=True, **{cache_kwarg(model): cache}, **last_logits_kwargs(model))
        return
    body(input_ids=ids, use_cache=True, **{cache_kwarg(body): cache})


def _prefix(policy: Policy, ids: list[int]) -> Prefix:
    """The keys and values of a shared prompt prefix (batch 1), computed once per weights version.

    Read-only: sampling attends to them in place or copies them into its own batch buffer.
    """
    key = tuple(ids)
    prefix = policy.prefix_caches.get(key)
    if prefix is None:
        from transformers import DynamicCache

        cache = DynamicCache()
        _run_body(policy.model, torch.tensor([ids], device=policy.device), cache)
        prefix = Prefix(list(ids), layers_of(cache))
        if len(policy.prefix_caches) >= _MAX_PREFIX_CACHES:  # a run mixes a few domains at most
            policy.prefix_caches.pop(next(iter(policy.prefix_caches)))
        policy.prefix_caches[key] = prefix
    return prefix


def _rows(policy: Policy, prompts: list[list[int]], slots: list[KVSlot | None], groups: list[Hashable]) -> list[Row]:
    """Each prompt with the cache it starts from: its slot's, else its group's shared prefix."""
    rows = []
    fresh: dict[Hashable, list[Row]] = {}
    for prompt, slot, group in zip(prompts, slots, groups, strict=True):
        n = slot.covers(prompt) if slot is not None else 0
        rows.append(Row(prompt, n, slot.layers if n else [], slot, slot.prefix if n else None))
        if n == 0:
            fresh.setdefault(group, []).append(rows[-1])
    for members in fresh.values():
        shared = common_prefix_length([r.prompt for r in members])
        if shared >= _MIN_SHARED_PREFIX:
            prefix = _prefix(policy, members[0].prompt[:shared])
            for row in members:
                row.cached, row.prefix = shared, prefix
    return rows
