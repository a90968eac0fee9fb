"""LLM users end to end: tau2's litellm user against a loopback server, and the reference-model user.

The agent is the tiny model; where a test needs known agent turns it answers with fixed text
(`FixedPolicy`). The litellm user is tau2's own `UserSimulator` talking HTTP to a server started
here, so the prompt it sends is checked byte for byte against tau2's.
"""

from __future__ import annotations

import json

import pytest
import torch
from openai_server import FAIL, HANG, ChatServer

from tau2cl.env import tau2_compat  # noqa: F401  (quiet tau2 import)
from tiny_run import tiny_config

# isort: split
from tau2.data_model.message import AssistantMessage, ToolMessage, UserMessage
from tau2.data_model.simulation import TerminationReason
from tau2.user.base import STOP
from tau2.user.user_simulator import UserSimulator as Tau2UserSimulator
from tau2.user.user_simulator import get_global_user_sim_guidelines

from tau2cl.agent.engine import GREETING, RolloutEngine, RolloutSettings
from tau2cl.agent.episode import RolloutRequest
from tau2cl.agent.policy import Generation, Policy
from tau2cl.agent.users.build import build_user
from tau2cl.agent.users.litellm_user import LiteLLMUser
from tau2cl.agent.users.local import LocalModelUser
from tau2cl.config import GRPOConfig
from tau2cl.env.domains import load_domain
from tau2cl.env.rewards import score_trajectories
from tau2cl.rl.grpo import group_advantages

AGENT_TEXT = "Could you give me your user id, please?"
OPENING = "Hi, I need to change my booking."
MODEL = "openai/test-user"


class FixedPolicy(Policy):
    """The tiny model's policy, answering every turn with AGENT_TEXT (then its end-of-turn)."""

    def generate(self, prompts, max_new_tokens, temperature=1.0, top_p=1.0, generator=None, caches=None, groups=None):
        ids = self.renderer.encode(AGENT_TEXT) + [self.tokenizer.eos_token_id]
        return [Generation(token_ids=list(ids), logprobs=[-1.0] * len(ids), finished=True) for _ in prompts]


class ScriptedGenerations(Policy):
    """A user model whose k-th batched call returns texts[k] for every prompt (last repeats)."""

    def __init__(self, model, tokenizer, texts: list[str]):
        super().__init__(model, tokenizer)
        self.texts = texts
        self.prompts: list[list[int]] = []

    def generate(self, prompts, max_new_tokens, temperature=1.0, top_p=1.0, generator=None, caches=None, groups=None):
        calls = len(self.prompts)
        self.prompts.append(list(prompts[0]))
        text = self.texts[min(calls, len(self.texts) - 1)]
        ids = self.renderer.encode(text) + [self.tokenizer.eos_token_id]
        return [Generation(token_ids=list(ids), logprobs=[0.0] * len(ids), finished=True) for _ in prompts]


def _settings(max_turns: int = 3, max_new_tokens: int = 8) -> RolloutSettings:
    return RolloutSettings(
        max_turns=max_turns, max_new_tokens=max_new_tokens, max_context_tokens=32768, temperature=1.0
    )


def _requests(domains, names=("airline", "retail")) -> list[RolloutRequest]:
    return [
        RolloutRequest(domains[n], task, group=len(names) * i + j)
        for j, n in enumerate(names)
        for i, task in enumerate(domains[n].train_tasks)
    ]


def _tau2_user_prompt(task, tools=None) -> str:
    return Tau2UserSimulator(tools=tools, instructions=str(task.user_scenario)).system_prompt


def _turns_of(request: dict) -> int:
    """How many turns the simulated user has already taken in this request (flipped: assistant)."""
    return sum(m["role"] == "assistant" for m in request["messages"])


def _agent_tokens_only(traj, policy) -> None:
    agent_ids = policy.renderer.encode(AGENT_TEXT) + [policy.tokenizer.eos_token_id]
    assert sum(traj.loss_mask) == traj.assistant_turns * len(agent_ids)


# ---------------------------------------------------------------- tau2's litellm user


