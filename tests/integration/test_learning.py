"""Loss, masking and optimizer learn together: GRPO raises a simple reward with the tiny model.

A single-turn synthetic task with no tau2 in it: the reward of a completion is the share of its
tokens (the stop token excluded) that fall in a fixed set of about 5% of the vocabulary. A random
model scores about 0.05; sampling with `Policy.generate`, group advantages, `collate` and
`accumulate_gradients` (PPO-clipped GRPO loss, no KL) and AdamW must push it far higher within a
few dozen steps. A broken mask, a sign error or log-probs that do not match the sampled tokens
would not learn.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tau2cl.agent.policy import Generation, Policy
from tau2cl.rl.grpo import group_advantages
from tau2cl.rl.update import LossSettings, accumulate_gradients, collate, split_micro_batches

SEED = 0
STEPS = 15
GROUPS, SAMPLES = 4, 8  # G prompts x S samples per step
MAX_NEW_TOKENS = 8
LEARNING_RATE = 1e-2
TARGET_EVERY = 20  # token ids divisible by 20: ~5% of the vocabulary
USER_MESSAGES = (
    "Hello there.",
    "I need help with my booking.",
    "Can you check my order?",
    "My phone has no signal.",
)


def _reward(generation: Generation, targets: set[int]) -> float:
    completion = generation.token_ids[:-1] if generation.finished else generation.token_ids
    return sum(t in targets for t in completion) / len(completion) if completion else 0.0


@pytest.mark.slow  # ~10 s: 15 sample-and-update steps
def test_grpo_learns_a_token_preference(tiny_model, tiny_tokenizer, single_torch_thread):
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    model = copy.deepcopy(tiny_model).train()  # never train the shared model
    policy = Policy(model, tiny_tokenizer)
    vocab = len(tiny_tokenizer.get_vocab())
    targets = {i for i in range(0, vocab, TARGET_EVERY) if i not in policy.stop_ids}
    targets -= set(tiny_tokenizer.all_special_ids)
    prompts = [
        policy.renderer.prompt_ids(
            "You are a helpful assistant.", [], [{"role": "user", "content": m}]
        )
        for m in USER_MESSAGES[:GROUPS]
    ]
    prompts = [p for p in prompts for _ in range(SAMPLES)]  # group-major
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    settings = LossSettings(temperature=1.0, clip_low=0.2, clip_high=0.2, kl_coef=0.0)
    history = []
    for _ in range(STEPS):
        generations = policy.generate(prompts, MAX_NEW_TOKENS, temperature=1.0, generator=generator)
        rewards = torch.tensor([_reward(g, targets) for g in generations])  # (G*S,)
        history.append(rewards.mean().item())
        batch = collate(
            [p + g.token_ids for p, g in zip(prompts, generations, strict=True)],
            [
                [0] * len(p) + [1] * len(g.token_ids)
                for p, g in zip(prompts, generations, strict=True)
            ],
            [[0.0] * len(p) + g.logprobs for p, g in zip(prompts, generations, strict=True)],
            group_advantages(rewards, SAMPLES).tolist(),
            pad_id=tiny_tokenizer.pad_token_id,
        )
        optimizer.zero_grad()
        stats = accumulate_gradients(
            model, batch, split_micro_batches(len(prompts), 2), settings, batch.num_tokens
        )
        assert abs(stats["ratio_mean"] - 1.0) < 1e-3  # on-policy: first ratio is 1
        optimizer.step()
        policy.reset_prefix_cache()  # weights changed: cached prompt prefixes are stale
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    print(f"mean reward first 5 steps {first:.3f}, last 5 steps {last:.3f}")
    assert last > first + 0.2 and last > 3 * first, history
