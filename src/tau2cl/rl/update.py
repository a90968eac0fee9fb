"""From scored trajectories to gradients: padding, log-prob forwards and the accumulated GRPO loss.

The model-facing half of the update; the maths lives in grpo.py. Log-probs are always computed on
the trajectories' own token ids (token-in, token-out).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from tau2cl.agent.compute import autocast_for, common_prefix_length
from tau2cl.rl.grpo import grpo_loss, token_logprobs
from tau2cl.rl.optimization import accumulate
from tau2cl.rl.shared_prefix import (
    MIN_SHARED_PREFIX,
    hidden_at,
    pick_hidden,
    run_after,
    run_prefix,
    shared_prefix_length,
    usable,
)


@dataclass
class TokenBatch:
    """Right-padded trajectories; every tensor is (B, T) except `advantages` (B,)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    ref_logprobs: torch.Tensor | None = None
    sampling_logprobs: torch.Tensor | None = None  # the rollout's, when old_logprobs are recomputed
    teacher_logprobs: torch.Tensor | None = None  # a frozen teacher's, for a distillation KL

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum().item())

    def rows(self, index: Sequence[int]) -> TokenBatch:
        """A micro-batch of these rows, with padding trimmed to its own longest row."""
        sel = torch.as_tensor(list(index), dtype=torch.long, device=self.input_ids.device)
        width = int(self.attention_mask[sel].sum(dim=1).max())  # right padding: real tokens first
        cols = slice(0, width)
        ref = None if self.ref_logprobs is None else self.ref_logprobs[sel, cols]
        sampled = None if self.sampling_logprobs is None else self.sampling_logprobs[sel, cols]
        teacher = None if self.teacher_logprobs is None else self.teacher_logprobs[sel, cols]
        return TokenBatch(
            self.input_ids[sel, cols], self.attention_mask[sel, cols], self.loss_mask[sel, cols],
            self.old_logprobs[sel, cols], self.advantages[sel], ref, sampled, teacher,
        )


def collate(
    token_ids: Sequence[Sequence[int]],
    loss_masks: Sequence[Sequence[int]],
    logprobs: Sequence[Sequence[float]],
    advantages: Sequence[float],
    pad_id: int | None,
    device: torch.device | str = "cpu",
) -> TokenBatch:
    """Right-pad variable-length sequences into a TokenBatch.

    Pads hold `pad_id` (0 for a tokenizer without a pad token) and are marked by the attention
    and loss masks alone, never by their id: a pad id that is also a real token (SmolLM2 pads
    with its end-of-turn token) stays trained where it was sampled.
    """
    width = max(len(ids) for ids in token_ids)
    batch = len(token_ids)
    ids = torch.full((batch, width), 0 if pad_id is None else pad_id, dtype=torch.long)
    attn = torch.zeros((batch, width), dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.bool)
    old = torch.zeros((batch, width), dtype=torch.float32)
    for row, (seq, m, lp) in enumerate(zip(token_ids, loss_masks, logprobs, strict=True)):
        n = len(seq)
        ids[row, :n] = torch.tensor(seq, dtype=torch.long)
        attn[row, :n] = 1
        mask[row, :n] = torch.tensor(m, dtype=torch.bool)
        old[row, :n] = torch.tensor(lp, dtype=torch.float32)
    mask[:, 0] = False  # position 0 has no prefix to predict it from
    adv = torch.tensor(list(advantages), dtype=torch.float32)
    return TokenBatch(ids.to(device), attn.to(device), mask.to(device), old.to(device), adv.to(device))


