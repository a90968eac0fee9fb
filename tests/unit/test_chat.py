"""ChatRenderer with the tiny tokenizer: token-exact prompts and continuations, and the fallback
for chat templates that know nothing of tools."""

from __future__ import annotations

import copy
import json

import pytest

from tau2cl.agent.chat import FALLBACK_TOOLS_HEADER, ChatRenderer, assistant_chat_message
from tau2cl.agent.tool_calls import format_tool_call

SYSTEM = "You are a customer service agent. Follow the policy."
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_user_details",
            "description": "Get the details of a user.",
            "parameters": {
                "type": "object",
                "properties": {"user_id": {"type": "string", "description": "The user id."}},
                "required": ["user_id"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_reservation_details",
            "description": "Get the details of a reservation.",
            "parameters": {
                "type": "object",
                "properties": {"reservation_id": {"type": "string"}},
                "required": ["reservation_id"],
            },
        },
    },
]
USER_1 = {"role": "user", "content": "Hi, I want to cancel my trip. My user id is emma_kim_9957."}
USER_2 = {"role": "user", "content": "It is reservation EHGLP3."}
CALLS = [
    ("get_user_details", {"user_id": "emma_kim_9957"}),
    ("get_reservation_details", {"reservation_id": "EHGLP3"}),
]
RESULTS = [
    {"role": "tool", "content": '{"user_id": "emma_kim_9957", "name": "Emma Kim"}'},
    {"role": "tool", "content": "Error: Reservation EHGLP4 not found"},
]
MINIMAL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
END = "<|im_end|>"


def _with_template(tokenizer, template):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


def _render_ids(tokenizer, chat, tools) -> list[int]:
    """The tokenization of the whole conversation rendered by the tokenizer's own template."""
    text = tokenizer.apply_chat_template(
        chat, tools=tools, tokenize=False, add_generation_prompt=True
    )
    return tokenizer.encode(text, add_special_tokens=False)


def _sampled(renderer: ChatRenderer, text: str) -> list[int]:
    """What a policy would have sampled for `text`: its tokens, then the end-of-turn token."""
    return renderer.encode(text) + [renderer.tokenizer.eos_token_id]


def test_prompt_renders_tool_schemas_in_the_system_block(tiny_tokenizer):
    renderer = ChatRenderer(tiny_tokenizer)
    assert renderer.native_tools and renderer.native_tool_messages
    ids = renderer.prompt_ids(SYSTEM, TOOLS, [USER_1])
    chat = [{"role": "system", "content": SYSTEM}, USER_1]
    assert ids == _render_ids(tiny_tokenizer, chat, TOOLS)
    text = tiny_tokenizer.decode(ids, skip_special_tokens=False)
    system_block = text[: text.index(END)]
    assert system_block.startswith("<|im_start|>system\n" + SYSTEM)
    for tool in TOOLS:
        assert json.dumps(tool, ensure_ascii=False) in system_block
    assert "<tool_call>" in system_block  # the call format is explained there too
    assert text.endswith(
        "<|im_start|>user\n" + USER_1["content"] + END + "\n<|im_start|>assistant\n"
    )


def test_prompt_ids_return_a_fresh_list(tiny_tokenizer):
    renderer = ChatRenderer(tiny_tokenizer)
    first = renderer.prompt_ids(SYSTEM, TOOLS, [USER_1])
    first.append(0)  # the engine extends its token lists in place; the cache must not see it
    assert renderer.prompt_ids(SYSTEM, TOOLS, [USER_1]) == first[:-1]


def test_continuation_after_text_turn_matches_full_rendering(tiny_tokenizer):
    renderer = ChatRenderer(tiny_tokenizer)
    reply = "Sure, could you tell me the reservation number?"
    assistant = assistant_chat_message(reply, [])
    ids = renderer.prompt_ids(SYSTEM, TOOLS, [USER_1]) + _sampled(renderer, reply)
    ids += renderer.continuation_ids(assistant, [USER_2], END)
    chat = [{"role": "system", "content": SYSTEM}, USER_1, assistant, USER_2]
    assert ids == _render_ids(tiny_tokenizer, chat, TOOLS)


