"""Batched multi-turn episodes in tau2 environments → token-exact trajectories.

Every live episode that waits on the policy is sampled in one batched call; tool calls then run in
each episode's own environment and text turns go to the user simulator, until each episode ends
(user stop, agent stop, max turns, context limit, too many tool errors), with tau2's termination
reasons. An episode's `token_ids` are exactly what the policy was conditioned on and produced:
sampled tokens are appended as ids (mask 1, with their sampling log-probs) and everything else
(tool results, user turns, template glue) is appended as ids rendered for that new part only
(mask 0). No context is ever cut: when what follows a turn would leave no room for another turn of
`max_new_tokens` within `max_context_tokens`, the episode ends there (tau2's MAX_STEPS, note
"context_limit") and its trajectory ends with that turn, so it never holds more than
`max_context_tokens` tokens once its prompt fits.

Outside solo mode an episode starts with tau2's greeting and waits on the user; the agent's prompt
is rendered once the user's opening arrives. A user's tool calls (telecom's phone) run in the
episode's environment with requestor "user" and their results go back to the user, as in tau2's
orchestrator; the agent sees only the user's text. User tokens never carry loss mask.

The turns themselves come from a sampler (sampler.py): the policy's own engine unless another
backend is given; the policy still renders contexts and decodes sampled turns into text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tau2cl.env import tau2_compat  # noqa: F401  (first: quiets tau2's import)

# isort: split
from tau2.agent.base import is_valid_agent_history_message
from tau2.config import DEFAULT_MAX_ERRORS
from tau2.data_model.message import AssistantMessage, Message, ToolCall, ToolMessage, UserMessage
from tau2.data_model.simulation import TerminationReason
from tau2.orchestrator.orchestrator import DEFAULT_FIRST_AGENT_MESSAGE
from tau2.user.base import STOP

from tau2cl.agent.chat import assistant_chat_message, chat_dict
from tau2cl.agent.episode import AWAITING_POLICY, AWAITING_USER, Episode, RolloutRequest, Trajectory
from tau2cl.agent.kv_cache import KVSlot
from tau2cl.agent.policy import Generation, Policy
from tau2cl.agent.sampler import PolicySampler, Sampler
from tau2cl.agent.tool_calls import (
    CALL_CLOSE,
    CALL_OPEN,
    MalformedCall,
    ParsedTurn,
    malformed_call_error,
    parse_tool_calls,
)
from tau2cl.agent.users.base import UserFailure, UserReply, UserSimulator, is_stop_message
from tau2cl.env.domains import STOP_TOOL_NAME
from tau2cl.env.predicted_state import call_record

GREETING = DEFAULT_FIRST_AGENT_MESSAGE.content  # tau2's opening line of the agent
MAX_USER_TOOL_TURNS = 10  # consecutive user tool-call turns before the user is cut off


@dataclass
class RolloutSettings:
    max_turns: int
    max_new_tokens: int
    max_context_tokens: int
    temperature: float
    top_p: float = 1.0
    kv_reuse: bool = True  # keep each episode's KV cache across its turns (False: re-prefill)


class RolloutEngine:
    """Runs batches of episodes with one policy, one sampler and one user simulator.

    `sampler`: the backend that samples the policy's turns (None: the policy's own engine).
    """

    def __init__(
        self, policy: Policy, user: UserSimulator, settings: RolloutSettings, check_stop: Callable[[], None] | None = None,
        sampler: Sampler | None = None,
    ):
        self.policy = policy
        self.user = user
        self.settings = settings
        self.check_stop = check_stop  # called between turns; raises to abandon the batch when the run stops
        self.sampler = sampler if sampler is not None else PolicySampler(policy)

    @property
    def _episode_caches(self) -> bool:
        return self.settings.kv_reuse and self.sampler.keeps_episode_caches

    def run(self, requests: list[RolloutRequest], generator: torch.Generator | None = None) -> list[Trajectory]:
        self.sampler.reset_prefix_cache()  # the weights may have changed since the last run
        episodes = [self._start(r) for r in requests]
        while True:
            if self.check_stop is not None:
                self.check_stop()
            waiting = [e for e in episodes if e.termination is None and e.awaiting == AWAITING_POLICY]
            waiting = [e for e in waiting if self._fits_context(e)]
            if waiting:  # one batch; a domain's episodes share its prompt prefix
                s = self.settings
                generations = self.sampler.sample(
                    [e.token_ids for e in waiting], s.max_new_tokens, s.temperature, s.top_p, generator,
                    caches=[e.kv for e in waiting] if self._episode_caches else None,
                    groups=[e.domain.name for e in waiting],
                )
                for episode, generation in zip(waiting, generations, strict=True):
                    self._agent_turn(episode, generation)
            asking = [e for e in episodes if e.termination is None and e.awaiting == AWAITING_USER]
            if asking:
                self._user_turns(asking)
            if all(e.termination is not None for e in episodes):
                for episode in episodes:
                    if not episode.token_ids:  # ended before the agent's first turn
                        self._render_prompt(episode)
                return [e.to_trajectory() for e in episodes]

    # ---- episode life cycle -------------------------------------------------------------
    def _start(self, request: RolloutRequest) -> Episode:
        domain, task = request.domain, request.task
        history = _initial_history(task)
        episode = Episode(request=request, env=domain.new_environment(task), messages=history)
        if self._episode_caches:
            episode.kv = KVSlot()
        if domain.solo_mode:
            self._render_prompt(episode)
        else:  # the agent's prompt is rendered when the user's opening arrives
            episode.messages.append(AssistantMessage(role="assistant", content=GREETING))
            episode.awaiting = AWAITING_USER
        return episode

    def _render_prompt(self, episode: Episode) -> None:
        """The agent's opening context: system prompt, tools and the conversation it may see."""
        domain, task = episode.domain, episode.task
        chat = [chat_dict(m) for m in episode.messages if is_valid_agent_history_message(m)]
        episode.add_context(self.policy.renderer.prompt_ids(domain.system_prompt(task), domain.tool_schemas, chat))
        episode.prompt_length = len(episode.token_ids)

    def _fits_context(self, episode: Episode) -> bool:
        if self._leaves_room(len(episode.token_ids)):
            return True
        episode.end(TerminationReason.MAX_STEPS, "context_limit")
        return False

    def _leaves_room(self, context_length: int) -> bool:
        """Whether a context this long leaves room for one more sampled turn."""
        return context_length + self.settings.max_new_tokens <= self.settings.max_context_tokens

    def _agent_turn(self, episode: Episode, generation: Generation) -> None:
        episode.add_sampled(generation)
        episode.assistant_turns += 1
        episode.last_closed = self.policy.closes_turn(generation)
        body = generation.token_ids[:-1] if generation.finished else generation.token_ids
        text = self.policy.decode(body)
        parsed = parse_tool_calls(text)
        episode.last_turn = assistant_chat_message(parsed.content, [(c.name, c.arguments) for c in parsed.calls])
        if episode.domain.solo_mode and any(c.name == STOP_TOOL_NAME for c in parsed.calls):
            # tau2's LLMSoloAgent turns a `done` call into a stop message
            episode.messages.append(AssistantMessage(role="assistant", content=STOP, raw_data={"text": text}))
            episode.end(TerminationReason.AGENT_STOP)
            return
        if parsed.items:
            self._run_tools(episode, parsed, text)
        else:
            self._send_text(episode, parsed.content, text)

    def _run_tools(self, episode: Episode, parsed: ParsedTurn, text: str) -> None:
        calls = agent_tool_calls(parsed, episode.assistant_turns)
        errors = [malformed_call_error(m) for m in parsed.malformed]
        raw = {"text": text, "malformed_call_errors": errors} if errors else {"text": text}
        episode.messages.append(
            AssistantMessage(
                role="assistant", content=_content_with_malformed(parsed), tool_calls=calls or None, raw_data=raw
            )
        )
        replies = run_agent_tools(episode, parsed, calls)
        if episode.tool_errors >= DEFAULT_MAX_ERRORS:
            episode.end(TerminationReason.TOO_MANY_ERRORS)
        elif episode.assistant_turns >= self.settings.max_turns:
            episode.end(TerminationReason.MAX_STEPS, "max_turns")
        else:
            self._continue(episode, replies, AWAITING_POLICY)

    def _send_text(self, episode: Episode, content: str, text: str) -> None:
        if not content:  # tau2 rejects an empty assistant message as an agent error
            episode.messages.append(AssistantMessage(role="assistant", content=text or " ", raw_data={"text": text}))
            episode.end(TerminationReason.AGENT_ERROR, "empty_message")
            return
        episode.messages.append(AssistantMessage(role="assistant", content=content, raw_data={"text": text}))
        if episode.domain.solo_mode:  # tau2: in solo mode a text turn that is not a stop is an error
            episode.end(TerminationReason.AGENT_STOP if STOP in content else TerminationReason.AGENT_ERROR)
        elif episode.assistant_turns >= self.settings.max_turns:
            episode.end(TerminationReason.MAX_STEPS, "max_turns")
        else:
            episode.awaiting = AWAITING_USER

    def _user_turns(self, episodes: list[Episode]) -> None:
        """Ask the user until every waiting episode has its text turn (or has ended).

        A user's tool calls run in the episode's environment and the user is asked again; a user
        that fails (raises, or returns a UserFailure) ends only the episodes concerned.
        """
        pending = episodes
        while pending:
            try:
                replies: list[UserReply] = self.user.respond(pending)
            except Exception as exc:  # e.g. a remote user that keeps failing
                for episode in pending:
                    episode.end(TerminationReason.USER_ERROR, f"user failed: {type(exc).__name__}: {exc}")
                return
            for episode, reply in zip(pending, replies, strict=True):
                self._user_turn(episode, reply)
            pending = [e for e in pending if e.termination is None and e.awaiting == AWAITING_USER]

    def _user_turn(self, episode: Episode, reply: UserReply) -> None:
        if isinstance(reply, UserFailure):
            episode.end(TerminationReason.USER_ERROR, f"user failed: {reply.reason}")
            return
        episode.messages.append(reply)
        if reply.is_tool_call():
            self._run_user_tools(episode, reply)
            return
        episode.user_turns += 1
        episode.user_tool_turns = 0
        if is_stop_message(reply.content or ""):
            episode.end(TerminationReason.USER_STOP)
        elif not episode.token_ids:  # the user's opening: the agent's prompt starts here
            self._render_prompt(episode)
            episode.awaiting = AWAITING_POLICY
        else:
            self._continue(episode, [{"role": "user", "content": reply.content or ""}], AWAITING_POLICY)

    def _run_user_tools(self, episode: Episode, reply: UserMessage) -> None:
        """tau2's ENV step for the user: each call runs with requestor "user"; results go back."""
        for call in reply.tool_calls:
            call.requestor = "user"
            result = _execute(episode, call)
            episode.tool_errors += int(result.error)  # tau2 counts both sides' tool errors
            episode.messages.append(result)
        episode.user_tool_turns += 1
        if episode.tool_errors >= DEFAULT_MAX_ERRORS:
            episode.end(TerminationReason.TOO_MANY_ERRORS)
        elif episode.user_tool_turns >= MAX_USER_TOOL_TURNS:
            episode.end(TerminationReason.USER_ERROR, "user_tool_loop")

    def _continue(self, episode: Episode, new_chat: list[dict], awaiting: str) -> None:
        """Append what follows the last sampled turn, or end the episode when the context would
        then leave no room for another turn: the trajectory keeps only what the policy saw."""
        renderer, end_of_turn = self.policy.renderer, self.policy.end_of_turn_text
        # a turn cut by max_new_tokens or ended by another stop id is closed as the template would, outside the loss
        ids = [] if episode.last_closed else renderer.encode(end_of_turn)
        ids += renderer.continuation_ids(episode.last_turn, new_chat, end_of_turn)
        if not self._leaves_room(len(episode.token_ids) + len(ids)):
            episode.end(TerminationReason.MAX_STEPS, "context_limit")
            return
        episode.add_context(ids)
        episode.awaiting = awaiting