def _picked(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """(N,) log-prob of each target under softmax(logits / T), computed in fp32."""
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logprobs.gather(-1, targets[:, None]).squeeze(-1)


def backward_each(
    model: torch.nn.Module,
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
    compute_dtype: torch.dtype | None = None,
    shared_prefix: bool = True,
) -> Iterator[int]:
    """Backpropagate, one (token ids, loss mask) sequence at a time, the sum of log p (T = 1) of its
    masked tokens; yields each sequence's index once its gradient is in the parameters' `.grad`
    (accumulated: clear them before resuming to keep per-sequence gradients).

    With `shared_prefix` the sequences' common prefix runs once, with gradients, and each
    sequence's remainder on top of it (shared_prefix.py); that forward's graph is kept until the
    last sequence's backward. Each gradient is that of the sequence run alone, up to float order.
    """
    device = next(model.parameters()).device
    body, head = _split_lm(model)
    prefix = 0
    if shared_prefix and body is not None and usable(model) and len(sequences) > 1:
        prefix = common_prefix_length([list(ids) for ids, _ in sequences])
        prefix = prefix if prefix >= MIN_SHARED_PREFIX else 0
    if prefix:
        with autocast_for(device, compute_dtype):
            prefix_head, cache = run_prefix(body, torch.tensor([list(sequences[0][0][:prefix])], device=device))
    for i, (token_ids, loss_mask) in enumerate(sequences):
        ids = torch.tensor([list(token_ids)], device=device)  # (1, T)
        mask = torch.tensor([list(loss_mask)], dtype=torch.bool, device=device)
        mask[:, 0] = False  # position 0 has no prefix to predict it from
        if prefix:
            rows, cols = mask.nonzero(as_tuple=True)
            with autocast_for(device, compute_dtype):
                tail = run_after(body, cache, ids[:, prefix:], prefix)  # (1, S, H)
                logits = head(pick_hidden(prefix_head, tail, prefix, rows, cols - 1))
            total = _picked(logits, ids[rows, cols], 1.0).sum()
        else:
            total = sequence_logprobs(model, ids, torch.ones_like(ids), mask, 1.0, compute_dtype).sum()
        total.backward(retain_graph=bool(prefix) and i < len(sequences) - 1)
        yield i


def sequence_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    temperature: float = 1.0,
    compute_dtype: torch.dtype | None = None,
    shared_prefix: bool = False,
) -> torch.Tensor:
    """(B, T) log p(token_t | tokens_<t) at `temperature` where loss_mask is set, 0 elsewhere.

    Only the trained positions go through the LM head: a tool-use context is mostly prompt
    (system, policy, tool schemas), so (B, T, V) logits would cost far more than they are worth.
    `shared_prefix`: the rows' common prefix runs once (shared_prefix.py); same values.
    """
    return _trained_positions(model, input_ids, attention_mask, loss_mask, temperature, compute_dtype,
                              False, shared_prefix)[0]