def test_litellm_user_runs_a_batch_against_an_openai_compatible_server(
    tiny_model, tiny_tokenizer, domains
):
    """tau2's user prompt goes out, roles come back flipped, and `###STOP###` ends each episode."""

    def reply(request):
        return OPENING if _turns_of(request) == 0 else STOP

    policy = FixedPolicy(tiny_model, tiny_tokenizer)
    with ChatServer(reply) as server:
        user = LiteLLMUser(MODEL, api_base=server.api_base, api_key="test-key", timeout=10)
        requests = _requests(domains)
        trajectories = RolloutEngine(policy, user, _settings()).run(requests)
        user.close()
    assert len(server.requests) == 2 * len(requests)  # one opening and one stop per episode
    by_prompt = {}
    for body in server.requests:
        system = body["messages"][0]
        assert system["role"] == "system" and body["model"] == "test-user"
        by_prompt.setdefault(system["content"], []).append(body["messages"][1:])
    for req, traj in zip(requests, trajectories, strict=True):
        conversations = by_prompt[_tau2_user_prompt(req.task)]  # tau2's guidelines + scenario
        first, second = sorted(conversations, key=len)
        assert first == [{"role": "user", "content": GREETING}]
        assert [(m["role"], m["content"]) for m in second] == [
            ("user", GREETING),
            ("assistant", OPENING),
            ("user", AGENT_TEXT),
        ]
        assert traj.termination_reason == TerminationReason.USER_STOP
        assert isinstance(traj.messages[-1], UserMessage) and traj.messages[-1].content == STOP
        assert [type(m) for m in traj.messages] == [AssistantMessage, UserMessage, AssistantMessage, UserMessage]
        assert traj.assistant_turns == 1
        _agent_tokens_only(traj, policy)
        chat = [{"role": "assistant", "content": GREETING}, {"role": "user", "content": OPENING}]
        prompt = policy.renderer.prompt_ids(req.domain.system_prompt(req.task), req.domain.tool_schemas, chat)
        assert traj.token_ids[: traj.prompt_length] == prompt  # the agent starts from the user's opening


def test_failing_and_hanging_servers_end_only_their_episodes(tiny_model, tiny_tokenizer, domains):
    """A 500 on every call and a call past its timeout end those episodes; the batch completes."""
    airline, retail = domains["airline"], domains["retail"]
    failing, hanging = airline.train_tasks[0], retail.train_tasks[0]

    def reply(request):
        system = request["messages"][0]["content"]
        if str(failing.user_scenario) in system:
            return FAIL
        if str(hanging.user_scenario) in system:
            return HANG
        return OPENING if _turns_of(request) == 0 else STOP

    policy = FixedPolicy(tiny_model, tiny_tokenizer)
    requests = _requests(domains)
    with ChatServer(reply) as server:
        user = LiteLLMUser(
            MODEL, api_base=server.api_base, api_key="test-key", timeout=1.0, max_retries=1, backoff=0.01
        )
        trajectories = RolloutEngine(policy, user, _settings()).run(requests)
        user.close()
    score_trajectories(trajectories, domains)
    broken = {("airline", failing.id), ("retail", hanging.id)}  # task ids repeat across domains
    for traj in trajectories:
        if (traj.domain, traj.task_id) in broken:
            assert traj.termination_reason == TerminationReason.USER_ERROR
            assert f"{user.name} failed 2 time(s)" in traj.end_note
            assert "test-key" not in traj.end_note
            assert traj.reward == 0.0 and traj.assistant_turns == 0
            assert sum(traj.loss_mask) == 0 and traj.prompt_length == len(traj.token_ids) > 0
        else:
            assert traj.termination_reason == TerminationReason.USER_STOP
    [hung] = [t for t in trajectories if (t.domain, t.task_id) == ("retail", hanging.id)]
    assert "Timeout" in hung.end_note or "timed out" in hung.end_note.lower()
    rewards = torch.tensor([t.train_reward for t in trajectories])
    assert torch.isfinite(group_advantages(rewards, 1, "std")).all()


def test_litellm_user_from_config_keeps_the_key_out_of_sight(monkeypatch):
    monkeypatch.delenv("TAU2CL_USER_API_KEY", raising=False)
    config = GRPOConfig(user_model="litellm:openai/served", user_api_base="http://127.0.0.1:9/v1", user_api_key="sk-abc")
    user = build_user(config)
    assert isinstance(user, LiteLLMUser) and user.model == "openai/served"
    assert user._llm_args["api_key"] == "sk-abc" and user._llm_args["api_base"] == "http://127.0.0.1:9/v1"
    assert "sk-abc" not in repr(user) and "sk-abc" not in repr(config)
    monkeypatch.setenv("TAU2CL_USER_API_KEY", "sk-env")
    config = GRPOConfig(user_model="litellm:gpt-4.1-mini", user_temperature=0.5, user_max_new_tokens=99)
    user = build_user(config)
    assert user._llm_args["api_key"] == "sk-env" and "api_base" not in user._llm_args
    assert (user._llm_args["temperature"], user._llm_args["max_tokens"]) == (0.5, 99)
    user.close()


