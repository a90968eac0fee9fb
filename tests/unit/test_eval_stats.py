"""Evaluation summaries checked against hand-computed values (arithmetic in the comments)."""

from __future__ import annotations

import json

import pytest

from tau2cl.evaluation.stats import (
    EvalSummary,
    is_success,
    pass_hat_k,
    pass_hat_k_by_task,
    summarize,
)

# Two tasks × three trials. Task a: rewards 1, 1, 0 (2 successes); task b: 1, 0, 0 (1 success).
REWARDS = [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
TASK_IDS = ["a", "a", "a", "b", "b", "b"]
TOOL_ACC = [1.0, 1.0, None, 0.5, None, 0.0]


def test_summarize_two_tasks_three_trials():
    s = summarize("airline", REWARDS, TOOL_ACC, TASK_IDS)
    assert s.domain == "airline"
    assert s.num_episodes == 6
    # mean = (1 + 1 + 0 + 1 + 0 + 0) / 6 = 3/6 = 0.5
    assert s.reward_mean == pytest.approx(0.5)
    # population std: every episode is 0.5 away from the mean → sqrt(6 · 0.25 / 6) = 0.5
    assert s.reward_std == pytest.approx(0.5)
    # 3 of 6 episodes have reward 1.0
    assert s.pass_rate == pytest.approx(0.5)
    # known tool accuracies 1.0, 1.0, 0.5, 0.0 → 2.5 / 4 = 0.625 (the two None are left out)
    assert s.tool_accuracy == pytest.approx(0.625)
    # pass^k = C(c, k) / C(3, k), averaged over tasks a (c = 2) and b (c = 1):
    #   k=1: (2/3 + 1/3) / 2 = 0.5
    #   k=2: (C(2,2)/C(3,2) + C(1,2)/C(3,2)) / 2 = (1/3 + 0) / 2 = 1/6
    #   k=3: (C(2,3)/1 + C(1,3)/1) / 2 = 0
    assert s.pass_hat_k.keys() == {1, 2, 3}
    assert s.pass_hat_k[1] == pytest.approx(0.5)
    assert s.pass_hat_k[2] == pytest.approx(1 / 6)
    assert s.pass_hat_k[3] == pytest.approx(0.0)
    assert s.custom_reward_mean is None


def test_reward_std_is_population_not_sample():
    # rewards 0, 1: mean 0.5; population var = (0.25 + 0.25) / 2 = 0.25 → std 0.5
    # (the sample std would be sqrt(0.5 / 1) ≈ 0.707)
    s = summarize("retail", [0.0, 1.0], [None, None], ["x", "y"])
    assert s.reward_std == pytest.approx(0.5)


def test_partial_rewards_and_success_tolerance():
    # 1 - 1e-7 is a success (tau2 counts reward == 1 within 1e-6); 0.999 and 0.5 are not.
    assert is_success(1.0 - 1e-7)
    assert not is_success(0.999)
    s = summarize("retail", [1.0 - 1e-7, 0.999, 0.5, 0.2], [None] * 4, ["a", "b", "c", "d"])
    # 1 success of 4 → 0.25; mean = (0.9999999 + 0.999 + 0.5 + 0.2) / 4 ≈ 2.6989999 / 4 ≈ 0.67475
    assert s.pass_rate == pytest.approx(0.25)
    assert s.reward_mean == pytest.approx(0.67475, abs=1e-6)
    # one trial per task: pass^1 is the pass rate
    assert s.pass_hat_k == {1: pytest.approx(0.25)}


def test_tool_accuracy_none_when_no_episode_has_golden_actions():
    s = summarize("telecom", [1.0, 0.0], [None, None], ["a", "b"])
    assert s.tool_accuracy is None


def test_pass_hat_k_empty_when_tasks_differ_in_trials():
    # task a has 2 trials, task b 1: pass^k is not defined
    assert pass_hat_k_by_task([1.0, 1.0, 0.0], ["a", "a", "b"]) == {}
    s = summarize("airline", [1.0, 1.0, 0.0], [None] * 3, ["a", "a", "b"])
    assert s.pass_hat_k == {}


def test_pass_hat_k_single_task():
    # 4 trials, 3 successes: pass^2 = C(3,2)/C(4,2) = 3/6 = 0.5; pass^4 = C(3,4)/C(4,4) = 0
    assert pass_hat_k(4, 3, 2) == pytest.approx(0.5)
    assert pass_hat_k(4, 3, 4) == 0.0


def test_custom_reward_mean():
    # (0.2 + 0.4 + 0.9) / 3 = 1.5 / 3 = 0.5
    s = summarize("airline", [0.0, 1.0, 0.0], [None] * 3, ["a", "b", "c"], [0.2, 0.4, 0.9])
    assert s.custom_reward_mean == pytest.approx(0.5)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="no episodes"):
        summarize("airline", [], [], [])
    with pytest.raises(ValueError, match="one entry per episode"):
        summarize("airline", [1.0, 0.0], [None], ["a", "b"])
    with pytest.raises(ValueError, match="custom_rewards"):
        summarize("airline", [1.0], [None], ["a"], [0.1, 0.2])


def test_to_dict_is_json_ready():
    s = summarize("airline", REWARDS, TOOL_ACC, TASK_IDS)
    d = s.to_dict()
    assert set(d) == {
        "domain",
        "reward_mean",
        "reward_std",
        "pass_rate",
        "tool_accuracy",
        "num_episodes",
        "pass_hat_k",
        "custom_reward_mean",
    }
    assert d["pass_hat_k"][2] == pytest.approx(1 / 6)
    assert json.loads(json.dumps(d))["pass_hat_k"]["1"] == pytest.approx(0.5)
    assert EvalSummary(**d) == s
