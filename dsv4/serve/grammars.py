"""From what a chat request allows to a compiled grammar, once per distinct request shape.

A `GrammarSpec` is the plain data a completion's grammar is made from (reasoning mode, response format, the
tools that may be called, tool_choice, parallel calls); `GrammarCompiler` turns it into the Lark text of
`dsv4.chat.grammars`, picks the closer of `dsv4.chat.closing` (JSON answers, tool calls) and compiles both with
llguidance (`dsv4.engine.constraint`). Compiling takes milliseconds and clients repeat their schemas, so compiled
grammars are kept, least recently used out. The spec is also what a model-parallel follower rank receives to
rebuild a request's grammar (`dsv4.engine.lockstep`): llguidance's objects do not pickle.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from dataclasses import dataclass
from typing import Any

from ..chat.closing import JsonCloser, ToolCallCloser
from ..chat.grammars import ToolGrammarError, completion_grammar
from ..chat.tokenizer import Tokenizer
from ..engine.constraint import Grammar, GrammarError, GrammarTokenizer
from .request import RequestError

CACHE = 64  # compiled grammars kept


@dataclass(frozen=True)
class GrammarSpec:
    """What a completion's grammar is made from."""

    thinking: bool
    response_format: dict[str, Any] | None  # a JSON schema, or {"type": "json_object"}
    tools: list[dict[str, Any]] | None  # the tools the model may call (None: none may be called)
    tool_choice: str | dict[str, Any]
    parallel_tool_calls: bool


class GrammarCompiler:
    """`compiler(spec)` -> the compiled `Grammar` (a RequestError(400) naming a schema llguidance cannot
    enforce). `vocab_size`: the model's logit width (default: the tokenizer's). Safe to call from worker
    threads."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size or tokenizer.vocab_size
        self._vocabulary: GrammarTokenizer | None = None  # built on first need (~0.6 s for V4's vocabulary)
        self._cache: dict[str, Grammar] = {}  # spec as JSON -> compiled, least recently used first
        self._lock = threading.Lock()

    def __call__(self, spec: GrammarSpec) -> Grammar:
        key = json.dumps(dataclasses.asdict(spec), sort_keys=True)
        with self._lock:
            grammar = self._cache.pop(key, None) or self._compile(spec)
            self._cache[key] = grammar
            while len(self._cache) > CACHE:
                self._cache.pop(next(iter(self._cache)))
        return grammar

    def _compile(self, spec: GrammarSpec) -> Grammar:
        try:
            lark = completion_grammar(thinking=spec.thinking, think_end_id=self.tokenizer.think_end_id,
                                      response_format=spec.response_format, tools=spec.tools,
                                      tool_choice=spec.tool_choice, parallel_tool_calls=spec.parallel_tool_calls)
        except ToolGrammarError as err:
            raise RequestError(400, str(err), param="tools") from None
        forced = spec.tools is not None and spec.tool_choice not in ("auto", "none")
        closer = None
        if spec.tools is not None and (forced or spec.response_format is None):
            closer = ToolCallCloser(self.tokenizer, spec.thinking, forced, spec.tools)
        elif spec.response_format is not None:
            closer = JsonCloser(self.tokenizer, spec.thinking, spec.response_format)
        if self._vocabulary is None:
            self._vocabulary = GrammarTokenizer(self.tokenizer.hf.to_str(), self.vocab_size, [self.tokenizer.eos_id])
        try:
            return Grammar(self._vocabulary, lark, closer, spec=spec)
        except GrammarError as err:
            where = "response_format" if spec.response_format is not None else "tools"
            raise RequestError(400, f"{where}: the schema cannot be enforced: {err}", param=where) from None
