"""Completion parsers: the full-text `parse_completion` and the streaming `StreamParser`."""

import json
import random

import pytest

from dsv4.chat.arguments import ToolSchemas as _Schemas
from dsv4.chat.events import (
    ContentDelta,
    Finish,
    ParsedMessage,
    ReasoningDelta,
    ToolCall,
    ToolCallArgumentsDelta,
    ToolCallEnd,
    ToolCallStart,
    aggregate_events,
    new_tool_call_id,
)
from dsv4.chat.format import (
    ASSISTANT,
    BOS,
    DSML,
    EOS,
    INVOKE_END,
    INVOKE_START,
    PARAMETER_END,
    PARAMETER_START,
    TASK_TOKENS,
    THINK_END,
    THINK_START,
    TOOL_CALLS_END,
    TOOL_CALLS_SEPARATOR,
    TOOL_CALLS_START,
)
from dsv4.chat.parser import _parse_direct, parse_completion
from dsv4.chat.streaming import StreamParser, scrub

RESERVED = (EOS, BOS, THINK_START, THINK_END, DSML)


def ids(i):
    return f"call_{i}"


def render(reasoning, content, calls, thinking=True):
    """A completion in the official layout; calls: [(name, [(key, value text, is_string)])]."""
    text = reasoning + THINK_END if thinking else ""
    text += content
    if calls:
        invokes = []
        for name, params in calls:
            lines = [
                f'{PARAMETER_START}{k}" string="{"true" if s else "false"}">{v}{PARAMETER_END}' for k, v, s in params
            ]
            invokes.append(f'{INVOKE_START}{name}">\n' + "\n".join(lines) + f"\n{INVOKE_END}")
        text += TOOL_CALLS_SEPARATOR + TOOL_CALLS_START + "\n" + "\n".join(invokes) + "\n" + TOOL_CALLS_END
    return text + EOS


def expected_arguments(params):
    return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {json.dumps(v, ensure_ascii=False) if s else v}"
                           for k, v, s in params) + "}"


def stream(text, cuts, *, thinking=True, tools=None, reason=None):
    sp = StreamParser(thinking=thinking, tools=tools, id_factory=ids)
    events = []
    prev = 0
    for c in [*cuts, len(text)]:
        events += sp.feed(text[prev:c])
        prev = c
    events += sp.finish(reason)
    return events


def streamed(text, cuts=(), **kw):
    return aggregate_events(stream(text, cuts, **kw))


def parsed(text, **kw):
    return parse_completion(text, id_factory=ids, **kw)


def check_clean(msg: ParsedMessage):
    """The properties every parse has, whatever the text."""
    for field in (msg.reasoning_content, msg.content, *(c.arguments for c in msg.tool_calls),
                  *(c.name for c in msg.tool_calls)):
        for m in RESERVED:
            assert m not in field, (m, field)
    for c in msg.tool_calls:
        assert isinstance(json.loads(c.arguments), dict), c.arguments


def check_events(events):
    """Event-stream shape: calls start once, in order, their deltas come between start and end,
    exactly one Finish, last."""
    assert isinstance(events[-1], Finish) and sum(isinstance(e, Finish) for e in events) == 1
    open_calls, started = set(), []
    for e in events:
        if isinstance(e, ToolCallStart):
            assert e.index == len(started)
            started.append(e.index)
            open_calls.add(e.index)
        elif isinstance(e, ToolCallArgumentsDelta):
            assert e.index in open_calls and e.text
        elif isinstance(e, ToolCallEnd):
            open_calls.remove(e.index)
        elif isinstance(e, ReasoningDelta | ContentDelta):
            assert e.text
    assert not open_calls


# ------------------------------------------------------------------------------------------------
# golden cases


def golden_completions(shared_dir):
    """(case, thinking, completion) of every assistant turn in output_*.txt."""
    out = []
    for case in range(1, 5):
        text = (shared_dir / "golden" / "encoding" / f"output_{case}.txt").read_text(encoding="utf-8")
        i = 0
        while (i := text.find(ASSISTANT, i)) >= 0:
            i += len(ASSISTANT)
            thinking = text.startswith(THINK_START, i)
            i += len(THINK_START if thinking else THINK_END)
            for tok in TASK_TOKENS.values():  # a task token belongs to the prompt
                if text.startswith(tok, i):
                    i += len(tok)
            e = text.index(EOS, i) + len(EOS)
            out.append((case, thinking, text[i:e]))
    return out


