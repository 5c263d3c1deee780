"""dsv4.chat.encoding: the four official golden prompts byte for byte, each rendering rule of spec
§6.1 on its own, the DSML tool-call block, and clear errors for malformed messages."""

import json

import pytest

from dsv4.chat.encoding import EncodingError, ToolCall, encode_messages, render_tool_calls, render_tools
from dsv4.chat.format import (
    ASSISTANT,
    BOS,
    EOS,
    LATEST_REMINDER,
    REASONING_EFFORT_MAX,
    TASK_TOKENS,
    THINK_END,
    THINK_START,
    USER,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def _call(name, arguments, call_id=None):
    call = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if call_id is not None:
        call["id"] = call_id
    return call


def _golden(shared_dir, case):
    folder = shared_dir / "golden" / "encoding"
    data = json.loads((folder / f"input_{case}.json").read_text(encoding="utf-8"))
    expected = (folder / f"output_{case}.txt").read_text(encoding="utf-8")
    return data, expected


# ------------------------------------------------------------------------------------------------
# the official golden cases


@pytest.mark.parametrize("case, mode", [(1, "thinking"), (2, "thinking"), (3, "thinking"), (4, "chat")])
def test_golden_cases_byte_exact(shared_dir, case, mode):
    data, expected = _golden(shared_dir, case)
    if case == 1:  # {"tools", "messages"}: the tools go onto the system message
        messages = data["messages"]
        messages[0]["tools"] = data["tools"]
    else:
        messages = data
    assert encode_messages(messages, thinking_mode=mode) == expected


def test_golden_case_1_with_request_level_tools(shared_dir):
    data, expected = _golden(shared_dir, 1)
    assert encode_messages(data["messages"], thinking_mode="thinking", tools=data["tools"]) == expected
    # request-level tools replace tools already on the system message, not duplicate them
    data["messages"][0]["tools"] = [WEATHER]
    assert encode_messages(data["messages"], thinking_mode="thinking", tools=data["tools"]) == expected


def test_golden_inputs_are_not_mutated(shared_dir):
    data, _ = _golden(shared_dir, 1)
    before = json.dumps(data, sort_keys=True)
    encode_messages(data["messages"], tools=data["tools"])
    assert json.dumps(data, sort_keys=True) == before


# ------------------------------------------------------------------------------------------------
# reasoning modes


def test_think_max_preamble_right_after_bos_then_system():
    msgs = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "hi"}]
    out = encode_messages(msgs, reasoning_effort="max")
    assert out == BOS + REASONING_EFFORT_MAX + "SYS" + USER + "hi" + ASSISTANT + THINK_START
    assert REASONING_EFFORT_MAX.startswith("Reasoning Effort: Absolute maximum") and REASONING_EFFORT_MAX.endswith(
        "unchecked.\n\n")
    # without a system message the preamble directly precedes the first user turn
    assert encode_messages(msgs[1:], reasoning_effort="max") == BOS + REASONING_EFFORT_MAX + USER + "hi" + (
        ASSISTANT + THINK_START)
    # chat mode has no reasoning effort
    assert encode_messages(msgs, thinking_mode="chat", reasoning_effort="max") == encode_messages(
        msgs, thinking_mode="chat")


def test_think_high_is_the_default_rendering():
    msgs = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "hi"}]
    assert encode_messages(msgs, reasoning_effort="high") == encode_messages(msgs, reasoning_effort=None)
    assert encode_messages(msgs) == BOS + "SYS" + USER + "hi" + ASSISTANT + THINK_START


def test_chat_mode_ends_with_closed_think_and_renders_no_reasoning():
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b", "reasoning_content": "SECRET"},
        {"role": "user", "content": "c"},
    ]
    out = encode_messages(msgs, thinking_mode="chat")
    assert out == BOS + USER + "a" + ASSISTANT + THINK_END + "b" + EOS + USER + "c" + ASSISTANT + THINK_END
    assert out.endswith("<｜Assistant｜></think>")
    assert encode_messages(msgs, thinking_mode="chat", drop_thinking=False) == out


# ------------------------------------------------------------------------------------------------
# drop_thinking


