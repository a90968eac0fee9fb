"""GRPO maths checked against hand-computed numbers (arithmetic in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from tau2cl.rl.grpo import (
    LOG_RATIO_BOUND,
    group_advantages,
    grpo_loss,
    logprob_gap,
    masked_mean,
    token_logprobs,
    zero_std_group_fraction,
)

# ---------------------------------------------------------------- advantages


def test_group_advantages_std_uses_unbiased_std():
    # [1, 0, 0, 1]: mean 0.5; unbiased std = sqrt(4 * 0.25 / 3) = sqrt(1/3) = 0.57735
    # A = ±0.5 / (0.57735 + 1e-6) = ±0.866024  (population std would give ±1.0)
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=4)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    assert adv.tolist() == pytest.approx([a, -a, -a, a], rel=1e-6)


def test_group_advantages_are_per_group():
    # group 0 = [1, 0] -> mean 0.5, unbiased std sqrt(0.5) = 0.70711 -> ±0.5 / 0.70711 = ±0.70711
    # group 1 = [3, 1] -> mean 2,   unbiased std sqrt(2) = 1.41421   -> ±1 / 1.41421 = ±0.70711
    adv = group_advantages(torch.tensor([1.0, 0.0, 3.0, 1.0]), group_size=2, eps=0.0)
    s = math.sqrt(0.5)
    assert adv.tolist() == pytest.approx([s, -s, s, -s], rel=1e-6)


def test_zero_variance_group_gives_exact_zeros():
    # second group is flat; 0.1 * 3 has rounding error in the mean, still exactly 0
    rewards = torch.tensor(
        [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.1, 0.1, 0.1, 0.1], dtype=torch.float64
    )
    adv = group_advantages(rewards, group_size=4)
    assert adv[4:].tolist() == [0.0] * 8
    assert adv[:4].abs().min() > 0.8
    assert group_advantages(torch.tensor([0.7, 0.2]), group_size=1).tolist() == [0.0, 0.0]


def test_group_advantages_mean_only():
    # mean 0.5, no scaling: A = r - 0.5
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=4, normalize="mean")
    assert adv.tolist() == [0.5, -0.5, -0.5, 0.5]


def test_group_advantages_rejects_bad_arguments():
    with pytest.raises(ValueError, match="normalize"):
        group_advantages(torch.zeros(4), 2, normalize="rank")
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(5), 2)


def test_zero_std_group_fraction():
    # groups [1, 0], [1, 1], [0, 0] -> 2 of 3 flat
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    assert zero_std_group_fraction(rewards, 2) == pytest.approx(2 / 3)


# ---------------------------------------------------------------- token log-probs


def _tiny_logits() -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.tensor(
        [[[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0], [5.0, -1.0, 2.0, 0.0]]]
    )  # (1, 3, 4)
    input_ids = torch.tensor([[2, 3, 0]])  # (1, 3)
    return logits, input_ids


def test_token_logprobs_matches_manual_softmax():
    logits, input_ids = _tiny_logits()
    out = token_logprobs(logits, input_ids)
    # out[0] = 0 (no prefix)
    # out[1] = log softmax([1, 2, 3, 4])[3] = 4 - log(e + e^2 + e^3 + e^4) = -log(1 + e^-1 + e^-2 + e^-3) = -0.440190
    # out[2] = log softmax([0, 0, 0, 0])[0] = log(1/4) = -1.386294   (position 2's logits are unused)
    assert out.shape == (1, 3)
    assert out[0].tolist() == pytest.approx([0.0, -0.440190, -1.386294], abs=1e-6)


def test_token_logprobs_divides_logits_by_temperature():
    logits, input_ids = _tiny_logits()
    out = token_logprobs(logits, input_ids, temperature=2.0)
    # out[1] = log softmax([0.5, 1, 1.5, 2])[3] = -log(1 + e^-0.5 + e^-1 + e^-1.5) = -0.787339
    # out[2] = log(1/4) again: a flat row stays flat at any temperature
    assert out[0].tolist() == pytest.approx([0.0, -0.787339, -1.386294], abs=1e-6)


@pytest.mark.parametrize("temperature,chunk_size", [(1.0, 1), (0.7, 2), (1.3, 5)])
def test_token_logprobs_value_and_grad_match_autograd_log_softmax(temperature, chunk_size):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)  # (B, T, V)
    input_ids = torch.randint(0, 7, (3, 5))
    weights = torch.randn(3, 5, dtype=torch.float64)  # arbitrary upstream gradient
    out = token_logprobs(logits, input_ids, temperature, chunk_size=chunk_size)
    (out * weights).sum().backward()
    grad = logits.grad.clone()

    logits.grad = None
    ref = torch.log_softmax(logits[:, :-1] / temperature, dim=-1).gather(
        -1, input_ids[:, 1:, None]
    )[..., 0]
    (ref * weights[:, 1:]).sum().backward()
    assert out.dtype == torch.float64  # fp32 at least: fp64 logits stay fp64
    assert torch.equal(out[:, 0], torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(out[:, 1:], ref)
    torch.testing.assert_close(grad, logits.grad)
    assert torch.all(grad[:, -1] == 0)  # the last position predicts nothing


def test_token_logprobs_gradcheck():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    input_ids = torch.randint(0, 4, (2, 3))
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, input_ids, 0.8), (logits,))


def test_token_logprobs_bf16_in_fp32_out_grad_in_bf16():
    logits, input_ids = _tiny_logits()
    logits = logits.bfloat16().requires_grad_()
    out = token_logprobs(logits, input_ids)
    out.sum().backward()
    assert out.dtype == torch.float32
    assert logits.grad.dtype == torch.bfloat16
    assert out[0].tolist() == pytest.approx(
        [0.0, -0.440190, -1.386294], abs=1e-6
    )  # values exact in bf16


def test_token_logprobs_keeps_no_fp32_copy_of_the_logits_for_backward():
    # Autograd through log_softmax would save a (B, T, V) fp32 tensor: 2 * 8 * 64 * 4 bytes = 4096.
    # Ours saves the bf16 logits (2048 bytes), the int64 targets (128) and the fp32 logsumexp (64).
    logits = torch.randn(2, 8, 64, dtype=torch.bfloat16, requires_grad=True)
    input_ids = torch.randint(0, 64, (2, 8))
    saved_bytes = []

    def pack(t):
        saved_bytes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_logprobs(logits, input_ids, temperature=0.9)
    assert max(saved_bytes) == 2 * 8 * 64 * 2
    assert sum(saved_bytes) < 2 * 8 * 64 * 4


# ---------------------------------------------------------------- loss


def test_ratio_one_gives_minus_token_mean_advantage_and_its_gradient():
    # B=2, T=3; seq 0 trains 2 tokens with A=1, seq 1 trains 1 token with A=-0.5
    # ratio = 1 everywhere -> per-token loss -A: -1, -1, +0.5 -> sum -1.5 over 3 tokens = -0.5
    # (a per-sequence mean would give (-1 + 0.5) / 2 = -0.25: aggregation is per token)
    # d loss / d logprob = -A * ratio / 3: -1/3 on seq 0's tokens, +1/6 on seq 1's token
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -1.1]], requires_grad=True)
    mask = torch.tensor([[0, 1, 1], [0, 1, 0]], dtype=torch.bool)
    advantages = torch.tensor([1.0, -0.5])
    loss, stats = grpo_loss(logprobs, logprobs.detach().clone(), advantages, mask)
    loss.backward()
    assert loss.item() == pytest.approx(-0.5)
    expected = torch.tensor([[0.0, -1 / 3, -1 / 3], [0.0, 1 / 6, 0.0]])
    torch.testing.assert_close(logprobs.grad, expected)
    assert stats["ratio_mean"] == pytest.approx(1.0)
    assert stats["clip_frac"] == 0.0
    assert stats["kl"] == 0.0
    assert stats["num_tokens"] == 3.0


def _clip_batch():
    # 4 sequences, token 0 masked, token 1 trained; log ratio at token 1 = [0.5, -0.5, -0.5, 0.5]
    old = torch.zeros(4, 2)
    logprobs = torch.tensor([[0.0, 0.5], [0.0, -0.5], [0.0, -0.5], [0.0, 0.5]], requires_grad=True)
    mask = torch.tensor([[False, True]] * 4)
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0])
    return logprobs, old, advantages, mask


def test_clipping_both_sides_and_zero_gradient_in_clipped_region():
    logprobs, old, advantages, mask = _clip_batch()
    loss, stats = grpo_loss(logprobs, old, advantages, mask, clip_low=0.2, clip_high=0.2)
    loss.backward()
    # seq 0: r = e^0.5 = 1.648721, A=+1: min(1.6487, 1.2) = 1.2 -> clipped high, loss -1.2, grad 0
    # seq 1: r = e^-0.5 = 0.606531, A=+1: min(0.6065, 0.8) = 0.6065 -> unclipped, loss -0.606531
    # seq 2: r = 0.606531, A=-1: min(-0.6065, -0.8) = -0.8 -> clipped low, loss 0.8, grad 0
    # seq 3: r = 1.648721, A=-1: min(-1.6487, -1.2) = -1.6487 -> unclipped, loss 1.648721
    # loss = (-1.2 - 0.606531 + 0.8 + 1.648721) / 4 = 0.642190 / 4 = 0.160548
    assert loss.item() == pytest.approx(0.160548, abs=1e-6)
    # unclipped grads: d(-r*A/4)/d lp = -r*A/4: seq 1 -0.606531/4 = -0.151633, seq 3 +1.648721/4 = 0.412180
    expected = torch.tensor([[0.0, 0.0], [0.0, -0.151633], [0.0, 0.0], [0.0, 0.412180]])
    torch.testing.assert_close(logprobs.grad, expected, atol=1e-6, rtol=0)
    assert stats["clip_frac"] == 0.5
    assert stats["clip_frac_low"] == 0.25
    assert stats["clip_frac_high"] == 0.25
    # ratio mean = (1.648721 * 2 + 0.606531 * 2) / 4 = 1.127626
    assert stats["ratio_mean"] == pytest.approx(1.127626, abs=1e-6)
    # policy_loss stat = the same token mean without KL
    assert stats["policy_loss"] == pytest.approx(0.160548, abs=1e-6)


def test_clip_high_and_low_are_separate():
    # r = e^0.2 = 1.221403 with A=+1: clipped under clip_high=0.2 (> 1.2), not under clip_high=0.3
    logprobs = torch.tensor([[0.2]], requires_grad=True)
    args = (torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1, dtype=torch.bool))
    _, tight = grpo_loss(logprobs, *args, clip_high=0.2, clip_low=0.5)
    loss, loose = grpo_loss(logprobs, *args, clip_high=0.3, clip_low=0.0)
    assert tight["clip_frac_high"] == 1.0
    assert loose["clip_frac"] == 0.0
    assert loss.item() == pytest.approx(-math.exp(0.2))


def test_k3_kl_value_and_penalty():
    # ref - lp = [0.5, -0.5] on two trained tokens
    # k3 = e^d - d - 1: e^0.5 - 1.5 = 0.148721; e^-0.5 + 0.5 - 1 = 0.106531; mean 0.127626
    # A = 0 -> policy loss 0, so loss = kl_coef * 0.127626 = 0.1 * 0.127626 = 0.0127626
    logprobs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-0.5, -2.5]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    adv = torch.tensor([0.0])
    loss, stats = grpo_loss(logprobs, logprobs.detach(), adv, mask, ref_logprobs=ref, kl_coef=0.1)
    assert stats["kl"] == pytest.approx(0.127626, abs=1e-6)
    assert loss.item() == pytest.approx(0.0127626, abs=1e-7)
    loss.backward()
    # d k3 / d lp = -e^d + 1: 1 - 1.648721 = -0.648721; 1 - 0.606531 = 0.393469; times 0.1 / 2
    torch.testing.assert_close(
        logprobs.grad, torch.tensor([[-0.0324361, 0.0196735]]), atol=1e-6, rtol=0
    )
    # kl_coef 0: still reported, not in the loss
    loss0, stats0 = grpo_loss(logprobs, logprobs.detach(), adv, mask, ref_logprobs=ref, kl_coef=0.0)
    assert loss0.item() == 0.0
    assert stats0["kl"] == pytest.approx(0.127626, abs=1e-6)


# ---------------------------------------------------------------- guards


def test_a_runaway_ratio_is_clamped_then_dual_clipped():
    # one token, log-ratio +25, A = -0.5 (a token the policy should make less likely)
    # unguarded: r = e^25 = 7.2005e10 -> loss 0.5 * 7.2005e10 = 3.6002e10
    # clamp: log-ratio 25 -> 20, r = e^20 = 4.851652e8 -> loss 0.5 * e^20 = 2.425826e8, no gradient
    # dual clip C = 3: loss capped at C * |A| = 1.5, no gradient
    assert LOG_RATIO_BOUND == 20.0
    old, adv, mask = torch.zeros(1, 1), torch.tensor([-0.5]), torch.ones(1, 1, dtype=torch.bool)
    lp = torch.full((1, 1), 25.0, requires_grad=True)
    loss, stats = grpo_loss(lp, old, adv, mask)
    loss.backward()
    assert loss.item() == pytest.approx(0.5 * math.exp(20.0), rel=1e-6)
    assert stats["log_ratio_clamp_frac"] == 1.0 and stats["dual_clip_frac"] == 0.0
    assert lp.grad.item() == 0.0
    lp.grad = None
    loss, stats = grpo_loss(lp, old, adv, mask, dual_clip=3.0)
    loss.backward()
    assert loss.item() == 1.5
    assert stats["dual_clip_frac"] == 1.0 and stats["log_ratio_clamp_frac"] == 1.0
    assert stats["policy_loss"] == 1.5
    assert lp.grad.item() == 0.0


def test_dual_clip_caps_only_negative_advantages_above_c():
    # 3 tokens, C = 3, clip 0.2:
    #   A=-1, r=2: PPO loss -min(-2, -1.2) = 2 < 3 -> 2, grad d(r*1)/dlp = r = 2, / 3 tokens = 0.666667
    #   A=-1, r=4: PPO loss 4 > 3 -> capped at 3, grad 0
    #   A=+1, r=4: PPO loss -min(4, 1.2) = -1.2 (clip high, grad 0); positive A is never dual-clipped
    # loss = (2 + 3 - 1.2) / 3 = 1.266667
    lp = torch.tensor([[math.log(2.0)], [math.log(4.0)], [math.log(4.0)]], requires_grad=True)
    old, mask = torch.zeros(3, 1), torch.ones(3, 1, dtype=torch.bool)
    loss, stats = grpo_loss(lp, old, torch.tensor([-1.0, -1.0, 1.0]), mask, dual_clip=3.0)
    loss.backward()
    assert loss.item() == pytest.approx(3.8 / 3, abs=1e-6)
    torch.testing.assert_close(lp.grad, torch.tensor([[2 / 3], [0.0], [0.0]]), atol=1e-6, rtol=0)
    assert stats["dual_clip_frac"] == pytest.approx(1 / 3)
    assert stats["log_ratio_clamp_frac"] == 0.0
    # without the dual clip: (2 + 4 - 1.2) / 3 = 1.6
    plain, _ = grpo_loss(lp, old, torch.tensor([-1.0, -1.0, 1.0]), mask)
    assert plain.item() == pytest.approx(1.6, abs=1e-6)


def test_truncated_importance_sampling_weights_the_policy_term():
    # old (the update's own recomputation) - sampling = [ln 3, ln 0.5]; cap 2 -> weights [2, 0.5]
    # ratio 1 (logprobs = old), A = +1 -> per-token loss -w: (-2 - 0.5) / 2 = -1.25
    # grad d(-w * r)/dlp = -w * r / 2 = [-1, -0.25]; weights carry no gradient
    old = torch.tensor([[-1.0, -2.0]])
    sampling = old - torch.tensor([[math.log(3.0), math.log(0.5)]])
    lp = old.clone().requires_grad_()
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, stats = grpo_loss(lp, old, torch.tensor([1.0]), mask, sampling_logprobs=sampling, tis_cap=2.0)
    loss.backward()
    assert loss.item() == pytest.approx(-1.25, abs=1e-6)
    torch.testing.assert_close(lp.grad, torch.tensor([[-1.0, -0.25]]), atol=1e-6, rtol=0)
    assert stats["tis_weight_mean"] == pytest.approx(1.25, abs=1e-6)
    assert stats["tis_clip_frac"] == 0.5
    with pytest.raises(ValueError, match="together"):
        grpo_loss(lp, old, torch.tensor([1.0]), mask, tis_cap=2.0)


def test_the_kl_gap_is_clamped_too():
    # ref - lp = 25 -> clamped to 20 in exp: k3 = e^20 - 25 - 1 (finite, and no inf gradient)
    lp = torch.zeros(1, 1, requires_grad=True)
    mask = torch.ones(1, 1, dtype=torch.bool)
    loss, stats = grpo_loss(lp, lp.detach(), torch.tensor([0.0]), mask, ref_logprobs=torch.full((1, 1), 25.0), kl_coef=1.0)
    assert stats["kl"] == pytest.approx(math.exp(20.0) - 26.0, rel=1e-6)
    loss.backward()
    assert lp.grad.item() == 1.0  # d(-(ref - lp))/dlp = +1; the clamped exp gives 0


@pytest.mark.parametrize("garbage", [1e4, -1e4, float("inf"), float("-inf"), float("nan")])
def test_masked_tokens_contribute_nothing(garbage):
    torch.manual_seed(0)
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    clean = torch.randn(2, 4) * 0.3
    old, ref = clean + 0.1 * torch.randn(2, 4), clean + 0.1 * torch.randn(2, 4)
    adv = torch.tensor([0.8, -1.3])

    def run(fill):
        lp = torch.where(mask, clean, torch.full_like(clean, fill)).requires_grad_()
        o = torch.where(mask, old, torch.full_like(old, -fill))
        r = torch.where(mask, ref, torch.full_like(ref, fill))
        loss, stats = grpo_loss(lp, o, adv, mask, ref_logprobs=r, kl_coef=0.05)
        loss.backward()
        return loss, lp.grad, stats

    loss_a, grad_a, stats_a = run(0.0)
    loss_b, grad_b, stats_b = run(garbage)
    assert torch.isfinite(loss_b) and torch.isfinite(grad_b).all()
    assert loss_a.item() == loss_b.item()
    assert torch.equal(grad_a, grad_b)
    assert torch.all(grad_b[~mask] == 0)
    assert stats_a == stats_b


def test_empty_mask_gives_zero_loss_not_nan():
    lp = torch.randn(2, 3, requires_grad=True)
    loss, stats = grpo_loss(lp, lp.detach(), torch.ones(2), torch.zeros(2, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(lp.grad == 0)
    assert stats["num_tokens"] == 0.0


def test_micro_batches_with_total_normalizer_equal_full_batch():
    # Two half-batches, each divided by the full batch's token count, sum to the full-batch loss,
    # and their accumulated gradients equal the full-batch gradient.
    torch.manual_seed(0)
    B, T = 4, 6
    mask = torch.rand(B, T) > 0.3  # uneven token counts per half
    mask[0, :] = True
    clean = torch.randn(B, T) * 0.2
    old, ref = clean + 0.2 * torch.randn(B, T), clean + 0.1 * torch.randn(B, T)
    adv = torch.randn(B)
    kwargs = dict(kl_coef=0.04, clip_low=0.2, clip_high=0.28)

    lp_full = clean.clone().requires_grad_()
    full, _ = grpo_loss(lp_full, old, adv, mask, ref_logprobs=ref, **kwargs)
    full.backward()

    lp_micro = clean.clone().requires_grad_()
    total_tokens = float(mask.sum())
    summed = 0.0
    for half in (slice(0, 2), slice(2, 4)):
        part, stats = grpo_loss(
            lp_micro[half],
            old[half],
            adv[half],
            mask[half],
            ref_logprobs=ref[half],
            num_tokens_normalizer=total_tokens,
            **kwargs,
        )
        part.backward()
        summed += part.item()
        assert stats["num_tokens"] == float(mask[half].sum())
    assert summed == pytest.approx(full.item(), abs=1e-6)
    torch.testing.assert_close(lp_micro.grad, lp_full.grad)
    # their own-count token means would not add up: the normaliser matters
    own = sum(
        grpo_loss(clean[h], old[h], adv[h], mask[h], ref_logprobs=ref[h], **kwargs)[0].item()
        for h in (slice(0, 2), slice(2, 4))
    )
    assert own != pytest.approx(full.item(), abs=1e-6)


def test_masked_mean():
    x = torch.tensor([[1.0, float("nan"), 3.0], [5.0, 7.0, float("inf")]])
    mask = torch.tensor([[1, 0, 1], [0, 1, 0]])
    # (1 + 3 + 7) / 3 = 11/3
    assert masked_mean(x, mask).item() == pytest.approx(11 / 3)
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0


def test_logprob_gap_is_the_masked_absolute_difference():
    trainer = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, 0.0]])
    sampler = torch.tensor([[-1.5, -2.0, -9.0], [-0.4, -2.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])  # the third column (gap 8.5) is not sampled
    total, count, largest = logprob_gap(trainer, sampler, mask)
    # |Δ| on the masked tokens: 0.5, 0.0, 0.3, 1.0 → sum 1.8 over 4 tokens, largest 1.0
    assert count == 4 and abs(total - 1.8) < 1e-6 and abs(largest - 1.0) < 1e-6
    assert logprob_gap(trainer, sampler, torch.zeros_like(mask)) == (0.0, 0, 0.0)