def test_golden_parser_expectations(shared_dir):
    turns = {(case, k): (thinking, c) for k, (case, thinking, c) in enumerate(golden_completions(shared_dir))}
    by_case = {}
    for (case, _), v in sorted(turns.items()):
        by_case.setdefault(case, []).append(v)

    thinking, first = by_case[1][0]
    assert thinking
    msg = parsed(first)
    assert msg.reasoning_content == "The user wants to know the weather in Beijing. I should use the get_weather tool."
    assert msg.content == ""
    assert [(c.name, json.loads(c.arguments)) for c in msg.tool_calls] == [
        ("get_weather", {"location": "Beijing", "unit": "celsius"})]
    assert msg.tool_calls[0].arguments == '{"location": "Beijing", "unit": "celsius"}'
    assert msg.finish_reason == "tool_calls"

    msg = parsed(by_case[1][-1][1])
    assert msg.reasoning_content == "Got the weather data. Let me format a nice response."
    assert "22°C" in msg.content and msg.tool_calls == [] and msg.finish_reason == "stop"

    thinking, last = by_case[2][-1]
    msg = parsed(last, thinking=thinking)
    assert msg.reasoning_content == "The user asks about the capital of France. It is Paris."
    assert msg.content == "The capital of France is Paris."


def test_golden_turns_match_their_input_messages(shared_dir):
    """Every assistant turn of the four cases parses back to the message it was encoded from."""
    for case in range(1, 5):
        data = json.loads((shared_dir / "golden" / "encoding" / f"input_{case}.json").read_text(encoding="utf-8"))
        messages = data["messages"] if isinstance(data, dict) else data
        tools = data.get("tools") if isinstance(data, dict) else None
        wanted = [m for m in messages if m["role"] == "assistant"]
        got = [(t, c) for k, t, c in golden_completions(shared_dir) if k == case]
        assert len(got) == len(wanted)
        for (thinking, completion), m in zip(got, wanted, strict=True):
            msg = parse_completion(completion, thinking=thinking, tools=tools, id_factory=ids)
            assert _parse_direct(completion, thinking, _Schemas(tools)) is not None  # the official layout
            if thinking:
                assert msg.reasoning_content == m.get("reasoning_content", "")
            assert msg.content == (m.get("content") or "")
            calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in m.get("tool_calls") or []]
            assert [(c.name, json.loads(c.arguments)) for c in msg.tool_calls] == calls
            assert all(c.warnings == () for c in msg.tool_calls)
            for cut in range(len(completion) + 1):
                assert streamed(completion, [cut], thinking=thinking, tools=tools) == msg


# ------------------------------------------------------------------------------------------------
# generated well-formed completions

TEXT_PIECES = [
    "the", " ", "weather", "Beijing", "北京", "°C", "é", "😀", "\n", "\n\n", "\t", '"', "\\", "<", ">", "｜", "▁",
    "</", "<thi", "</thin", "think>", "<｜DS", "｜DSM", "ML｜", "<｜end▁of▁sent", "<｜begin", "▁of▁sentence",
    "\n\n<", "\n\n<｜", "<｜D", "tool_calls>", "</｜", "invoke", "a < b", "x>y", "{", "}", "'", "&lt;", "<br>",
]


def rand_text(rng, max_pieces):
    while True:
        t = "".join(rng.choice(TEXT_PIECES) for _ in range(rng.randint(0, max_pieces)))
        if not any(m in t for m in RESERVED):
            return t


