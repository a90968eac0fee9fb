"""The rollout engine end to end with the tiny model and real tau2 environments.

Checks the design's token-in, token-out properties on a mixed batch (airline, retail, telecom):
what is trained on is exactly what was sampled, only sampled tokens carry the loss mask, and the
log-probs recomputed from the saved ids equal the sampling log-probs. Scripted policies (fixed
turns instead of samples) check that bad tool calls come back to the model as tool errors, that a
valid call runs in the episode's own tau2 environment, and that solo telecom stops on `done`.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from tau2cl.env import tau2_compat  # noqa: F401  (quiet tau2 import)

# isort: split
from tau2.data_model.message import AssistantMessage, ToolCall, ToolMessage, UserMessage
from tau2.data_model.simulation import TerminationReason
from tau2.user.base import STOP

from tau2cl.agent.engine import GREETING, RolloutEngine, RolloutSettings
from tau2cl.agent.episode import RolloutRequest, Trajectory
from tau2cl.agent.policy import Generation, Policy
from tau2cl.agent.users.base import UserFailure
from tau2cl.agent.users.scripted import ScriptedUser
from tau2cl.env.tau2_reward import compute_reward
from tau2cl.rl.update import collate, sequence_logprobs

SEED = 1234
MAX_NEW_TOKENS = 16
MAX_TURNS = 2
LOGPROB_TOLERANCE = 1e-4  # fp32, the design's bound


class RecordingPolicy(Policy):
    """The real policy, keeping every (prompt, generation) pair it was asked for."""

    def __init__(self, model, tokenizer):
        super().__init__(model, tokenizer)
        self.calls: list[tuple[list[int], Generation]] = []

    def generate(self, prompts, *args, **kwargs):
        generations = super().generate(prompts, *args, **kwargs)
        # copy: the engine hands in the episodes' live token lists, which grow afterwards
        self.calls += [(list(p), g) for p, g in zip(prompts, generations, strict=True)]
        return generations


class ScriptedPolicy(Policy):
    """Answers the k-th call with the k-th scripted text (the last one repeats), ending with eos."""

    def __init__(self, model, tokenizer, turns: list[str]):
        super().__init__(model, tokenizer)
        self.turns = turns
        self.prompts: list[list[int]] = []
        self.outputs: list[list[int]] = []

    def generate(self, prompts, max_new_tokens, temperature=1.0, top_p=1.0, generator=None, caches=None, groups=None):
        out = []
        for prompt in prompts:
            text = self.turns[min(len(self.prompts), len(self.turns) - 1)]
            ids = self.renderer.encode(text) + [self.tokenizer.eos_token_id]
            self.prompts.append(list(prompt))
            self.outputs.append(ids)
            out.append(Generation(token_ids=ids, logprobs=[-1.0] * len(ids), finished=True))
        return out


# ---------------------------------------------------------------- a sampled mixed batch


def _requests(domains) -> list[RolloutRequest]:
    """8 episodes: 3 airline, 3 retail (2 train tasks + 1 test task each), 2 telecom (solo)."""
    requests = []
    for name in ("airline", "retail"):
        domain = domains[name]
        for task in domain.train_tasks[:2] + domain.test_tasks[:1]:
            requests.append(RolloutRequest(domain, task, group=len(requests)))
    for task in domains["telecom"].train_tasks[:2]:
        requests.append(RolloutRequest(domains["telecom"], task, group=len(requests)))
    return requests


@pytest.fixture(scope="module")
def sampled(tiny_model, tiny_tokenizer, domains, single_torch_thread):
    """(policy, requests, trajectories) of one sampled batch; ~20 s on 2 busy cores."""
    policy = RecordingPolicy(tiny_model, tiny_tokenizer)
    settings = RolloutSettings(
        max_turns=MAX_TURNS,
        max_new_tokens=MAX_NEW_TOKENS,
        max_context_tokens=32768,
        temperature=1.0,
    )
    requests = _requests(domains)
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    trajectories = RolloutEngine(policy, ScriptedUser(), settings).run(requests, generator)
    return policy, requests, trajectories


def _turns(policy: RecordingPolicy, traj: Trajectory) -> list[tuple[list[int], Generation]]:
    """The recorded (prompt, generation) pairs that this trajectory is built from, in order."""
    ids = traj.token_ids
    found = [(p, g) for p, g in policy.calls if ids[: len(p) + len(g.token_ids)] == p + g.token_ids]
    return sorted(found, key=lambda pg: len(pg[0]))


def _opening_chat(traj: Trajectory, solo: bool) -> list[dict]:
    if solo:
        return []
    greeting, opening = traj.messages[0], traj.messages[1]
    assert isinstance(greeting, AssistantMessage) and greeting.content == GREETING
    assert isinstance(opening, UserMessage)
    return [
        {"role": "assistant", "content": GREETING},
        {"role": "user", "content": opening.content},
    ]


@pytest.mark.slow  # shares the ~20 s sampled batch
def test_batch_completes_with_tau2_termination_reasons(sampled):
    _, requests, trajectories = sampled
    assert len(trajectories) == len(requests) >= 8
    assert {t.domain for t in trajectories} == {"airline", "retail", "telecom"}
    for req, traj in zip(requests, trajectories, strict=True):
        assert traj.domain == req.domain.name and traj.task_id == req.task.id
        assert isinstance(traj.termination_reason, TerminationReason)
        assert 1 <= traj.assistant_turns <= MAX_TURNS
        # one tau2 AssistantMessage per sampled turn (plus tau2's greeting outside solo mode)
        agent = [m for m in traj.messages if isinstance(m, AssistantMessage)]
        assert len(agent) == traj.assistant_turns + (0 if req.domain.solo_mode else 1)


@pytest.mark.slow  # shares the ~20 s sampled batch
def test_prompt_is_the_renderers_opening(sampled):
    policy, requests, trajectories = sampled
    for req, traj in zip(requests, trajectories, strict=True):
        domain = req.domain
        chat = _opening_chat(traj, domain.solo_mode)
        expected = policy.renderer.prompt_ids(
            domain.system_prompt(req.task), domain.tool_schemas, chat
        )
        assert traj.prompt_length == len(expected)
        assert traj.token_ids[: traj.prompt_length] == expected


@pytest.mark.slow  # shares the ~20 s sampled batch
def test_tokens_are_exactly_what_was_sampled(sampled):
    """Each turn's prompt extends the previous prompt + its sample; the mask covers the samples only."""
    policy, _, trajectories = sampled
    eos = policy.tokenizer.eos_token_id
    used = set()
    for traj in trajectories:
        n = len(traj.token_ids)
        assert len(traj.loss_mask) == len(traj.sampling_logprobs) == n
        turns = _turns(policy, traj)
        assert len(turns) == traj.assistant_turns
        assert turns[0][0] == traj.token_ids[: traj.prompt_length]
        expected_mask = [0] * n
        for k, (prompt, gen) in enumerate(turns):
            used.add(id(gen))
            end = len(prompt) + len(gen.token_ids)
            if k + 1 < len(turns):  # strict extension: new context follows the sample
                assert len(turns[k + 1][0]) > end
            expected_mask[len(prompt) : end] = [1] * len(gen.token_ids)
            if gen.finished:
                assert traj.token_ids[end - 1] in policy.stop_ids
                assert traj.token_ids[end - 1] == eos
            elif k + 1 < len(turns):  # cut by max_new_tokens: closed with eos outside the loss
                assert traj.token_ids[end] == eos
            assert traj.sampling_logprobs[len(prompt) : end] == gen.logprobs
        assert n == len(turns[-1][0]) + len(turns[-1][1].token_ids)  # nothing after the last turn
        assert traj.loss_mask == expected_mask
        assert sum(traj.loss_mask) == sum(len(g.token_ids) for _, g in turns)
        assert not any(traj.loss_mask[: traj.prompt_length])
        assert all(
            lp == 0.0 for lp, m in zip(traj.sampling_logprobs, traj.loss_mask, strict=True) if not m
        )
        assert all(
            lp <= 0.0 for lp, m in zip(traj.sampling_logprobs, traj.loss_mask, strict=True) if m
        )
    assert len(used) == len(policy.calls)  # every sample ended up in some trajectory
    assert any(t.assistant_turns > 1 for t in trajectories)  # multi-turn contexts were exercised