# ---------------------------------------------------------------- the reference-model user


@pytest.fixture(scope="module")
def telecom_full():
    """telecom in tau2's conversational setting (the user holds the phone's tools)."""
    return load_domain("telecom", max_tasks=2, solo_mode=False)


@pytest.mark.slow  # ~15 s: the tiny model samples both sides in three domains
def test_reference_user_completes_episodes_in_every_domain(
    tiny_model, tiny_tokenizer, domains, telecom_full, single_torch_thread
):
    config = GRPOConfig(model_name_or_path="tiny", user_model="reference", user_max_new_tokens=12, user_temperature=1.0)
    reference = Policy(tiny_model, tiny_tokenizer)
    user = build_user(config, reference=lambda: reference)
    assert isinstance(user, LocalModelUser) and user.policy is reference and user.name == "reference"
    all_domains = {**domains, "telecom": telecom_full}
    requests = _requests(all_domains, ("airline", "retail", "telecom"))
    agent = Policy(tiny_model, tiny_tokenizer)
    torch.manual_seed(0)
    trajectories = RolloutEngine(agent, user, _settings(max_turns=2)).run(requests, torch.Generator().manual_seed(0))
    assert {t.domain for t in trajectories} == {"airline", "retail", "telecom"}
    for req, traj in zip(requests, trajectories, strict=True):
        assert traj.domain == req.domain.name and not req.domain.solo_mode
        assert isinstance(traj.termination_reason, TerminationReason)
        assert isinstance(traj.messages[0], AssistantMessage) and traj.messages[0].content == GREETING
        assert isinstance(traj.messages[1], UserMessage)  # the user model's opening
        assert traj.assistant_turns >= 1  # the agent answered the user model
        assert not any(traj.loss_mask[: traj.prompt_length])
        assert sum(traj.loss_mask) <= traj.assistant_turns * 8
    score_trajectories(trajectories, all_domains)
    assert all(0.0 <= t.reward <= 1.0 for t in trajectories)


def test_local_user_prompt_is_tau2s_and_its_tool_calls_run_in_the_telecom_environment(
    tiny_model, tiny_tokenizer, telecom_full
):
    """A user turn that calls the phone's tools: they run with requestor "user", the results go
    back to the user, and the agent only ever sees the user's text."""
    task = telecom_full.train_tasks[0]
    call = json.dumps({"name": "check_status_bar", "arguments": {}})
    said = "My phone shows no signal, can you help?"
    user_policy = ScriptedGenerations(tiny_model, tiny_tokenizer, [f"<tool_call>{call}</tool_call>", said, STOP])
    user = LocalModelUser(user_policy, temperature=0.0, max_new_tokens=64)
    agent = FixedPolicy(tiny_model, tiny_tokenizer)
    [traj] = RolloutEngine(agent, user, _settings()).run([RolloutRequest(telecom_full, task, group=0)])

    greeting, call_turn, result, opening, agent_turn, stop = traj.messages
    assert call_turn.is_tool_call() and call_turn.tool_calls[0].requestor == "user"
    assert isinstance(result, ToolMessage) and result.requestor == "user" and not result.error
    expected = telecom_full.new_environment(task).get_response(call_turn.tool_calls[0])
    assert result.content == expected.content  # the phone's status, from the episode's own env
    assert opening.content == said and agent_turn.content == AGENT_TEXT and stop.content == STOP
    assert traj.termination_reason == TerminationReason.USER_STOP

    agent_context = agent.decode(traj.token_ids)
    assert said in agent_context and result.content not in agent_context
    assert "check_status_bar" not in agent_context.split("<|im_start|>user", 1)[1]
    _agent_tokens_only(traj, agent)

    # the second user prompt: tau2's tool-using guidelines, the flipped call and its result
    tools = telecom_full.new_environment(task).get_user_tools()
    system = _tau2_user_prompt(task, tools)
    assert get_global_user_sim_guidelines(use_tools=True) in system
    second = user_policy.renderer.prompt_ids(
        system,
        telecom_full.user_tool_schemas,
        [
            {"role": "user", "content": GREETING},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "check_status_bar", "arguments": {}}}
            ]},
            {"role": "tool", "content": result.content},
        ],
    )
    assert user_policy.prompts[1] == second
    score_trajectories([traj], {"telecom": telecom_full})  # tau2 scores the non-solo conversation
    assert 0.0 <= traj.reward <= 1.0 and traj.reward_info is not None