def rand_json(rng, depth=0):
    k = rng.randrange(7 if depth < 2 else 4)
    if k == 0:
        return rng.randint(-1000, 1000)
    if k == 1:
        return rng.choice([True, False, None, 2.5, -0.125, 1e21])
    if k == 2:
        return rand_text(rng, 3)
    if k == 3:
        return rng.choice(["", "x"])
    if k in (4, 5):
        return [rand_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rand_text(rng, 2): rand_json(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def rand_completion(rng, thinking):
    calls = []
    for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
        params, keys = [], set()
        for _ in range(rng.randint(1, 3)):
            key = rng.choice(["location", "unit", "q", "n", "opts", "名字"])
            if key in keys:
                continue
            keys.add(key)
            if rng.random() < 0.6:
                params.append((key, rand_text(rng, 6), True))
            else:
                value = json.dumps(rand_json(rng), ensure_ascii=rng.random() < 0.5)
                if any(m in value for m in RESERVED):
                    continue
                params.append((key, value, False))
        calls.append((rng.choice(["get_weather", "search", "f"]), params))
    reasoning = rand_text(rng, 12) if thinking else ""
    return reasoning, rand_text(rng, 12), calls


def generated(n, seed):
    rng = random.Random(seed)
    out = []
    for k in range(n):
        thinking = k % 3 != 2
        r, c, calls = rand_completion(rng, thinking)
        out.append((thinking, r, c, calls, render(r, c, calls, thinking)))
    return out


HAND_WRITTEN = [
    (True, "", "", []),
    (False, "", "Hello!", []),
    (True, "Think < think > </thin", "Answer: a<b, c>d ｜ ▁", []),
    (True, "r", "", [("get_weather", [("location", "Paris", True), ("n", "3", False)])]),
    (True, "r\n\n", "text\n\n\n", [("f", [("s", 'He said "hi"\\n\n\ttab', True)])]),
    (False, "", "two calls", [("a", [("x", "[1, {\"k\": null}]", False)]), ("b", [("y", "", True)])]),
    (True, "<｜end▁of▁sentence", "<｜DSML", [("search", [("q", "<｜DS <thi </｜", True), ("opts", "{}", False)])]),
]


@pytest.mark.parametrize("case", range(len(HAND_WRITTEN)))
def test_hand_written_roundtrip_every_split(case):
    thinking, r, c, calls = HAND_WRITTEN[case]
    text = render(r, c, calls, thinking)
    msg = parsed(text, thinking=thinking)
    assert _parse_direct(text, thinking, _Schemas(None)) is not None
    assert msg == ParsedMessage(
        r, c, [ToolCall(ids(i), n, expected_arguments(p)) for i, (n, p) in enumerate(calls)],
        "tool_calls" if calls else "stop")
    for cut in range(len(text) + 1):
        assert streamed(text, [cut], thinking=thinking) == msg
    assert streamed(text, range(1, len(text)), thinking=thinking) == msg  # one character at a time


def test_generated_roundtrip_and_chunking_invariance():
    rng = random.Random(7)
    for thinking, r, c, calls, text in generated(40, seed=1):
        msg = parsed(text, thinking=thinking)
        assert _parse_direct(text, thinking, _Schemas(None)) is not None
        assert msg.reasoning_content == r and msg.content == c
        assert [(t.name, t.arguments) for t in msg.tool_calls] == [(n, expected_arguments(p)) for n, p in calls]
        assert msg.finish_reason == ("tool_calls" if calls else "stop")
        for p in calls:
            for _, v, s in p[1]:
                if not s:
                    json.loads(v)
        for cut in range(len(text) + 1):
            assert streamed(text, [cut], thinking=thinking) == msg
        for _ in range(15):
            cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 40))))
            events = stream(text, cuts, thinking=thinking)
            check_events(events)
            assert aggregate_events(events) == msg


def test_token_sized_chunks_of_a_long_completion():
    rng = random.Random(3)
    parts = [render(*rand_completion(rng, True)[:2], [], True)[:-len(EOS)]]
    calls = [c for _, _, _, cs, _ in generated(30, seed=5) for c in cs][:12]
    text = parts[0] + "".join(rand_text(rng, 12) for _ in range(30)) + render("", "", calls, thinking=False)
    msg = parsed(text)
    assert len(msg.tool_calls) == len(calls)
    for size in (1, 2, 3, 4, 7):
        assert streamed(text, range(size, len(text), size)) == msg


# ------------------------------------------------------------------------------------------------
# hold-back: only what may still be a marker


def feeds(chunks, **kw):
    sp = StreamParser(id_factory=ids, **kw)
    return [sp.feed(c) for c in chunks], sp