def _trained_positions(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    temperature: float,
    compute_dtype: torch.dtype | None,
    with_hits: bool,
    shared_prefix: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs at the trained positions and, `with_hits`, the greedy hits there (else None)."""
    body, head = _split_lm(model)
    with autocast_for(input_ids.device, compute_dtype):
        if body is None:  # an architecture we cannot split: full logits
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            logprobs = token_logprobs(logits, input_ids, temperature) * loss_mask
            if not with_hits:
                return logprobs, None
            hits = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
            hits[:, 1:] = (logits[:, :-1].argmax(-1) == input_ids[:, 1:]).float()
            return logprobs, hits * loss_mask
        rows, cols = loss_mask.nonzero(as_tuple=True)  # targets at (row, col), predicted from col - 1
        prefix = shared_prefix_length(input_ids, attention_mask) if shared_prefix and usable(model) else 0
        if prefix >= MIN_SHARED_PREFIX:
            hidden = hidden_at(body, input_ids, prefix, rows, cols - 1)  # (N, H)
        else:
            hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            hidden = hidden[rows, cols - 1]  # (N, H)
        logits = head(hidden)  # (N, V)
    targets = input_ids[rows, cols]
    picked = _picked(logits, targets, temperature)  # (N,)
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    out = out.index_put((rows, cols), picked)
    if not with_hits:
        return out, None
    hit = (logits.argmax(-1) == targets).float().detach()  # (N,)
    return out, torch.zeros_like(out).index_put((rows, cols), hit)


class TrainedLogprobs(torch.nn.Module):
    """A causal LM whose forward is the update's: `sequence_logprobs` at the trained positions.

    The update's forward goes through this module's `forward`, so a data-parallel wrapper around
    it (DDP, FSDP2) sees every training forward it has to hook, even though the log-probs call
    the LM's body and head separately.
    """

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
        temperature: float = 1.0,
        compute_dtype: torch.dtype | None = None,
        with_hits: bool = False,
        shared_prefix: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log-probs, greedy hits or None): one forward either way, so a wrapper hooks every one."""
        return _trained_positions(self.lm, input_ids, attention_mask, loss_mask, temperature, compute_dtype,
                                  with_hits, shared_prefix)


def as_trained_forward(model: torch.nn.Module) -> torch.nn.Module:
    """`model` if it already computes trained-position log-probs (possibly wrapped), else a wrapper."""
    inner = getattr(model, "module", model)  # DistributedDataParallel keeps the module here
    return model if isinstance(inner, TrainedLogprobs) else TrainedLogprobs(model)


def _split_lm(model: torch.nn.Module) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
    """(transformer body, LM head) of a causal LM when the head is a plain projection."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = getattr(model, "model", None)
    if head is None or body is None or getattr(model.config, "final_logit_softcapping", None):
        return None, None
    return body, head


@torch.no_grad()
def reference_logprobs(
    model: torch.nn.Module,
    batch: TokenBatch,
    micro_batches: list[list[int]],
    temperature: float,
    compute_dtype: torch.dtype | None,
    shared_prefix: bool = False,
) -> torch.Tensor:
    """(B, T) log-probs of the batch under a frozen model, computed micro-batch by micro-batch."""
    out = torch.zeros(batch.input_ids.shape, dtype=torch.float32, device=batch.input_ids.device)
    for rows in micro_batches:
        mb = batch.rows(rows)
        width = mb.input_ids.shape[1]
        out[rows, :width] = sequence_logprobs(
            model, mb.input_ids, mb.attention_mask, mb.loss_mask, temperature, compute_dtype,
            shared_prefix=shared_prefix,
        )
    return out


def recompute_old_logprobs(
    model: torch.nn.Module,
    batch: TokenBatch,
    micro_batches: list[list[int]],
    temperature: float,
    compute_dtype: torch.dtype | None,
) -> None:
    """For truncated importance sampling: the batch's old log-probs become the update's own.

    The rollout's log-probs move to `sampling_logprobs`; `old_logprobs` are recomputed by the
    update's forward (same weights, before any step), so the PPO ratio compares like with like
    and the sampling mismatch goes into the truncated weight instead.
    """
    batch.sampling_logprobs = batch.old_logprobs
    batch.old_logprobs = reference_logprobs(model, batch, micro_batches, temperature, compute_dtype)


@dataclass
class LossSettings:
    temperature: float
    clip_low: float
    clip_high: float
    kl_coef: float
    compute_dtype: torch.dtype | None = None
    dual_clip: float | None = None
    tis_cap: float | None = None
    shared_prefix: bool = False  # run each micro-batch's common prefix once
    distill_coef: float = 0.0  # weight of the KL to the batch's teacher_logprobs, when it has them


def accumulate_gradients(
    model: torch.nn.Module,
    batch: TokenBatch,
    micro_batches: list[list[int]],
    settings: LossSettings,
    num_tokens_normalizer: float,
    extra_loss: Callable[[], dict[str, torch.Tensor]] | None = None,
) -> dict[str, float]:
    """Backward the GRPO loss over micro-batches (rows of `batch`), summing gradients.

    `model` is a causal LM or a (DDP/FSDP-wrapped) `TrainedLogprobs`; a wrapped model syncs
    gradients across ranks on the last micro-batch only. Each micro-batch divides its token-sum loss by `num_tokens_normalizer` (the whole batch's
    token count, or global count / world size under data parallelism), so the accumulated
    gradient equals one full-batch token-mean loss. `extra_loss` terms (a CL penalty) are added
    once, on the last micro-batch. Returns token-weighted statistics.
    """
    forward = as_trained_forward(model)

    def loss_of(rows: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        mb = batch.rows(rows)
        logprobs, _ = forward(mb.input_ids, mb.attention_mask, mb.loss_mask, settings.temperature,
                              settings.compute_dtype, shared_prefix=settings.shared_prefix)
        return grpo_loss(
            logprobs, mb.old_logprobs, mb.advantages, mb.loss_mask,
            ref_logprobs=mb.ref_logprobs, kl_coef=settings.kl_coef,
            clip_low=settings.clip_low, clip_high=settings.clip_high,
            num_tokens_normalizer=num_tokens_normalizer, dual_clip=settings.dual_clip,
            sampling_logprobs=mb.sampling_logprobs if settings.tis_cap else None,
            tis_cap=settings.tis_cap,
            teacher_logprobs=mb.teacher_logprobs, distill_coef=settings.distill_coef,
        )

    per_micro_batch, terms, loss_sum = accumulate(forward, micro_batches, loss_of, extra_loss)
    result = token_weighted_means(per_micro_batch)
    result["loss"] = loss_sum
    result.update(terms)
    return result


def token_weighted_means(parts: list[dict[str, float]]) -> dict[str, float]:
    """Each statistic's mean over `parts` weighted by their `num_tokens`, and the tokens' total."""
    weight = sum(p["num_tokens"] for p in parts)
    keys = [k for k in parts[0] if k != "num_tokens"] if parts else []
    result = {k: sum(p[k] * p["num_tokens"] for p in parts) / weight if weight else 0.0 for k in keys}
    result["num_tokens"] = float(weight)
    return result


def split_micro_batches(num_rows: int, num_micro_batches: int) -> list[list[int]]:
    """Contiguous, near-equal row groups (fewer groups if there are fewer rows)."""
    n = max(1, min(num_micro_batches, num_rows))
    bounds = [round(i * num_rows / n) for i in range(n + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(n) if bounds[i + 1] > bounds[i]]


def micro_batches_by_length(
    lengths: Sequence[int], num_micro_batches: int, groups: Sequence[str] | None = None
) -> list[list[int]]:
    """Near-equal row groups with rows of similar length together (shortest first).

    Each micro-batch is padded only to its own longest row, so grouping by length pads far less
    than taking rows in batch order. With `groups` (e.g. each row's domain), rows of one group are
    kept together first, so a micro-batch's rows share their group's prompt prefix (the shared-
    prefix update runs it once). The loss is unchanged: every micro-batch divides by the same
    whole-batch token count, so the accumulated gradient does not depend on the grouping.
    """
    keys = groups if groups is not None else [""] * len(lengths)
    order = sorted(range(len(lengths)), key=lambda row: (keys[row], lengths[row], row))
    return [[order[i] for i in group] for group in split_micro_batches(len(lengths), num_micro_batches)]