CONVERSATION = [
    {"role": "user", "content": "q1"},
    {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
    {"role": "user", "content": "q2"},
    {"role": "assistant", "content": "a2", "reasoning_content": "r2"},
]


def test_drop_thinking_removes_reasoning_before_the_last_user_turn():
    out = encode_messages(CONVERSATION)
    assert out == (BOS + USER + "q1" + ASSISTANT + THINK_END + "a1" + EOS
                   + USER + "q2" + ASSISTANT + THINK_START + "r2" + THINK_END + "a2" + EOS)
    # off: every turn keeps its reasoning and opens with <think>
    assert encode_messages(CONVERSATION, drop_thinking=False) == (
        BOS + USER + "q1" + ASSISTANT + THINK_START + "r1" + THINK_END + "a1" + EOS
        + USER + "q2" + ASSISTANT + THINK_START + "r2" + THINK_END + "a2" + EOS)


def test_drop_thinking_is_disabled_when_tools_are_present():
    kept = encode_messages(CONVERSATION, drop_thinking=False)
    with_tools = encode_messages(CONVERSATION, tools=[WEATHER])
    assert "r1" in with_tools
    assert with_tools.endswith(kept[len(BOS):])
    on_system = encode_messages([{"role": "system", "content": "", "tools": [WEATHER]}, *CONVERSATION])
    assert on_system == with_tools


def test_drop_thinking_drops_earlier_developer_messages_in_thinking_mode_only():
    msgs = [
        {"role": "developer", "content": "DEV"},
        {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
        {"role": "user", "content": "q2"},
    ]
    assert encode_messages(msgs) == BOS + "a1" + EOS + USER + "q2" + ASSISTANT + THINK_START
    assert encode_messages(msgs, drop_thinking=False) == (
        BOS + USER + "DEV" + ASSISTANT + THINK_START + "r1" + THINK_END + "a1" + EOS
        + USER + "q2" + ASSISTANT + THINK_START)
    assert encode_messages(msgs, thinking_mode="chat").startswith(BOS + USER + "DEV" + ASSISTANT + THINK_END)


# ------------------------------------------------------------------------------------------------
# tools and tool results


def test_tool_results_merge_into_one_user_turn_in_call_order():
    calls = [_call("f", '{"i": 1}', "c1"), _call("f", '{"i": 2}', "c2"), _call("f", '{"i": 3}', "c3")]
    msgs = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": None, "reasoning_content": "plan", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "c3", "content": "R3"},
        {"role": "tool", "tool_call_id": "c1", "content": "R1"},
        {"role": "tool", "tool_call_id": "c2", "content": "R2"},
        {"role": "user", "content": "and?"},
    ]
    out = encode_messages(msgs, tools=[WEATHER])
    turn = USER + "<tool_result>R1</tool_result>\n\n<tool_result>R2</tool_result>\n\n<tool_result>R3</tool_result>"
    assert out.endswith(EOS + turn + "\n\nand?" + ASSISTANT + THINK_START)
    assert "<｜tool" not in out and out.count(USER) == 2
    # in the original order the prompt is the same
    ordered = msgs[:2] + [msgs[3], msgs[4], msgs[2]] + msgs[5:]
    assert encode_messages(ordered, tools=[WEATHER]) == out


def test_assistant_tool_call_block_follows_content():
    msgs = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "Let me check.", "reasoning_content": "need tool",
         "tool_calls": [_call("get_weather", {"city": "Paris", "days": 2}, "c1")]},
    ]
    out = encode_messages(msgs, tools=[WEATHER])
    block = render_tool_calls(msgs[1]["tool_calls"])
    assert out.endswith(ASSISTANT + THINK_START + "need tool" + THINK_END + "Let me check.\n\n" + block + EOS)


def test_render_tool_calls_dsml():
    block = render_tool_calls([
        _call("search", '{"q": "北京 weather", "n": 3, "opts": {"a": [1, true, null]}, "flag": false}'),
        {"name": "noop", "arguments": ""},
    ])
    assert block == (
        "<｜DSML｜tool_calls>\n"
        '<｜DSML｜invoke name="search">\n'
        '<｜DSML｜parameter name="q" string="true">北京 weather</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="n" string="false">3</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="opts" string="false">{"a": [1, true, null]}</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="flag" string="false">false</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n"
        '<｜DSML｜invoke name="noop">\n'
        "\n"
        "</｜DSML｜invoke>\n"
        "</｜DSML｜tool_calls>"
    )
    # arguments as a dict, as a JSON string, or a ToolCall render the same
    args = {"s": "x y", "f": 1.5, "u": "ü"}
    expected = render_tool_calls([_call("t", json.dumps(args))])
    assert render_tool_calls([_call("t", args)]) == expected
    assert render_tool_calls([ToolCall("t", args)]) == expected
    assert render_tool_calls([_call("t", json.dumps(args, ensure_ascii=True, separators=(",", ":")))]) == expected


