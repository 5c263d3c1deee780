"""`ChatService`: the real `ChatBackend`, chat requests over an `AsyncEngine` and the V4 tokenizer.

Per request: validate and encode (`encode`), check the token limits, map the settings to `SamplingParams`,
start `n` engine requests, and turn each one's tokens into parser events (incremental detokenizer -> stop
strings -> `StreamParser`), merged into one stream of `ChoiceEvent`s, then one `Usage` with its cost.

Decisions (serving.md 1.2, 1.4, 6):
* modes: "non-think" renders the chat prompt (`</think>`), "think-high" the thinking prompt, "think-max"
  the thinking prompt with the max-effort preamble. Thinking modes ignore temperature, top_p, top_k, min_p
  and the penalties (DeepSeek ignores them without error in thinking mode) and sample with the model's
  recommended setting, `thinking_sampling` (V4: T = 1, top_p = 1; a model directory's generation_config.json
  may say otherwise, e.g. greedy for the demo model); `seed` is honoured in every mode.
* the completion is constrained by a grammar (`dsv4.chat.grammars`, compiled by `dsv4.engine.constraint`), in
  every mode, after the reasoning (which stays free): `response_format` `json_object` / `json_schema` -> JSON
  valid for it; `tool_choice` "required" / a named function -> a DSML call (of that function) with arguments
  valid for the tool's schema; "auto" with tools -> text that may end in calls of the declared tools only;
  "none" or no tools -> the tools are not rendered and no tool-call markup can be written. DeepSeek refuses
  required / named tool_choice in thinking mode; here the model reasons, then must call, as vLLM and SGLang do.
  A prefix continuation (a final assistant message with `prefix: true`) is not constrained: it starts mid-turn.
* reasoning retention is the encoder's rule (reasoning before the last user turn dropped unless tools are
  defined); with `strict_reasoning` a thinking-mode assistant turn with tool calls but no reasoning_content
  is a 400 with DeepSeek's message.
* limits: prompt + max_tokens <= max_context and max_tokens <= max_output_tokens, else 400 naming the numbers;
  without max_tokens the default is the smaller of max_output_tokens and what the context leaves.
* stop strings are matched in the completion text as written (reasoning, content and markup), the text before
  the first one is kept, finish_reason "stop", and that choice's engine request is aborted.
* usage: prompt tokens once per request, completion tokens summed over the choices, reasoning tokens those
  before `</think>`, cached tokens from the engine's prefix cache report of the first choice.
* legacy completions (OpenAI's and vLLM's rules): `prompt` is a string, strings, token ids or lists of token ids,
  one `_Plan` per prompt, `n` choices each, numbered prompt index * n + i, usage summed over the prompts;
  `echo` starts each choice with its prompt's text (token ids decoded) and, with `logprobs`, the prompt tokens'
  logprobs (the engine's prompt logprobs; the first token has none); `max_tokens` 0 (with echo only) returns
  the echo alone, from an engine request that scores the prompt and generates nothing.

`generate` validates before it returns (its async iterator has not started), so every client mistake is
a RequestError before any output; closing the iterator aborts every engine request of the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..chat.encoding import EncodingError, encode_messages
from ..chat.events import ContentDelta, Event, Finish
from ..chat.streaming import StreamParser
from ..chat.tokenizer import Tokenizer
from ..engine.constraint import Grammar
from ..engine.sampling import MAX_LOGPROBS, SamplingParams, TokenLogprobs
from .body import lone_surrogate
from .grammars import GrammarCompiler, GrammarSpec
from .prices import PriceTable
from .request import REASONING_MODES, ChatRequest, ChoiceEvent, CompletionRequest, RequestError, Usage

TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TOOLS = 128
MAX_STOPS = 16
MAX_N = 16
MAX_COMPLETION_CHOICES = 128  # prompts x n of one legacy completions request (each choice is an engine request)
REASONING_PASSBACK = "The `reasoning_content` in the thinking mode must be passed back to the API."


@dataclass(frozen=True)
class _Encoded:
    """A chat request rendered: its prompt and what its completion may be."""

    prompt: str
    thinking: bool
    tools: list[dict[str, Any]] | None  # the tools the model may call (None: none may be called)
    tool_choice: str | dict[str, Any]
    response_format: dict[str, Any] | None  # a JSON schema, or {"type": "json_object"}
    parallel_tool_calls: bool
    continuation: bool  # the prompt ends inside an assistant turn (prefix: true)


@dataclass
class _Plan:
    """A validated request ready for the engine."""

    model: str
    prompt_ids: list[int]
    params: list[SamplingParams]  # one per choice
    make_parser: Callable[[], Any]
    stops: list[str]
    thinking: bool
    raw: bool = False  # legacy completions: special tokens (EOS) are not text
    echo: str | None = None  # legacy completions with echo: the prompt text each choice starts with


def _is_token(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _prompt_list(prompt: Any) -> list[Any]:
    """A legacy `prompt` in any of OpenAI's four forms as a list of prompts (each a string or token ids)."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_token(t) for t in prompt)):
        return [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise RequestError(400, "prompt must be a non-empty string, list of strings, list of token ids or list of "
                           "lists of token ids", param="prompt")
    return prompt


class _RawParser:
    """The parser of legacy completions: the text is the content."""

    def feed(self, text: str) -> list[Event]:
        return [ContentDelta(text)] if text else []

    def finish(self, reason: str | None = None) -> list[Event]:
        return [Finish(reason or "stop")]


class ChatService:
    """A `ChatBackend` over `engine` (an `AsyncEngine`, or anything with its `generate(prompt_ids, params)`)
    and `tokenizer`. `max_context` defaults to the engine's `max_seq_len`."""

    def __init__(self, engine: Any, tokenizer: Tokenizer, model_names: Sequence[str], *,
                 prices: PriceTable | None = None, max_context: int | None = None, max_output_tokens: int = 1024,
                 strict_reasoning: bool = False, thinking_sampling: Mapping[str, float] | None = None) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_names = list(model_names)
        self.prices = prices or PriceTable()
        core = getattr(engine, "engine", None)
        limit = getattr(core, "max_seq_len", None)
        self.max_context = min(x for x in (max_context, limit) if x is not None) if (max_context or limit) else 4096
        self.max_output_tokens = max_output_tokens
        self.strict_reasoning = strict_reasoning
        self.thinking_sampling = dict(thinking_sampling or {"temperature": 1.0, "top_p": 1.0})
        model = getattr(getattr(engine, "engine", None), "model", None)
        self.grammars = GrammarCompiler(tokenizer, model.args.vocab_size if model is not None else None)

    def engine_stats(self) -> Any:
        """The engine's `EngineStats` (None for an engine without them, e.g. a test double)."""
        core = getattr(self.engine, "engine", None)
        return core.stats() if core is not None and hasattr(core, "stats") else None

    def token_text(self, token_id: int) -> tuple[str, list[int]]:
        """(text, UTF-8 bytes) of one token, for logprobs."""
        raw = self.tokenizer.token_bytes(token_id)
        return raw.decode("utf-8", "replace"), list(raw)

    # ---------------------------------------------------------------- validation and encoding
    def encode(self, request: ChatRequest) -> _Encoded:
        """The request's prompt and what constrains its completion; RequestError(400) for bad input."""
        if request.mode not in REASONING_MODES:
            raise RequestError(400, f"unknown reasoning mode {request.mode!r}")
        thinking = request.mode != "non-think"
        tools = self._check_tools(request.tools)
        choice = request.tool_choice
        named = None
        if isinstance(choice, dict):
            fn = choice.get("function") if choice.get("type") == "function" else None
            named = fn.get("name") if isinstance(fn, dict) else None
            if not isinstance(named, str):
                raise RequestError(400, 'tool_choice must be "none", "auto", "required" or '
                                   '{"type": "function", "function": {"name": ...}}', param="tool_choice")
        elif choice not in ("none", "auto", "required"):
            raise RequestError(400, f'tool_choice must be "none", "auto", "required" or a named function, '
                               f"got {choice!r}", param="tool_choice")
        forced = named is not None or choice == "required"
        if forced and not tools:
            raise RequestError(400, "tool_choice requires tools", param="tool_choice")
        if named is not None and named not in {t["function"]["name"] for t in tools}:
            raise RequestError(400, f"tool_choice names {named!r}, which is not in tools", param="tool_choice")
        if self.strict_reasoning and thinking:
            for i, m in enumerate(request.messages):
                if (isinstance(m, dict) and m.get("role") == "assistant" and m.get("tool_calls")
                        and not m.get("reasoning_content")):
                    raise RequestError(400, REASONING_PASSBACK, param=f"messages[{i}].reasoning_content")
        last = request.messages[-1] if request.messages else None
        continuation = isinstance(last, dict) and last.get("role") == "assistant"
        if continuation and not last.get("prefix"):
            raise RequestError(400, "the last message is a complete assistant message: nothing to answer (end with "
                               "a user or tool message, or mark the assistant message prefix: true)",
                               param="messages")
        response_format = self._response_format(request.response_format)
        callable_tools = tools if tools and choice != "none" else None
        try:
            prompt = encode_messages(
                request.messages, thinking_mode="thinking" if thinking else "chat",
                reasoning_effort="max" if request.mode == "think-max" else None,
                tools=callable_tools, response_format=response_format)
        except EncodingError as err:
            raise RequestError(400, f"invalid messages: {err}", param="messages") from None
        return _Encoded(prompt, thinking, callable_tools, choice, response_format, request.parallel_tool_calls,
                        continuation)

    @staticmethod
    def _check_tools(tools: Any) -> list[dict[str, Any]]:
        if tools is None:
            return []
        if not isinstance(tools, list):
            raise RequestError(400, "tools must be a list", param="tools")
        if len(tools) > MAX_TOOLS:
            raise RequestError(400, f"at most {MAX_TOOLS} tools, got {len(tools)}", param="tools")
        for i, tool in enumerate(tools):
            fn = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
                raise RequestError(400, f'tools[{i}] must be {{"type": "function", "function": {{...}}}}',
                                   param=f"tools[{i}]")
            name = fn.get("name")
            if not isinstance(name, str) or not TOOL_NAME.match(name):
                raise RequestError(400, f"tools[{i}].function.name must match [A-Za-z0-9_-]{{1,64}}, got {name!r}",
                                   param=f"tools[{i}].function.name")
            params = fn.get("parameters")
            if params is not None and (not isinstance(params, dict) or params.get("type", "object") != "object"):
                raise RequestError(400, f"tools[{i}].function.parameters must be a JSON schema object with type "
                                   '"object"', param=f"tools[{i}].function.parameters")
            if fn.get("description") is not None and not isinstance(fn.get("description"), str):
                raise RequestError(400, f"tools[{i}].function.description must be a string",
                                   param=f"tools[{i}].function.description")
        return tools

    @staticmethod
    def _response_format(fmt: Any) -> Any:
        """What the encoder renders as "## Response Format": the JSON schema, or {"type": "json_object"}."""
        if fmt is None:
            return None
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "text":
            return None
        if kind == "json_object":
            return {"type": "json_object"}
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise RequestError(400, "response_format.json_schema.schema must be a JSON schema object",
                                   param="response_format")
            return schema
        raise RequestError(400, "response_format.type must be text, json_object or json_schema",
                           param="response_format")

    def count_tokens(self, request: ChatRequest) -> int:
        return len(self._tokenize(self.encode(request).prompt, "messages"))

    def _tokenize(self, text: str, param: str) -> list[int]:
        """The token ids of a prompt, after two checks that keep hostile input cheap: a lone surrogate (e.g. from a
        tool call's JSON arguments, decoded after the body's own Unicode check) is a 400, not the tokenizer's
        TypeError; a text too long for the context whatever its tokens (`Tokenizer.min_tokens`) is refused
        without tokenising it. Through `encode_batch`, which releases the GIL where `encode` holds it
        (tokenizers 0.23), so the event loop runs on while the server's worker thread tokenises a long prompt."""
        if lone_surrogate(text) is not None:
            raise RequestError(400, f"invalid Unicode in {param}: a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff "
                               "escape, e.g. in a tool call's JSON arguments)", param=param)
        least = self.tokenizer.min_tokens(text)
        if least >= self.max_context:
            raise RequestError(400, f"This model's maximum context length is {self.max_context} tokens. However, "
                               f"your {param} resulted in at least {least} tokens.", param=param)
        return self.tokenizer.encode_batch([text])[0]

    def _limits(self, prompt_len: int, max_tokens: int | None) -> int:
        ctx = self.max_context
        if prompt_len >= ctx:
            raise RequestError(400, f"This model's maximum context length is {ctx} tokens. However, your messages "
                               f"resulted in {prompt_len} tokens.", param="messages")
        if max_tokens is None:
            return min(self.max_output_tokens, ctx - prompt_len)
        if max_tokens < 1:
            raise RequestError(400, f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
        if max_tokens > self.max_output_tokens:
            raise RequestError(400, f"max_tokens is {max_tokens}; this server allows at most "
                               f"{self.max_output_tokens}", param="max_tokens")
        if prompt_len + max_tokens > ctx:
            raise RequestError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                               f"{prompt_len + max_tokens} tokens ({prompt_len} in the messages, {max_tokens} in "
                               "the completion).", param="max_tokens")
        return max_tokens

    @staticmethod
    def _check_common(n: int, stop: list[str], top_logprobs: int | None) -> None:
        if not 1 <= n <= MAX_N:
            raise RequestError(400, f"n must be in [1, {MAX_N}], got {n}", param="n")
        if len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop):
            raise RequestError(400, f"stop must be at most {MAX_STOPS} non-empty strings", param="stop")
        if top_logprobs is not None and not 0 <= top_logprobs <= MAX_LOGPROBS:
            raise RequestError(400, f"top_logprobs must be in [0, {MAX_LOGPROBS}]", param="top_logprobs")

    def _sampling(self, n: int, seed: int | None, **kw: Any) -> list[SamplingParams]:
        try:
            return [SamplingParams(seed=None if seed is None else seed + i, **kw) for i in range(n)]
        except ValueError as err:
            raise RequestError(400, str(err).replace("SamplingParams.", "")) from None

    def _check_engine(self, ids: list[int], params: list[SamplingParams]) -> None:
        """The engine's own limits (e.g. its KV pool) checked now, so the client gets a 400, not a 200 and then
        an error event."""
        for p in params:
            try:
                self.engine.check_request(ids, p)
            except ValueError as err:
                raise RequestError(400, str(err), param="max_tokens") from None

    def plan(self, request: ChatRequest) -> _Plan:
        """Validate and encode a chat request (RequestError for every client mistake)."""
        self._check_common(request.n, request.stop, request.top_logprobs if request.logprobs else None)
        encoded = self.encode(request)
        grammar = self.grammar(encoded)
        ids = self._tokenize(encoded.prompt, "messages")
        max_tokens = self._limits(len(ids), request.max_tokens)
        thinking = request.mode != "non-think"
        kw: dict[str, Any] = dict(self.thinking_sampling)
        if not thinking:
            kw = dict(temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
                      min_p=request.min_p, presence_penalty=request.presence_penalty,
                      frequency_penalty=request.frequency_penalty, repetition_penalty=request.repetition_penalty)
        params = self._sampling(request.n, request.seed, max_tokens=max_tokens,
                                logprobs=request.top_logprobs if request.logprobs else None, grammar=grammar, **kw)
        self._check_engine(ids, params)
        tools = encoded.tools
        return _Plan(request.model, ids, params, lambda: StreamParser(thinking=thinking, tools=tools),
                     list(request.stop), thinking)

    def grammar(self, encoded: _Encoded) -> Grammar | None:
        """The grammar of the completion (`dsv4.chat.grammars`): JSON for `response_format`, a call of the
        declared tools when one is required, calls of declared tools only under "auto", none at all when no tool
        may be called. None for a prefix continuation (the completion starts mid-turn, where no grammar of a
        whole turn applies)."""
        if encoded.continuation:
            return None
        return self.grammars(GrammarSpec(encoded.thinking, encoded.response_format, encoded.tools,
                                         encoded.tool_choice, encoded.parallel_tool_calls))

    def plan_completion(self, request: CompletionRequest) -> list[_Plan]:
        """Validate a legacy completions request: one plan per prompt (see the module docstring)."""
        self._check_common(request.n, request.stop, request.logprobs)
        prompts = _prompt_list(request.prompt)
        if len(prompts) * request.n > MAX_COMPLETION_CHOICES:
            raise RequestError(400, f"at most {MAX_COMPLETION_CHOICES} choices per request (prompts x n), got "
                               f"{len(prompts)} x {request.n}", param="prompt")
        if request.max_tokens == 0 and not request.echo:
            raise RequestError(400, "max_tokens may be 0 only with echo: true (the prompt alone comes back)",
                               param="max_tokens")
        # echo with logprobs: the prompt tokens' logprobs come first; max_tokens 0: the engine only scores the prompt
        scoring = request.logprobs if request.echo else None
        if request.max_tokens == 0 and scoring is None:
            scoring = 0
        plans = []
        for i, prompt in enumerate(prompts):
            where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            text, ids = self._encode_prompt(prompt, where)
            if request.max_tokens == 0:
                self._limits(len(ids), None)  # the prompt alone must fit the context
                max_tokens = 0
            else:
                max_tokens = self._limits(len(ids), request.max_tokens)
            params = self._sampling(request.n, request.seed, max_tokens=max_tokens, temperature=request.temperature,
                                    top_p=request.top_p, presence_penalty=request.presence_penalty,
                                    frequency_penalty=request.frequency_penalty, logprobs=request.logprobs,
                                    prompt_logprobs=scoring)
            self._check_engine(ids, params)
            plans.append(_Plan(request.model, ids, params, _RawParser, list(request.stop), False, raw=True,
                               echo=text if request.echo else None))
        return plans

    def _encode_prompt(self, prompt: str | list[int], where: str) -> tuple[str, list[int]]:
        """(text, token ids) of one legacy prompt; the text of token ids is their decoding, specials included (what
        echo returns, so token ids and the text they encode echo alike)."""
        if isinstance(prompt, str):
            ids, text = self._tokenize(prompt, where), prompt
        else:
            vocab = self.tokenizer.vocab_size
            if not isinstance(prompt, list) or not all(_is_token(t) and t < vocab for t in prompt):
                raise RequestError(400, f"{where}: token ids must be ints in [0, {vocab})", param="prompt")
            ids, text = list(prompt), self.tokenizer.decode(prompt)
        if not ids:
            raise RequestError(400, f"{where} is empty", param="prompt")
        return text, ids

    # ---------------------------------------------------------------- generation
    def generate(self, request: ChatRequest) -> AsyncIterator[ChoiceEvent | Usage]:
        """Validate now (RequestError), stream when iterated (see the module docstring)."""
        return self._run([self.plan(request)])

    def complete(self, request: CompletionRequest) -> AsyncIterator[ChoiceEvent | Usage]:
        """The legacy-completions counterpart of `generate`: per choice (prompt index * n + i) the echoed prompt
        (with echo), ContentDelta events and a Finish."""
        return self._run(self.plan_completion(request))

    async def _run(self, plans: Sequence[_Plan]) -> AsyncIterator[ChoiceEvent | Usage]:
        out: asyncio.Queue = asyncio.Queue()
        streams: list[tuple[_Plan, Any]] = []  # (plan, engine stream) per choice, in choice order
        try:
            for plan in plans:
                for p in plan.params:
                    streams.append((plan, self.engine.generate(plan.prompt_ids, p)))
        except ValueError as err:  # the engine's own limits (e.g. KV pages): still the client's request
            for _, s in streams:
                s.close()
            raise RequestError(400, str(err)) from None
        choices = [_Choice(self, i, plan, s, out) for i, (plan, s) in enumerate(streams)]
        tasks = [asyncio.ensure_future(c.pump()) for c in choices]
        try:
            remaining = len(tasks)
            while remaining:
                item = await out.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
            prompt = sum(len(plan.prompt_ids) for plan in plans)
            cached = sum(next(c for c in choices if c.plan is plan).cached for plan in plans)
            completion = sum(c.tokens for c in choices)
            yield Usage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached,
                        reasoning_tokens=sum(c.reasoning for c in choices),
                        cost=self.prices.cost(plans[0].model, prompt, cached, completion))
        finally:
            for t in tasks:
                t.cancel()
            for _, s in streams:
                s.close()
            for t in tasks:
                with contextlib.suppress(BaseException):
                    await t


