"""The episode types: a request to run, a running episode and the finished trajectory.

They live apart from the rollout engine so that the engine and the user simulators both read
them without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tau2cl.env import tau2_compat  # noqa: F401  (first: quiets tau2's import)

# isort: split
from tau2.data_model.message import Message
from tau2.data_model.simulation import TerminationReason

from tau2cl.agent.kv_cache import KVSlot
from tau2cl.agent.policy import Generation
from tau2cl.env.domains import Domain
from tau2cl.env.predicted_state import CallRecord, EpisodeState

AWAITING_POLICY, AWAITING_USER = "policy", "user"  # who the episode waits on


@dataclass
class RolloutRequest:
    """One episode to run: a task of a domain; `group` ties the samples of one task together."""

    domain: Domain
    task: Any
    group: int


@dataclass
class Trajectory:
    """A finished episode: what the policy saw and produced, and the tau2 conversation."""

    domain: str
    task: Any  # the tau2 Task
    group: int
    token_ids: list[int]  # (T,) the full context, prompt included
    loss_mask: list[int]  # (T,) 1 on tokens the policy sampled (end-of-turn token included)
    sampling_logprobs: list[float]  # (T,) log-prob at sampling time; 0.0 where loss_mask is 0
    messages: list[Message]  # tau2 messages (initial history, greeting, turns, tool results)
    termination_reason: TerminationReason
    prompt_length: int
    assistant_turns: int
    tool_errors: int
    end_note: str = ""  # finer detail than tau2's reason, e.g. "context_limit"
    reward: float = 0.0  # tau2's reward, filled by the reward step
    train_reward: float = 0.0  # the reward trained on (tau2's unless --reward_fn is set)
    tool_accuracy: float | None = None
    reward_info: Any = None
    episode_state: EpisodeState | None = None  # the environment after the rollout, until scored

    @property
    def task_id(self) -> str:
        return self.task.id

    @property
    def num_generated_tokens(self) -> int:
        return sum(self.loss_mask)


@dataclass
class Episode:
    """A running episode (mutable); becomes a Trajectory when it ends."""

    request: RolloutRequest
    env: Any
    messages: list[Message]
    token_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    prompt_length: int = 0
    assistant_turns: int = 0
    tool_errors: int = 0
    user_turns: int = 0  # text turns the user has sent (its opening included)
    user_tool_turns: int = 0  # the user's tool-call turns since its last text turn
    awaiting: str = AWAITING_POLICY
    last_turn: dict | None = None  # chat dict of the last sampled turn (continuation anchor)
    last_closed: bool = True  # the last sampled turn ended with the template's end-of-turn token
    termination: TerminationReason | None = None
    end_note: str = ""
    env_calls: list[CallRecord] = field(default_factory=list)  # every call run in `env`, in order
    kv: KVSlot | None = None  # the policy's cache of token_ids across turns (None: re-prefill)

    @property
    def task(self) -> Any:
        return self.request.task

    @property
    def domain(self) -> Domain:
        return self.request.domain

    def add_context(self, ids: list[int]) -> None:
        self.token_ids += ids
        self.loss_mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)

    def add_sampled(self, generation: Generation) -> None:
        self.token_ids += generation.token_ids
        self.loss_mask += [1] * len(generation.token_ids)
        self.logprobs += generation.logprobs

    def end(self, reason: TerminationReason, note: str = "") -> None:
        self.termination = reason
        self.end_note = note
        if self.kv is not None:  # an ended episode frees its cache (even if the slot is still referenced)
            self.kv.clear()
            self.kv = None

    def to_trajectory(self) -> Trajectory:
        for index, message in enumerate(self.messages):
            message.turn_idx = index
        return Trajectory(
            domain=self.domain.name,
            task=self.task,
            group=self.request.group,
            token_ids=self.token_ids,
            loss_mask=self.loss_mask,
            sampling_logprobs=self.logprobs,
            messages=self.messages,
            termination_reason=self.termination,
            prompt_length=self.prompt_length,
            assistant_turns=self.assistant_turns,
            tool_errors=self.tool_errors,
            end_note=self.end_note,
            episode_state=EpisodeState(self.env, self.env_calls),
        )
