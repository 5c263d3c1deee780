"""Replays of the requests the real Claude Code sends, against a live server.

The bodies under `fixtures/claude_code/` were recorded from claude-cli 2.1.197 (`claude -p "list the files here"`,
then `--continue`) pointed at a recording stub: the first turn, the turn after a Bash `tool_use` was answered,
and the first request of a continued session. Local paths, device and session ids were replaced. They carry
what the client really sends: `model: claude-opus-4-8`, a system message as `messages[1]`, 24 custom tools,
`thinking: {"type": "adaptive"}`, `output_config.effort`, `context_management` with `clear_thinking_20251015`,
`metadata.user_id`, `cache_control` on blocks, `max_tokens: 64000` and `?beta=true` on the path.

The server is the real app and `ChatService` over the scripted engine (so the V4 encoder, tokenizer, DSML
parser and SSE renderer run for real; only the model is scripted): it writes a Bash call while no tool result is
in the prompt, then an answer. The recording stub signed its thinking block "SIG"; a replay re-signs the
block's (empty, display-omitted style) text with this server's key, as the client would send back a block this
server wrote.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from serve_stubs import ScriptedEngine, live_server, thinking_prompt, tool_calls

from dsv4.chat.format import THINK_END
from dsv4.chat.tokenizer import Tokenizer
from dsv4.serve.app import create_app
from dsv4.serve.context import ServeConfig, ServeContext
from dsv4.serve.protocols import anthropic as A
from dsv4.serve.service import ChatService

FIXTURES = Path(__file__).parent / "fixtures" / "claude_code"
KEY = "sk-replay"
SIGN_KEY = b"replay signature key"
HEADERS = {"x-api-key": KEY}


def fixture(name: str) -> dict:
    """A recorded request ({"path", "headers", "body"}), its thinking signatures re-signed under SIGN_KEY."""
    rec = json.loads((FIXTURES / name).read_text())
    for m in rec["body"]["messages"]:
        for b in m["content"] if isinstance(m["content"], list) else ():
            if b.get("type") == "thinking":
                b["signature"] = A.sign_thinking(b["thinking"], SIGN_KEY)
    return rec


def agent_reply(prompt: str) -> str:
    """The scripted model: a Bash call until a tool result is in the prompt's last user turn, then an answer."""
    last = prompt.rsplit("<｜User｜>", 1)[-1]
    text = ("There is one entry: home." if "<tool_result>" in last
            else tool_calls([{"name": "Bash", "arguments": {"command": "ls", "description": "List files"}}]))
    return f"I should look at the directory.{THINK_END}{text}" if thinking_prompt(prompt) else text


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.bundled()


@pytest.fixture
def serve(tokenizer):
    stack = []

    def start(delay: float = 0.0):
        engine = ScriptedEngine(tokenizer, replies=agent_reply, delay=delay)
        cfg = ServeConfig(served_model_names=["deepseek-v4-flash"], api_keys=[KEY], max_context=131072,
                          max_output_tokens=65536, signature_key=SIGN_KEY)
        service = ChatService(engine, tokenizer, cfg.served_model_names, max_context=cfg.max_context,
                              max_output_tokens=cfg.max_output_tokens)
        cm = live_server(create_app(ServeContext(service, cfg)))
        stack.append(cm)
        return cm.__enter__(), engine

    yield start
    for cm in reversed(stack):
        cm.__exit__(None, None, None)


def sse_events(text: str) -> list[tuple[str, dict]]:
    events, name = [], None
    for line in text.splitlines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[6:])))
    return events


def check_sequence(events: list[tuple[str, dict]]) -> dict:
    """The event grammar clients parse: message_start, blocks opened / deltas / closed in index order,
    message_delta, message_stop; every `data.type` equals its `event:` name. Returns the final message_delta."""
    names = [n for n, _ in events]
    assert all(d["type"] == n for n, d in events), names
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"], names
    open_index, next_index = None, 0
    for name, data in events:
        if name == "content_block_start":
            assert open_index is None and data["index"] == next_index
            open_index, next_index = data["index"], next_index + 1
        elif name == "content_block_delta":
            assert data["index"] == open_index
        elif name == "content_block_stop":
            assert data["index"] == open_index
            open_index = None
    assert open_index is None and "error" not in names
    return events[-2][1]


def delta_text(events: list, kind: str, field: str) -> str:
    """The concatenated `field` of a stream's content_block_delta events of delta type `kind`."""
    return "".join(d["delta"][field] for n, d in events if n == "content_block_delta" and d["delta"]["type"] == kind)


def post(url: str, rec: dict, **changes) -> httpx.Response:
    headers = {**rec["headers"], **HEADERS}
    return httpx.post(url + rec["path"], json={**rec["body"], **changes}, headers=headers, timeout=60)


def stream_turn(url: str, rec: dict) -> tuple[list[tuple[str, dict]], dict]:
    """A recorded request streamed: it must answer 200 with a well-formed event sequence; (events, message_delta)."""
    r = post(url, rec)
    assert r.status_code == 200, r.text
    events = sse_events(r.text)
    return events, check_sequence(events)


