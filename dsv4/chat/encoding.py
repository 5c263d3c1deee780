"""OpenAI-shaped chat messages -> DeepSeek-V4 prompt text, byte for byte as the models were trained.

The released models have no Jinja template; the release ships a Python encoder
(`encoding/encoding_dsv4.py`) and four golden input/output pairs (`../shared/golden/encoding/`).
This module reproduces that encoder's output exactly for every well-formed conversation, and turns
malformed ones into an `EncodingError` (a `ValueError` naming the message index) instead of an
assertion, a crash, or a silently odd prompt.

Rendering rules (architecture spec §6.1):

* BOS once at the start; in thinking mode with `reasoning_effort="max"` the fixed
  "Reasoning Effort: ..." paragraph follows right after it. `None` and `"high"` render the same.
* system: raw content, then "\\n\\n" + the tools block if it carries `tools`, then "\\n\\n" + the
  response-format block if it carries `response_format`.
* developer: a user turn, `<｜User｜>` + content (+ tools / response format as for system).
* user: `<｜User｜>` + content. Tool messages have no turn of their own: they and the user messages
  around them merge into one user turn, parts joined by "\\n\\n", each tool result wrapped in
  `<tool_result>...</tool_result>` and ordered by the preceding assistant's tool_calls.
* latest_reminder: `<｜latest_reminder｜>` + content.
* After a user/developer message that is last, or followed by an assistant or latest_reminder
  message: `<｜Assistant｜>` + `<think>` (thinking mode, at the last user turn or everywhere when
  thinking is kept) or `</think>` (chat mode, and earlier turns when thinking is dropped).
* assistant: [reasoning + `</think>`] + content + ["\\n\\n" + DSML tool-call block] + EOS. The
  reasoning is rendered in thinking mode for turns after the last user turn (every turn when
  thinking is kept), never after a message carrying a `task`.
* drop_thinking (default on, thinking mode): earlier assistant turns lose their reasoning and
  developer messages before the last user turn are dropped; any message with `tools` turns it off.
* `task` on a message appends its quick-instruction token when the message is last or followed by
  an assistant/latest_reminder message: `action` as `<｜Assistant｜>` + think token + `<｜action｜>`,
  every other task directly after the message.

Inputs beyond the official encoder:

* request-level `tools` / `response_format` go onto the leading system (or developer) message,
  replacing what it has, or onto a new empty system message put first (what vLLM's V4 tokenizer does);
* content given as a list of text parts is joined with "\\n" (the OpenAI-server convention, as vLLM
  does before encoding); a tool message's list of text parts with "\\n\\n" (the official encoder's rule);
* an assistant message with `prefix: true` (DeepSeek's chat-prefix completion) must be last and is
  left open for the model to continue: no EOS, and when it has neither content nor tool calls its
  reasoning is left open too (no `</think>`), so the model continues the chain of thought;
  the official encoder's own `wo_eos: true` only leaves out the EOS, as there;
* tool-call `arguments` may be a JSON string (as OpenAI sends them) or a dict; an empty string
  means no arguments.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .format import (
    ASSISTANT,
    BOS,
    EOS,
    INVOKE_END,
    INVOKE_START,
    LATEST_REMINDER,
    PARAMETER_END,
    PARAMETER_START,
    REASONING_EFFORT_MAX,
    RESPONSE_FORMAT_TEMPLATE,
    TASK_TOKENS,
    THINK_END,
    THINK_START,
    TOOL_CALLS_END,
    TOOL_CALLS_SEPARATOR,
    TOOL_CALLS_START,
    TOOL_RESULT_END,
    TOOL_RESULT_START,
    TOOLS_TEMPLATE,
    USER,
)

__all__ = [
    "EncodingError",
    "ToolCall",
    "THINKING_MODES",
    "REASONING_EFFORTS",
    "encode_messages",
    "encode_segments",
    "render_tool_calls",
    "render_tools",
    "tool_call_from_openai",
]

THINKING_MODES = ("thinking", "chat")
REASONING_EFFORTS = (None, "high", "max")
ROLES = ("system", "developer", "user", "assistant", "tool", "latest_reminder")


class EncodingError(ValueError):
    """The messages cannot be encoded. `index` is the offending message's position in the list
    given to `encode_messages` (None for a problem with an argument); the text names both."""

    def __init__(self, problem: str, index: int | None = None):
        self.problem = problem
        self.index = index
        super().__init__(problem if index is None else f"messages[{index}]: {problem}")


@dataclass(frozen=True)
class ToolCall:
    """One tool call of an assistant turn: the function name and its decoded arguments object."""

    name: str
    arguments: dict[str, Any]
    id: str | None = None


# ------------------------------------------------------------------------------------------------
# JSON and DSML


def _to_json(value: Any) -> str:
    # the official `to_json`: Python's default separators, non-ASCII kept as is
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise EncodingError(f"value is not JSON-serializable: {e}") from None


def _check_json(value: Any, where: str, index: int | None) -> None:
    try:
        json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise EncodingError(f"{where} is not JSON-serializable: {e}", index) from None


def _decode_arguments(arguments: Any, where: str, index: int | None) -> dict[str, Any]:
    if arguments is None:
        return {}
    if isinstance(arguments, str):
        if not arguments.strip():
            return {}
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise EncodingError(f"{where}.arguments is not valid JSON ({e.msg} at char {e.pos})", index) from None
    if not isinstance(arguments, Mapping):
        raise EncodingError(
            f"{where}.arguments must be a JSON object, got {type(arguments).__name__}", index
        )
    for key in arguments:
        if not isinstance(key, str):
            raise EncodingError(f"{where}.arguments has a non-string key {key!r}", index)
    _check_json(arguments, f"{where}.arguments", index)
    return dict(arguments)


def tool_call_from_openai(call: Any, where: str = "tool_call", index: int | None = None) -> ToolCall:
    """A `ToolCall` from an OpenAI tool call `{"id", "type": "function", "function": {"name",
    "arguments"}}` (arguments a JSON string or a dict), or from a flat `{"name", "arguments"}`."""
    if isinstance(call, ToolCall):
        return call
    if not isinstance(call, Mapping):
        raise EncodingError(f"{where} must be an object, got {type(call).__name__}", index)
    call_id = call.get("id")
    if call_id is not None and not isinstance(call_id, str):
        raise EncodingError(f"{where}.id must be a string", index)
    if "function" in call:
        function = call["function"]
        if not isinstance(function, Mapping):
            raise EncodingError(f"{where}.function must be an object", index)
        where = f"{where}.function"
        if call_id is None and isinstance(function.get("id"), str):
            call_id = function["id"]  # the official encoder also looks here
    else:
        function = call
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise EncodingError(f"{where}.name must be a non-empty string", index)
    arguments = _decode_arguments(function.get("arguments"), where, index)
    return ToolCall(name=name, arguments=arguments, id=call_id or None)


def _render_parameter(key: str, value: Any) -> str:
    if isinstance(value, str):
        return f'{PARAMETER_START}{key}" string="true">{value}{PARAMETER_END}'
    return f'{PARAMETER_START}{key}" string="false">{_to_json(value)}{PARAMETER_END}'


def _render_invoke(call: ToolCall) -> str:
    params = "\n".join(_render_parameter(k, v) for k, v in call.arguments.items())
    return f'{INVOKE_START}{call.name}">\n{params}\n{INVOKE_END}'


def render_tool_calls(tool_calls: Sequence[ToolCall | Mapping[str, Any]]) -> str:
    """One assistant turn's tool calls as the DSML block the model writes, from
    `<｜DSML｜tool_calls>` to `</｜DSML｜tool_calls>` (in a prompt it follows the content after
    "\\n\\n"). A string-valued argument is written raw with `string="true"`, anything else as JSON
    with `string="false"`; arguments keep their order."""
    calls = [tool_call_from_openai(c, f"tool_calls[{i}]") for i, c in enumerate(tool_calls)]
    if not calls:
        raise EncodingError("tool_calls is empty")
    body = "\n".join(_render_invoke(c) for c in calls)
    return f"{TOOL_CALLS_START}\n{body}\n{TOOL_CALLS_END}"


def _function_schemas(tools: Any, where: str, index: int | None) -> list[dict[str, Any]]:
    if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)):
        raise EncodingError(f"{where} must be a list of tools", index)
    schemas = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise EncodingError(
                f'{where}[{i}] must be {{"type": "function", "function": {{"name": ..., ...}}}}', index
            )
        _check_json(function, f"{where}[{i}].function", index)
        schemas.append(dict(function))
    return schemas


def render_tools(tools: Sequence[Mapping[str, Any]]) -> str:
    """The tools block of the system prompt for OpenAI-shaped tools: the fixed instructions, then
    each tool's function object as one line of JSON."""
    schemas = _function_schemas(tools, "tools", None)
    return TOOLS_TEMPLATE.replace("{tool_schemas}", "\n".join(_to_json(s) for s in schemas))


