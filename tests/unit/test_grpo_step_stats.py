"""A GRPO step's episode figures: the rewards' spread and the advantages' magnitude (what says whether
a step can move the weights at all)."""

from types import SimpleNamespace

import pytest
import torch

from tau2cl.recipe.grpo_step import GRPOStep
from tau2cl.rl.grpo import group_advantages

STEP = SimpleNamespace(config=SimpleNamespace(num_samples_per_prompt=4))


def _episode(reward: float) -> SimpleNamespace:
    return SimpleNamespace(train_reward=reward, reward=reward, tool_accuracy=None, num_generated_tokens=10,
                           assistant_turns=2)


def test_a_flat_group_adds_no_advantage_and_counts_as_zero_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # one varied group, one flat
    advantages = group_advantages(rewards, 4)
    stats = GRPOStep.episode_stats(STEP, [_episode(float(r)) for r in rewards], rewards, advantages)
    # first group: mean 0.25, unbiased std 0.5, so A = 1.5, -0.5, -0.5, -0.5 (sum of |A| = 3); second: 0
    assert stats["advantage_abs_mean"] == pytest.approx(3.0 / 8, rel=1e-5)
    assert stats["frac_reward_zero_std"] == 0.5
    assert stats["reward_mean"] == 0.625 and stats["num_episodes"] == 8


def test_all_flat_groups_give_zero_advantage():
    rewards = torch.ones(8)
    stats = GRPOStep.episode_stats(STEP, [_episode(1.0)] * 8, rewards, group_advantages(rewards, 4))
    assert stats["advantage_abs_mean"] == 0.0 and stats["frac_reward_zero_std"] == 1.0