def test_first_turn_streams_a_tool_call(serve, tokenizer):
    """Claude Code's first request (system message as messages[1], 24 tools, adaptive thinking): 200, a
    well-formed stream with a signed thinking block and a Bash tool_use; the environment text reached the prompt
    ahead of the user's turn, which ends in the assistant's opening."""
    url, engine = serve()
    rec = fixture("first_turn.json")
    events, final = stream_turn(url, rec)
    assert final["delta"]["stop_reason"] == "tool_use"
    assert final["context_management"] == {"applied_edits": []}  # keep: "all"
    starts = [d["content_block"] for n, d in events if n == "content_block_start"]
    assert [b["type"] for b in starts] == ["thinking", "tool_use"] and starts[1]["name"] == "Bash"
    sig = next(d["delta"]["signature"] for n, d in events if n == "content_block_delta"
               and d["delta"]["type"] == "signature_delta")
    assert A.verify_signature("I should look at the directory.", sig, SIGN_KEY)
    args = delta_text(events, "input_json_delta", "partial_json")
    assert json.loads(args) == {"command": "ls", "description": "List files"}
    prompt = tokenizer.decode(engine.requests[0][0])
    env = rec["body"]["messages"][1]["content"]
    assert env[:40] in prompt and prompt.index(env[:40]) < prompt.rindex("<｜User｜>")
    assert prompt.endswith("list the files here<｜Assistant｜><think>")


def test_tool_result_round_trip(serve):
    """The turn after the client ran Bash: thinking + tool_use sent back, the tool_result with cache_control;
    the answer is a text block and end_turn. Non-streaming too (the same body with stream false)."""
    url, engine = serve()
    rec = fixture("tool_result_turn.json")
    events, final = stream_turn(url, rec)
    assert final["delta"]["stop_reason"] == "end_turn"
    text = delta_text(events, "text_delta", "text")
    assert text == "There is one entry: home."
    r = post(url, rec, stream=False)
    assert r.status_code == 200, r.text
    msg = r.json()
    assert msg["type"] == "message" and msg["model"] == rec["body"]["model"]
    assert [b["type"] for b in msg["content"]] == ["thinking", "text"] and msg["stop_reason"] == "end_turn"


def test_continued_session_and_clear_thinking(serve, tokenizer):
    """`--continue`'s first request (two assistant turns replayed); with the edit keeping one thinking turn the
    reply reports what it cleared. A forged signature on a kept turn is Anthropic's 400, never a 5xx."""
    url, engine = serve()
    rec = fixture("continued_session.json")
    stream_turn(url, rec)
    keep_none = {"edits": [{"type": "clear_thinking_20251015", "keep": {"type": "thinking_turns", "value": 0}}]}
    r = post(url, rec, stream=False, context_management=keep_none)
    assert r.status_code == 200, r.text
    assert r.json()["context_management"]["applied_edits"][0]["cleared_thinking_turns"] == 1
    body = json.loads(json.dumps(rec["body"]))
    body["messages"][2]["content"][0]["signature"] = "SIG"
    r = httpx.post(url + rec["path"], json=body, headers={**rec["headers"], **HEADERS}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "messages.2.content.0" in r.json()["error"]["message"]


def test_interrupted_stream_frees_the_request(serve):
    """The client closes the stream mid-way (Claude Code's Esc): the engine request is aborted and the server
    keeps serving."""
    url, engine = serve(delay=0.02)
    rec = fixture("first_turn.json")
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", url + rec["path"], json=rec["body"], headers={**rec["headers"], **HEADERS}) as r:
            assert r.status_code == 200
            names = []
            for line in r.iter_lines():
                if line.startswith("event: "):
                    names.append(line[7:])
                if names.count("content_block_delta") >= 2:
                    break
    deadline = time.monotonic() + 10
    while engine.aborted != [0] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.aborted == [0] and not engine.active
    engine.delay = 0.0
    stream_turn(url, rec)


def test_count_tokens(serve, tokenizer):
    """count_tokens on the recorded body (without the fields it does not take): the prompt's token count, the
    same number the stream's message_start reports."""
    url, engine = serve()
    rec = fixture("tool_result_turn.json")
    body = {k: v for k, v in rec["body"].items() if k not in ("max_tokens", "stream", "metadata")}
    r = httpx.post(url + "/v1/messages/count_tokens?beta=true", json=body, headers={**rec["headers"], **HEADERS},
                   timeout=60)
    assert r.status_code == 200, r.text
    n = r.json()["input_tokens"]
    r = post(url, rec)
    start = sse_events(r.text)[0][1]
    assert start["message"]["usage"]["input_tokens"] == n == len(engine.requests[0][0])


def test_tool_schemas_compile_leniently_response_format_strictly(tokenizer):
    """A tool parameter using a keyword llguidance lacks (`propertyNames`, in Claude Code's TaskCreate) compiles,
    unenforced; the same schema as a response_format is still a 400 naming the keyword."""
    from dsv4.serve.grammars import GrammarCompiler, GrammarSpec
    from dsv4.serve.request import RequestError
    schema = {"type": "object", "properties": {"metadata": {"type": "object", "propertyNames": {"type": "string"}}}}
    tool = {"type": "function", "function": {"name": "TaskCreate", "parameters": schema}}
    compiler = GrammarCompiler(tokenizer)
    assert compiler(GrammarSpec(thinking=True, response_format=None, tools=[tool], tool_choice="auto",
                                parallel_tool_calls=True)) is not None
    with pytest.raises(RequestError) as info:
        compiler(GrammarSpec(thinking=False, response_format=schema, tools=None, tool_choice="none",
                             parallel_tool_calls=True))
    assert info.value.status == 400 and "propertyNames" in info.value.message