def test_hold_back_is_minimal():
    out, _ = feeds(["Hello wor", "ld <", "b", "\n", "\n", "y", "a</thi", "nk>b"])
    assert out[0] == [ReasoningDelta("Hello wor")]
    assert out[1] == [ReasoningDelta("ld ")]  # "<" may start </think>
    assert out[2] == [ReasoningDelta("<b")]
    assert out[3] == [] and out[4] == []  # "\n\n" may precede a tool-calls opener
    assert out[5] == [ReasoningDelta("\n\ny")]
    assert out[6] == [ReasoningDelta("a")]
    assert out[7] == [ContentDelta("b")]

    out, sp = feeds(["x<｜end▁of", "▁sentence｜>", "ignored"], thinking=False)
    assert out == [[ContentDelta("x")], [], []]
    assert sp.finish() == [Finish("stop")]

    out, _ = feeds(["a <thx", " <t", "hink", ">", "b"], thinking=False)
    assert out == [[ContentDelta("a <thx")], [ContentDelta(" ")], [], [], [ContentDelta("b")]]


def test_string_arguments_stream_as_they_arrive():
    head = f'{TOOL_CALLS_START}\n{INVOKE_START}get_weather">\n{PARAMETER_START}location" string="true">'
    out, sp = feeds([head, "Bei", "jing", '"q', f"{PARAMETER_END}\n", f"{INVOKE_END}\n{TOOL_CALLS_END}{EOS}"],
                    thinking=False)
    assert out[0] == [ToolCallStart(0, "call_0", "get_weather"), ToolCallArgumentsDelta(0, '{"location": "')]
    assert out[1] == [ToolCallArgumentsDelta(0, "Bei")]
    assert out[2] == [ToolCallArgumentsDelta(0, "jing")]
    assert out[3] == [ToolCallArgumentsDelta(0, '\\"q')]
    assert out[4] == [ToolCallArgumentsDelta(0, '"')]
    assert out[5] == [ToolCallArgumentsDelta(0, "}"), ToolCallEnd(0, ())]
    assert sp.finish() == [Finish("tool_calls")]


# ------------------------------------------------------------------------------------------------
# edge cases


def invoke(name, *params):
    lines = "".join(f'{PARAMETER_START}{k}" string="{s}">{v}{PARAMETER_END}\n' for k, v, s in params)
    return f'{INVOKE_START}{name}">\n{lines}{INVOKE_END}'


def block(*invokes):
    return f"{TOOL_CALLS_START}\n" + "\n".join(invokes) + f"\n{TOOL_CALLS_END}"


def agree(text, **kw):
    """parse_completion, after checking that every split point and char-by-char streaming agree."""
    msg = parsed(text, **kw)
    for cut in range(len(text) + 1):
        assert streamed(text, [cut], **kw) == msg, cut
    events = stream(text, range(1, len(text)), **kw)
    check_events(events)
    assert aggregate_events(events) == msg
    check_clean(msg)
    return msg


W = invoke("get_weather", ("location", "Paris", "true"))


def test_missing_think_end_before_tool_calls():
    for sep in ("\n\n", "", "\n"):
        msg = agree("Let me check." + sep + block(W) + EOS)
        assert msg.reasoning_content == "Let me check." + ("\n" if sep == "\n" else "")
        assert msg.content == ""
        assert [(c.name, c.arguments) for c in msg.tool_calls] == [("get_weather", '{"location": "Paris"}')]
        assert msg.finish_reason == "tool_calls"
    msg = agree("thinking" + TOOL_CALLS_SEPARATOR + block(W) + "\nThen text." + EOS)
    assert (msg.reasoning_content, msg.content, len(msg.tool_calls)) == ("thinking", "\nThen text.", 1)


def test_reasoning_without_think_end_and_chat_mode():
    msg = agree("only reasoning" + EOS)
    assert (msg.reasoning_content, msg.content, msg.finish_reason) == ("only reasoning", "", "stop")
    msg = agree("cut off reasoning")
    assert (msg.reasoning_content, msg.content, msg.finish_reason) == ("cut off reasoning", "", "length")
    msg = agree("plain answer" + EOS, thinking=False)
    assert (msg.reasoning_content, msg.content) == ("", "plain answer")
    msg = agree("<think>r</think>a" + EOS, thinking=False)  # chat mode: think markup is deleted
    assert msg.content == "ra"


