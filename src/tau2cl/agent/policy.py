"""The policy: a Hugging Face causal LM, its tokenizer and chat renderer, and batched sampling.

Sampling runs its own decode loop over a KV cache so that the log-prob of every sampled token is
taken from the same temperature-scaled distribution the GRPO update recomputes
(`grpo.token_logprobs`), without keeping (steps, batch, vocab) logits around.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tau2cl.agent.chat import ChatRenderer
from tau2cl.agent.model_source import check_model_source
from tau2cl.agent.tiny_model import resolve_model_path
from tau2cl.errors import UserError
from tau2cl.rl.update import autocast_for

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Generation:
    """One sampled assistant turn."""

    token_ids: list[int]  # (n,) sampled ids, ending with a stop token when `finished`
    logprobs: list[float]  # (n,) log-prob of each sampled id under the sampling distribution
    finished: bool  # ended with a stop token (False: cut by max_new_tokens)


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
    """Every id that ends an assistant turn: the tokenizer's eos plus the generation config's."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(gen_eos)
    return sorted(i for i in ids if i is not None)


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
        self.end_of_turn_text = tokenizer.decode([tokenizer.eos_token_id])
        self.prefix_caches: dict[tuple, Any] = {}

    def reset_prefix_cache(self) -> None:
        """Forget cached prompt prefixes; call whenever the weights may have changed."""
        self.prefix_caches = {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def end_of_turn(self, generation: Generation) -> str:
        """The text of the token that closed this turn (the template's end-of-turn marker)."""
        if generation.finished:
            return self.tokenizer.decode([generation.token_ids[-1]])
        return self.end_of_turn_text

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
    ) -> list[Generation]:
        """Sample one turn for each prompt (temperature 0 = greedy), all prompts in one batch."""
        was_training = self.model.training
        self.model.eval()
        try:
            with self.weights(), autocast_for(self.device, self.compute_dtype):
                return _decode_batch(self, prompts, max_new_tokens, temperature, top_p, generator)
        finally:
            self.model.train(was_training)


def _left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)  # (B, L), (B, L)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens (B,) and their log-probs (B,) under softmax(logits / T) (T = 1 when greedy)."""
    logits = logits.float()  # (B, V)
    if temperature <= 0:
        logprobs = torch.log_softmax(logits, dim=-1)
        tokens = logits.argmax(dim=-1)
        return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    probs = logprobs.exp()
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


_MIN_SHARED_PREFIX = 32  # shorter common prefixes are not worth a cache
_MAX_PREFIX_CACHES = 4  # one per domain of a batch (replay mixes domains)


def _cache_kwarg(model: Any) -> str:
    """transformers renamed `past_key_values` to `cache`; pass whichever this model takes."""
    return "cache" if "cache" in _forward_parameters(type(model)) else "past_key_values"


def _last_logits_kwargs(model: Any) -> dict[str, int]:
    """Ask for the last position's logits only, where the model supports it.

    A prefill projects every prompt position to the vocabulary otherwise: with Qwen's 151,936-token
    vocabulary that is ~0.6 MB per position in fp32, gigabytes for a batch of long prompts.
    """
    return {"logits_to_keep": 1} if "logits_to_keep" in _forward_parameters(type(model)) else {}


@functools.cache
def _forward_parameters(model_class: type) -> frozenset[str]:
    """The keyword names a model class's forward takes (read once per class, not per call)."""
    return frozenset(inspect.signature(model_class.forward).parameters)


