"""Chat rendering with tools through the tokenizer's own chat template, as token ids.

Two jobs, both token-exact:
- `prompt_ids`: the opening context of an episode (system + tools + first messages + generation prompt).
- `continuation_ids`: the tokens that follow a sampled assistant turn when tool results or a user
  message arrive. They are rendered as the template would render them after that turn, but only
  the new part is tokenized: the model's own tokens are never decoded and re-encoded, and no turn
  re-tokenizes the whole conversation.

Templates that ignore `tools` (or the `tool` role) get the schemas and the call format in the
system prompt, and tool calls/results written as text in assistant/user turns.
"""

from __future__ import annotations

import json
from typing import Any

from tau2cl.agent.tool_calls import CALL_CLOSE, CALL_OPEN, format_tool_call

_PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": "probe_tool_zq",
        "description": "probe",
        "parameters": {"type": "object", "properties": {}, "required": []},
    },
}
_PROBE_RESULT = "probe_result_zq"
_PROBE_ANSWER = "probe_answer_zq"

FALLBACK_TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
FALLBACK_TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    f"within {CALL_OPEN}{CALL_CLOSE} XML tags:\n{CALL_OPEN}\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n' + CALL_CLOSE
)


class ChatRenderer:
    """Renders tau2cl chat dicts ({"role", "content", "tool_calls"}) into token ids."""

    def __init__(self, tokenizer: Any):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.native_tools = self._template_renders_tools()
        self.native_tool_messages = self._template_renders_tool_role()
        self._prompt_cache: dict[str, list[int]] = {}

    # ---- public -------------------------------------------------------------------------
    def prompt_ids(self, system: str, tools: list[dict], messages: list[dict]) -> list[int]:
        """Token ids of system + tools + messages + the assistant generation prompt."""
        chat = [{"role": "system", "content": self._system_text(system, tools)}]
        chat += [self._adapt(m) for m in messages]
        text = self._render(chat, tools=tools if self.native_tools else None, add_generation_prompt=True)
        cached = self._prompt_cache.get(text)
        if cached is None:
            cached = self.encode(text)
            if len(self._prompt_cache) < 4096:
                self._prompt_cache[text] = cached
        return list(cached)

    def continuation_ids(self, last_assistant: dict, new_messages: list[dict], end_of_turn: str) -> list[int]:
        """Tokens that follow `last_assistant`'s end-of-turn token when `new_messages` arrive.

        The template renders [anchor..., last_assistant] and [anchor..., last_assistant, *new];
        the second must extend the first. The cut is placed right after the last `end_of_turn`
        string of the first rendering, so template text after it (e.g. Qwen's newline) belongs
        to the continuation.
        """
        anchor = [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "u"},
            self._adapt(last_assistant),
        ]
        before = self._render(anchor, tools=None, add_generation_prompt=False)
        after = self._render(anchor + [self._adapt(m) for m in new_messages], tools=None, add_generation_prompt=True)
        if not after.startswith(before):
            raise ValueError("the chat template rewrites earlier turns when messages are added")
        cut = before.rfind(end_of_turn)
        if cut < 0:
            raise ValueError(f"the chat template does not end assistant turns with {end_of_turn!r}")
        return self.encode(after[cut + len(end_of_turn) :])

    def assistant_turn_ids(self, message: dict, end_of_turn: str) -> list[int]:
        """Token ids of an assistant turn as the template writes it after the generation prompt.

        What a policy would have to generate for `message`, up to and including its
        end-of-turn marker: the target of a demonstration.
        """
        anchor = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
        before = self._render(anchor, tools=None, add_generation_prompt=True)
        after = self._render(anchor + [self._adapt(message)], tools=None, add_generation_prompt=False)
        if not after.startswith(before):
            raise ValueError("the chat template's assistant turn does not follow its generation prompt")
        body = after[len(before) :]
        cut = body.rfind(end_of_turn)
        if cut < 0:
            raise ValueError(f"the chat template does not end assistant turns with {end_of_turn!r}")
        return self.encode(body[: cut + len(end_of_turn)])

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    # ---- rendering ----------------------------------------------------------------------
    def _render(self, chat: list[dict], tools: list[dict] | None, add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            chat, tools=tools or None, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _system_text(self, system: str, tools: list[dict]) -> str:
        if self.native_tools or not tools:
            return system
        lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        return f"{system}\n\n{FALLBACK_TOOLS_HEADER}{lines}{FALLBACK_TOOLS_FOOTER}"

    def _adapt(self, message: dict) -> dict:
        """Rewrite tool calls / tool results as text for templates that cannot render them."""
        role = message["role"]
        if role == "assistant" and message.get("tool_calls") and not self.native_tool_messages:
            calls = [format_tool_call(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]
            text = "\n".join(([message["content"]] if message.get("content") else []) + calls)
            return {"role": "assistant", "content": text}
        if role == "tool" and not self.native_tool_messages:
            return {"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"}
        return message

    # ---- template probing ---------------------------------------------------------------
    def _template_renders_tools(self) -> bool:
        chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
        try:
            text = self._render(chat, tools=[_PROBE_TOOL], add_generation_prompt=True)
        except Exception:
            return False
        return "probe_tool_zq" in text

    def _template_renders_tool_role(self) -> bool:
        chat = [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": "", "tool_calls": [_chat_call("probe_tool_zq", {})]},
            {"role": "tool", "content": _PROBE_RESULT},
        ]
        try:
            text = self._render(chat, tools=None, add_generation_prompt=True)
        except Exception:
            return False
        return _PROBE_RESULT in text and "probe_tool_zq" in text


def template_end_of_turn_id(tokenizer: Any) -> int | None:
    """The special token the chat template writes right after an assistant turn's text (ChatML's
    `<|im_end|>`, Llama 3's `<|eot_id|>`), or None when it writes no special token there.

    A turn ends with this token whatever the tokenizer calls its eos, so sampling stops at it and
    a turn that ended otherwise is closed with it.
    """
    chat = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": _PROBE_ANSWER},
    ]
    try:
        text = tokenizer.apply_chat_template(chat, tokenize=False)
    except Exception:
        return None
    at = text.rfind(_PROBE_ANSWER)
    if at < 0:
        return None
    ids = tokenizer.encode(text[at + len(_PROBE_ANSWER) :], add_special_tokens=False)
    special = set(tokenizer.all_special_ids)
    special |= {i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special}
    return ids[0] if ids and ids[0] in special else None


def _chat_call(name: str, arguments: dict) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def assistant_chat_message(content: str, calls: list[tuple[str, dict]]) -> dict:
    """A chat dict for an assistant turn with optional (name, arguments) calls."""
    message: dict = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [_chat_call(n, a) for n, a in calls]
    return message


def chat_dict(message: Any) -> dict:
    """The chat dict of a tau2 message (user, assistant with optional calls, or tool result)."""
    if message.role == "tool":
        return {"role": "tool", "content": message.content or ""}
    calls = [(c.name, c.arguments) for c in (message.tool_calls or [])]
    if message.role == "assistant":
        return assistant_chat_message(message.content or "", calls)
    return {"role": message.role, "content": message.content or ""}