def test_a_user_stuck_calling_tools_is_cut_off(tiny_model, tiny_tokenizer, telecom_full):
    from tau2cl.agent.engine import MAX_USER_TOOL_TURNS

    call = json.dumps({"name": "check_status_bar", "arguments": {}})
    user = LocalModelUser(ScriptedGenerations(tiny_model, tiny_tokenizer, [f"<tool_call>{call}</tool_call>"]), 0.0, 64)
    agent = FixedPolicy(tiny_model, tiny_tokenizer)
    [traj] = RolloutEngine(agent, user, _settings()).run([RolloutRequest(telecom_full, telecom_full.train_tasks[0], 0)])
    assert traj.termination_reason == TerminationReason.USER_ERROR and traj.end_note == "user_tool_loop"
    assert sum(isinstance(m, ToolMessage) for m in traj.messages) == MAX_USER_TOOL_TURNS
    assert traj.assistant_turns == 0


# ---------------------------------------------------------------- inside a training run


@pytest.mark.slow  # ~20 s: a one-step tiny run with evaluation and a checkpoint
def test_training_with_a_litellm_user_never_writes_its_key(tmp_path, capsys, single_torch_thread):
    """A run whose user fails on half the tasks completes its step, and the API key is in no file
    and no printed line (summary.json, checkpoint state, train.log, metrics, tau2 results)."""
    from tau2cl.trainer import GRPOTrainer

    key = "sk-never-written-7f3a"
    failing = load_domain("airline", max_tasks=2).train_tasks[1]

    def is_failing(request) -> bool:
        return request["messages"][0]["content"].endswith(str(failing.user_scenario) + "\n</scenario>")

    def reply(request):
        if is_failing(request):
            return FAIL
        return OPENING if _turns_of(request) == 0 else STOP

    with ChatServer(reply) as server:
        config = tiny_config(
            task_order=["airline"], compact_domains=False, num_steps_per_task=1, batch_size_per_gpu=2,
            max_new_tokens=4, max_turns=2, reward_fn="tau2", log_dir=str(tmp_path),
            user_model=f"litellm:{MODEL}", user_api_base=server.api_base, user_api_key=key,
            user_max_retries=0, user_timeout=10.0,
        )
        trainer = GRPOTrainer(config)
        assert trainer.models.reference is None and not trainer.load_domain("telecom").solo_mode
        summary = trainer.train()
    assert summary["global_step"] == 1 and summary["config"]["user_api_key"] is None
    assert sum(map(is_failing, server.requests)) == 2  # the step's two failing episodes, no retries
    assert len(server.requests) >= 4  # the user was asked in training and evaluation
    train = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["num_episodes"] for r in train if r["type"] == "train"] == [4]
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "summary.json" for p in written) and any("checkpoint_task_0" in str(p) for p in written)
    for path in written:
        assert key.encode() not in path.read_bytes(), path
    assert key not in capsys.readouterr().out


def test_a_run_with_the_reference_user_loads_the_reference_once_even_without_kl(tmp_path):
    from tau2cl.trainer import GRPOTrainer

    config = GRPOConfig(
        model_name_or_path="tiny", model_dtype="float32", task_order=["telecom"], max_tasks_per_domain=2,
        batch_size_per_gpu=1, num_samples_per_prompt=2, kl_coef=0.0, use_progress_bar=False,
        log_dir=str(tmp_path), user_model="reference",
    )
    trainer = GRPOTrainer(config)
    assert isinstance(trainer.user, LocalModelUser) and trainer.user.policy.model is trainer.models.reference
    assert trainer.models.reference is not trainer.policy.model and not trainer.models.reference.training
    assert not any(p.requires_grad for p in trainer.models.reference.parameters())
    assert trainer.rollouts.engine.user is trainer.evaluation.engine.user is trainer.user
    assert not trainer.domains["telecom"].solo_mode and trainer.domains["telecom"].user_tool_schemas
    trainer.tracker.close()
