"""Experience replay: part of every batch is earlier domains' tasks, in their own environments.

Cost: memory for `replay_buffer_size` task ids and rewards per earlier domain (negligible); time
is the replayed share of each step's rollouts, which replace current-domain rollouts, so a step
costs the same as without replay. Replayed tasks are rolled out afresh by the current policy
(GRPO needs on-policy samples), each in its own domain's environment with its own system prompt,
tools and evaluator: a RolloutRequest carries its Domain, so nothing else needs to know.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from tau2cl.agent.episode import RolloutRequest, Trajectory
from tau2cl.cl.context import CLContext
from tau2cl.cl.strategies.base import CLStrategy
from tau2cl.distributed import all_gather_objects


@dataclass
class BufferEntry:
    task_id: str
    reward: float  # mean reward of the task's group when it was trained on


class Reservoir:
    """Algorithm R: a uniform sample of at most `capacity` of all entries offered."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.entries: list[BufferEntry] = []
        self.seen = 0

    def offer(self, entry: BufferEntry, rng: random.Random) -> None:
        self.seen += 1
        if len(self.entries) < self.capacity:
            self.entries.append(entry)
            return
        slot = rng.randrange(self.seen)
        if slot < self.capacity:
            self.entries[slot] = entry

    def choose(self, rng: random.Random, selection: str) -> BufferEntry:
        if selection == "reward" and any(e.reward > 0 for e in self.entries):
            return rng.choices(self.entries, weights=[max(e.reward, 0.0) for e in self.entries])[0]
        return rng.choice(self.entries)


def replay_count(batch_size: int, ratio: float) -> int:
    """Replayed tasks per batch: the ratio's share, rounded up (0 only when the ratio is 0)."""
    return math.ceil(ratio * batch_size - 1e-9) if ratio > 0 else 0


class Replay(CLStrategy):
    """Keeps a reservoir of trained tasks per domain and replays them in later domains.

    Every rank holds the same buffers: the tasks each rank trained on are gathered before they
    are offered, with a shared random stream, so buffers and checkpoints agree across ranks. The
    batch keeps `batch_size_per_gpu` tasks: ceil(replay_ratio × batch) of them are replayed
    (sampled domain-uniformly, then by `replay_selection`), but at least one current-domain task
    always stays (with batch_size_per_gpu 1 the replayed task is added beside it).
    """

    name = "replay"

    def __init__(self, config):
        super().__init__(config)
        self.buffers: dict[str, Reservoir] = {}
        self.rng = random.Random(f"{config.seed}-replay-buffer")

    def augment_batch(self, ctx: CLContext, requests: list[RolloutRequest]) -> list[RolloutRequest]:
        earlier = [d for d in ctx.earlier_domains if self.buffers.get(d) and self.buffers[d].entries]
        samples = self.config.num_samples_per_prompt
        tasks = len(requests) // samples
        n_replay = replay_count(tasks, self.config.replay_ratio)
        if not earlier or n_replay == 0:
            return requests
        keep = max(1, tasks - n_replay)
        kept = requests[: keep * samples]
        rng = random.Random(f"{self.config.seed}-replay-{ctx.dist.rank}-{ctx.progress.global_step}")
        for g in range(n_replay):
            name = self._pick_domain(ctx, earlier, rng)
            entry = self.buffers[name].choose(rng, self.config.replay_selection)
            domain = ctx.domains[name]
            task = domain.task(entry.task_id)
            kept += [RolloutRequest(domain, task, group=keep + g) for _ in range(samples)]
        return kept

    def _pick_domain(self, ctx: CLContext, earlier: list[str], rng: random.Random) -> str:
        """The earlier domain a replayed task comes from: uniform over the domains."""
        return rng.choice(earlier)

    def after_rollout(self, ctx: CLContext, trajectories: list[Trajectory]) -> None:
        current = ctx.current_domain
        groups: dict[int, list[Trajectory]] = {}
        for traj in trajectories:
            if traj.domain == current:
                groups.setdefault(traj.group, []).append(traj)
        local = [BufferEntry(g[0].task_id, sum(t.train_reward for t in g) / len(g)) for g in groups.values()]
        buffer = self.buffers.setdefault(current, Reservoir(self.config.replay_buffer_size))
        for part in all_gather_objects(local):
            for entry in part:
                buffer.offer(entry, self.rng)

    def step_metrics(self, ctx: CLContext, trajectories: list[Trajectory]) -> dict[str, Any]:
        """replay_frac: share of the step's episodes (all ranks) from earlier domains;
        replay_reward_mean: their mean trained reward (None when nothing was replayed)."""
        current = ctx.current_domain
        local = [t.train_reward for t in trajectories if t.domain != current]
        parts = all_gather_objects((local, len(trajectories)))
        replayed = [r for rewards, _ in parts for r in rewards]
        total = sum(n for _, n in parts)
        return {
            "replay_frac": len(replayed) / max(total, 1),
            "replay_reward_mean": sum(replayed) / len(replayed) if replayed else None,
        }

    def state_dict(self) -> dict:
        return {
            "rng": self.rng.getstate(),
            "buffers": {
                name: {"seen": b.seen, "entries": [(e.task_id, e.reward) for e in b.entries]}
                for name, b in self.buffers.items()
            },
        }

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
        self.buffers = {}
        for name, saved in state["buffers"].items():
            buffer = Reservoir(self.config.replay_buffer_size)
            buffer.seen = saved["seen"]
            buffer.entries = [BufferEntry(t, r) for t, r in saved["entries"]]
            self.buffers[name] = buffer