def agent_tool_calls(parsed: ParsedTurn, turn: int) -> list[ToolCall]:
    """tau2 ToolCalls of a turn's well-formed calls, with ids unique within the episode."""
    return [ToolCall(id=f"call_{turn}_{i}", name=c.name, arguments=c.arguments) for i, c in enumerate(parsed.calls)]


def run_agent_tools(episode: Episode, parsed: ParsedTurn, calls: list[ToolCall]) -> list[dict]:
    """Run a turn's calls in the episode's environment, in the order the agent wrote them.

    Results are appended to the tau2 conversation and errors counted (a malformed call counts as
    one and is answered with its error); returns the tool replies the agent sees next.
    """
    replies: list[dict] = []
    valid = iter(calls)
    for item in parsed.items:
        if isinstance(item, MalformedCall):
            episode.tool_errors += 1
            replies.append({"role": "tool", "content": malformed_call_error(item)})
            continue
        result = _execute(episode, next(valid))
        episode.tool_errors += int(result.error)
        episode.messages.append(result)
        replies.append({"role": "tool", "content": result.content or ""})
    return replies


def _execute(episode: Episode, call: ToolCall) -> ToolMessage:
    """tau2's own tool execution: unknown tools and bad arguments come back as 'Error: ...'.

    An exception that escapes the environment itself (tau2 catches only the tool's own) becomes
    that call's tool error in the same form, counted in the episode's tool errors like any other.
    Every call is logged, so the reward can score the episode's environment in place.
    """
    try:
        result = episode.env.get_response(call)
    except Exception as exc:
        result = ToolMessage(
            id=call.id, content=f"Error: {type(exc).__name__}: {exc}", requestor=call.requestor, role="tool", error=True
        )
    episode.env_calls.append(call_record(call, result))
    return result


def _content_with_malformed(parsed: ParsedTurn) -> str | None:
    """Text of the turn with malformed calls kept verbatim, so the tau2 record shows them."""
    parts = [parsed.content] if parsed.content else []
    parts += [f"{CALL_OPEN}{m.raw}{CALL_CLOSE}" for m in parsed.malformed]
    return "\n".join(parts) or None


def _initial_history(task: Any) -> list[Message]:
    state = getattr(task, "initial_state", None)
    history = getattr(state, "message_history", None) or []
    return [m.model_copy(deep=True) for m in history]
