"""Episodes for training: sampled with the training engine and the run's random stream, scored with
tau2's reward (and the custom one), and stopped within seconds of a stop signal."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from tau2cl.agent.engine import RolloutEngine
from tau2cl.agent.episode import RolloutRequest, Trajectory
from tau2cl.env.domains import Domain
from tau2cl.env.rewards import RewardFn, score_trajectories
from tau2cl.errors import UserError
from tau2cl.runs.interrupt import agreed


class Rollouts:
    """The training engine's episodes; the `agreed_*` methods are collectives (all ranks leave a
    stop or a fault together), the others rank-local."""

    def __init__(
        self, engine: RolloutEngine, generator: torch.Generator, domains: dict[str, Domain],
        reward_fn: RewardFn | None, config: Any, check_stop: Callable[[], None],
    ):
        self.engine = engine
        self.generator = generator
        self.domains = domains
        self.reward_fn = reward_fn
        self.judge_model = config.judge_model
        self.reward_timeout = config.reward_timeout
        self.check_stop = check_stop

    def sample(self, requests: list[RolloutRequest]) -> list[Trajectory]:
        with out_of_memory_names_the_knobs("rollout"):
            return self.engine.run(requests, self.generator)

    def score(self, trajectories: list[Trajectory]) -> None:
        """tau2's reward (and the custom one) of finished episodes, in place; stoppable."""
        score_trajectories(trajectories, self.domains, self.reward_fn, self.judge_model, self.reward_timeout,
                           self.check_stop)

    def agreed_sample(self, requests: list[RolloutRequest]) -> list[Trajectory]:
        """Unscored episodes (a strategy's own rollouts)."""
        return agreed(lambda: self.engine.run(requests, self.generator))

    def agreed_scored(self, requests: list[RolloutRequest], sampled_at: list[float] | None = None) -> list[Trajectory]:
        """Scored episodes; `sampled_at` gets the moment sampling ended (scoring is timed apart)."""
        def work() -> list[Trajectory]:  # rank-local: a stop or a reward fault leaves it
            episodes = self.sample(requests)
            if sampled_at is not None:
                sampled_at.append(time.perf_counter())
            self.score(episodes)
            return episodes

        return agreed(work)


@contextlib.contextmanager
def out_of_memory_names_the_knobs(phase: str) -> Iterator[None]:
    """A GPU out-of-memory error becomes one line naming the flags that lower the load of `phase`."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        knobs = (
            "--batch_size_per_gpu, --num_samples_per_prompt, --max_new_tokens or --max_context_tokens"
            if phase == "rollout"
            else "--gradient_accumulation_steps (raise it), --gradient_checkpointing or --batch_size_per_gpu"
        )
        raise UserError(f"out of GPU memory during {phase}; lower the load with {knobs}.") from None