def test_tool_calls_block_anywhere_in_content_and_several_blocks():
    msg = agree("r" + THINK_END + "Sure" + block(W) + "\n\n" + block(W, W) + " \n" + EOS)
    assert msg.content == "Sure" and len(msg.tool_calls) == 3
    assert [c.id for c in msg.tool_calls] == ["call_0", "call_1", "call_2"]


def test_whitespace_between_tags_is_free():
    text = (f'r{THINK_END}{TOOL_CALLS_START}  {INVOKE_START}f">{PARAMETER_START}a" string="false" >1'
            f"{PARAMETER_END}\t\r\n{PARAMETER_START}b\">x{PARAMETER_END}{INVOKE_END}{TOOL_CALLS_END}  {EOS}")
    msg = agree(text)
    assert msg.content == "" and msg.tool_calls[0].arguments == '{"a": 1, "b": "x"}'
    assert msg.tool_calls[0].warnings == ('parameter \'b\': string="false" value is not valid JSON; kept as a string',)


def test_malformed_dsml_goes_to_content():
    msg = agree("r" + THINK_END + "Hi\n\n" + TOOL_CALLS_START + "\nhello\n" + TOOL_CALLS_END + EOS)
    assert msg.content == "Hi\n\n<tool_calls>\nhello\n</tool_calls>"
    assert msg.tool_calls == [] and msg.finish_reason == "stop"

    bad_name = f'{TOOL_CALLS_START}\n{INVOKE_START}get\nweather">\n{INVOKE_END}\n{TOOL_CALLS_END}'
    msg = agree("r" + THINK_END + bad_name + EOS)
    assert msg.tool_calls == []
    assert msg.content == '<tool_calls>\n<invoke name="get\nweather">\n</invoke>\n</tool_calls>'

    # malformed after a call started: the call is closed, the rest is content
    text = ("r" + THINK_END + f'{TOOL_CALLS_START}\n{W}\n{INVOKE_START}g">\n'
            f'{PARAMETER_START}k" string="maybe">v{PARAMETER_END}\n{INVOKE_END}\n{TOOL_CALLS_END}' + EOS)
    msg = agree(text)
    assert [(c.name, c.arguments) for c in msg.tool_calls] == [("get_weather", '{"location": "Paris"}'), ("g", "{}")]
    assert msg.tool_calls[1].warnings == ("malformed DSML in the call; the rest went to content",)
    assert msg.content == '\n<parameter name="k" string="maybe">v</parameter>\n</invoke>\n</tool_calls>'
    assert msg.finish_reason == "tool_calls"

    # a parameter not closed before the end of its call
    text = "r" + THINK_END + f'{TOOL_CALLS_START}\n{INVOKE_START}g">\n{PARAMETER_START}k" string="true">v\n' \
        f"{INVOKE_END}\n{TOOL_CALLS_END}" + EOS
    msg = agree(text)
    assert msg.tool_calls[0].arguments == '{"k": "v\\n"}' and msg.content == ""
    assert msg.tool_calls[0].warnings == ("missing parameter end tag before the end of the call",)


