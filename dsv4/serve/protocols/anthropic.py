"""Anthropic Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`, also under `/anthropic`).

DeepSeek serves this protocol next to OpenAI's (serving.md 1.10); clients are the official `anthropic` SDKs
and Claude Code. This module has three layers, each testable alone:

1. Schemas (pydantic v2, unknown keys allowed everywhere, types strict so `"5"` is not a number) and
   `to_chat_request`, which reduces a request to the shared `ChatRequest`:
   * `system` (string or text blocks, joined by a blank line) -> a leading system message;
   * user `text` blocks -> a user message; `tool_result` blocks -> role "tool" messages (tool_call_id =
     tool_use_id), put before the user text of the same message (Anthropic requires results first);
   * assistant `text` -> content, `thinking` (signature verified, see below) -> reasoning_content, `tool_use`
     -> tool_calls with JSON-string arguments; a `redacted_thinking` block is a 400 (this server writes none, so
     none sent back can be genuine); consecutive messages of one role are merged (Anthropic's documented
     behaviour); a final assistant message is a prefill (`prefix: true`);
   * a message with `role: "system"` (Claude Code sends its environment so, as `messages[1]`) may stand
     anywhere in `messages`, its content text only; it is never merged into a user or assistant message.
     The V4 encoding writes a system message as its bare text at a turn boundary and opens the assistant's
     turn only right after a user turn, so it is placed after the last assistant turn before it, ahead of the
     user turn (tool results and text) it follows, and joined by a blank line to a system message already
     there (the `system` field, or another): `[user, system]` renders as `system` text + `<｜User｜>` turn;
   * `context_management.edits`: `clear_thinking_*` (e.g. `clear_thinking_20251015`) with `keep` "all" or
     `{"type": "thinking_turns", "value": N}` (absent: N=1, Anthropic's default) drops the thinking blocks of
     all but the last N assistant turns that have any (a turn is a run of assistant messages, merged) before
     rendering, unchecked; the response reports `context_management: {"applied_edits": [{"type",
     "cleared_thinking_turns", "cleared_input_tokens"}]}` (in the final `message_delta` when streaming; an
     empty list when nothing was cleared; absent without `context_management`). `clear_tool_uses_*` edits are
     accepted and not applied (never reported); any other edit type is a 400 naming it. Without
     `context_management` nothing is cleared (the V4 encoding's own rule for earlier reasoning applies);
   * every `tool_use` must be answered by a `tool_result` in the next message, and a `tool_result` must
     answer a `tool_use` of the message before it (Anthropic's rules; 400 otherwise);
   * mode: `thinking.type` "disabled" -> non-think; otherwise (absent: DeepSeek thinks by default; "enabled",
     "adaptive", "between_tools") think-high, or think-max when `output_config.effort` is "max" or "xhigh"
     (DeepSeek's launch mapping: low/medium/high -> high, xhigh/max -> max). `budget_tokens` is accepted
     and ignored, as at DeepSeek;
   * `tool_choice` auto/any/tool/none -> "auto"/"required"/named function/"none" (enforced by the service's
     grammar, in thinking modes too); `disable_parallel_tool_use` -> one call at most;
   * `stop_sequences` -> stop, `metadata.user_id` -> user, `output_config.format` (json_schema) ->
     response_format; `top_k`, `service_tier`, `container`, `cache_control`, `is_error` are accepted and
     ignored;
   * top-level fields: the ones above are honoured; every other key (`mcp_servers`, `speed`,
     `inference_geo`, ..., and fields the API adds later) is accepted and ignored, never an error. Its value
     is not looked at, so an unsupported feature silently does nothing rather than failing the request.
2. `MessageRenderer`, which turns the backend's `ChoiceEvent`s and `Usage` into both the SSE event sequence
   and the final message JSON, so streaming and non-streaming can never disagree. Blocks come in the order
   the model writes them (thinking, text, tool_use); a block opens when its kind of event first arrives and
   closes when another kind (or the end) arrives. stop_reason: engine "stop" -> end_turn (stop_sequence
   when the backend reports the matched stop string), "tool_calls" -> tool_use, "length" -> max_tokens,
   "content_filter" -> refusal, anything else -> end_turn.
3. `router(ctx)`: the routes, over the `ServeContext` (model names, limiter, metrics), registered with the app
   as `PROTOCOL` (the app checks the API key and renders errors raised before a response starts).

Usage follows Anthropic's accounting: `input_tokens` is the prompt tokens *not* read from the prefix cache,
`cache_read_input_tokens` the ones that were (their sum is the prompt), `cache_creation_input_tokens` is 0
(caching is automatic, nothing is billed for writing), `output_tokens` counts reasoning too and
`output_tokens_details.thinking_tokens` says how much of it was reasoning. `message_start` carries the
whole prompt as `input_tokens` (the cache split is known only at the end; the final `message_delta`
carries the split, which SDKs apply since their usage fields overwrite).

Thinking signatures. Anthropic clients keep a thinking block's `signature` and send the block back on
later turns (Claude Code drops blocks without one, serving.md 1.10); the signature proves the block is one this
server wrote, unchanged. It is `"dsv4." + base64url(digest + tag)`, both truncated HMAC-SHA256s under the
server's key (`ServeConfig.signature_key`: `--signature-key` / `DSV4_SIGNATURE_KEY`, else random per process):
`digest` of the block's full thinking text, `tag` of the digest. A block sent back must carry a signature whose
tag verifies (so it was issued here) and, when it has text, whose digest is that text's (so the text is the one
signed). A block shown with display "omitted" comes back with an empty text: its tag still proves the server
issued the signature, though there is no text to compare (nor any reasoning to give the model). Anything else (a
missing, empty, foreign, forged or altered signature) is Anthropic's 400 "messages.N.content.K: Invalid
`signature` in `thinking` block", and a `redacted_thinking` block (whose data only its writer can check; this
server writes none) its "Invalid `data` in `redacted_thinking` block". Signatures are deterministic and do not
expire; a session moves between servers that share a key, and between providers not at all (as at DeepSeek and
Anthropic).

Errors use Anthropic's body `{"type": "error", "error": {"type", "message"}}` (`error_body`), the status
naming the class (400 invalid_request_error ... 529 overloaded_error); a failure after a stream started is
an `event: error` with the same body, and ends the stream.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import re
import secrets
from collections.abc import AsyncIterator, Iterable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ...chat.events import (
    ContentDelta,
    Finish,
    ReasoningDelta,
    ToolCallArgumentsDelta,
    ToolCallEnd,
    ToolCallStart,
)
from ..context import KeepAlive, ServeContext
from ..plumbing import collect, read_json, sse_response
from ..request import ChatRequest, ChoiceEvent, RequestError, Usage
from . import WireProtocol

__all__ = [
    "PROTOCOL",
    "CountTokensRequest",
    "applied_edits",
    "keep_thinking_turns",
    "thinking_turns_to_clear",
    "MessageRenderer",
    "MessagesRequest",
    "error_body",
    "error_type",
    "parse_request",
    "reasoning_mode",
    "render_message",
    "render_stream",
    "resolve_model",
    "router",
    "sign_thinking",
    "sse",
    "stop_reason",
    "to_chat_request",
    "verify_signature",
]

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------
# errors

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def error_type(status: int) -> str:
    """Anthropic's error type for an HTTP status (other 4xx: invalid_request_error, other 5xx: api_error)."""
    if status in _ERROR_TYPES:
        return _ERROR_TYPES[status]
    return "invalid_request_error" if 400 <= status < 500 else "api_error"


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """Anthropic's error body for a response of `status`: `{"type": "error", "error": {"type", "message"}}`.
    The app's exception handlers call this for every error on this protocol's routes and prefixes; `param` is
    not part of Anthropic's shape (the message names the field)."""
    return {"type": "error", "error": {"type": error_type(status), "message": message}}


