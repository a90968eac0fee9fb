"""Section (f) of bench.py: multi-turn episodes of unequal length, and the shared-prefix update.

16 episodes (airline + retail) of up to 10 agent turns; a scripted user that says `###STOP###`
after a set number of replies, different per episode (3 to 10), so episodes end at different
turns and the batch shrinks as they do. Measured side by side with the same seed:

- the engine as the trainer runs it (each episode's KV cache kept across turns, right-aligned
  decode batches that shrink, stop checks every few tokens);
- the engine with --no-kv_reuse (every turn prefills the whole context after the shared prefix);
- bench.py's naive loop (one episode at a time, whole conversation re-encoded, `generate`), on
  every episode or, for the larger model, on a subset whose mean length is the batch's;
- tau2's reward of the engine's episodes: compute_reward scoring each episode in its own
  environment (predicted_state.py; every gold and predicted state, and the records' JSON texts of
  db_hash.py, start unrecorded)
  against tau2's evaluate_simulation from scratch, identical RewardInfo asserted;
- the GRPO update (accumulate_gradients, 4 micro-batches grouped by domain and length) on the
  engine's trajectories, with and without the shared prefix: tokens/s and the largest gradient
  difference; and the EWC Fisher's per-episode gradients of one domain's episodes, each episode
  run whole and after one shared prefix forward.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tau2cl.env import tau2_compat  # noqa: F401  (first: quiets tau2's import)

# isort: split
from tau2.data_model.message import UserMessage
from tau2.data_model.simulation import TerminationReason
from tau2.user.base import STOP

from tau2cl.agent.engine import RolloutEngine, RolloutSettings
from tau2cl.agent.episode import RolloutRequest
from tau2cl.agent.policy import Policy
from tau2cl.agent.users.scripted import ScriptedUser
from tau2cl.env import gold_state, predicted_state
from tau2cl.env.tau2_reward import compute_reward
from tau2cl.rl.update import (
    LossSettings,
    accumulate_gradients,
    backward_each,
    collate,
    micro_batches_by_length,
)

EPISODES, MAX_TURNS = 16, 10
DOMAINS = ("airline", "retail")
MICRO_BATCHES = 4


def user_replies(index: int) -> int:
    """Replies the user sends before stopping in episode `index`: 3..10, mixed over the batch."""
    return 3 + (index * 5) % 8


class TurnLimitUser(ScriptedUser):
    """The scripted user, stopping episode g after user_replies(g) replies (g: the request's group)."""

    def __init__(self):
        super().__init__(max_turns=MAX_TURNS)

    def respond(self, episodes):
        replies = super().respond(episodes)
        return [UserMessage(role="user", content=STOP) if e.user_turns > user_replies(e.request.group) else r
                for e, r in zip(episodes, replies, strict=True)]


def requests(domains) -> list[RolloutRequest]:
    per_domain = EPISODES // len(DOMAINS)
    tasks = [(name, task) for name in DOMAINS for task in domains[name].train_tasks[: per_domain // 2] * 2]
    return [RolloutRequest(domains[name], task, group=i) for i, (name, task) in enumerate(tasks)]


def naive_requests(reqs: list[RolloutRequest], count: int) -> list[RolloutRequest]:
    """`count` of the episodes whose lengths stand for the batch's: the naive loop's cost per token
    grows with the context, so a subset of short episodes would flatter it.

    Episodes sorted by their user's replies; picked in pairs mirrored about the middle, so the
    subset's mean length is the batch's (count 2: the 5th and 12th of 16, 5 and 8 replies).
    """
    if count >= len(reqs):
        return list(reqs)
    ranked = sorted(reqs, key=lambda r: (user_replies(r.group), r.group))
    n = len(ranked)
    low = [int((k + 0.5) * n / count) for k in range((count + 1) // 2)]
    picks = low + [n - 1 - p for p in low[: count // 2]]
    return [ranked[p] for p in sorted(set(picks))]


@dataclass
class Run:
    label: str
    episodes: int
    turns: int
    tokens: int
    body_tokens: int
    seconds: float
    trajectories: list

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def run_engine(model, tokenizer, reqs, kv_reuse: bool, max_new_tokens: int, seed: int, counter) -> Run:
    settings = RolloutSettings(max_turns=MAX_TURNS, max_new_tokens=max_new_tokens, max_context_tokens=32768,
                               temperature=1.0, kv_reuse=kv_reuse)
    engine = RolloutEngine(Policy(model, tokenizer), TurnLimitUser(), settings)
    generator = torch.Generator().manual_seed(seed)
    counter.reset()
    t0 = time.perf_counter()
    out = engine.run(reqs, generator)
    seconds = time.perf_counter() - t0
    label = "engine, KV kept across turns" if kv_reuse else "engine, --no-kv_reuse (re-prefill)"
    return Run(label, len(reqs), sum(t.assistant_turns for t in out), sum(t.num_generated_tokens for t in out),
               counter.body_tokens, seconds, out)


def run_naive(naive_class, model, tokenizer, reqs, settings, counter) -> Run:
    naive = naive_class(model, tokenizer, dataclasses.replace(settings, max_turns=MAX_TURNS))
    naive.user = TurnLimitUser()
    result = naive.run(reqs, counter)
    return Run("naive loop (one by one, re-encode, generate)", result.episodes, result.turns,
               result.generated_tokens, result.body_tokens, result.seconds, [])


@dataclass
class UpdateRow:
    label: str
    tokens: int
    seconds: float
    max_grad_gap: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def bench_update(model, tokenizer, trajectories) -> list[UpdateRow]:
    """accumulate_gradients on the trajectories, without and with the shared prefix (fp32)."""
    policy = copy.deepcopy(model).train()
    batch = collate([t.token_ids for t in trajectories], [t.loss_mask for t in trajectories],
                    [t.sampling_logprobs for t in trajectories], [((i % 3) - 1) * 0.5 for i in range(len(trajectories))],
                    tokenizer.pad_token_id)
    micro = micro_batches_by_length([len(t.token_ids) for t in trajectories], MICRO_BATCHES,
                                    groups=[t.domain for t in trajectories])
    tokens = sum(int(batch.rows(m).attention_mask.sum()) for m in micro)
    rows, grads = [], []
    for shared in (False, True):
        policy.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        accumulate_gradients(policy, batch, micro, LossSettings(1.0, 0.2, 0.2, 0.0, shared_prefix=shared),
                             max(batch.num_tokens, 1))
        seconds = time.perf_counter() - t0
        grads.append([p.grad.clone() for p in policy.parameters() if p.grad is not None])
        gap = 0.0 if not shared else max((a - b).abs().max().item() for a, b in zip(*grads, strict=True))
        label = "shared prefix once per micro-batch" if shared else "every row whole (--no-shared_prefix_update)"
        rows.append(UpdateRow(label, tokens, seconds, gap))
    return rows + bench_fisher(policy, trajectories)


def bench_fisher(policy, trajectories) -> list[UpdateRow]:
    """The EWC Fisher's per-episode gradients (backward_each) on one domain's episodes, each episode
    run whole and with the episodes' common prefix run once; the largest difference of the squared
    gradients summed over episodes (the Fisher before its normalisation), relative to its largest entry."""
    domain = trajectories[0].domain
    sequences = [(t.token_ids, t.loss_mask) for t in trajectories if t.domain == domain and t.num_generated_tokens]
    tokens = sum(len(ids) for ids, _ in sequences)
    rows, fishers = [], []
    for shared in (False, True):
        policy.zero_grad(set_to_none=True)
        fisher = [torch.zeros_like(p) for p in policy.parameters()]
        t0 = time.perf_counter()
        for _ in backward_each(policy, sequences, None, shared_prefix=shared):
            for f, p in zip(fisher, policy.parameters(), strict=True):
                if p.grad is not None:
                    f += p.grad**2
            policy.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        fishers.append(fisher)
        scale = max(f.abs().max().item() for f in fishers[0])
        gap = 0.0 if not shared else max((a - b).abs().max().item() for a, b in zip(*fishers, strict=True)) / scale
        label = f"EWC Fisher, {len(sequences)} {domain} episodes one by one: " + (
            "common prefix once" if shared else "each episode whole")
        rows.append(UpdateRow(label, tokens, seconds, gap))
    return rows


@dataclass
class RewardRow:
    scored: int  # episodes tau2 evaluates (the others end in a way tau2 scores 0 unevaluated)
    in_place: int  # of those, scored in the episode's own environment
    project_s: float
    tau2_s: float


def bench_rewards(domains, trajectories, plain_tau2_reward) -> RewardRow:
    """compute_reward with each episode's environment vs tau2 from scratch, on the same episodes."""
    finished = [t for t in trajectories if t.termination_reason in (TerminationReason.AGENT_STOP,
                                                                     TerminationReason.USER_STOP)]
    in_place = sum(predicted_state.proven(t.episode_state, t.task, t.messages, domains[t.domain].solo_mode)
                   for t in finished)
    gold_state.clear()
    t0 = time.perf_counter()
    ours = [compute_reward(domains[t.domain], t.task, t.messages, t.termination_reason,
                           episode_state=t.episode_state) for t in trajectories]
    t1 = time.perf_counter()
    theirs = [plain_tau2_reward(domains[t.domain], t.task, t.messages, t.termination_reason) for t in trajectories]
    t2 = time.perf_counter()
    for t, a, b in zip(trajectories, ours, theirs, strict=True):
        assert a.reward_info.model_dump() == b.model_dump(), f"{t.domain} task {t.task_id}: rewards differ"
    return RewardRow(len(finished), in_place, t1 - t0, t2 - t1)


@dataclass
class ModelResult:
    name: str
    runs: list[Run]  # kv reuse, re-prefill, naive
    same_samples: int  # episodes whose tokens are identical with and without KV reuse
    update: list[UpdateRow]
    reward: RewardRow | None = None

    @property
    def speedup(self) -> float:
        return self.runs[0].tokens_per_s / self.runs[2].tokens_per_s


def run(name, model, tokenizer, domains, settings, naive_class, flop_counter: Callable[[Any], Any],
        naive_episodes: int, with_update: bool, plain_tau2_reward: Callable | None = None) -> ModelResult:
    reqs = requests(domains)
    counter = flop_counter(model)
    print(f"[f] {name}: {EPISODES} episodes, up to {MAX_TURNS} turns", flush=True)
    kept = run_engine(model, tokenizer, reqs, True, settings.max_new_tokens, settings.seed, counter)
    print(f"    engine (KV kept): {kept.seconds:.1f}s", flush=True)
    again = run_engine(model, tokenizer, reqs, False, settings.max_new_tokens, settings.seed, counter)
    print(f"    engine (re-prefill): {again.seconds:.1f}s", flush=True)
    naive = run_naive(naive_class, model, tokenizer, naive_requests(reqs, naive_episodes), settings, counter)
    print(f"    naive: {naive.episodes} episodes in {naive.seconds:.1f}s", flush=True)
    counter.remove()
    same = sum(a.token_ids == b.token_ids for a, b in zip(kept.trajectories, again.trajectories, strict=True))
    update = bench_update(model, tokenizer, kept.trajectories) if with_update else []
    reward = None if plain_tau2_reward is None else bench_rewards(domains, kept.trajectories, plain_tau2_reward)
    return ModelResult(name, [kept, again, naive], same, update, reward)


def print_results(results: list[ModelResult], table) -> None:
    rows = []
    for m in results:
        base = m.runs[2]
        for r in m.runs:
            turns = sorted(t.assistant_turns for t in r.trajectories)
            rows.append([m.name, r.label, r.episodes, r.turns, f"{turns[0]}-{turns[-1]}" if turns else "",
                         r.tokens, f"{r.body_tokens / r.episodes:,.0f}", f"{r.seconds:.1f}", f"{r.tokens_per_s:.1f}",
                         f"{r.tokens_per_s / base.tokens_per_s:.2f}x", f"{m.runs[1].seconds / r.seconds:.2f}x"])
    table(f"(f) multi-turn rollouts: {EPISODES} episodes, up to {MAX_TURNS} agent turns, the user stops after "
          "3-10 replies (episodes end at different turns)",
          ["model", "path", "episodes", "turns", "turns/episode", "gen tokens", "model tokens/episode", "s",
           "gen tok/s", "tok/s vs naive", "time vs re-prefill"], rows)
    for m in results:
        print(f"{m.name}: {m.same_samples} of {EPISODES} episodes sampled the same tokens with and without KV reuse "
              "(same seed; a difference is a floating-point near-tie)")
    for m in results:
        if m.reward is not None:
            r = m.reward
            n = len(m.runs[0].trajectories)
            print(f"{m.name} rewards of the {n} episodes ({r.scored} evaluated by tau2, {r.in_place} of them in their "
                  f"own environment), identical RewardInfo: compute_reward {1000 * r.project_s / n:.0f} ms/episode, "
                  f"tau2 from scratch {1000 * r.tau2_s / n:.0f} ms/episode: {r.tau2_s / r.project_s:.1f}x")
    update_rows = [[m.name, u.label, f"{u.tokens:,}", f"{u.seconds:.2f}", f"{u.tokens_per_s:,.0f}",
                    f"{m.update[2 * (i // 2)].seconds / u.seconds:.2f}x", f"{u.max_grad_gap:.1e}"]
                   for m in results for i, u in enumerate(m.update)]
    if update_rows:
        table(f"(f) update on the multi-turn trajectories ({MICRO_BATCHES} micro-batches by domain and length, fp32), "
              "and the EWC Fisher's per-episode gradients (speedup: against the row above for the Fisher's second row)",
              ["model", "forward", "tokens", "s", "tok/s", "speedup", "max |Δgrad| (Fisher: |ΔF| / max F)"], update_rows)