def test_truncated_inside_dsml():
    full = "r" + THINK_END + "c" + TOOL_CALLS_SEPARATOR + block(
        invoke("get_weather", ("location", "Beijing", "true"), ("days", "[1, 2]", "false")), W) + EOS
    msg = parsed(full)
    assert len(msg.tool_calls) == 2
    rng = random.Random(5)
    for cut in range(len(full) + 1):  # every truncation point: never raises, always clean
        prefix = full[:cut]
        m = parsed(prefix)
        check_clean(m)
        for cuts in (range(1, cut), sorted(rng.sample(range(1, cut), min(cut - 1, 8))) if cut > 1 else []):
            events = stream(prefix, cuts)
            check_events(events)
            assert aggregate_events(events) == m
        assert m.finish_reason == ("length" if cut < len(full) else "tool_calls")
        if cut >= len("r" + THINK_END):
            assert m.reasoning_content == "r"
            # the content, then held text flushed as text: a piece of the opener, its reserved part deleted
            assert "c\n\n<｜DSML".startswith(m.content) or "c\n\n<tool_calls>".startswith(m.content)

    def cut_after(s):
        return full[: full.index(s) + len(s)]

    m = agree(cut_after(">Bei"))  # inside a streamed string: kept, closed
    assert [(c.name, c.arguments) for c in m.tool_calls] == [("get_weather", '{"location": "Bei"}')]
    assert m.tool_calls[0].warnings == ("incomplete: the output ended inside the call",)
    m = agree(cut_after(">Beijing</｜DSML｜param"))  # a cut closing tag is not value text
    assert m.tool_calls[0].arguments == '{"location": "Beijing"}'
    m = agree(cut_after("[1, 2"))  # inside a typed value: dropped
    assert m.tool_calls[0].arguments == '{"location": "Beijing"}'
    assert m.tool_calls[0].warnings == ("parameter 'days' incomplete at the end of the output; dropped",
                                        "incomplete: the output ended inside the call")
    m = agree(cut_after('name="get_wea'))  # inside a call header: no call
    assert m.tool_calls == [] and m.content == "c" and m.finish_reason == "length"
    m = agree(cut_after("c\n\n<｜DSML｜tool_ca"))  # a partial opener is text: reserved part deleted
    assert m.content == "c\n\n<｜DSML｜tool_ca".replace(DSML, "") or m.content == "c\n\n<tool_ca"
    # EOS inside a block closes like the end of the output, with finish "tool_calls"
    m = agree(cut_after('string="true">Bei') + EOS)
    assert m.tool_calls[0].arguments == '{"location": "Bei"}' and m.finish_reason == "tool_calls"
    assert parsed(cut_after(">Bei"), finish_reason="stop").finish_reason == "tool_calls"


def test_unknown_tools_are_reported():
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"location": {"type": "string"}}}}}]
    text = "r" + THINK_END + block(W, invoke("get_time", ("tz", "UTC", "true"))) + EOS
    msg = agree(text, tools=tools)
    assert [c.warnings for c in msg.tool_calls] == [(), ("unknown tool 'get_time'",)]
    assert msg.tool_calls[1].arguments == '{"tz": "UTC"}'
    assert all(c.warnings == () for c in agree(text).tool_calls)  # no tools given: nothing is unknown


def test_duplicate_parameter_keeps_the_first():
    msg = agree(block(invoke("f", ("a", "1", "false"), ("a", "2", "true"), ("b", "x", "true"))) + EOS, thinking=False)
    assert msg.tool_calls[0].arguments == '{"a": 1, "b": "x"}'
    assert msg.tool_calls[0].warnings == ("duplicate parameter 'a' ignored",)


SCHEMA_TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
    "s": {"type": "string"},
    "i": {"type": "integer"},
    "n": {"type": "number"},
    "b": {"type": "boolean"},
    "a": {"type": "array", "items": {"type": "integer"}},
    "o": {"type": "object"},
    "u": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
    "e": {"enum": ["x", "y"]},
    "z": {"type": ["integer", "null"]},
}}}}]


@pytest.mark.parametrize("key, value, string, arguments, warned", [
    ("s", "Paris", "false", '"Paris"', False),  # not JSON, schema string: coerced
    ("s", "123", "false", '"123"', False),  # JSON but not a string, schema string: coerced
    ("s", '"Paris"', "false", '"Paris"', False),  # a JSON string: verbatim
    ("x", "Paris", "false", '"Paris"', True),  # no schema: kept as a string, with a warning
    ("x", "NaN", "false", '"NaN"', True),  # NaN is not JSON
    ("x", " [1,2] ", "false", " [1,2] ", False),  # valid JSON: verbatim (as the official parser)
    ("i", "5", "true", "5", False),
    ("i", "five", "true", '"five"', False),
    ("i", "3.5", "true", '"3.5"', False),  # not an integer: stays a string
    ("n", "3.5", "true", "3.5", False),
    ("n", "7", "true", "7", False),
    ("b", "true", "true", "true", False),
    ("a", "[1,2]", "true", "[1, 2]", False),
    ("o", '{"k": "v"}', "true", '{"k": "v"}', False),
    ("o", "[1]", "true", '"[1]"', False),
    ("u", "5", "true", '"5"', False),  # a string is allowed: no coercion
    ("e", "x", "false", '"x"', False),  # enum of strings = string
    ("z", "null", "true", "null", False),
    ("s", "5", "true", '"5"', False),
])
def test_schema_coercion(key, value, string, arguments, warned):
    text = block(invoke("f", (key, value, string))) + EOS
    msg = agree(text, thinking=False, tools=SCHEMA_TOOLS)
    call = msg.tool_calls[0]
    assert call.arguments == "{" + json.dumps(key) + ": " + arguments + "}"
    assert bool(call.warnings) == warned


