"""Golden conversations: a task's golden actions played as an agent would play them.

Used by tests and benchmarks to prove that rewards are tau2's (every golden conversation scores 1.0,
dropping a needed action scores less) and to exercise the reward and Results paths without a model.

Conversational mode (airline, retail): tau2's greeting, the user's reason for calling, one tool
call per golden action, each followed by the environment's reply (actions tau2 assigns to the user
are made by the user), one assistant message stating every `communicate_info` string, and the
user's `###STOP###`. Solo mode (telecom): the agent makes every call itself (the solo environment
routes user tools to the phone) and stops as tau2's LLMSoloAgent does after its `done` call.
"""

from __future__ import annotations

from copy import deepcopy
from datetime import datetime, timedelta

from tau2cl.env import tau2_compat  # noqa: F401  (first: quiets tau2's import)

# isort: split
from tau2.agent.llm_agent import LLMSoloAgent
from tau2.data_model.message import AssistantMessage, Message, ToolCall, ToolMessage, UserMessage
from tau2.data_model.simulation import TerminationReason
from tau2.data_model.tasks import Action, Task
from tau2.environment.environment import Environment
from tau2.environment.toolkit import ToolType
from tau2.orchestrator.orchestrator import DEFAULT_FIRST_AGENT_MESSAGE
from tau2.user.base import STOP
from tau2.utils.utils import format_time

from tau2cl.env.domains import Domain
from tau2cl.env.tau2_compat import as_list

CLOSING_WITHOUT_INFO = "Your request has been handled."
CALL_ID_PREFIX = "golden_"  # call ids are CALL_ID_PREFIX + the golden action's index


def golden_conversation(
    domain: Domain, task: Task, drop: int | None = None
) -> tuple[list[Message], TerminationReason]:
    """Run the task's golden actions (all but action `drop`) in a fresh environment."""
    criteria = task.evaluation_criteria
    actions: list[Action] = as_list(criteria.actions) if criteria is not None else []
    if drop is not None and not 0 <= drop < len(actions):
        raise IndexError(f"task {task.id} has {len(actions)} golden actions; cannot drop {drop}")
    env = domain.new_environment(task)
    history = deepcopy(as_list(task.initial_state.message_history if task.initial_state else None))
    messages: list[Message] = list(history)
    if not domain.solo_mode:
        if not history:  # tau2's orchestrator greets only when there is no history
            messages.append(deepcopy(DEFAULT_FIRST_AGENT_MESSAGE))
        messages.append(UserMessage(role="user", content=_reason_for_call(task)))
    for index, action in enumerate(actions):
        if index != drop:
            messages += _act(env, action, f"{CALL_ID_PREFIX}{index}", domain.solo_mode)
    if domain.solo_mode:
        messages.append(AssistantMessage(role="assistant", content=LLMSoloAgent.STOP_TOKEN))
        reason = TerminationReason.AGENT_STOP
    else:
        info = as_list(criteria.communicate_info) if criteria is not None else []
        messages.append(AssistantMessage(role="assistant", content="\n".join(info) or CLOSING_WITHOUT_INFO))
        messages.append(UserMessage(role="user", content=STOP))
        reason = TerminationReason.USER_STOP
    _stamp(messages)
    return messages, reason


def _act(env: Environment, action: Action, call_id: str, solo_mode: bool) -> list[Message]:
    """One golden action as a tool-call message and the environment's reply."""
    requestor = "assistant" if solo_mode else action.requestor
    call = ToolCall(id=call_id, name=action.name, arguments=deepcopy(action.arguments), requestor=requestor)
    if requestor == "user":
        caller: Message = UserMessage(role="user", tool_calls=[call])
    else:
        caller = AssistantMessage(role="assistant", tool_calls=[call])
    return [caller, env.get_response(call)]


def _reason_for_call(task: Task) -> str:
    instructions = task.user_scenario.instructions
    return getattr(instructions, "reason_for_call", None) or str(instructions)


def _stamp(messages: list[Message]) -> None:
    """Strictly increasing timestamps and turn indices, as tau2's orchestrator records them."""
    start = datetime.now()
    for index, message in enumerate(messages):
        message.timestamp = format_time(start + timedelta(milliseconds=index))
        message.turn_idx = index


def perturbed_conversation(domain, task, messages: list) -> list | None:
    """The conversation with one argument of its last golden write call changed, replayed.

    tau2's evaluator replays every call and insists that each reply equals the recorded one, so
    the replies are recomputed in a fresh environment. A write call is preferred (changing a read
    rarely changes the score); None when no call has a str/int argument.
    """
    messages = deepcopy(messages)
    calls = {c.id: c for m in messages for c in (getattr(m, "tool_calls", None) or []) if c.id.startswith(CALL_ID_PREFIX)}
    env = domain.new_environment(task)
    candidates = [c for c in calls.values() if _perturbable_key(c.arguments)]
    writes = [c for c in candidates if _is_write(env, c.name)]
    target = (writes or candidates or [None])[-1]
    if target is None:
        return None
    key = _perturbable_key(target.arguments)
    value = target.arguments[key]
    target.arguments[key] = value + "_x" if isinstance(value, str) else value + 1
    for index, message in enumerate(messages):
        if isinstance(message, ToolMessage) and message.id in calls:
            reply = env.get_response(calls[message.id])
            reply.timestamp, reply.turn_idx = message.timestamp, message.turn_idx
            messages[index] = reply
    return messages


def _is_write(env, name: str) -> bool:
    toolkit = env.user_tools if env.user_tools is not None and env.user_tools.has_tool(name) else env.tools
    return toolkit.tool_type(name) == ToolType.WRITE


def _perturbable_key(arguments: dict) -> str | None:
    return next(
        (k for k, v in arguments.items() if isinstance(v, str | int) and not isinstance(v, bool)), None
    )


def reward_corpus(domain, tasks: list) -> list[tuple[str, Task, list, TerminationReason]]:
    """(kind, task, messages, termination): golden, truncated (last action dropped), perturbed."""
    items = []
    for task in tasks:
        messages, reason = golden_conversation(domain, task)
        items.append(("golden", task, messages, reason))
        actions = as_list(task.evaluation_criteria.actions) if task.evaluation_criteria else []
        if actions:
            truncated, reason_t = golden_conversation(domain, task, drop=len(actions) - 1)
            items.append(("truncated", task, truncated, reason_t))
        perturbed = perturbed_conversation(domain, task, messages)
        if perturbed is not None:
            items.append(("perturbed", task, perturbed, reason))
    return items