def _validation_message(err: ValidationError, body: Any) -> str:
    """A one-line message naming the bad field as a dotted path into the body (`messages.0.content.1.type:
    ...`). pydantic's locations also hold union-branch names (`str`, `list[...]`, block tags); walking the
    body keeps only the request's own keys. Of the errors, the one reaching deepest into the body is shown
    (for `content: [bad block]` that is the block's error, not "should be a valid string")."""
    best: tuple[int, str, dict[str, Any]] | None = None
    for e in err.errors():
        node, parts = body, []
        loc = e["loc"]
        for k, p in enumerate(loc):
            if isinstance(node, dict) and isinstance(p, str) and p in node:
                node = node[p]
                parts.append(p)
            elif isinstance(node, list) and isinstance(p, int) and 0 <= p < len(node):
                node = node[p]
                parts.append(str(p))
            elif e["type"] == "missing" and k == len(loc) - 1:
                parts.append(str(p))
        if best is None or len(parts) > best[0]:
            best = (len(parts), ".".join(parts), e)
    assert best is not None
    _, where, first = best
    msg = first["msg"]
    if first["type"] == "union_tag_invalid":
        ctx = first.get("ctx") or {}
        msg = f"unknown type {ctx.get('tag')!r} (expected one of {ctx.get('expected_tags')})"
    return f"{where}: {msg}" if where else msg


# ------------------------------------------------------------------------------------------------
# schemas


class _Schema(BaseModel):
    """Unknown keys are allowed (new API fields must not break old servers); types are strict."""

    model_config = ConfigDict(extra="allow", strict=True)


class TextBlock(_Schema):
    type: Literal["text"]
    text: str


class ThinkingBlock(_Schema):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_Schema):
    type: Literal["redacted_thinking"]
    data: str | None = None


class ImageBlock(_Schema):
    type: Literal["image"]


class DocumentBlock(_Schema):
    type: Literal["document"]


class SearchResultBlock(_Schema):
    type: Literal["search_result"]


class ToolUseBlock(_Schema):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]


_ResultPart = Annotated[TextBlock | ImageBlock | DocumentBlock | SearchResultBlock, Field(discriminator="type")]


class ToolResultBlock(_Schema):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[_ResultPart] | None = None
    is_error: bool | None = None


Block = Annotated[
    TextBlock | ThinkingBlock | RedactedThinkingBlock | ImageBlock | DocumentBlock | SearchResultBlock
    | ToolUseBlock | ToolResultBlock,
    Field(discriminator="type"),
]