def _render_response_format(response_format: Any) -> str:
    return RESPONSE_FORMAT_TEMPLATE.replace("{schema}", _to_json(response_format))


# ------------------------------------------------------------------------------------------------
# Normalized messages


@dataclass
class _Block:
    text: str
    tool: bool = False  # a tool result
    order: int = 0  # tool results: position of their call in the assistant's tool_calls


@dataclass
class _Msg:
    role: str
    index: int | None  # position in the caller's list (of the first source message, once merged)
    content: str = ""
    blocks: list[_Block] = field(default_factory=list)  # user turns
    tools: list[dict[str, Any]] | None = None
    response_format: Any = None
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    task: str | None = None
    prefix: bool = False  # chat-prefix completion: continue this (last) assistant message
    wo_eos: bool = False


def _text(value: Any, what: str, index: int, joiner: str = "\n") -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        texts = []
        for i, part in enumerate(value):
            if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise EncodingError(f"{what}[{i}]: only text parts are supported, got {kind!r}", index)
        return joiner.join(texts)
    raise EncodingError(f"{what} must be a string or a list of text parts, got {type(value).__name__}", index)


def _normalize(messages: Sequence[Any]) -> list[_Msg]:
    out: list[_Msg] = []
    last_assistant: _Msg | None = None
    n = len(messages)
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise EncodingError(f"a message must be an object, got {type(m).__name__}", i)
        role = m.get("role")
        if role not in ROLES:
            raise EncodingError(f"unknown role {role!r} (expected one of {', '.join(ROLES)})", i)
        msg = _Msg(role=role, index=i)

        task = m.get("task")
        if task is not None and task not in TASK_TOKENS:
            raise EncodingError(f"unknown task {task!r} (expected one of {', '.join(TASK_TOKENS)})", i)
        msg.task = task

        for key in ("tools", "response_format"):
            if m.get(key) and role not in ("system", "developer"):
                raise EncodingError(f"`{key}` is only allowed on system and developer messages", i)
        if m.get("tools"):
            msg.tools = _function_schemas(m["tools"], "tools", i)
        if m.get("response_format"):
            _check_json(m["response_format"], "response_format", i)
            msg.response_format = m["response_format"]
        if m.get("prefix") and role != "assistant":
            raise EncodingError("`prefix` is only allowed on an assistant message", i)

        if role == "tool":
            msg.content = _text(m.get("content"), "content", i, joiner="\n\n")
            if last_assistant is None or not last_assistant.tool_calls:
                raise EncodingError("a tool message must follow an assistant message with tool_calls", i)
            call_id = m.get("tool_call_id")
            if call_id is not None and not isinstance(call_id, str):
                raise EncodingError("tool_call_id must be a string", i)
            ids = [c.id for c in last_assistant.tool_calls]
            order = 0  # unmatched results sort first, as in the official encoder
            if call_id:
                if call_id in ids:
                    order = ids.index(call_id)
                elif any(ids):
                    raise EncodingError(
                        f"tool_call_id {call_id!r} matches none of the tool calls of "
                        f"messages[{last_assistant.index}] ({', '.join(repr(x) for x in ids if x)})",
                        i,
                    )
            msg.blocks = [_Block(msg.content, tool=True, order=order)]
        else:
            msg.content = _text(m.get("content"), "content", i)

        if role == "developer" and not msg.content:
            raise EncodingError("a developer message needs content", i)
        if role == "assistant":
            reasoning = m.get("reasoning_content")
            if reasoning is None:
                reasoning = m.get("reasoning")  # vLLM's name for it
            if reasoning is not None and not isinstance(reasoning, str):
                raise EncodingError("reasoning_content must be a string", i)
            msg.reasoning = reasoning or ""
            calls = m.get("tool_calls")
            if calls:
                if not isinstance(calls, Sequence) or isinstance(calls, (str, bytes)):
                    raise EncodingError("tool_calls must be a list", i)
                msg.tool_calls = [tool_call_from_openai(c, f"tool_calls[{k}]", i) for k, c in enumerate(calls)]
            msg.prefix = bool(m.get("prefix"))
            msg.wo_eos = bool(m.get("wo_eos"))
            if msg.prefix and i != n - 1:
                raise EncodingError("an assistant message with `prefix` must be the last message", i)
            last_assistant = msg
        out.append(msg)
    return out


