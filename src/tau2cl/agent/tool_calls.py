"""Hermes/Qwen-style tool calls in model text: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.

Pure string code. A malformed call is returned as a `MalformedCall` with a reason, never raised:
bad model output is training data, and the rollout engine feeds the reason back to the model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
_CALL_RE = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.DOTALL)


@dataclass
class ParsedCall:
    name: str
    arguments: dict


@dataclass
class MalformedCall:
    raw: str
    reason: str


@dataclass
class ParsedTurn:
    """One assistant turn split into its text (calls removed) and its calls, in order."""

    content: str
    items: list[ParsedCall | MalformedCall] = field(default_factory=list)  # in text order

    @property
    def calls(self) -> list[ParsedCall]:
        return [c for c in self.items if isinstance(c, ParsedCall)]

    @property
    def malformed(self) -> list[MalformedCall]:
        return [c for c in self.items if isinstance(c, MalformedCall)]


def parse_tool_calls(text: str) -> ParsedTurn:
    """Split assistant text into free text and tool calls (several per message allowed)."""
    items: list[ParsedCall | MalformedCall] = []
    pieces: list[str] = []
    pos = 0
    for match in _CALL_RE.finditer(text):
        pieces.append(text[pos : match.start()])
        pos = match.end()
        items.append(_parse_one(match.group(1)))
    rest = text[pos:]
    if CALL_OPEN in rest:  # an unclosed call, usually cut by max_new_tokens
        before, _, raw = rest.partition(CALL_OPEN)
        pieces.append(before)
        items.append(MalformedCall(raw=raw, reason=f"the call has no closing {CALL_CLOSE} tag"))
    else:
        pieces.append(rest)
    return ParsedTurn(content="".join(pieces).strip(), items=items)


def _parse_one(body: str) -> ParsedCall | MalformedCall:
    try:
        obj = json.loads(body.strip())
    except json.JSONDecodeError as exc:
        return MalformedCall(raw=body, reason=f"the call is not valid JSON ({exc.msg})")
    if not isinstance(obj, dict):
        return MalformedCall(raw=body, reason="the call must be a JSON object")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return MalformedCall(raw=body, reason='the call has no "name" string')
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models emit arguments as a JSON-encoded string
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as exc:
            return MalformedCall(raw=body, reason=f"the arguments are not valid JSON ({exc.msg})")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return MalformedCall(raw=body, reason='"arguments" must be a JSON object')
    return ParsedCall(name=name, arguments=args)


def format_tool_call(name: str, arguments: dict) -> str:
    """The text form of one call, as the Hermes/Qwen templates render it."""
    payload = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{CALL_OPEN}\n{payload}\n{CALL_CLOSE}"


def malformed_call_error(call: MalformedCall) -> str:
    """The tool error the model sees for a call it did not form correctly (tau2's 'Error: ...' form)."""
    return (
        f"Error: invalid tool call: {call.reason}. Write each call as {CALL_OPEN}"
        '{"name": <tool name>, "arguments": <JSON object>}' + f"{CALL_CLOSE}."
    )
