"""Choosing the user simulator a run asks for (`--user_model`)."""

from __future__ import annotations

from typing import Any

from tau2cl.agent.users.base import UserSimulator
from tau2cl.agent.users.litellm_user import LiteLLMUser
from tau2cl.agent.users.local import LocalModelUser
from tau2cl.agent.users.scripted import ScriptedUser
from tau2cl.constants import LITELLM_PREFIX, REFERENCE_USER


def build_user(config: Any, reference: Any = None, device: Any = "cpu") -> UserSimulator:
    """The user simulator `config.user_model` asks for (see its --help).

    `reference` is a zero-argument function returning the run's `Policy` over the frozen
    reference model; it is only called for `--user_model reference`. A separate local user model
    is loaded onto `device`.
    """
    model = config.user_model
    if model is None:
        return ScriptedUser(max_turns=config.user_max_turns)
    if model.startswith(LITELLM_PREFIX):
        return LiteLLMUser.from_config(config)
    if model == REFERENCE_USER:
        return LocalModelUser(reference(), config.user_temperature, config.user_max_new_tokens, name="reference")
    return LocalModelUser.from_config(config, device)