def _attach_request_fields(msgs: list[_Msg], tools: Any, response_format: Any) -> list[_Msg]:
    if not tools and not response_format:
        return msgs
    if msgs and msgs[0].role in ("system", "developer"):
        head = replace(msgs[0])
        rest = msgs[1:]
    else:
        head = _Msg(role="system", index=None)
        rest = msgs
    if tools:
        head.tools = _function_schemas(tools, "tools", None)
    if response_format:
        _check_json(response_format, "response_format", None)
        head.response_format = response_format
    return [head, *rest]


def _merge_user_turns(msgs: list[_Msg]) -> list[_Msg]:
    """Tool results and the user messages next to them become one user turn (official
    `merge_tool_messages`), its tool results ordered by the assistant's tool_calls."""
    merged: list[_Msg] = []
    for m in msgs:
        prev = merged[-1] if merged and merged[-1].role == "user" else None
        if m.role == "tool":
            if prev is not None:
                prev.blocks.append(m.blocks[0])
            else:
                merged.append(_Msg(role="user", index=m.index, blocks=list(m.blocks)))
        elif m.role == "user":
            if prev is not None and prev.task is None:
                prev.blocks.append(_Block(m.content))
                prev.task = m.task  # (the official encoder loses a task merged this way)
            else:
                merged.append(replace(m, blocks=[_Block(m.content)]))
        else:
            merged.append(m)
    for m in merged:
        slots = [k for k, b in enumerate(m.blocks) if b.tool]
        if len(slots) > 1:
            ordered = sorted((m.blocks[k] for k in slots), key=lambda b: b.order)  # stable
            for k, b in zip(slots, ordered, strict=True):
                m.blocks[k] = b
    return merged