def _run_body(model: Any, ids: torch.Tensor, cache: Any) -> None:
    """Fill `cache` with the keys and values of `ids`: the transformer body only, no LM head."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    if body is None or body is model:
        model(input_ids=ids, use_cache=True, **{_cache_kwarg(model): cache}, **_last_logits_kwargs(model))
        return
    body(input_ids=ids, use_cache=True, **{_cache_kwarg(body): cache})


def _common_prefix_length(prompts: list[list[int]]) -> int:
    """Length of the longest common prefix, leaving every prompt at least one token of its own."""
    limit = min(len(p) for p in prompts) - 1
    first = prompts[0]
    n = 0
    while n < limit and all(p[n] == first[n] for p in prompts):
        n += 1
    return n


def _prefix_cache(policy: Policy, prefix: list[int]) -> Any:
    """The KV cache of a shared prompt prefix (batch 1), computed once per weights version."""
    key = tuple(prefix)
    cache = policy.prefix_caches.get(key)
    if cache is None:
        from transformers import DynamicCache

        cache = DynamicCache()
        _run_body(policy.model, torch.tensor([prefix], device=policy.device), cache)
        if len(policy.prefix_caches) >= _MAX_PREFIX_CACHES:  # a run mixes a few domains at most
            policy.prefix_caches.pop(next(iter(policy.prefix_caches)))
        policy.prefix_caches[key] = cache
    return copy.deepcopy(cache)


def _prefill(policy: Policy, prompts: list[list[int]]) -> tuple[Any, torch.Tensor, torch.Tensor, Any]:
    """Run the prompts; returns (last logits (B, V), attention mask, last positions (B, 1), cache).

    The common prefix of the batch (the system prompt and tool schemas, most of every prompt) is
    computed once and its KV cache shared; each row's own suffix follows it after left padding:
    [prefix | pad | suffix] with the pad masked out and positions counting only real tokens.
    """
    from transformers import DynamicCache

    device, pad_id = policy.device, policy.tokenizer.pad_token_id
    shared = _common_prefix_length(prompts)
    if shared >= _MIN_SHARED_PREFIX:
        cache = _prefix_cache(policy, prompts[0][:shared])
        cache.batch_repeat_interleave(len(prompts))
        ids, suffix_mask = _left_pad([p[shared:] for p in prompts], pad_id, device)
        mask = torch.cat([torch.ones((len(prompts), shared), dtype=torch.long, device=device), suffix_mask], dim=1)
        positions = (mask.cumsum(-1) - 1)[:, shared:]  # (B, S)
    else:
        cache = DynamicCache()
        ids, mask = _left_pad(prompts, pad_id, device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, L)
    out = policy.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                       **{_cache_kwarg(policy.model): cache}, **_last_logits_kwargs(policy.model))
    return out.logits[:, -1], mask, positions[:, -1:], cache


def _decode_batch(policy: Policy, prompts, max_new_tokens, temperature, top_p, generator) -> list[Generation]:
    device = policy.device
    pad_id = policy.tokenizer.pad_token_id
    cache_kw = _cache_kwarg(policy.model)
    logits, mask, last_pos, cache = _prefill(policy, prompts)  # logits (B, V)
    stop = torch.tensor(policy.stop_ids, device=device)
    batch = len(prompts)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens_out: list[torch.Tensor] = []
    logprobs_out: list[torch.Tensor] = []
    next_pos = last_pos + 1  # (B, 1)
    for _ in range(max_new_tokens):
        tokens, logprobs = _sample(logits, temperature, top_p, generator)
        tokens = torch.where(done, torch.full_like(tokens, pad_id), tokens)
        tokens_out.append(tokens)
        logprobs_out.append(logprobs)
        done = done | torch.isin(tokens, stop)
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype, device=device)], dim=1)
        out = policy.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_pos, use_cache=True,
                           **{cache_kw: cache})
        logits = out.logits[:, -1]
        next_pos = next_pos + 1
    return _collect(tokens_out, logprobs_out, policy.stop_ids, batch)


def _collect(tokens_out, logprobs_out, stop_ids, batch) -> list[Generation]:
    tokens = torch.stack(tokens_out, dim=1).tolist()  # (B, n)
    logprobs = torch.stack(logprobs_out, dim=1).tolist()  # (B, n)
    stops = set(stop_ids)
    result = []
    for row in range(batch):
        seq, lps = tokens[row], logprobs[row]
        end = next((i for i, t in enumerate(seq) if t in stops), None)
        if end is None:
            result.append(Generation(token_ids=seq, logprobs=lps, finished=False))
        else:
            result.append(Generation(token_ids=seq[: end + 1], logprobs=lps[: end + 1], finished=True))
    return result