class _Choice:
    """One choice: engine updates -> detokenizer -> stop strings -> parser -> ChoiceEvents on `out`."""

    def __init__(self, service: ChatService, index: int, plan: _Plan, stream: Any, out: asyncio.Queue) -> None:
        self.index, self.plan, self.stream, self.out = index, plan, stream, out
        self.detok = service.tokenizer.detokenizer(skip_special=plan.raw)
        self.think_end_id = service.tokenizer.think_end_id
        self.parser = plan.make_parser()
        self.hold = max((len(s) for s in plan.stops), default=1) - 1
        self.text = ""  # completion text not yet fed to the parser (held for stop matching)
        self.matched_stop: str | None = None
        self.logprobs: list[TokenLogprobs] = []
        self.tokens = self.reasoning = self.cached = 0
        self.in_reasoning = plan.thinking
        self.echo = plan.echo

    def emit(self, events: list[Event]) -> None:
        for ev in events:
            lps, self.logprobs = tuple(self.logprobs), []
            self.out.put_nowait(ChoiceEvent(self.index, ev, lps))

    async def pump(self) -> None:
        try:
            reason, cut = None, False
            async for update in self.stream:
                if self.echo is not None:  # the prompt (and its logprobs, when asked) before any completion text
                    self.out.put_nowait(ChoiceEvent(self.index, ContentDelta(self.echo),
                                                    tuple(update.prompt_logprobs or ())))
                    self.echo = None
                self.cached = update.cached_tokens
                for tok, lp in zip(update.new_token_ids, update.logprobs, strict=False):
                    self.tokens += 1
                    if self.in_reasoning:
                        self.reasoning += 1
                        self.in_reasoning = tok != self.think_end_id
                    if lp is not None:
                        self.logprobs.append(lp)
                self.text += self.detok.add(update.new_token_ids)
                if self.stop_found():
                    reason, cut = "stop", True
                    self.stream.close()  # abort: the rest of this choice is not wanted
                    break
                self.feed(final=False)
                if update.finished:
                    reason = update.finish_reason
            if not cut:
                self.text += self.detok.flush()
                if self.stop_found():
                    reason = "stop"
                else:
                    self.feed(final=True)
            events = [dataclasses.replace(ev, stop_sequence=self.matched_stop) if isinstance(ev, Finish) else ev
                      for ev in self.parser.finish(reason)]
            if self.logprobs and events:  # logprobs not yet attached ride on the last event
                *head, last = events
                self.emit(head)
                lps, self.logprobs = tuple(self.logprobs), []
                self.out.put_nowait(ChoiceEvent(self.index, last, lps))
            else:
                self.emit(events)
            self.out.put_nowait(None)
        except asyncio.CancelledError:
            raise
        except BaseException as err:
            self.out.put_nowait(err)

    def stop_found(self) -> bool:
        """Cut `text` at the first stop string and feed the rest of it; True when one was found."""
        stops = self.plan.stops
        if not stops:
            return False
        hits = [(i, n, s) for n, s in enumerate(stops) if (i := self.text.find(s)) >= 0]
        if not hits:
            return False
        at, _, self.matched_stop = min(hits)  # the earliest match; a tie goes to the first listed
        self.text = self.text[:at]
        self.feed(final=True)
        return True

    def feed(self, final: bool) -> None:
        cut = len(self.text) if final or not self.plan.stops else max(0, len(self.text) - self.hold)
        chunk, self.text = self.text[:cut], self.text[cut:]
        if chunk:
            self.emit(self.parser.feed(chunk))
