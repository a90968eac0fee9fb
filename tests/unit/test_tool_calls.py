from tau2cl.agent.tool_calls import (
    MalformedCall,
    ParsedCall,
    format_tool_call,
    malformed_call_error,
    parse_tool_calls,
)


def test_plain_text_has_no_calls():
    turn = parse_tool_calls("  Sure, what is your user id?  ")
    assert turn.content == "Sure, what is your user id?"
    assert turn.items == []


def test_several_calls_with_text_around_them_keep_order_and_text():
    text = (
        "Let me look.\n<tool_call>\n{\"name\": \"get_user_details\", \"arguments\": {\"user_id\": \"u1\"}}\n</tool_call>"
        " and <tool_call>{\"name\": \"list_all_airports\", \"arguments\": {}}</tool_call> done"
    )
    turn = parse_tool_calls(text)
    assert turn.calls == [
        ParsedCall("get_user_details", {"user_id": "u1"}),
        ParsedCall("list_all_airports", {}),
    ]
    assert turn.content == "Let me look.\n and  done"
    assert turn.malformed == []


def test_arguments_as_json_string_are_decoded():
    turn = parse_tool_calls('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>')
    assert turn.calls == [ParsedCall("f", {"x": 1})]


def test_broken_json_is_malformed_not_an_exception():
    turn = parse_tool_calls('<tool_call>{"name": "f", "arguments": {"x": }</tool_call>')
    assert turn.calls == []
    assert len(turn.malformed) == 1
    assert "not valid JSON" in turn.malformed[0].reason


def test_missing_name_and_non_object_arguments_are_malformed():
    no_name = parse_tool_calls('<tool_call>{"arguments": {}}</tool_call>').malformed[0]
    assert "name" in no_name.reason
    bad_args = parse_tool_calls('<tool_call>{"name": "f", "arguments": [1]}</tool_call>').malformed[0]
    assert "arguments" in bad_args.reason
    not_object = parse_tool_calls("<tool_call>[1, 2]</tool_call>").malformed[0]
    assert "object" in not_object.reason


def test_unclosed_call_is_malformed_and_text_before_it_is_kept():
    turn = parse_tool_calls('I will check <tool_call>{"name": "f", "argu')
    assert turn.content == "I will check"
    assert turn.malformed[0].reason.startswith("the call has no closing")


def test_unknown_tool_name_parses_as_a_call():
    # whether the tool exists is the environment's business: tau2 answers "Error: Tool ... not found"
    turn = parse_tool_calls('<tool_call>{"name": "no_such_tool", "arguments": {}}</tool_call>')
    assert turn.calls == [ParsedCall("no_such_tool", {})]


def test_format_round_trips_through_parse():
    text = format_tool_call("book", {"a": [1, 2], "b": "é"})
    assert parse_tool_calls(text).calls == [ParsedCall("book", {"a": [1, 2], "b": "é"})]


def test_malformed_error_message_reads_like_a_tau2_error():
    message = malformed_call_error(MalformedCall(raw="{", reason="the call is not valid JSON (x)"))
    assert message.startswith("Error: invalid tool call: the call is not valid JSON (x).")
    assert "<tool_call>" in message
