"""The internal requests the wire protocols convert into, and what the backend streams back.

OpenAI Chat Completions and Anthropic Messages requests are validated by their own schemas (the modules of
`dsv4.serve.protocols`) and reduced to a `ChatRequest`: OpenAI-shaped messages (what `dsv4.chat.encode_messages`
takes), one of three reasoning modes, tools, sampling settings. OpenAI legacy completions reduce to a
`CompletionRequest` (raw prompt, no chat template). A `ChatBackend` (the real one is
`dsv4.serve.service.ChatService` over the engine) turns either into a stream of `ChoiceEvent`s (the chat
parser's events, per choice) followed by one `Usage`. The protocol modules render that stream in their own wire
format; nothing protocol-specific crosses this boundary.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..chat.events import Event
from ..engine.sampling import TokenLogprobs

REASONING_MODES = ("non-think", "think-high", "think-max")


class RequestError(Exception):
    """A client mistake, reported as a 4xx in the protocol's error shape: `status` (400, 401, 404, 413, 422,
    429), a human message naming the problem, and optionally the offending parameter."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


@dataclass
class ChatRequest:
    model: str
    messages: list[dict[str, Any]]  # OpenAI-shaped: role, content, reasoning_content, tool_calls, tool_call_id
    mode: str = "think-high"  # one of REASONING_MODES
    tools: list[dict[str, Any]] | None = None  # OpenAI function tools: {"type": "function", "function": {...}}
    tool_choice: str | dict[str, Any] = "auto"  # "none" | "auto" | "required" | {"type": "function", ...}
    parallel_tool_calls: bool = True  # False: a required call is exactly one call
    response_format: dict[str, Any] | None = None  # {"type": "json_object"} or {"type": "json_schema", ...}
    max_tokens: int | None = None  # None: the server's limit
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)  # stop strings (the text before one is kept)
    seed: int | None = None
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    user: str | None = None


@dataclass
class CompletionRequest:
    """A legacy `/v1/completions` request: raw prompt text (or token ids), no chat template, no parsing. `prompt`
    takes OpenAI's four forms: a text, texts, token ids, lists of token ids (one choice per prompt x n)."""

    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    n: int = 1
    logprobs: int | None = None  # top alternatives per token (legacy shape); None: no logprobs
    echo: bool = False  # each choice starts with its prompt (and, with logprobs, the prompt tokens' logprobs)


@dataclass(frozen=True)
class ChoiceEvent:
    """One parser event of choice `index`; `logprobs` are the tokens that produced its text (when asked)."""

    index: int
    event: Event
    logprobs: tuple[TokenLogprobs, ...] = ()


@dataclass(frozen=True)
class Usage:
    """Token accounting of a whole request (all choices), the last item of every stream."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens resumed from the prefix cache
    reasoning_tokens: int
    cost: float  # USD, from the model's price table

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class ChatBackend(Protocol):
    """What the HTTP layer needs from a model: names it answers to, token counting, chat generation, legacy text
    completion, and token texts for logprobs."""

    model_names: list[str]

    def token_text(self, token_id: int) -> tuple[str, list[int]]:
        """(text, UTF-8 bytes) of one token, for logprobs."""

    def count_tokens(self, request: ChatRequest) -> int:
        """Prompt tokens of the request as it would be encoded; raises RequestError for bad input."""

    def generate(self, request: ChatRequest) -> AsyncIterator[ChoiceEvent | Usage]:
        """Validate (raising RequestError before the first item), queue and stream the request. Closing the
        iterator early (client gone) aborts the engine requests and frees their memory."""

    def complete(self, request: CompletionRequest) -> AsyncIterator[ChoiceEvent | Usage]:
        """`generate` for a legacy completion: the prompts as given, no chat template; per choice (prompt index *
        n + i) the text comes back as `ContentDelta`s (with echo, the prompt's first) and a `Finish`. Validates
        before returning, like `generate`."""