def test_text_after_eos_is_ignored_and_finish_is_once():
    sp = StreamParser(thinking=False, id_factory=ids)
    events = sp.feed("done" + EOS + "more <think> text")
    assert events == [ContentDelta("done")]
    assert sp.feed("and more") == []
    assert sp.finish("length") == [Finish("length")]  # the engine's reason is kept
    assert sp.finish() == [] and sp.feed("x") == []
    assert parsed("done" + EOS + "more", thinking=False).content == "done"


def test_default_ids_are_unique():
    a = [new_tool_call_id(0) for _ in range(200)]
    assert len(set(a)) == 200 and all(x.startswith("call_00_") and len(x) == 30 for x in a)
    msg = parse_completion(block(W, W) + EOS, thinking=False)
    assert msg.tool_calls[0].id != msg.tool_calls[1].id and msg.tool_calls[1].id.startswith("call_01_")
    assert msg.to_openai()["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"location": "Paris"}'}


def test_reserved_strings_never_leak():
    assert scrub("<</think>think>") == ""
    msg = agree("a<" + THINK_START + "b" + THINK_END + "c<</think>think>d" + DSML + "｜DS" + DSML + "ML｜" + EOS)
    assert (msg.reasoning_content, msg.content) == ("a<b", "cd")
    msg = agree(block(invoke("f<think>", ("k" + DSML, "v</think>", "true"))) + EOS, thinking=False)
    check_clean(msg)


FUZZ_PIECES = [*RESERVED, TOOL_CALLS_START, TOOL_CALLS_END, INVOKE_START, INVOKE_END, PARAMETER_START, PARAMETER_END,
               '">', '" string="true">', '" string="false">', '"', ">", "\n", "\n\n", " ", "f", "get_weather", "k",
               "1", "[", "]", "x", "北京", "<", "｜", "<｜", "</", "think>", "｜DSML", "ML｜", "▁sentence｜>", "\\",
               "<｜end▁of", "NaN", "{}", "true"]


def test_fuzz_never_raises_and_agrees():
    rng = random.Random(11)
    for k in range(400):
        text = "".join(rng.choice(FUZZ_PIECES) for _ in range(rng.randint(0, 30)))
        thinking = k % 2 == 0
        tools = SCHEMA_TOOLS if k % 3 == 0 else None
        msg = parsed(text, thinking=thinking, tools=tools)
        check_clean(msg)
        for _ in range(4):
            cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 12)))) if text else []
            events = stream(text, cuts, thinking=thinking, tools=tools)
            check_events(events)
            assert aggregate_events(events) == msg


def mutate(rng, text):
    """A near-miss of a well-formed completion: a few pieces deleted, duplicated or inserted."""
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(text) + 1)
        j = min(len(text), i + rng.randint(0, 12))
        op = rng.randrange(3)
        if op == 0:
            text = text[:i] + text[j:]
        elif op == 1:
            text = text[:j] + text[i:j] + text[j:]
        else:
            text = text[:i] + rng.choice(FUZZ_PIECES) + text[i:]
    return text


def test_fuzz_near_misses_of_well_formed_completions():
    rng = random.Random(13)
    for k, (thinking, _, _, _, text) in enumerate(generated(150, seed=2)):
        text = mutate(rng, text)
        tools = SCHEMA_TOOLS if k % 2 else None
        msg = parsed(text, thinking=thinking, tools=tools)
        check_clean(msg)
        for _ in range(3):
            cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 30))))
            events = stream(text, cuts, thinking=thinking, tools=tools)
            check_events(events)
            assert aggregate_events(events) == msg