def _last_user_index(msgs: list[_Msg]) -> int:
    for k in range(len(msgs) - 1, -1, -1):
        if msgs[k].role in ("user", "developer"):
            return k
    return -1


def _drop_thinking(msgs: list[_Msg]) -> list[_Msg]:
    last_user = _last_user_index(msgs)
    kept = []
    for k, m in enumerate(msgs):
        if k >= last_user or m.role in ("user", "system", "latest_reminder"):
            kept.append(m)
        elif m.role == "assistant":
            kept.append(replace(m, reasoning=""))
        # developer messages before the last user turn are dropped
    return kept


def _prepare(messages: Sequence[Any], tools: Any, response_format: Any, thinking: bool,
             drop_thinking: bool) -> tuple[list[_Msg], bool, int]:
    """(the messages as rendered, whether earlier reasoning is dropped, the index of the last user turn)."""
    msgs = _merge_user_turns(_attach_request_fields(_normalize(messages), tools, response_format))
    drop = drop_thinking and not any(m.tools for m in msgs)
    if thinking and drop:
        msgs = _drop_thinking(msgs)
    return msgs, drop, _last_user_index(msgs)


# ------------------------------------------------------------------------------------------------
# Rendering


def _render(k: int, msgs: list[_Msg], thinking: bool, drop: bool, last_user: int) -> str:
    m = msgs[k]
    out = ""
    if m.role in ("system", "developer"):
        if m.role == "developer":
            out += USER
        out += m.content
        if m.tools:
            out += "\n\n" + TOOLS_TEMPLATE.replace("{tool_schemas}", "\n".join(_to_json(s) for s in m.tools))
        if m.response_format:
            out += "\n\n" + _render_response_format(m.response_format)
    elif m.role == "user":
        parts = [f"{TOOL_RESULT_START}{b.text}{TOOL_RESULT_END}" if b.tool else b.text for b in m.blocks]
        out += USER + "\n\n".join(parts)
    elif m.role == "latest_reminder":
        out += LATEST_REMINDER + m.content
    else:  # assistant
        prev_has_task = k > 0 and msgs[k - 1].task is not None
        if thinking and not prev_has_task and (not drop or k > last_user):
            out += m.reasoning
            if not (m.prefix and not m.content and not m.tool_calls):
                out += THINK_END
        out += m.content
        if m.tool_calls:
            out += TOOL_CALLS_SEPARATOR + render_tool_calls(m.tool_calls)
        if not (m.prefix or m.wo_eos):
            out += EOS

    if k + 1 < len(msgs) and msgs[k + 1].role not in ("assistant", "latest_reminder"):
        return out
    if m.task is not None:
        if m.task == "action":
            out += ASSISTANT + (THINK_START if thinking else THINK_END)
        out += TASK_TOKENS[m.task]
    elif m.role in ("user", "developer"):
        out += ASSISTANT + (THINK_START if thinking and (not drop or k >= last_user) else THINK_END)
    return out


