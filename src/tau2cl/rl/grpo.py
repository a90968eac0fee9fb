"""GRPO maths: group advantages, per-token log-probs and the clipped policy loss.

Pure tensor code (no I/O, no model, no torch.distributed) so every number here can be checked by hand.
Layout conventions used throughout:
  - rewards/advantages are group-major: the `group_size` samples of one task are contiguous.
  - token tensors are (B, T); `loss_mask` is True on the tokens the policy generated (the ones trained on).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tau2cl.constants import ADVANTAGE_NORMALIZATIONS, LOG_RATIO_BOUND


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    """Reshape flat group-major rewards (G*S,) to (G, S), checking the layout."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (G*S,), got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"group_size {group_size} does not divide {rewards.numel()} rewards")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    return rewards.view(-1, group_size)  # (G, S)


def group_advantages(
    rewards: Tensor, group_size: int, normalize: str = "std", eps: float = 1e-6
) -> Tensor:
    """Advantage of each sample relative to the other samples of its task.

    A = r - mean(group); with normalize="std" it is then divided by (std(group) + eps), where std is the
    unbiased (Bessel-corrected, n-1) standard deviation, as torch.std and TRL use. normalize="mean" keeps
    the raw difference (Dr. GRPO), which does not up-weight near-uniform groups.
    A group whose rewards are all equal carries no signal and gets exactly 0 (also for group_size 1,
    where the unbiased std is undefined).
    Returns (G*S,) in the rewards' float dtype.
    """
    if normalize not in ADVANTAGE_NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {ADVANTAGE_NORMALIZATIONS}, got {normalize!r}")
    grouped = _grouped(rewards, group_size)  # (G, S)
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # (G, S)
    if normalize == "std" and group_size > 1:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    # Float rounding can leave e.g. 0.1 - mean([0.1]*3) at 1e-17: force flat groups to exact zeros.
    flat = _flat_groups(grouped)[:, None]  # (G, 1)
    return torch.where(flat, torch.zeros_like(centred), centred).reshape(-1)


def _flat_groups(grouped: Tensor) -> Tensor:
    """(G, S) -> (G,) bool: True where every sample of the group got the same reward."""
    return grouped.amax(dim=1) == grouped.amin(dim=1)


def zero_std_group_fraction(rewards: Tensor, group_size: int) -> float:
    """Share of groups whose rewards are all equal (they give no gradient); TRL's frac_reward_zero_std."""
    return _flat_groups(_grouped(rewards, group_size)).float().mean().item()


