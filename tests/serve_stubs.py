"""Test doubles for the server: a scripted engine that plugs into `ChatService`, completion-text builders in
the official format, and a live uvicorn server on a free loopback port.

`ScriptedEngine` stands in for `dsv4.engine.AsyncEngine`: `generate(prompt_ids, params)` returns a stream of
`RequestOutput`s that writes a scripted completion token by token (the real tokenizer's ids of the text, then
EOS), so the whole serving path above the engine (ChatService's detokenizer, stop strings, StreamParser,
usage, the protocol renderers, SSE) runs for real. It honours `max_tokens` ("length"), `stop_token_ids`,
`logprobs` (fixed values) and aborts, and records requests so tests can check what reached the engine.

A reply is completion text as the model would write it after the prompt: in thinking mode it starts with the
reasoning and `</think>`; build it with `think(...)`, `tool_calls(...)`. `replies` is a callable
(prompt text -> completion text) or a list used in order (the last one repeats).

    engine = ScriptedEngine(tokenizer, replies=[think("Let me see.", "Hello!")])
    service = ChatService(engine, tokenizer, ...)
    with live_server(create_app(ServeContext(service, config))) as base_url: ...
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dsv4.chat.encoding import render_tool_calls
from dsv4.chat.format import THINK_END, THINK_START, TOOL_CALLS_SEPARATOR
from dsv4.chat.tokenizer import Tokenizer
from dsv4.engine.engine import RequestOutput
from dsv4.engine.sampling import SamplingParams, TokenLogprobs
from dsv4.serve.background import serve_in_thread


# ---------------------------------------------------------------- completion texts
def think(reasoning: str, answer: str) -> str:
    """A thinking-mode completion: reasoning, `</think>`, the answer."""
    return f"{reasoning}{THINK_END}{answer}"


def tool_calls(calls: Sequence[Mapping[str, Any]], content: str = "", reasoning: str | None = None) -> str:
    """A completion that calls tools (`calls`: `{"name", "arguments": dict}`), in the official DSML layout;
    with `reasoning` it is a thinking-mode completion."""
    text = (content + TOOL_CALLS_SEPARATOR if content else "") + render_tool_calls(calls)
    return text if reasoning is None else f"{reasoning}{THINK_END}{text}"


def thinking_prompt(prompt: str) -> bool:
    """Whether the prompt asks for thinking (ends with `<think>`)."""
    return prompt.endswith(THINK_START)


def smart_reply(prompt: str) -> str:
    """A default script: a tool call to `get_weather` when tools are offered and no result came back yet,
    an answer that quotes the tool result once it has, else a greeting; with reasoning in thinking mode."""
    if "<tool_result>" in prompt:
        result = prompt.rsplit("<tool_result>", 1)[1].split("</tool_result>", 1)[0]
        text = f"The tool said: {result}"
    elif "get_weather" in prompt:
        text = tool_calls([{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}},
                           {"name": "get_weather", "arguments": {"city": "Tokyo", "days": 1}}])
    else:
        text = "Hello! How can I help you today?"
    return f"The user wants something. I will answer.{THINK_END}{text}" if thinking_prompt(prompt) else text


# ---------------------------------------------------------------- the engine double
class ScriptedStream:
    """One scripted request's updates; like `RequestStream`, closing it early aborts the request."""

    def __init__(self, owner: ScriptedEngine, rid: int, prompt: list[int], params: SamplingParams,
                 tokens: list[int]) -> None:
        self.request_id = rid
        self._owner, self._prompt, self._params, self._tokens = owner, prompt, params, tokens
        self._i = 0
        self._done = False

    def __aiter__(self) -> ScriptedStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            await asyncio.sleep(self._owner.delay)
        except BaseException:
            self.close()
            raise
        p, tok = self._params, self._tokens[self._i]
        self._i += 1
        reason = None
        if tok in p.stop_token_ids or (tok == self._owner.eos_id and not p.ignore_eos):
            reason = "stop"
        elif self._i >= p.max_tokens or self._i >= len(self._tokens):
            reason = "length"
        lp = None
        if p.logprobs is not None:
            others = [t for t in range(5, 5 + p.logprobs + 1) if t != tok]
            top = [(tok, -0.25)] + [(t, -2.0 - k) for k, t in enumerate(others)]
            lp = TokenLogprobs(tok, -0.25, top[:p.logprobs])
        if reason is not None:
            self._finish()
        return RequestOutput(self.request_id, [tok], [lp], reason is not None, reason, len(self._prompt), self._i,
                             self._owner.cached_tokens(self._prompt))

    def _finish(self) -> None:
        self._done = True
        self._owner.active.discard(self.request_id)

    def close(self) -> None:
        if not self._done:
            self._finish()
            self._owner.aborted.append(self.request_id)

    async def aclose(self) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


class ScriptedEngine:
    """An `AsyncEngine` double (see the module docstring). `delay`: seconds per token; `cache_hit`: the
    prompt tokens reported as read from the prefix cache (a function of the prompt ids, default 0).
    `stream_class` makes the streams (a subclass can inject failures)."""

    stream_class = ScriptedStream

    def __init__(self, tokenizer: Tokenizer, replies: Callable[[str], str] | Sequence[str] = smart_reply,
                 delay: float = 0.0, cache_hit: Callable[[list[int]], int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_id
        self.replies = replies
        self.delay = delay
        self.cached_tokens = cache_hit or (lambda prompt: 0)
        self.requests: list[tuple[list[int], SamplingParams]] = []
        self.active: set[int] = set()
        self.aborted: list[int] = []
        self._ids = itertools.count()

    @property
    def replies(self) -> Callable[[str], str] | Sequence[str]:
        return self._replies

    @replies.setter
    def replies(self, value: Callable[[str], str] | Sequence[str]) -> None:
        """Setting a new script starts it from its first reply."""
        self._replies, self._turn = value, 0

    def reply_for(self, prompt_text: str) -> str:
        if callable(self.replies):
            return self.replies(prompt_text)
        reply = self.replies[min(self._turn, len(self.replies) - 1)]
        self._turn += 1
        return reply

    def check_request(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> None:
        """The stub accepts every request (the real engine's limits are tested with the real engine)."""

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> ScriptedStream:
        params = params or SamplingParams()
        prompt = list(prompt_ids)
        if not prompt:
            raise ValueError("the prompt needs at least one token")
        text = self.reply_for(self.tokenizer.decode(prompt))
        tokens = self.tokenizer.encode(text) + [self.eos_id]
        rid = next(self._ids)
        self.requests.append((prompt, params))
        self.active.add(rid)
        return self.stream_class(self, rid, prompt, params, tokens)


def grammar_accepts(params: SamplingParams, tokenizer: Tokenizer, text: str) -> bool:
    """Whether the request's grammar (the service's constraint; the scripted engine does not apply it) allows
    `text` as the whole completion, EOS included."""
    state = params.grammar.start()
    return all(state.consume(t) for t in tokenizer.encode(text) + [tokenizer.eos_id])


# ---------------------------------------------------------------- a live server
live_server = serve_in_thread  # the app on a free loopback port in a background thread; yields its base URL