def test_tools_block():
    block = render_tools([WEATHER])
    assert block.startswith("## Tools\n\nYou have access to a set of tools")
    assert block.endswith(
        "### Available Tool Schemas\n\n" + json.dumps(WEATHER["function"], ensure_ascii=False)
        + "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n")
    # a request without a system message gets an empty one carrying the tools
    out = encode_messages([{"role": "user", "content": "hi"}], tools=[WEATHER])
    assert out == BOS + "\n\n" + block + USER + "hi" + ASSISTANT + THINK_START


# ------------------------------------------------------------------------------------------------
# other roles and fields


def test_developer_role_is_a_user_turn_with_optional_tools():
    msgs = [{"role": "system", "content": "S"}, {"role": "developer", "content": "D", "tools": [WEATHER]}]
    out = encode_messages(msgs)
    assert out == BOS + "S" + USER + "D\n\n" + render_tools([WEATHER]) + ASSISTANT + THINK_START


def test_latest_reminder():
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "latest_reminder", "content": "2026-02-21,Guangzhou"},
        {"role": "user", "content": "hi"},
    ]
    out = encode_messages(msgs)
    assert out == BOS + "S" + LATEST_REMINDER + "2026-02-21,Guangzhou" + USER + "hi" + ASSISTANT + THINK_START


def test_response_format_block():
    schema = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}}}
    expected = (BOS + "S\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
                + json.dumps(schema, ensure_ascii=False) + USER + "hi" + ASSISTANT + THINK_START)
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    assert encode_messages(msgs, response_format=schema) == expected
    assert encode_messages([{**msgs[0], "response_format": schema}, msgs[1]]) == expected
    # after the tools block when both are present
    both = encode_messages(msgs, tools=[WEATHER], response_format=schema)
    assert "tool calls.\n\n\n## Response Format:" in both


def test_task_tokens():
    user = {"role": "user", "content": "Q"}
    # action: the assistant prefix, the think token, then the task token
    assert encode_messages([{**user, "task": "action"}], thinking_mode="chat") == (
        BOS + USER + "Q" + ASSISTANT + THINK_END + TASK_TOKENS["action"])
    assert encode_messages([{**user, "task": "action"}]) == BOS + USER + "Q" + ASSISTANT + THINK_START + "<｜action｜>"
    # other tasks directly after the content; the answer to a task has no reasoning
    out = encode_messages([{**user, "task": "query"}, {"role": "assistant", "content": "A", "reasoning_content": "R"}])
    assert out == BOS + USER + "Q" + "<｜query｜>" + "A" + EOS
    # title: after the assistant's EOS
    out = encode_messages([user, {"role": "assistant", "content": "A", "reasoning_content": "R", "task": "title"}])
    assert out == BOS + USER + "Q" + ASSISTANT + THINK_START + "R" + THINK_END + "A" + EOS + "<｜title｜>"
    # no task token when the message is followed by another user turn
    out = encode_messages([{**user, "task": "query"}, {"role": "system", "content": "S"}])
    assert "<｜query｜>" not in out


def test_assistant_prefix_continuation():
    user = {"role": "user", "content": "Q"}
    head = BOS + USER + "Q" + ASSISTANT
    # content prefix: reasoning closed, content left open
    out = encode_messages([user, {"role": "assistant", "content": "```python\n", "reasoning_content": "R",
                                  "prefix": True}])
    assert out == head + THINK_START + "R" + THINK_END + "```python\n"
    # reasoning only: the chain of thought is left open for the model to continue
    out = encode_messages([user, {"role": "assistant", "content": "", "reasoning_content": "Let me", "prefix": True}])
    assert out == head + THINK_START + "Let me"
    assert encode_messages([user, {"role": "assistant", "prefix": True}]) == encode_messages([user])
    assert encode_messages([user, {"role": "assistant", "content": "x", "prefix": True}], thinking_mode="chat") == (
        head + THINK_END + "x")
    # the official encoder's wo_eos only leaves out the EOS
    out = encode_messages([user, {"role": "assistant", "content": "", "reasoning_content": "R", "wo_eos": True}])
    assert out == head + THINK_START + "R" + THINK_END
    # a complete final assistant message ends with EOS
    assert encode_messages([user, {"role": "assistant", "content": "A"}]) == head + THINK_START + THINK_END + "A" + EOS


