"""A user played by a local model: the frozen reference model or any causal LM.

Each episode's user prompt is tau2's: its user-simulation guidelines and the task's scenario as the
system prompt, the conversation with roles flipped (the agent speaks as "user", the simulated
user as "assistant"), and the user's own tools (telecom's phone) in the full setting. All waiting
episodes are sampled in one batched call of the same decode loop the agent uses; the user's tokens
live only in this call and never enter the agent's trajectory. Cost: one batched generation per
user turn on the run's own device (the reference model: no extra weights).
"""

from __future__ import annotations

from typing import Any

from tau2cl.env import tau2_compat  # noqa: F401  (first: quiets tau2's import)

# isort: split
from tau2.data_model.message import ToolCall, UserMessage

from tau2cl.agent.chat import chat_dict
from tau2cl.agent.episode import Episode
from tau2cl.agent.policy import Generation, Policy, load_model, load_tokenizer
from tau2cl.agent.tool_calls import parse_tool_calls
from tau2cl.agent.users.base import (
    UserFailure,
    UserReply,
    UserSimulator,
    flipped_history,
    user_system_prompt,
)


class LocalModelUser(UserSimulator):
    """Generates the replies of a batch of episodes with one local model."""

    def __init__(self, policy: Policy, temperature: float, max_new_tokens: int, name: str = "local"):
        self.policy = policy
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.name = name

    @classmethod
    def from_config(cls, config: Any, device: Any) -> LocalModelUser:
        """Load `config.user_model` (hub id, local folder or .gguf file), frozen, in eval mode."""
        dtype = "float32" if config.model_dtype == "auto" or str(device) == "cpu" else config.model_dtype
        model = load_model(config.user_model, dtype, device).eval().requires_grad_(False)
        policy = Policy(model, load_tokenizer(config.user_model))
        return cls(policy, config.user_temperature, config.user_max_new_tokens, name=config.user_model)

    def respond(self, episodes: list[Episode]) -> list[UserReply]:
        prompts = [self.prompt_ids(e) for e in episodes]
        generations = self.policy.generate(prompts, self.max_new_tokens, self.temperature)
        return [self._reply(e, g) for e, g in zip(episodes, generations, strict=True)]

    def prompt_ids(self, episode: Episode) -> list[int]:
        """The user's whole context for its next turn, rendered by the user model's template."""
        chat = [chat_dict(m) for m in flipped_history(episode)]
        tools = episode.domain.user_tool_schemas
        return self.policy.renderer.prompt_ids(user_system_prompt(episode), tools, chat)

    def _reply(self, episode: Episode, generation: Generation) -> UserReply:
        body = generation.token_ids[:-1] if generation.finished else generation.token_ids
        # special tokens are dropped: a stray end-of-turn marker must not reach the agent's context
        text = self.policy.tokenizer.decode(body, skip_special_tokens=True).strip()
        parsed = parse_tool_calls(text) if episode.domain.user_tool_schemas else None
        if parsed is not None and parsed.calls:
            n = sum(isinstance(m, UserMessage) for m in episode.messages)
            calls = [
                ToolCall(id=f"user_call_{n}_{i}", name=c.name, arguments=c.arguments, requestor="user")
                for i, c in enumerate(parsed.calls)
            ]
            return UserMessage(role="user", content=parsed.content or None, tool_calls=calls)
        if not text:
            return UserFailure("the user model generated an empty message")
        return UserMessage(role="user", content=text)