def test_continuation_after_two_tool_calls_matches_full_rendering(tiny_tokenizer):
    renderer = ChatRenderer(tiny_tokenizer)
    sampled_text = "\n".join(format_tool_call(name, args) for name, args in CALLS)
    assistant = assistant_chat_message("", CALLS)
    ids = renderer.prompt_ids(SYSTEM, TOOLS, [USER_1]) + _sampled(renderer, sampled_text)
    continuation = renderer.continuation_ids(assistant, RESULTS, END)
    ids += continuation
    chat = [{"role": "system", "content": SYSTEM}, USER_1, assistant, *RESULTS]
    assert ids == _render_ids(tiny_tokenizer, chat, TOOLS)
    text = tiny_tokenizer.decode(continuation, skip_special_tokens=False)
    assert text == (
        "\n<|im_start|>user"
        + "".join(f"\n<tool_response>\n{r['content']}\n</tool_response>" for r in RESULTS)
        + END
        + "\n<|im_start|>assistant\n"
    )


def test_fallback_template_puts_tools_in_the_system_prompt(tiny_tokenizer):
    tokenizer = _with_template(tiny_tokenizer, MINIMAL_TEMPLATE)
    renderer = ChatRenderer(tokenizer)
    assert not renderer.native_tools and not renderer.native_tool_messages
    text = tokenizer.decode(renderer.prompt_ids(SYSTEM, TOOLS, [USER_1]), skip_special_tokens=False)
    system_block = text[: text.index(END)]
    assert system_block.startswith("<|im_start|>system\n" + SYSTEM)
    assert FALLBACK_TOOLS_HEADER in system_block
    for tool in TOOLS:
        assert json.dumps(tool, ensure_ascii=False) in system_block
    assert (
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
        in system_block
    )
    assert text.endswith(
        "<|im_start|>user\n" + USER_1["content"] + END + "\n<|im_start|>assistant\n"
    )


def test_fallback_renders_tool_results_as_user_turns(tiny_tokenizer):
    tokenizer = _with_template(tiny_tokenizer, MINIMAL_TEMPLATE)
    renderer = ChatRenderer(tokenizer)
    sampled_text = "\n".join(format_tool_call(name, args) for name, args in CALLS)
    prompt = renderer.prompt_ids(SYSTEM, TOOLS, [USER_1])
    continuation = renderer.continuation_ids(assistant_chat_message("", CALLS), RESULTS, END)
    turns = "".join(
        f"<|im_start|>user\n<tool_response>\n{r['content']}\n</tool_response>{END}\n"
        for r in RESULTS
    )
    assert (
        tokenizer.decode(continuation, skip_special_tokens=False)
        == "\n" + turns + "<|im_start|>assistant\n"
    )
    # token-exact: what the model saw is the tokenization of the conversation as one text
    whole = tokenizer.decode(prompt, skip_special_tokens=False) + sampled_text + END + "\n" + turns
    whole += "<|im_start|>assistant\n"
    assert prompt + _sampled(renderer, sampled_text) + continuation == renderer.encode(whole)


def test_fallback_continuation_after_text_turn(tiny_tokenizer):
    renderer = ChatRenderer(_with_template(tiny_tokenizer, MINIMAL_TEMPLATE))
    continuation = renderer.continuation_ids(assistant_chat_message("Sure.", []), [USER_2], END)
    assert renderer.tokenizer.decode(continuation, skip_special_tokens=False) == (
        f"\n<|im_start|>user\n{USER_2['content']}{END}\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("template", [None, ""])
def test_no_chat_template_is_a_value_error(tiny_tokenizer, template):
    with pytest.raises(ValueError, match="chat template"):
        ChatRenderer(_with_template(tiny_tokenizer, template))