def test_content_as_text_parts():
    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    assert encode_messages([{"role": "user", "content": parts}]) == encode_messages(
        [{"role": "user", "content": "one\ntwo"}])
    msgs = [{"role": "user", "content": "go"},
            {"role": "assistant", "tool_calls": [_call("f", "{}", "c1")]},
            {"role": "tool", "tool_call_id": "c1", "content": parts}]
    assert "<tool_result>one\n\ntwo</tool_result>" in encode_messages(msgs)


# ------------------------------------------------------------------------------------------------
# bad input


TOOL_TURN = [{"role": "user", "content": "go"},
             {"role": "assistant", "content": "", "tool_calls": [_call("f", '{"a": 1}', "c1")]}]


@pytest.mark.parametrize("messages, index, words", [
    ([{"role": "user", "content": "a"}, {"role": "function", "content": "x"}], 1, "unknown role"),
    ([{"content": "a"}], 0, "unknown role"),
    (["hello"], 0, "must be an object"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "tool_call_id": "c1", "content": "x"}], 1,
     "must follow an assistant message with tool_calls"),
    ([*TOOL_TURN, {"role": "assistant", "content": "done"}, {"role": "tool", "content": "x"}], 3,
     "must follow an assistant message with tool_calls"),
    ([*TOOL_TURN, {"role": "tool", "tool_call_id": "zz", "content": "x"}], 2, "'zz' matches none"),
    ([{"role": "user", "content": "go"},
      {"role": "assistant", "tool_calls": [_call("f", '{"a": 1')]}], 1, "not valid JSON"),
    ([{"role": "user", "content": "go"},
      {"role": "assistant", "tool_calls": [_call("f", "[1, 2]")]}], 1, "must be a JSON object"),
    ([{"role": "user", "content": "go"},
      {"role": "assistant", "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]}], 1,
     "name must be a non-empty string"),
    ([{"role": "user", "content": "go"}, {"role": "assistant", "tool_calls": "f()"}], 1, "must be a list"),
    ([{"role": "user", "content": "a", "task": "summarize"}], 0, "unknown task"),
    ([{"role": "developer", "content": ""}], 0, "needs content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], 0, "only text parts"),
    ([{"role": "user", "content": 5}], 0, "string or a list of text parts"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "prefix": True},
      {"role": "user", "content": "c"}], 1, "must be the last message"),
    ([{"role": "user", "content": "a", "tools": [WEATHER]}], 0, "only allowed on system and developer"),
    ([{"role": "system", "content": "a", "tools": [{"name": "f"}]}], 0, "tools[0] must be"),
    ([{"role": "assistant", "content": "a", "reasoning_content": 3}], 0, "reasoning_content must be a string"),
])
def test_bad_messages_raise_encoding_error(messages, index, words):
    with pytest.raises(EncodingError) as info:
        encode_messages(messages)
    assert isinstance(info.value, ValueError)
    assert info.value.index == index
    assert str(info.value).startswith(f"messages[{index}]: ") and words in str(info.value)


@pytest.mark.parametrize("kwargs, words", [
    ({"thinking_mode": "think"}, "thinking_mode"),
    ({"reasoning_effort": "low"}, "reasoning_effort"),
    ({"tools": [{"type": "function"}]}, r"tools\[0\] must be"),
    ({"response_format": {"schema": {1, 2}}}, "not JSON-serializable"),
])
def test_bad_arguments_raise_encoding_error(kwargs, words):
    with pytest.raises(EncodingError, match=words) as info:
        encode_messages([{"role": "user", "content": "hi"}], **kwargs)
    assert info.value.index is None


def test_empty_messages_raise():
    with pytest.raises(EncodingError, match="empty"):
        encode_messages([])
    with pytest.raises(EncodingError, match="list"):
        encode_messages({"role": "user", "content": "hi"})