def encode_messages(
    messages: Sequence[Mapping[str, Any]],
    *,
    thinking_mode: str = "thinking",
    reasoning_effort: str | None = None,
    drop_thinking: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
    response_format: Any = None,
    add_default_bos_token: bool = True,
) -> str:
    """The prompt text for OpenAI-shaped `messages` (see the module docstring for the rules).

    thinking_mode: "thinking" (prompt ends `<｜Assistant｜><think>`) or "chat" (ends
    `<｜Assistant｜></think>`). reasoning_effort: None or "high" (the same prompt), or "max" (the
    think-max preamble; thinking mode only). drop_thinking: drop the reasoning of assistant turns
    before the last user turn (off automatically when any message carries tools). tools /
    response_format: request-level fields, put on the leading system message. The generation
    prompt follows a final user/developer message; a final assistant message is rendered complete
    (with EOS) unless it has `prefix: true`. Raises `EncodingError` for malformed input.
    """
    if thinking_mode not in THINKING_MODES:
        raise EncodingError(f"thinking_mode must be 'thinking' or 'chat', got {thinking_mode!r}")
    if reasoning_effort not in REASONING_EFFORTS:
        raise EncodingError(f"reasoning_effort must be None, 'high' or 'max', got {reasoning_effort!r}")
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise EncodingError("messages must be a list of message objects")
    if not messages:
        raise EncodingError("messages is empty")
    thinking = thinking_mode == "thinking"
    msgs, drop, last_user = _prepare(messages, tools, response_format, thinking, drop_thinking)
    prompt = BOS if add_default_bos_token else ""
    if thinking and reasoning_effort == "max":
        prompt += REASONING_EFFORT_MAX
    return prompt + "".join(_render(k, msgs, thinking, drop, last_user) for k in range(len(msgs)))


def encode_segments(
    messages: Sequence[Mapping[str, Any]],
    *,
    thinking_mode: str = "chat",
    drop_thinking: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> list[tuple[str, bool]]:
    """`encode_messages(messages, thinking_mode=..., drop_thinking=..., tools=...)` cut into
    (text, produced_by_assistant) pieces that join to exactly that text: what a fine-tuning loss mask needs.

    Why not render prefixes of the conversation and diff them: with drop_thinking, a later user turn changes
    how *earlier* turns render (their reasoning is dropped and their turn opens with `</think>`), so a prefix
    render is not a prefix of the full text. Instead each message is rendered as `encode_messages` renders it
    and each assistant message's own part is split off; the join is checked against `encode_messages`."""
    text = encode_messages(messages, thinking_mode=thinking_mode, drop_thinking=drop_thinking, tools=tools)
    thinking = thinking_mode == "thinking"
    msgs, drop, last_user = _prepare(messages, tools, None, thinking, drop_thinking)
    segments: list[tuple[str, bool]] = [(BOS, False)]
    for k, m in enumerate(msgs):
        piece = _render(k, msgs, thinking, drop, last_user)
        if m.role == "assistant":
            # the message's own text: rendered as if it were last and carried no task (a task token after it
            # is a prompt for the next turn, not something this turn produced)
            own = _render(k, [*msgs[:k], replace(m, task=None)], thinking, drop, last_user)
            if not piece.startswith(own):
                raise AssertionError("encode_segments: an assistant turn no longer renders first")
            segments += [(own, True), (piece[len(own):], False)]
        else:
            segments.append((piece, False))
    segments = [(s, a) for s, a in segments if s]
    if "".join(s for s, _ in segments) != text:
        raise AssertionError("encode_segments: the per-message rendering no longer joins to encode_messages")
    return segments
