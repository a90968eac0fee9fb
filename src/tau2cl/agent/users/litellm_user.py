"""tau2's own LLM user simulator, driven through litellm, as tau2-bench runs its benchmark.

Each reply is one call of tau2's `UserSimulator.generate_next_message` on the episode's user
history (tau2 builds the system prompt, flips the roles, passes the user's tools and turns the
model's tool calls into user tool calls). The episodes of a batch are answered concurrently from a
thread pool. Every call is limited to `timeout` seconds and retried with exponential backoff; a
turn that still fails becomes a `UserFailure`, which ends only its episode. Cost: one API call per
user turn (a paid API bills them; a local server costs its own compute).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tau2cl.agent.episode import Episode
from tau2cl.agent.users.base import UserFailure, UserReply, UserSimulator, tau2_user, user_history
from tau2cl.constants import LITELLM_PREFIX, USER_API_KEY_ENV
from tau2cl.env import tau2_compat  # noqa: F401  (first: quiets tau2's import)

MAX_CONCURRENT_CALLS = 32
NO_KEY_PLACEHOLDER = "EMPTY"  # what OpenAI-compatible local servers accept when they need no key


class LiteLLMUser(UserSimulator):
    """tau2's `UserSimulator` over litellm: any hosted model or OpenAI-compatible endpoint."""

    def __init__(
        self,
        model: str,
        *,
        api_base: str | None = None,
        api_key: str | None = None,
        temperature: float = 0.0,
        max_new_tokens: int = 256,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 1.0,
    ):
        self.model = model
        self.name = f"{LITELLM_PREFIX}{model}"
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff  # seconds before the first retry; doubled before each next one
        # litellm's own retries are off: this class retries, with backoff, the whole call
        self._llm_args: dict[str, Any] = {
            "temperature": temperature,
            "max_tokens": max_new_tokens,
            "timeout": timeout,
            "num_retries": 0,
            "max_retries": 0,
        }
        if api_base is not None:
            self._llm_args["api_base"] = api_base
        if api_key is not None:
            self._llm_args["api_key"] = api_key
        self._pool = ThreadPoolExecutor(max_workers=MAX_CONCURRENT_CALLS, thread_name_prefix="tau2cl-user")

    @classmethod
    def from_config(cls, config: Any) -> LiteLLMUser:
        """From --user_model litellm:<model> and the --user_* options (key: flag, then env)."""
        api_key = config.user_api_key or os.environ.get(USER_API_KEY_ENV)
        if api_key is None and config.user_api_base is not None and "OPENAI_API_KEY" not in os.environ:
            api_key = NO_KEY_PLACEHOLDER  # a local server without keys; the client insists on one
        return cls(
            config.user_model[len(LITELLM_PREFIX) :],
            api_base=config.user_api_base,
            api_key=api_key,
            temperature=config.user_temperature,
            max_new_tokens=config.user_max_new_tokens,
            timeout=config.user_timeout,
            max_retries=config.user_max_retries,
        )

    def __repr__(self) -> str:  # never shows the key
        return f"LiteLLMUser(model={self.model!r}, api_base={self._llm_args.get('api_base')!r})"

    def respond(self, episodes: list[Episode]) -> list[UserReply]:
        return list(self._pool.map(self._reply_with_retries, episodes))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _reply_with_retries(self, episode: Episode) -> UserReply:
        error: Exception | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                return self._reply(episode)
            except Exception as exc:  # API, network, timeout or malformed-response errors
                error = exc
        reason = _describe(error)
        key = self._llm_args.get("api_key")
        if key:  # some providers quote the key they rejected
            reason = reason.replace(key, "***")
        return UserFailure(f"{self.name} failed {self.max_retries + 1} time(s): {reason}")

    def _reply(self, episode: Episode) -> UserReply:
        simulator = tau2_user(episode, llm=self.model, llm_args=self._llm_args)
        history = user_history(episode)
        state = simulator.get_init_state(message_history=history[:-1])
        message, _ = simulator.generate_next_message(history[-1], state)
        message.validate()  # tau2's check: text or tool calls
        return message


def _describe(error: Exception | None) -> str:
    text = str(error).strip().splitlines()[0] if error is not None and str(error).strip() else ""
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__