class Message(_Schema):
    role: Literal["user", "assistant", "system"]
    content: str | list[Block]


_TOOL_NAME = r"^[A-Za-z0-9_-]{1,128}$"


class Tool(_Schema):
    name: str = Field(pattern=_TOOL_NAME)
    description: str | None = None
    input_schema: dict[str, Any]
    type: str | None = None  # "custom" or absent; Anthropic's own tool types are not served


class ToolChoiceAuto(_Schema):
    type: Literal["auto"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceAny(_Schema):
    type: Literal["any"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceTool(_Schema):
    type: Literal["tool"]
    name: str = Field(min_length=1)
    disable_parallel_tool_use: bool | None = None


class ToolChoiceNone(_Schema):
    type: Literal["none"]


ToolChoice = Annotated[ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone, Field(discriminator="type")]


class ThinkingConfig(_Schema):
    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: int | None = Field(default=None, ge=1)
    display: Literal["summarized", "omitted"] | None = None


class OutputConfig(_Schema):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: dict[str, Any] | None = None


class Metadata(_Schema):
    user_id: str | None = Field(default=None, max_length=512)


class ContextManagement(_Schema):
    edits: list[dict[str, Any]] | None = None


class CountTokensRequest(_Schema):
    """`POST /v1/messages/count_tokens`: a Messages request without `max_tokens`."""

    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None
    context_management: ContextManagement | None = None


class MessagesRequest(CountTokensRequest):
    """`POST /v1/messages`."""

    max_tokens: int = Field(ge=1)
    stop_sequences: list[Annotated[str, Field(min_length=1)]] | None = None
    stream: bool | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    metadata: Metadata | None = None


def parse_request(body: Any, cls: type[CountTokensRequest]) -> Any:
    """`body` (decoded JSON) validated as `cls`, or RequestError(400) naming the first bad field."""
    if not isinstance(body, dict):
        raise RequestError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        raise RequestError(400, _validation_message(e, body)) from None


# ------------------------------------------------------------------------------------------------
# thinking signatures

SIGNATURE_PREFIX = "dsv4."
_SIGNATURE = re.compile(r"dsv4\.([A-Za-z0-9_-]{43})")  # 32 bytes, unpadded base64url
_HALF = 16  # bytes of the digest and of the tag (128-bit MACs)


def _mac(key: bytes, label: bytes, data: bytes) -> bytes:
    return hmac.new(key, label + b"\0" + data, hashlib.sha256).digest()[:_HALF]


def sign_thinking(text: str, key: bytes) -> str:
    """The signature of a thinking block of full text `text` under the server's `key` (module docstring)."""
    digest = _mac(key, b"thinking text", text.encode("utf-8"))
    tag = _mac(key, b"thinking signature", digest)
    return SIGNATURE_PREFIX + base64.urlsafe_b64encode(digest + tag).rstrip(b"=").decode("ascii")


def verify_signature(text: str, signature: str | None, key: bytes) -> bool:
    """Whether `signature` was issued under `key` and, unless `text` is empty (a block shown with display "omitted",
    whose text the client never had), for exactly this thinking text."""
    match = _SIGNATURE.fullmatch(signature or "")
    if match is None:
        return False
    raw = base64.urlsafe_b64decode(match.group(1) + "=")
    digest, tag = raw[:_HALF], raw[_HALF:]
    issued = hmac.compare_digest(tag, _mac(key, b"thinking signature", digest))
    return issued and (not text or hmac.compare_digest(digest, _mac(key, b"thinking text", text.encode("utf-8"))))


# ------------------------------------------------------------------------------------------------
# request conversion

_EFFORT_MAX = ("xhigh", "max")


def reasoning_mode(thinking: ThinkingConfig | None, output_config: OutputConfig | None) -> str:
    """ChatRequest.mode for Anthropic's `thinking` and `output_config.effort` (see the module docstring)."""
    if thinking is not None and thinking.type == "disabled":
        return "non-think"
    effort = output_config.effort if output_config is not None else None
    return "think-max" if effort in _EFFORT_MAX else "think-high"


def _system_text(system: str | list[TextBlock] | None) -> str:
    if system is None:
        return ""
    if isinstance(system, str):
        return system
    return "\n\n".join(b.text for b in system)


def _merged(messages: list[Message]) -> list[tuple[str, list[Any], list[int]]]:
    """Consecutive messages of one role merged: (role, blocks, source indices). A string content is a text
    block."""
    out: list[tuple[str, list[Any], list[int]]] = []
    for i, m in enumerate(messages):
        blocks = [TextBlock(type="text", text=m.content)] if isinstance(m.content, str) else list(m.content)
        if not blocks or (isinstance(m.content, str) and not m.content):
            if not (m.role == "assistant" and i == len(messages) - 1):
                raise RequestError(400, f"messages.{i}: content must not be empty (only the final assistant "
                                   "message may be empty)")
        if out and out[-1][0] == m.role:
            out[-1][1].extend(blocks)
            out[-1][2].append(i)
        else:
            out.append((m.role, blocks, [i]))
    return out


def _tool_result_text(block: ToolResultBlock, where: str) -> str:
    if block.content is None:
        return ""
    if isinstance(block.content, str):
        return block.content
    texts = []
    for k, part in enumerate(block.content):
        if not isinstance(part, TextBlock):
            raise RequestError(400, f"{where}.content.{k}: {part.type} blocks are not supported in tool results "
                               "(text only)")
        texts.append(part.text)
    return "\n\n".join(texts)


def _unsupported(block: Any, where: str) -> RequestError:
    return RequestError(400, f"{where}: {block.type} blocks are not supported by this server (text, thinking, "
                        "tool_use and tool_result are)")


def _place_system(out: list[dict[str, Any]], text: str) -> None:
    """Put a system message from `messages` into the converted list `out` where the V4 encoding renders it at
    a turn boundary: after the last assistant turn (or the leading system text), before the user turn it
    follows, if any. The encoder writes a system message as its raw text with no turn token, and opens the
    assistant's turn only right after a user turn; a system message left between a user turn and the
    assistant's would swallow that opening. Next to another system message it is joined by a blank line."""
    k = len(out)
    while k > 0 and out[k - 1]["role"] in ("user", "tool"):
        k -= 1
    if k > 0 and out[k - 1]["role"] == "system":
        out[k - 1]["content"] += "\n\n" + text
    else:
        out.insert(k, {"role": "system", "content": text})


def thinking_turns_to_clear(messages: list[Message], keep: int | None) -> set[int]:
    """The merged assistant turns (by their first message index) whose thinking a `clear_thinking` edit that
    keeps the last `keep` thinking turns clears (None: keep all). A thinking turn is an assistant turn (after
    merging consecutive assistant messages) with at least one thinking block."""
    if keep is None:
        return set()
    turns = [idx[0] for role, blocks, idx in _merged(messages)
             if role == "assistant" and any(isinstance(b, (ThinkingBlock, RedactedThinkingBlock)) for b in blocks)]
    return set(turns[:max(len(turns) - keep, 0)])


def convert_messages(system: str | list[TextBlock] | None, messages: list[Message],
                     signature_key: bytes, keep_thinking_turns: int | None = None, *,
                     keep_cleared: bool = False) -> list[dict[str, Any]]:
    """Anthropic `system` + `messages` -> OpenAI-shaped messages (rules in the module docstring); thinking
    signatures are checked under `signature_key`. `keep_thinking_turns` (a `clear_thinking` edit; None keeps
    all): the thinking blocks of earlier assistant turns are dropped unchecked, or with `keep_cleared` kept
    unchecked (only to count the tokens the edit cleared; never a prompt to run)."""
    out: list[dict[str, Any]] = []
    sys_text = _system_text(system)
    if sys_text:
        out.append({"role": "system", "content": sys_text})
    cleared = thinking_turns_to_clear(messages, keep_thinking_turns)
    turns = _merged(messages)
    if all(role == "system" for role, _, _ in turns):
        raise RequestError(400, "messages: at least one user or assistant message is required (system messages "
                           "alone leave nothing to answer)")
    pending: set[str] = set()  # tool_use ids of the previous assistant turn still to be answered
    pending_at = -1
    for t, (role, blocks, idx) in enumerate(turns):
        last = t == len(turns) - 1
        where = f"messages.{idx[0]}"
        if role == "system":
            texts = []
            for k, b in enumerate(blocks):
                if not isinstance(b, TextBlock):
                    raise RequestError(400, f"{where}.content.{k}: {b.type} blocks may not appear in system "
                                       "messages (text only)")
                texts.append(b.text)
            _place_system(out, "\n\n".join(texts))
            continue
        if role == "user":
            results: list[dict[str, Any]] = []
            texts: list[str] = []
            for k, b in enumerate(blocks):
                bw = f"{where}.content.{k}"
                if isinstance(b, TextBlock):
                    texts.append(b.text)
                elif isinstance(b, ToolResultBlock):
                    if b.tool_use_id not in pending:
                        raise RequestError(400, f"{bw}: unexpected tool_use_id {b.tool_use_id!r} in a tool_result "
                                           "block: each tool_result must answer a tool_use block of the previous "
                                           "assistant message")
                    pending.discard(b.tool_use_id)
                    results.append({"role": "tool", "tool_call_id": b.tool_use_id,
                                    "content": _tool_result_text(b, bw)})
                elif isinstance(b, (ThinkingBlock, RedactedThinkingBlock, ToolUseBlock)):
                    raise RequestError(400, f"{bw}: {b.type} blocks may only appear in assistant messages")
                else:
                    raise _unsupported(b, bw)
            if pending:
                raise RequestError(400, f"messages.{pending_at}: tool_use ids were found without tool_result "
                                   f"blocks immediately after: {', '.join(sorted(pending))}")
            out.extend(results)
            if texts:
                out.append({"role": "user", "content": "\n\n".join(texts)})
        else:
            if pending:
                raise RequestError(400, f"messages.{pending_at}: tool_use ids were found without tool_result "
                                   f"blocks immediately after: {', '.join(sorted(pending))}")
            reasoning: list[str] = []
            texts = []
            calls: list[dict[str, Any]] = []
            for k, b in enumerate(blocks):
                bw = f"{where}.content.{k}"
                if isinstance(b, TextBlock):
                    texts.append(b.text)
                elif isinstance(b, (ThinkingBlock, RedactedThinkingBlock)) and idx[0] in cleared:
                    if keep_cleared and isinstance(b, ThinkingBlock):
                        reasoning.append(b.thinking)
                    continue  # cleared by a clear_thinking edit: never rendered, so not checked
                elif isinstance(b, ThinkingBlock):
                    if not verify_signature(b.thinking, b.signature, signature_key):
                        raise RequestError(400, f"{bw}: Invalid `signature` in `thinking` block")
                    reasoning.append(b.thinking)
                elif isinstance(b, RedactedThinkingBlock):
                    raise RequestError(400, f"{bw}: Invalid `data` in `redacted_thinking` block")
                elif isinstance(b, ToolUseBlock):
                    if any(c["id"] == b.id for c in calls):
                        raise RequestError(400, f"{bw}: duplicate tool_use id {b.id!r}")
                    calls.append({"id": b.id, "type": "function", "function": {
                        "name": b.name, "arguments": json.dumps(b.input, ensure_ascii=False)}})
                elif isinstance(b, ToolResultBlock):
                    raise RequestError(400, f"{bw}: tool_result blocks may only appear in user messages")
                else:
                    raise _unsupported(b, bw)
            msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
            if "".join(reasoning):
                msg["reasoning_content"] = "".join(reasoning)
            if calls:
                msg["tool_calls"] = calls
                pending = {c["id"] for c in calls}
                pending_at = idx[-1]
            if last:
                if calls:
                    raise RequestError(400, f"messages.{pending_at}: tool_use ids were found without tool_result "
                                       f"blocks immediately after: {', '.join(sorted(pending))}")
                msg["prefix"] = True  # a final assistant message is a prefill the model continues
            out.append(msg)
    return out


def convert_tools(tools: list[Tool] | None) -> list[dict[str, Any]] | None:
    """Anthropic custom tools -> OpenAI function tools; 400 for Anthropic-defined tool types, duplicate names
    or an input_schema that is not an object schema."""
    if not tools:
        return None
    out = []
    seen: set[str] = set()
    for i, t in enumerate(tools):
        if t.type not in (None, "custom"):
            raise RequestError(400, f"tools.{i}.type: tool type {t.type!r} is not supported (custom tools only)")
        if t.name in seen:
            raise RequestError(400, f"tools.{i}.name: duplicate tool name {t.name!r}")
        seen.add(t.name)
        schema_type = t.input_schema.get("type")
        if schema_type != "object":
            raise RequestError(400, f"tools.{i}.input_schema.type: must be 'object', got {schema_type!r}")
        props = t.input_schema.get("properties")
        if props is not None and not isinstance(props, dict):
            raise RequestError(400, f"tools.{i}.input_schema.properties: must be an object")
        fn: dict[str, Any] = {"name": t.name, "parameters": t.input_schema}
        if t.description:
            fn["description"] = t.description
        out.append({"type": "function", "function": fn})
    return out


def convert_tool_choice(choice: Any, tools: list[Tool] | None) -> str | dict[str, Any]:
    if choice is None:
        return "auto"
    if choice.type == "none":
        return "none"
    if choice.type == "auto":
        return "auto"
    if not tools:
        raise RequestError(400, f"tool_choice.type: {choice.type!r} needs `tools`")
    if choice.type == "any":
        return "required"
    if choice.name not in {t.name for t in tools}:
        raise RequestError(400, f"tool_choice.name: no tool named {choice.name!r} in `tools`")
    return {"type": "function", "function": {"name": choice.name}}


def _response_format(output_config: OutputConfig | None) -> dict[str, Any] | None:
    fmt = output_config.format if output_config is not None else None
    if not fmt:
        return None
    if fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise RequestError(400, "output_config.format: only {\"type\": \"json_schema\", \"schema\": {...}} is "
                           "supported")
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}


CLEAR_THINKING = re.compile(r"clear_thinking_\d{8}")
CLEAR_TOOL_USES = re.compile(r"clear_tool_uses_\d{8}")


def keep_thinking_turns(req: CountTokensRequest) -> int | None:
    """How many of the last thinking turns keep their thinking under `context_management` (None: all), after
    checking every edit: `clear_thinking_*` with `keep` "all" (None) or `{"type": "thinking_turns", "value":
    N}` (absent: 1, Anthropic's default); `clear_tool_uses_*` accepted and not applied; any other type a
    400 naming it."""
    cm = req.context_management
    keep: int | None = None
    for i, edit in enumerate((cm.edits or []) if cm is not None else []):
        where = f"context_management.edits.{i}"
        etype = edit.get("type") if isinstance(edit, dict) else None
        if isinstance(etype, str) and CLEAR_THINKING.fullmatch(etype):
            value = edit.get("keep", {"type": "thinking_turns", "value": 1})
            if value == "all":
                continue
            if (not isinstance(value, dict) or value.get("type") != "thinking_turns"
                    or type(value.get("value")) is not int or value["value"] < 0):
                raise RequestError(400, f"{where}.keep: must be \"all\" or {{\"type\": \"thinking_turns\", "
                                   "\"value\": N}} with an integer N >= 0")
            keep = value["value"] if keep is None else min(keep, value["value"])
        elif isinstance(etype, str) and CLEAR_TOOL_USES.fullmatch(etype):
            continue
        else:
            raise RequestError(400, f"{where}.type: unknown context management edit type {etype!r} (this server "
                               "supports clear_thinking_* and accepts clear_tool_uses_* without applying it)")
    return keep


def applied_edits(req: CountTokensRequest) -> list[dict[str, Any]] | None:
    """The `context_management.applied_edits` of a response (None when the request had no
    `context_management`): one `clear_thinking` entry when it cleared any turn (`cleared_input_tokens` is
    filled in by the route, which can count tokens)."""
    if req.context_management is None:
        return None
    keep = keep_thinking_turns(req)
    n = len(thinking_turns_to_clear(req.messages, keep))
    if not n:
        return []
    etype = next(e["type"] for e in req.context_management.edits or [] if CLEAR_THINKING.fullmatch(e["type"]))
    return [{"type": etype, "cleared_thinking_turns": n, "cleared_input_tokens": 0}]


def to_chat_request(req: CountTokensRequest, model: str, signature_key: bytes, *,
                    apply_edits: bool = True) -> ChatRequest:
    """The shared ChatRequest of a validated Messages (or count_tokens) request; `model` is the served name,
    `signature_key` the server's key of thinking signatures; `apply_edits=False` keeps the thinking a
    `context_management` edit clears, unchecked (only to count the tokens it cleared, never to run)."""
    keep = keep_thinking_turns(req)
    chat = ChatRequest(
        model=model,
        messages=convert_messages(req.system, req.messages, signature_key, keep, keep_cleared=not apply_edits),
        mode=reasoning_mode(req.thinking, req.output_config),
        tools=convert_tools(req.tools),
        tool_choice=convert_tool_choice(req.tool_choice, req.tools),
        parallel_tool_calls=not (req.tool_choice is not None
                                 and getattr(req.tool_choice, "disable_parallel_tool_use", None)),
        response_format=_response_format(req.output_config),
    )
    if isinstance(req, MessagesRequest):
        chat.max_tokens = req.max_tokens
        if req.temperature is not None:
            chat.temperature = req.temperature
        if req.top_p is not None:
            chat.top_p = req.top_p
        if req.top_k is not None:
            chat.top_k = req.top_k
        chat.stop = list(req.stop_sequences or [])
        if req.metadata is not None:
            chat.user = req.metadata.user_id
    return chat


# ------------------------------------------------------------------------------------------------
# response rendering

_STOP_REASONS = {
    "stop": "end_turn",
    "tool_calls": "tool_use",
    "length": "max_tokens",
    "content_filter": "refusal",
}


def stop_reason(reason: str | None, stop_sequence: str | None = None) -> str:
    """Anthropic stop_reason of an engine/parser finish reason; `stop_sequence` (the matched stop string,
    when the backend reports one) makes a "stop" a "stop_sequence"."""
    if stop_sequence is not None and reason in (None, "stop"):
        return "stop_sequence"
    return _STOP_REASONS.get(reason or "stop", "end_turn")


def _matched_stop(finish: Finish) -> str | None:
    """The stop string the backend reports as matched; None when the generation stopped otherwise."""
    return finish.stop_sequence


def new_message_id() -> str:
    return "msg_" + secrets.token_hex(12)


SSEEvent = tuple[str, dict[str, Any]]


def sse(name: str, data: dict[str, Any]) -> str:
    """One Server-Sent Event with the `event:` line the anthropic SDK needs (serving.md 2.4)."""
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


class MessageRenderer:
    """Builds a Messages response from the backend's items: `start()` gives `message_start`, `feed(item)` the
    events one item causes, `finish()` the closing events; `message()` is the final message JSON (the
    non-streaming response). Only choice 0 exists (Anthropic has no `n`); other indices are ignored."""

    def __init__(self, model: str, input_tokens: int = 0, *, signature_key: bytes, message_id: str | None = None,
                 show_thinking: bool = True, context_management: dict[str, Any] | None = None) -> None:
        self.id = message_id or new_message_id()
        self.context_management = context_management  # {"applied_edits": [...]} when the request had edits
        self.model = model
        self.input_tokens = input_tokens
        self.show_thinking = show_thinking
        self.signature_key = signature_key
        self.content: list[dict[str, Any]] = []
        self._open: str | None = None  # "thinking" | "text" | "tool_use" (the last block of content)
        self._thinking: list[str] = []  # full thinking text of the open thinking block (for its signature)
        self._args: dict[int, list[str]] = {}  # tool call index -> argument fragments
        self._tool_block: dict[int, int] = {}  # tool call index -> block index
        self.finish_reason: str | None = None
        self.stop_sequence: str | None = None
        self.usage: Usage | None = None

    # ---------------------------------------------------------------- events
    def _usage(self, final: bool) -> dict[str, Any]:
        u = self.usage
        if u is None:
            return {"input_tokens": self.input_tokens, "output_tokens": 0, "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": 0}
        out = {"input_tokens": u.prompt_tokens - u.cached_tokens, "output_tokens": u.completion_tokens,
               "cache_creation_input_tokens": 0, "cache_read_input_tokens": u.cached_tokens}
        if final:
            out["output_tokens_details"] = {"thinking_tokens": u.reasoning_tokens}
        return out

    def start(self) -> list[SSEEvent]:
        return [("message_start", {"type": "message_start", "message": {
            "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": self._usage(False)}})]

    def _close(self) -> list[SSEEvent]:
        if self._open is None:
            return []
        index = len(self.content) - 1
        events: list[SSEEvent] = []
        if self._open == "thinking":
            block = self.content[index]
            text = "".join(self._thinking)
            block["thinking"] = text if self.show_thinking else ""
            block["signature"] = sign_thinking(text, self.signature_key)
            events.append(("content_block_delta", {"type": "content_block_delta", "index": index, "delta": {
                "type": "signature_delta", "signature": block["signature"]}}))
        elif self._open == "text":
            self.content[index]["text"] = "".join(self.content[index]["text"])
        elif self._open == "tool_use":
            call = next(c for c, b in self._tool_block.items() if b == index)
            self.content[index]["input"] = _tool_input("".join(self._args.get(call, ())))
        self._open = None
        events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
        return events

    def _open_block(self, kind: str, block: dict[str, Any]) -> list[SSEEvent]:
        events = self._close()
        self._open = kind
        self.content.append(block)
        shown = dict(block)
        if kind == "text":
            shown["text"] = ""
            block["text"] = []  # fragments until closed
        elif kind == "tool_use":
            shown["input"] = {}
        elif kind == "thinking":
            self._thinking = []  # each thinking block is signed for its own text
        events.append(("content_block_start", {"type": "content_block_start", "index": len(self.content) - 1,
                                               "content_block": shown}))
        return events

    def feed(self, item: ChoiceEvent | Usage) -> list[SSEEvent]:
        if isinstance(item, Usage):
            self.usage = item
            return []
        if item.index != 0:
            return []
        ev = item.event
        index = len(self.content) - 1
        if isinstance(ev, ReasoningDelta):
            if not ev.text:
                return []
            events = [] if self._open == "thinking" else self._open_block(
                "thinking", {"type": "thinking", "thinking": "", "signature": ""})
            self._thinking.append(ev.text)
            if self.show_thinking:
                events.append(("content_block_delta", {"type": "content_block_delta", "index": len(self.content) - 1,
                                                       "delta": {"type": "thinking_delta", "thinking": ev.text}}))
            return events
        if isinstance(ev, ContentDelta):
            if not ev.text:
                return []
            events = [] if self._open == "text" else self._open_block("text", {"type": "text", "text": ""})
            self.content[-1]["text"].append(ev.text)
            events.append(("content_block_delta", {"type": "content_block_delta", "index": len(self.content) - 1,
                                                   "delta": {"type": "text_delta", "text": ev.text}}))
            return events
        if isinstance(ev, ToolCallStart):
            events = self._open_block("tool_use", {"type": "tool_use", "id": ev.id, "name": ev.name, "input": {}})
            self._tool_block[ev.index] = len(self.content) - 1
            self._args[ev.index] = []
            return events
        if isinstance(ev, ToolCallArgumentsDelta):
            block = self._tool_block.get(ev.index)
            if block is None or not ev.text:
                return []
            self._args[ev.index].append(ev.text)
            return [("content_block_delta", {"type": "content_block_delta", "index": block,
                                             "delta": {"type": "input_json_delta", "partial_json": ev.text}})]
        if isinstance(ev, ToolCallEnd):
            if self._open == "tool_use" and self._tool_block.get(ev.index) == index:
                return self._close()
            return []
        if isinstance(ev, Finish):
            self.finish_reason = ev.reason
            self.stop_sequence = _matched_stop(ev)
            return []
        return []

    def finish(self) -> list[SSEEvent]:
        """Close the open block, then `message_delta` (stop_reason, cumulative usage) and `message_stop`."""
        events = self._close()
        reason = stop_reason(self.finish_reason, self.stop_sequence)
        events.append(("message_delta", {"type": "message_delta", "delta": {
            "stop_reason": reason, "stop_sequence": self.stop_sequence if reason == "stop_sequence" else None},
            "usage": self._usage(True)}))
        if self.context_management is not None:
            events[-1][1]["context_management"] = self.context_management
        events.append(("message_stop", {"type": "message_stop"}))
        return events

    def message(self) -> dict[str, Any]:
        """The complete message (after `finish()`)."""
        reason = stop_reason(self.finish_reason, self.stop_sequence)
        out = {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
               "content": self.content, "stop_reason": reason,
               "stop_sequence": self.stop_sequence if reason == "stop_sequence" else None,
               "usage": self._usage(True)}
        if self.context_management is not None:
            out["context_management"] = self.context_management
        return out


def _tool_input(arguments: str) -> dict[str, Any]:
    """A tool call's `input` object from its JSON arguments text (the parser guarantees an object; anything
    else is kept under "arguments" rather than lost)."""
    if not arguments.strip():
        return {}
    try:
        value = json.loads(arguments)
    except ValueError:
        return {"arguments": arguments}
    return value if isinstance(value, dict) else {"arguments": value}


def render_message(renderer: MessageRenderer, items: Iterable[ChoiceEvent | Usage]) -> dict[str, Any]:
    """The non-streaming response of a finished generation."""
    for item in items:
        renderer.feed(item)
    renderer.finish()
    return renderer.message()


async def render_stream(renderer: MessageRenderer, items: AsyncIterator[Any], *,
                        is_keepalive=lambda item: False) -> AsyncIterator[str]:
    """The SSE text of a streamed response: message_start, a ping, the blocks, message_delta, message_stop.
    Keep-alive items become pings. A failure after the start becomes `event: error` (a RequestError keeps
    its class, anything else is an api_error) and ends the stream; the item source is closed on every exit
    (the client leaving cancels this generator, which aborts the generation)."""
    for name, data in renderer.start():
        yield sse(name, data)
    yield sse("ping", {"type": "ping"})
    try:
        async for item in items:
            if is_keepalive(item):
                yield sse("ping", {"type": "ping"})
                continue
            for name, data in renderer.feed(item):
                yield sse(name, data)
        for name, data in renderer.finish():
            yield sse(name, data)
    except RequestError as e:
        yield sse("error", error_body(e.status, e.message))
    except Exception:
        log.exception("anthropic stream failed")
        yield sse("error", error_body(500, "internal server error while generating"))
    finally:
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


# ------------------------------------------------------------------------------------------------
# routes


def resolve_model(ctx: ServeContext, name: str) -> str:
    """The served model a Messages `model` names. Served names as they are; Claude Code's `[1m]`-style
    suffix dropped; `claude-opus*` -> a served name containing "pro", `claude-sonnet*`/`claude-haiku*` -> one
    containing "flash" (DeepSeek's mapping, serving.md 1.1), or the first served name when none does; any
    other name goes to `ctx.resolve_model` (404 for an unknown one)."""
    served = list(ctx.config.served_model_names)
    if name in served:
        return name
    base = re.sub(r"\[[^\]]*\]$", "", name) if isinstance(name, str) else name
    if base in served:
        return base
    if isinstance(base, str) and base.startswith("claude-"):
        want = "pro" if base.startswith("claude-opus") else "flash"
        for s in served:
            if want in s:
                return s
        return served[0]
    return ctx.resolve_model(name)


def router(ctx: ServeContext) -> APIRouter:
    """The Messages routes over `ctx`: POST /v1/messages and /v1/messages/count_tokens, and both again under
    /anthropic (DeepSeek's base URL, left out of the OpenAPI schema). Endpoint names make the schema."""
    api = APIRouter()
    key = ctx.config.signature_key

    def prepare(data: Any, cls: type[CountTokensRequest]) -> tuple[Any, ChatRequest]:
        """The decoded body validated as `cls` and converted (in the body reader's worker thread for a big body)."""
        req = parse_request(data, cls)
        return req, to_chat_request(req, resolve_model(ctx, req.model), key)

    def edits(req: Any, chat: ChatRequest, prompt_tokens: int | None = None) -> dict[str, Any] | None:
        """The response's `context_management` (applied edits, with the tokens they cleared from the prompt);
        `prompt_tokens`: the edited prompt's count when the caller has it (it is tokenised once)."""
        applied = applied_edits(req)
        if applied is None:
            return None
        if applied:
            whole = to_chat_request(req, chat.model, key, apply_edits=False)
            if prompt_tokens is None:
                prompt_tokens = ctx.backend.count_tokens(chat)
            applied[0]["cleared_input_tokens"] = max(ctx.backend.count_tokens(whole) - prompt_tokens, 0)
        return {"applied_edits": applied}

    async def messages(request: Request) -> Response:
        req, chat = await read_json(request, lambda data: prepare(data, MessagesRequest))
        show = not (req.thinking is not None and req.thinking.display == "omitted")
        if not req.stream:
            managed = await asyncio.to_thread(edits, req, chat) if req.context_management is not None else None
            items = await collect(await ctx.start(chat), request)  # aborts if the client goes away
            renderer = MessageRenderer(req.model, show_thinking=show, signature_key=key, context_management=managed)
            return JSONResponse(render_message(renderer, items))
        input_tokens = await asyncio.to_thread(ctx.backend.count_tokens, chat)
        managed = (await asyncio.to_thread(edits, req, chat, input_tokens) if req.context_management is not None
                   else None)
        gen = await ctx.start(chat)
        renderer = MessageRenderer(req.model, input_tokens, show_thinking=show, signature_key=key,
                                   context_management=managed)
        return sse_response(render_stream(renderer, gen, is_keepalive=lambda item: isinstance(item, KeepAlive)))

    async def count_tokens(request: Request) -> Response:
        _, chat = await read_json(request, lambda data: prepare(data, CountTokensRequest))
        n = await asyncio.to_thread(ctx.backend.count_tokens, chat)
        return JSONResponse({"input_tokens": n})

    for prefix in ("", "/anthropic"):
        api.add_api_route(prefix + "/v1/messages", messages, methods=["POST"], include_in_schema=prefix == "")
        api.add_api_route(prefix + "/v1/messages/count_tokens", count_tokens, methods=["POST"],
                          include_in_schema=prefix == "")
    return api


PROTOCOL = WireProtocol(name="anthropic", family="anthropic", prefixes=("/v1/messages", "/anthropic/"),
                        error_body=error_body, router=router)