@pytest.mark.slow  # shares the ~20 s sampled batch
@torch.no_grad()
def test_recomputed_logprobs_equal_sampling_logprobs(sampled, tiny_model):
    """collate -> sequence_logprobs on the saved ids gives the sampling log-probs (ratio 1).

    One trajectory per domain, the one with the most sampled turns (each came out of a
    left-padded batch with a shared-prefix cache); a forward over a 5-10k-token tau2 context
    costs seconds on CPU, so not all eight are recomputed.
    """
    policy, _, trajectories = sampled
    for name in ("airline", "retail", "telecom"):
        traj = max((t for t in trajectories if t.domain == name), key=lambda t: t.assistant_turns)
        batch = collate(
            [traj.token_ids],
            [traj.loss_mask],
            [traj.sampling_logprobs],
            [0.0],
            pad_id=policy.tokenizer.pad_token_id,
        )
        recomputed = sequence_logprobs(
            tiny_model, batch.input_ids, batch.attention_mask, batch.loss_mask
        )  # (1, T)
        mask = batch.loss_mask  # (1, T)
        assert int(mask.sum()) == sum(traj.loss_mask) > 0  # no sample sits at position 0
        gap = (recomputed - batch.old_logprobs).abs()[mask]
        assert gap.max().item() < LOGPROB_TOLERANCE, f"{name}: max |Δ| = {gap.max().item():.2e}"