class _TokenLogProbs(torch.autograd.Function):
    """log softmax(logits / temperature)[target], one batch chunk at a time, forward and backward.

    Plain autograd through log_softmax would keep a full (B, T, V) fp32 copy alive until backward.
    Here only the input logits and the (B, T) logsumexp are saved; the softmax is recomputed chunk by
    chunk in backward, so the fp32 working set is one chunk of (chunk_size, T, V).
    """

    @staticmethod
    def forward(
        ctx, logits: Tensor, targets: Tensor, temperature: float, chunk_size: int
    ) -> Tensor:
        # fp32 for half-precision logits; fp64 stays fp64 (gradcheck)
        compute_dtype = torch.promote_types(logits.dtype, torch.float32)
        out = torch.empty(targets.shape, dtype=compute_dtype, device=logits.device)  # (B, T)
        lse = torch.empty_like(out)  # (B, T)
        for start in range(0, logits.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            scaled = logits[rows].to(compute_dtype) / temperature  # (c, T, V)
            lse[rows] = torch.logsumexp(scaled, dim=-1)
            out[rows] = scaled.gather(-1, targets[rows, :, None]).squeeze(-1) - lse[rows]
        ctx.save_for_backward(logits, targets, lse)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, targets, lse = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)  # (B, T, V), in the logits' own dtype
        for start in range(0, logits.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            g = grad_out[rows, :, None].to(lse.dtype)  # (c, T, 1)
            probs = torch.exp(logits[rows].to(lse.dtype) / ctx.temperature - lse[rows, :, None])
            # d logp[target] / d x = onehot(target) - softmax(x), and x = logits / temperature
            grad = probs.mul_(-g).scatter_add_(-1, targets[rows, :, None], g)  # (c, T, V)
            grad_logits[rows] = grad.div_(ctx.temperature)
        return grad_logits, None, None, None


def token_logprobs(
    logits: Tensor, input_ids: Tensor, temperature: float = 1.0, *, chunk_size: int = 1
) -> Tensor:
    """Log-probability of each token given its prefix, aligned with the tokens.

    logits (B, T, V) from the model on input_ids (B, T); position t's logits predict token t+1.
    Returns (B, T) in fp32 (fp64 for fp64 logits) with out[:, t] = log p(input_ids[:, t] | input_ids[:, :t])
    and out[:, 0] = 0 (the first token has no prefix; mask it out). Logits are divided by `temperature` so the scores match
    the distribution the rollout sampled from. Computed in fp32 `chunk_size` sequences at a time without
    keeping an fp32 copy of the logits for backward. input_ids must be valid vocabulary ids everywhere
    (pad with a real token id, not -100).
    """
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"logits (B, T, V) and input_ids (B, T) disagree: {tuple(logits.shape)} vs {tuple(input_ids.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    # Target of position t is token t+1; the last position's target (wrapped token 0) is dropped below,
    # so its logits get zero gradient. Using the full logits avoids a slice-backward (B, T, V) copy.
    targets = input_ids.roll(-1, dims=1).long()  # (B, T)
    predicted = _TokenLogProbs.apply(logits, targets, float(temperature), chunk_size)  # (B, T)
    return torch.nn.functional.pad(predicted[:, :-1], (1, 0))  # (B, T), out[:, 0] = 0


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x over the True entries of mask; 0 when mask is empty. Masked entries may hold NaN/inf."""
    mask = mask.bool()
    total = torch.where(mask, x, torch.zeros_like(x)).sum()
    return total / mask.sum().clamp(min=1)


# Log-ratios are clamped to [-LOG_RATIO_BOUND, LOG_RATIO_BOUND] = [-20, 20] before exp (verl's
# bound): a ratio never exceeds e^20 ≈ 4.85e8, so one stale or low-precision token cannot make the
# loss inf/NaN. Beyond the bound the ratio is constant, so such a token gets no gradient through it.


def bounded_exp(log_ratio: Tensor) -> Tensor:
    """exp(clamp(log_ratio, -LOG_RATIO_BOUND, LOG_RATIO_BOUND))."""
    return torch.exp(log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))


def ppo_token_loss(
    ratio: Tensor, adv: Tensor, clip_low: float, clip_high: float, dual_clip: float | None = None
) -> tuple[Tensor, Tensor]:
    """Per-token PPO-clipped loss and where the dual clip capped it (both (B, T)).

    -min(r * A, clip(r, 1 - clip_low, 1 + clip_high) * A); with `dual_clip` C (> 1), tokens with
    A < 0 are further capped at C * |A| (Ye et al. 2020, verl's clip_ratio_c): without it their
    loss grows like r * |A| without bound when r is large.
    """
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    if dual_clip is None:
        return loss, torch.zeros_like(loss, dtype=torch.bool)
    cap = -dual_clip * adv  # C * |A| where A < 0
    capped = (adv < 0) & (loss > cap)
    return torch.where(capped, cap.expand_as(loss), loss), capped


def truncated_is_weights(
    old_logprobs: Tensor, sampling_logprobs: Tensor, cap: float, mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Truncated importance-sampling weights min(π_old / π_sampler, cap) and where they were cut.

    `old_logprobs` are the update's own forward's log-probs of the sampled tokens before any
    step; `sampling_logprobs` the rollout's. The weight corrects for the two computations of the
    same policy disagreeing (another dtype, kernel or engine). No gradient; 1 on masked tokens.
    """
    gap = torch.where(mask, old_logprobs - sampling_logprobs, torch.zeros_like(old_logprobs))
    weights = bounded_exp(gap.detach())
    return weights.clamp(max=cap), weights > cap


def k3_kl(logprobs: Tensor, other_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(policy ‖ other) on tokens the policy sampled, (B, T).

    With g = other − logprobs: exp(g) − g − 1, which is ≥ 0 for every token and an unbiased
    estimate of the KL when the tokens come from the policy (Schulman's k3; GRPO's own KL term).
    Its gradient in logprobs is 1 − exp(g): positive where the policy gives its token more
    probability than `other` does, so descent pulls the policy towards `other` either way.
    g is clamped to ±LOG_RATIO_BOUND before exp; masked tokens are exactly 0, whatever they hold.
    """
    gap = torch.where(mask, other_logprobs - logprobs, torch.zeros_like(logprobs))  # (B, T)
    return bounded_exp(gap) - gap - 1.0


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    num_tokens_normalizer: float | None = None,
    dual_clip: float | None = None,
    sampling_logprobs: Tensor | None = None,
    tis_cap: float | None = None,
    teacher_logprobs: Tensor | None = None,
    distill_coef: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """PPO-clipped GRPO loss with an optional k3 KL penalty, averaged over tokens (DAPO token mean).

    logprobs (B, T) current policy, with grad; old_logprobs (B, T) the policy that sampled the rollout;
    ref_logprobs (B, T) the frozen reference; advantages (B,) one per sequence; loss_mask (B, T) True on
    trained tokens. Per token: -min(r * A, clip(r, 1 - clip_low, 1 + clip_high) * A) with
    r = exp(logprobs - old_logprobs), plus kl_coef * (exp(ref - lp) - (ref - lp) - 1). Both
    log-differences are clamped to ±LOG_RATIO_BOUND before exp. With `dual_clip` C the policy
    term of a token with A < 0 is capped at C * |A|. With `tis_cap` and `sampling_logprobs`
    (B, T), the policy term is weighted by min(exp(old - sampling), tis_cap) (truncated
    importance sampling; then old_logprobs are the update's own recomputation). With
    `teacher_logprobs` (B, T), a frozen teacher's (distillation), distill_coef × the k3 KL to the
    teacher is added per token the same way as the reference's.
    The sum over masked tokens is divided by `num_tokens_normalizer` when given, else by this batch's
    masked-token count: with gradient accumulation pass the whole batch's count to every micro-batch so
    the summed micro-batch losses equal the full-batch loss. Masked tokens contribute nothing, even when
    their log-probs are NaN or inf.
    Statistics are detached floats averaged over this call's own masked tokens (weight them by
    `num_tokens` to combine micro-batches); `kl` is 0.0 when no ref_logprobs are given;
    `distill_kl` is there only when teacher_logprobs are.
    """
    if not (logprobs.shape == old_logprobs.shape == loss_mask.shape):
        raise ValueError("logprobs, old_logprobs and loss_mask must all be (B, T)")
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(
            f"advantages must be (B,) = {tuple(logprobs.shape[:1])}, got {tuple(advantages.shape)}"
        )
    if (tis_cap is None) != (sampling_logprobs is None):
        raise ValueError("tis_cap and sampling_logprobs go together")
    mask = loss_mask.bool()  # (B, T)
    zero = torch.zeros_like(logprobs)
    adv = advantages.to(logprobs.dtype)[:, None]  # (B, 1)
    # torch.where before exp: a garbage masked log-prob must not make inf/NaN (nor NaN gradients).
    log_ratio = torch.where(mask, logprobs - old_logprobs, zero)  # (B, T)
    ratio = bounded_exp(log_ratio)
    policy_loss, dual_hit = ppo_token_loss(ratio, adv, clip_low, clip_high, dual_clip)  # (B, T)
    stats: dict[str, float] = {}
    if tis_cap is not None:
        weights, cut = truncated_is_weights(old_logprobs, sampling_logprobs, tis_cap, mask)
        policy_loss = policy_loss * weights
        stats["tis_weight_mean"] = masked_mean(weights, mask).item()
        stats["tis_clip_frac"] = masked_mean(cut.float(), mask).item()
    per_token = policy_loss
    kl = None
    if ref_logprobs is not None:
        kl = k3_kl(logprobs, ref_logprobs, mask)  # (B, T), >= 0
        if kl_coef > 0:
            per_token = per_token + kl_coef * kl
    if teacher_logprobs is not None:
        distill_kl = k3_kl(logprobs, teacher_logprobs, mask)  # (B, T), >= 0
        per_token = per_token + distill_coef * distill_kl
        stats["distill_kl"] = masked_mean(distill_kl.detach(), mask).item()
    num_tokens = mask.sum()
    normalizer = num_tokens.clamp(min=1) if num_tokens_normalizer is None else num_tokens_normalizer
    loss = torch.where(mask, per_token, zero).sum() / normalizer

    with torch.no_grad():
        clip_high_hit = (ratio > 1.0 + clip_high) & (adv > 0)  # clipped term chosen, gradient cut
        clip_low_hit = (ratio < 1.0 - clip_low) & (adv < 0)
        stats.update({
            "policy_loss": masked_mean(policy_loss, mask).item(),
            "kl": 0.0 if kl is None else masked_mean(kl, mask).item(),
            "clip_frac": masked_mean((clip_low_hit | clip_high_hit).float(), mask).item(),
            "clip_frac_low": masked_mean(clip_low_hit.float(), mask).item(),
            "clip_frac_high": masked_mean(clip_high_hit.float(), mask).item(),
            "dual_clip_frac": masked_mean(dual_hit.float(), mask).item(),
            "log_ratio_clamp_frac": masked_mean((log_ratio.abs() > LOG_RATIO_BOUND).float(), mask).item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
            "num_tokens": float(num_tokens.item()),
        })
    return loss, stats


def logprob_gap(trainer: Tensor, sampler: Tensor, mask: Tensor) -> tuple[float, int, float]:
    """How far the sampler's log-probs are from the trainer's on the masked tokens: (sum of
    |trainer − sampler|, number of tokens, largest |trainer − sampler|); all (B, T)."""
    gap = (trainer - sampler).abs()[mask.bool()]
    if gap.numel() == 0:
        return 0.0, 0, 0.0
    return float(gap.sum()), int(gap.numel()), float(gap.max())
