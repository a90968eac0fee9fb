"""adaptive_fusion's α search and EWC++'s moving-average Fisher, on hand-computed numbers and a fake context."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tau2cl.cl.context import CLContext, Progress
from tau2cl.cl.strategies.adaptive_fusion import (
    AdaptiveFusion,
    best_alpha,
    format_alpha_search,
    holdout_split,
)
from tau2cl.cl.strategies.base import build_strategy
from tau2cl.cl.strategies.ewc_pp import is_update_step, moving_average, relative_change
from tau2cl.cl.strategies.fusion import interpolate
from tau2cl.config import GRPOConfig
from tau2cl.errors import UserError


def _gradients_of(logprob):
    """A CLContext.episode_gradients that backpropagates logprob(traj) for each trajectory in turn."""
    def gradients(trajectories):
        for traj in trajectories:
            logprob(traj).backward()
            yield traj
    return gradients


CPU = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"))


class Policy:
    """The policy's weights as the fake context sees them, and a planted reward that peaks at
    w = [2, 2] (the midpoint of the start [0, 4] and the end [4, 0]): 1 − |w₀ − 2| / 4."""

    def __init__(self, value: list[float]):
        self.value = {"w": torch.tensor(value)}
        self.evaluations: list[tuple[str, list[str], str]] = []
        self.fail_after: int | None = None  # raise on this evaluation (a stop during the search)

    def snapshot(self):
        return {k: v.clone() for k, v in self.value.items()}

    def load(self, weights):
        self.value = {k: v.clone() for k, v in weights.items()}

    def evaluate(self, domain: str, tasks: list, label: str) -> float:
        if self.fail_after is not None and len(self.evaluations) == self.fail_after:
            raise KeyboardInterrupt("stopped")
        self.evaluations.append((domain, [t.id for t in tasks], label))
        return 1.0 - abs(float(self.value["w"][0]) - 2.0) / 4.0


def _fusion_context(policy: Policy, logged: list, order=("airline", "retail")) -> CLContext:
    return CLContext(
        config=None, dist=CPU, order=list(order), domains={}, params=[], progress=Progress(),
        rollout=None, episode_gradients=None, snapshot_weights=policy.snapshot, load_weights=policy.load,
        accuracy_matrix=lambda: None, evaluate=policy.evaluate, log=lambda figures, line: logged.append((figures, line)),
    )


def _domain(name: str, n: int):
    return SimpleNamespace(name=name, train_tasks=[SimpleNamespace(id=str(i)) for i in range(n)])


def _adaptive(policy: Policy, holdout: int = 1) -> AdaptiveFusion:
    config = GRPOConfig(cl_algorithm="adaptive_fusion", fusion_alpha_grid=[0.25, 0.5, 0.75, 1.0],
                        fusion_holdout_tasks=holdout)
    strategy = build_strategy(config)
    for name in ("airline", "retail"):
        strategy.held_out_tasks(_domain(name, 4))
    return strategy


def test_best_alpha_takes_the_highest_reward_and_the_largest_alpha_on_a_tie():
    assert best_alpha({0.25: 0.1, 0.5: 0.7, 1.0: 0.3}) == 0.5
    assert best_alpha({0.25: 0.0, 0.5: 0.0, 1.0: 0.0}) == 1.0
    assert best_alpha({0.25: 0.4, 0.75: 0.4, 1.0: 0.2}) == 0.75


def test_the_alpha_search_line_lists_the_grid_by_increasing_alpha_then_the_choice():
    line = format_alpha_search(1, {1.0: 0.125, 0.5: 0.25}, 0.5, ["airline", "retail"])
    assert line == "[FUSION] Task 1 α search on held-out airline, retail: 0.5 → 0.250 | 1 → 0.125 | chosen α = 0.5"


def test_the_last_train_tasks_are_held_out_and_too_many_is_refused():
    assert [t.id for t in holdout_split(_domain("airline", 5), 2)] == ["3", "4"]
    with pytest.raises(UserError, match="leaves none of the 2 airline train tasks"):
        holdout_split(_domain("airline", 2), 2)


def test_the_search_keeps_the_alpha_of_the_planted_reward_and_loads_exactly_its_interpolation():
    policy, logged = Policy([0.0, 4.0]), []
    ctx = _fusion_context(policy, logged)
    strategy = _adaptive(policy)
    assert isinstance(strategy, AdaptiveFusion)
    strategy.before_domain(ctx, 0, "airline")
    start = policy.snapshot()
    policy.value = {"w": torch.tensor([4.0, 0.0])}  # what training on airline reached
    strategy.after_domain(ctx, 0, "airline")
    # w₀ at α = 0.25, 0.5, 0.75, 1: 1, 2, 3, 4 → rewards 0.75, 1, 0.75, 0.5
    assert strategy.chosen[0]["scores"] == {0.25: 0.75, 0.5: 1.0, 0.75: 0.75, 1.0: 0.5}
    assert strategy.chosen[0]["alpha"] == 0.5
    expected = interpolate(start, {"w": torch.tensor([4.0, 0.0])}, 0.5)["w"]
    assert torch.equal(policy.value["w"], expected) and policy.value["w"].tolist() == [2.0, 2.0]
    # one evaluation per grid point on airline's held-out task (its last train task), labelled apart
    assert [(d, ids) for d, ids, _ in policy.evaluations] == [("airline", ["3"])] * 4
    assert len({label for _, _, label in policy.evaluations}) == 4
    figures, line = logged[0]
    assert figures["fusion_alpha"] == 0.5 and figures["fusion_reward/alpha_0.75"] == 0.75
    assert line == (
        "[FUSION] Task 0 α search on held-out airline: 0.25 → 0.750 | 0.5 → 1.000 | 0.75 → 0.750 | 1 → 0.500"
        " | chosen α = 0.5"
    )
    assert strategy.start is None and strategy.end is None and strategy.scores == {}


def test_later_domains_score_alpha_on_every_seen_domains_held_out_tasks():
    policy, logged = Policy([0.0, 4.0]), []
    ctx = _fusion_context(policy, logged)
    strategy = _adaptive(policy, holdout=2)
    strategy.before_domain(ctx, 1, "retail")
    policy.value = {"w": torch.tensor([4.0, 0.0])}
    strategy.after_domain(ctx, 1, "retail")
    assert [(d, ids) for d, ids, _ in policy.evaluations] == [("airline", ["2", "3"]), ("retail", ["2", "3"])] * 4
    assert strategy.chosen[0]["alpha"] == 0.5


def test_a_stop_during_the_search_resumes_from_the_domains_end_and_measures_only_the_rest():
    policy, logged = Policy([0.0, 4.0]), []
    ctx = _fusion_context(policy, logged)
    strategy = _adaptive(policy)
    strategy.before_domain(ctx, 0, "airline")
    policy.value = {"w": torch.tensor([4.0, 0.0])}
    policy.fail_after = 2  # the stop comes while α = 0.75 is evaluated, with 0.75's weights loaded
    with pytest.raises(KeyboardInterrupt):
        strategy.after_domain(ctx, 0, "airline")
    assert policy.value["w"].tolist() == [3.0, 1.0]  # what a checkpoint at the stop would hold
    resumed = _adaptive(policy)
    resumed.load_state_dict(strategy.state_dict())
    policy.fail_after = None
    resumed.after_domain(ctx, 0, "airline")
    assert [label.split("α=")[1] for _, _, label in policy.evaluations[2:]] == ["0.75", "1"]
    assert resumed.chosen[0]["scores"] == {0.25: 0.75, 0.5: 1.0, 0.75: 0.75, 1.0: 0.5}
    assert policy.value["w"].tolist() == [2.0, 2.0]


def test_moving_average_by_hand():
    running, new = [torch.tensor([2.0, 4.0])], [torch.tensor([6.0, 0.0])]
    # 0.25 * 6 + 0.75 * 2 = 3; 0.25 * 0 + 0.75 * 4 = 3
    assert moving_average(running, new, 0.25)[0].tolist() == [3.0, 3.0]
    assert relative_change(running, [torch.tensor([3.0, 3.0])]) == pytest.approx(2 / 6)  # (1 + 1) / (2 + 4)
    assert relative_change([torch.zeros(2)], new) == 0.0
    first = moving_average(None, new, 0.25)
    assert first[0].tolist() == [6.0, 0.0] and first[0] is not new[0]
    assert [s for s in range(1, 7) if is_update_step(s, 3)] == [3, 6]


def _episode(x: list[float], domain: str = "airline"):
    return SimpleNamespace(domain=domain, num_generated_tokens=1, x=torch.tensor(x))


def test_ewc_pp_updates_its_fisher_during_a_domain_and_penalises_only_from_the_second():
    config = GRPOConfig(cl_algorithm="ewc_pp", ewc_pp_alpha=0.5, ewc_pp_interval=1, ewc_lambda=2.0,
                        ewc_fisher_normalization="none")
    w = torch.tensor([1.0, -1.0], requires_grad=True)
    progress = Progress()
    ctx = CLContext(
        config=config, dist=CPU, order=["airline", "retail"], domains={}, params=[w], progress=progress,
        rollout=None, episode_gradients=_gradients_of(lambda traj: (w * traj.x).sum()),  # gradient = x, Fisher x²
        snapshot_weights=None, load_weights=None, accuracy_matrix=lambda: None,
    )
    strategy = build_strategy(config)
    strategy.after_rollout(ctx, [_episode([1.0, 2.0]), _episode([3.0, 0.0])])
    # F_new = mean of [1, 4] and [9, 0] = [5, 2], taken as it is
    assert strategy.running[0].tolist() == [5.0, 2.0]
    assert strategy.loss_terms(ctx) == {}  # no penalty on the first domain
    progress.step = 1
    strategy.after_rollout(ctx, [_episode([2.0, 2.0]), _episode([9.0, 9.0], domain="retail")])
    # only the current domain's episode: F_new = [4, 4]; 0.5 * 4 + 0.5 * [5, 2] = [4.5, 3]
    assert strategy.running[0].tolist() == [4.5, 3.0]
    # Σ|ΔF| / Σ|F| = (0.5 + 1) / (5 + 2)
    assert strategy.step_metrics(ctx, []) == {"ewc_pp_updates": 2, "ewc_pp_fisher_change": pytest.approx(1.5 / 7)}
    assert w.grad is None  # the estimate leaves no gradient behind for the update
    strategy.after_domain(ctx, 0, "airline")
    progress.set(domain_idx=1, step=0)
    assert float(strategy.loss_terms(ctx)["ewc_penalty"].detach()) == 0.0  # at the anchor
    with torch.no_grad():
        w += torch.tensor([1.0, 0.0])
    # (λ/2) Σ F* (θ − θ*)² = (2/2) * 4.5 * 1² = 4.5
    assert float(strategy.loss_terms(ctx)["ewc_penalty"].detach()) == pytest.approx(4.5, abs=1e-6)
    strategy.after_rollout(ctx, [_episode([0.0, 2.0], domain="retail")])
    # the running Fisher moves on during retail ([0.5*0 + 0.5*4.5, 0.5*4 + 0.5*3]), the penalty's does not
    assert strategy.running[0].tolist() == [2.25, 3.5] and strategy.fisher[0].tolist() == [4.5, 3.0]
    restored = build_strategy(config)
    restored.load_state_dict(strategy.state_dict())
    assert float(restored.loss_terms(ctx)["ewc_penalty"].detach()) == pytest.approx(4.5, abs=1e-6)


def test_ewc_pp_skips_the_steps_between_updates():
    config = GRPOConfig(cl_algorithm="ewc_pp", ewc_pp_interval=2, ewc_fisher_normalization="none")
    w = torch.tensor([1.0], requires_grad=True)
    progress = Progress()
    ctx = CLContext(
        config=config, dist=CPU, order=["airline"], domains={}, params=[w], progress=progress, rollout=None,
        episode_gradients=_gradients_of(lambda traj: (w * traj.x).sum()), snapshot_weights=None, load_weights=None,
        accuracy_matrix=lambda: None,
    )
    strategy = build_strategy(config)
    strategy.after_rollout(ctx, [_episode([3.0])])  # step 1: no update
    assert strategy.running is None
    assert strategy.step_metrics(ctx, []) == {"ewc_pp_updates": 0, "ewc_pp_fisher_change": None}
    progress.step = 1
    strategy.after_rollout(ctx, [_episode([3.0])])  # step 2: F = 9
    assert strategy.running[0].tolist() == [9.0]


def test_their_flags_parse_and_bad_values_are_refused_in_one_sentence():
    from tau2cl.config import parse_config

    config = parse_config(["--cl_algorithm", "adaptive_fusion", "--fusion_alpha_grid", "0.5", "1"])
    assert config.fusion_alpha_grid == [0.5, 1.0] and config.fusion_holdout_tasks == 1
    assert GRPOConfig(fusion_alpha_grid="0.25,0.75").fusion_alpha_grid == [0.25, 0.75]
    refusals = {
        "expects a list of numbers": dict(fusion_alpha_grid=["half"]),
        "needs values between 0 and 1": dict(fusion_alpha_grid=[0.5, 1.5]),
        "--ewc_pp_alpha must be in (0, 1]": dict(ewc_pp_alpha=0.0),
        "--ewc_pp_interval must be at least 1": dict(ewc_pp_interval=0),
        "--fusion_holdout_tasks must be at least 1": dict(fusion_holdout_tasks=0),
        "--cl_algorithm ewc_pp needs --parallelism ddp": dict(cl_algorithm="ewc_pp", parallelism="fsdp"),
    }
    for message, values in refusals.items():
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace("]", r"\]")):
            GRPOConfig(**values)