# ---------------------------------------------------------------- scripted turns


def _run_scripted(model, tokenizer, domain, task, turns: list[str], max_turns: int = 3):
    policy = ScriptedPolicy(model, tokenizer, turns)
    settings = RolloutSettings(
        max_turns=max_turns, max_new_tokens=64, max_context_tokens=32768, temperature=1.0
    )
    engine = RolloutEngine(policy, ScriptedUser(), settings)
    [traj] = engine.run([RolloutRequest(domain, task, group=0)])
    return policy, traj


def _context_after_first_turn(policy: ScriptedPolicy) -> str:
    """The text the engine appended after the first sampled turn, up to the second prompt's end."""
    first_end = len(policy.prompts[0]) + len(policy.outputs[0])
    second = policy.prompts[1]
    assert second[:first_end] == policy.prompts[0] + policy.outputs[0]
    return policy.tokenizer.decode(second[first_end:], skip_special_tokens=False)


def _tool_response(content: str) -> str:
    return f"<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>"


def _user_id(task) -> str:
    return re.search(r"user id is (\w+)", task.user_scenario.instructions.known_info).group(1)


FOLLOW_UP = "Could you tell me your reservation number?"


def _call_text(name: str, arguments: dict) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def test_malformed_call_is_a_tool_error_and_the_episode_continues(
    tiny_model, tiny_tokenizer, domains
):
    broken = '<tool_call>{"name": "get_user_details", "arguments": {bad</tool_call>'
    domain = domains["airline"]
    policy, traj = _run_scripted(
        tiny_model, tiny_tokenizer, domain, domain.train_tasks[0], [broken, FOLLOW_UP]
    )
    assert traj.tool_errors == 1
    assert traj.assistant_turns == 3 and len(policy.prompts) == 3
    assert traj.termination_reason == TerminationReason.MAX_STEPS
    context = _context_after_first_turn(policy)
    assert "<|im_start|>user\n<tool_response>\nError: invalid tool call: " in context
    assert "\n</tool_response><|im_end|>" in context
    assert context.endswith("<|im_start|>assistant\n")
    first_agent = traj.messages[2]  # after tau2's greeting and the user's opening
    assert isinstance(first_agent, AssistantMessage) and not first_agent.tool_calls
    assert "{bad" in first_agent.content  # the tau2 record keeps the broken call
    assert not any(isinstance(m, ToolMessage) for m in traj.messages)
    scored = compute_reward(domain, traj.task, traj.messages, traj.termination_reason)
    assert 0.0 <= scored.reward <= 1.0  # tau2's evaluator takes the record as it is


@pytest.mark.parametrize(
    "name, arguments",
    [("no_such_tool", {}), ("get_user_details", {"wrong_argument": 1})],
    ids=["unknown_tool", "bad_arguments"],
)
def test_tau2_tool_errors_go_back_to_the_model(
    tiny_model, tiny_tokenizer, domains, name, arguments
):
    domain = domains["airline"]
    task = domain.train_tasks[0]
    expected = domain.new_environment(task).get_response(
        ToolCall(id="x", name=name, arguments=arguments)
    )
    assert expected.error and expected.content.startswith("Error: ")  # tau2's own wording
    if name == "no_such_tool":
        assert expected.content == "Error: Tool 'no_such_tool' not found."
    call = _call_text(name, arguments)
    policy, traj = _run_scripted(tiny_model, tiny_tokenizer, domain, task, [call, FOLLOW_UP])
    [tool_message] = [m for m in traj.messages if isinstance(m, ToolMessage)]
    assert tool_message.error and tool_message.content == expected.content
    assert traj.tool_errors == 1
    assert traj.assistant_turns == 3 and traj.termination_reason == TerminationReason.MAX_STEPS
    assert _tool_response(expected.content) in _context_after_first_turn(policy)


def test_valid_call_runs_in_the_episodes_environment(tiny_model, tiny_tokenizer, domains):
    domain = domains["airline"]
    task = domain.train_tasks[0]
    arguments = {"user_id": _user_id(task)}
    call = _call_text("get_user_details", arguments)
    policy, traj = _run_scripted(tiny_model, tiny_tokenizer, domain, task, [call, FOLLOW_UP])
    expected = domain.new_environment(task).get_response(
        ToolCall(id="x", name="get_user_details", arguments=arguments)
    )
    assert not expected.error and arguments["user_id"] in expected.content
    [tool_message] = [m for m in traj.messages if isinstance(m, ToolMessage)]
    assert not tool_message.error and tool_message.content == expected.content
    agent = traj.messages[2]
    assert isinstance(agent, AssistantMessage)
    assert [(c.name, c.arguments) for c in agent.tool_calls] == [("get_user_details", arguments)]
    assert tool_message.id == agent.tool_calls[0].id  # tau2 pairs results with their calls
    assert traj.tool_errors == 0 and traj.assistant_turns == 3
    assert _tool_response(expected.content) in _context_after_first_turn(policy)


def test_solo_done_call_is_an_agent_stop(tiny_model, tiny_tokenizer, domains):
    domain = domains["telecom"]
    assert domain.solo_mode
    done = '<tool_call>{"name": "done", "arguments": {}}</tool_call>'
    policy, traj = _run_scripted(tiny_model, tiny_tokenizer, domain, domain.train_tasks[0], [done])
    assert traj.termination_reason == TerminationReason.AGENT_STOP
    assert traj.assistant_turns == 1 and traj.tool_errors == 0
    assert isinstance(traj.messages[-1], AssistantMessage) and traj.messages[-1].content == STOP
    assert traj.token_ids == policy.prompts[0] + policy.outputs[0]
    assert sum(traj.loss_mask) == len(policy.outputs[0])


# ---------------------------------------------------------------- a user that fails


class FailingForOneTask(ScriptedUser):
    """The scripted user, except that it cannot answer the episodes of one task (a dead endpoint)."""

    def __init__(self, failing_task_id: str):
        super().__init__(max_turns=2)
        self.failing_task_id = failing_task_id

    def respond(self, episodes):
        replies = super().respond(episodes)
        return [
            UserFailure("endpoint timed out") if e.task.id == self.failing_task_id else reply
            for e, reply in zip(episodes, replies, strict=True)
        ]


class RaisingUser(ScriptedUser):
    def respond(self, episodes):
        raise TimeoutError("no answer")


def _user_failure_batch(model, tokenizer, domains, user):
    airline = domains["airline"]
    requests = [RolloutRequest(airline, task, group=g) for g, task in enumerate(airline.train_tasks[:2]) for _ in range(2)]
    policy = ScriptedPolicy(model, tokenizer, ["How can I help further?"])
    settings = RolloutSettings(max_turns=3, max_new_tokens=16, max_context_tokens=32768, temperature=1.0)
    return requests, RolloutEngine(policy, user, settings).run(requests)


def test_a_failing_user_ends_only_its_episodes_and_the_batch_completes(tiny_model, tiny_tokenizer, domains):
    failing = domains["airline"].train_tasks[0].id
    requests, trajectories = _user_failure_batch(tiny_model, tiny_tokenizer, domains, FailingForOneTask(failing))
    assert [t.task_id for t in trajectories] == [r.task.id for r in requests]
    broken = [t for t in trajectories if t.task_id == failing]
    others = [t for t in trajectories if t.task_id != failing]
    assert len(broken) == 2 and len(others) == 2
    for traj in broken:  # ended at the user's opening: no agent turn, tau2's USER_ERROR
        assert traj.termination_reason == TerminationReason.USER_ERROR
        assert traj.end_note == "user failed: endpoint timed out" and traj.assistant_turns == 0
    for traj in others:  # the rest of the batch kept talking until the user or max_turns ended it
        assert traj.termination_reason in (TerminationReason.USER_STOP, TerminationReason.MAX_STEPS)
        assert traj.assistant_turns >= 2 and traj.num_generated_tokens > 0


def test_a_user_that_raises_ends_the_episodes_it_was_asked_about(tiny_model, tiny_tokenizer, domains):
    _, trajectories = _user_failure_batch(tiny_model, tiny_tokenizer, domains, RaisingUser())
    assert {t.termination_reason for t in trajectories} == {TerminationReason.USER_ERROR}
    assert {t.end_note for t in trajectories} == {"user failed: TimeoutError: no answer"}
