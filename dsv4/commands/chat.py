"""`dsv4 chat`: an interactive terminal chat over the engine, in process (no server).

The model, tokenizer, engine and `ChatService` are built by the runtime exactly as `dsv4 serve` builds them, with
the same model and engine flags (`--model` is a preset with random weights or a checkpoint directory; `--kv-format`,
`--kv-budget`, ...), one conversation at a time, so the chat is the server's own request path: the V4
chat template, the reasoning modes, the streaming parser. Each turn streams the reply as it is generated, the
reasoning apart from the answer (dimmed on a terminal, labelled otherwise), tool calls as name + JSON
arguments, then one line of token counts and speed. The history is kept across turns: each assistant turn
goes back with its content and reasoning_content (the encoder applies V4's retention rule).

Commands at the prompt: /mode non-think|think-high|think-max, /reset (forget the history), /help, /exit
(or EOF). Ctrl-C while a reply streams stops that reply (its engine request is aborted, the turn is not kept)
and returns to the prompt; Ctrl-C at the prompt exits.

`--prompt TEXT` (repeatable) runs those turns without reading stdin and exits: a scripted conversation.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any

from .. import runtime
from ..serve.request import REASONING_MODES as MODES
from .common import positive_int
from .runtime_flags import add_engine_flags, add_model_flags, engine_config, error_line, model_source

HELP = ("commands: /mode non-think|think-high|think-max  switch the reasoning mode\n"
        "          /reset  forget the conversation    /exit  quit (or EOF; Ctrl-C at the prompt)\n"
        "          Ctrl-C while a reply streams stops that reply")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with the model in the terminal (no server)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p, f"checkpoint directory or preset, loaded as `dsv4 serve` loads it (default: "
                       f"{runtime.DEMO!r}, the demo model shipped in the package)")
    p.add_argument("--mode", choices=MODES, default="think-high", help="reasoning mode (default: think-high)")
    p.add_argument("--system", default=None, metavar="TEXT", help="system message")
    p.add_argument("--max-tokens", type=positive_int, default=None, metavar="N",
                   help="completion tokens per reply (default: what the context leaves, at most 4096)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (non-think mode; thinking modes sample at 1.0)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: unseeded)")
    p.add_argument("--show-reasoning", dest="show_reasoning", action="store_true", default=True,
                   help="print the reasoning before the answer (the default)")
    p.add_argument("--hide-reasoning", dest="show_reasoning", action="store_false",
                   help="print only the answer (the model still reasons in thinking modes)")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="a user turn to run without reading stdin (repeat for several turns), then exit")
    add_engine_flags(p)
    p.set_defaults(run=run)


# ---------------------------------------------------------------- building the service
def build_service(args: argparse.Namespace) -> Any:
    """The `ChatService` `dsv4 serve` would run for these flags, one request at a time. Tests replace this
    function to chat with a scripted engine."""
    server = runtime.ServerConfig(max_output_tokens=args.max_tokens or runtime.ServerConfig.max_output_tokens)
    return runtime.build_service(model_source(args), engine_config(args, max_batch=1), server)


# ---------------------------------------------------------------- rendering a reply
DIM, BOLD, RESET = "\x1b[2m", "\x1b[1m", "\x1b[0m"


class View:
    """Writes one reply as its events arrive: a "[thinking]" section (dimmed on a terminal), an "[answer]"
    section, tool calls as `name {json}`, and a closing stats line. Plain labels when stdout is not a TTY."""

    def __init__(self, show_reasoning: bool, color: bool) -> None:
        self.show_reasoning = show_reasoning
        self.color = color
        self.section: str | None = None
        self.at_line_start = True

    def write(self, text: str, style: str = "") -> None:
        if not text:
            return
        out = sys.stdout
        if style and self.color:  # the reset before a closing newline, so the next line starts plain
            body, end = (text[:-1], "\n") if text.endswith("\n") else (text, "")
            text = f"{style}{body}{RESET}{end}"
        out.write(text)
        out.flush()
        self.at_line_start = text.endswith("\n")

    def newline(self) -> None:
        if not self.at_line_start:
            self.write("\n")

    def enter(self, section: str, label: str, style: str = "") -> None:
        if self.section != section:
            self.newline()
            self.section = section
            if label:
                self.write(label + "\n", style)

    def reasoning(self, text: str) -> None:
        if self.show_reasoning:
            self.enter("reasoning", "[thinking]", DIM)
            self.write(text, DIM)

    def content(self, text: str) -> None:
        if self.section is None and not text.strip():
            return  # the blank lines a reply may open with
        self.enter("answer", "[answer]", BOLD)
        self.write(text)

    def tool_start(self, name: str) -> None:
        self.section = "tool"
        self.newline()
        self.write("[tool call] ", BOLD)
        self.write(f"{name} ")

    def tool_arguments(self, text: str) -> None:
        self.write(text)

    def tool_end(self) -> None:
        self.newline()

    def end(self, reply: Reply, seconds: float) -> None:
        self.newline()
        if reply.finish_reason == "length":
            self.write("[stopped: max tokens reached]\n", DIM)
        u = reply.usage
        if u is not None:
            speed = u.completion_tokens / seconds if seconds > 0 else 0.0
            self.write(f"[{u.completion_tokens} tokens ({u.reasoning_tokens} reasoning), prompt {u.prompt_tokens} "
                       f"({u.cached_tokens} cached), {speed:.1f} tok/s, {seconds:.2f} s]\n", DIM)

    def interrupted(self) -> None:
        self.newline()
        self.write("[reply stopped]\n", DIM)


@dataclass
class Reply:
    """What one streamed reply said (the assistant message for the history) and its usage."""

    reasoning: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    calls: dict[int, list[str]] = field(default_factory=dict)  # index -> [id, name, argument parts...]
    finish_reason: str | None = None
    usage: Any = None

    def message(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": "".join(self.content)}
        if self.reasoning:
            msg["reasoning_content"] = "".join(self.reasoning)
        if self.calls:
            msg["tool_calls"] = [{"id": c[0], "type": "function", "function": {"name": c[1],
                                                                              "arguments": "".join(c[2:])}}
                                 for _, c in sorted(self.calls.items())]
        return msg


async def stream_reply(stream: AsyncIterator[Any], reply: Reply, view: View) -> None:
    """Consume a `ChatService.generate` stream into `reply`, writing it with `view`. Cancelling this (Ctrl-C)
    closes the stream, which aborts the engine request."""
    from ..chat.events import (
        ContentDelta,
        Finish,
        ReasoningDelta,
        ToolCallArgumentsDelta,
        ToolCallEnd,
        ToolCallStart,
    )
    from ..serve.request import Usage

    try:
        async for item in stream:
            if isinstance(item, Usage):
                reply.usage = item
                continue
            ev = item.event
            if isinstance(ev, ReasoningDelta):
                reply.reasoning.append(ev.text)
                view.reasoning(ev.text)
            elif isinstance(ev, ContentDelta):
                reply.content.append(ev.text)
                view.content(ev.text)
            elif isinstance(ev, ToolCallStart):
                reply.calls[ev.index] = [ev.id, ev.name]
                view.tool_start(ev.name)
            elif isinstance(ev, ToolCallArgumentsDelta):
                reply.calls[ev.index].append(ev.text)
                view.tool_arguments(ev.text)
            elif isinstance(ev, ToolCallEnd):
                view.tool_end()
            elif isinstance(ev, Finish):
                reply.finish_reason = ev.reason
    finally:
        await stream.aclose()


def run_interruptibly(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]) -> bool:
    """Run `coro` on `loop`; the first Ctrl-C cancels it (its `finally` blocks run, so the engine request is
    aborted) and returns False, a second one raises KeyboardInterrupt. True when it completed."""
    task = loop.create_task(coro)
    interrupted = False

    def on_sigint(signum: int, frame: Any) -> None:
        nonlocal interrupted
        if interrupted or task.done():
            raise KeyboardInterrupt
        interrupted = True
        loop.call_soon_threadsafe(task.cancel)

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if main else None
    try:
        loop.run_until_complete(task)
    except asyncio.CancelledError:
        if not interrupted:
            raise
        return False
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
    return True


# ---------------------------------------------------------------- the conversation
class Chat:
    """One conversation: the history, the mode, and a turn at a time on one event loop (the engine's)."""

    def __init__(self, service: Any, args: argparse.Namespace) -> None:
        self.service = service
        self.args = args
        self.mode = args.mode
        self.history: list[dict[str, Any]] = []
        self.reset()
        color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
        self.view_options = (args.show_reasoning, color)
        self.loop = asyncio.new_event_loop()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.args.system}] if self.args.system else []

    def close(self) -> None:
        loop = self.loop
        pending = asyncio.all_tasks(loop)
        for t in pending:
            t.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    def turn(self, text: str) -> bool:
        """One user turn: stream the reply and keep both in the history. False on an error."""
        from ..serve.request import ChatRequest, RequestError

        user = {"role": "user", "content": text}
        kw: dict[str, Any] = {} if self.args.temperature is None else {"temperature": self.args.temperature}
        request = ChatRequest(model=self.service.model_names[0], messages=[*self.history, user], mode=self.mode,
                              max_tokens=self.args.max_tokens, seed=self.args.seed, **kw)
        try:
            stream = self.service.generate(request)  # validates now: RequestError before any output
        except RequestError as err:
            print(f"dsv4 chat: {err.message}", file=sys.stderr)
            return False
        reply, view = Reply(), View(*self.view_options)
        start = time.perf_counter()
        try:
            done = run_interruptibly(self.loop, stream_reply(stream, reply, view))
        except (RequestError, RuntimeError, ValueError) as err:
            view.newline()
            print(f"dsv4 chat: the reply failed: {err}", file=sys.stderr)
            return False
        if not done:
            view.interrupted()  # the turn is dropped: the model never finished its answer
            return True
        view.end(reply, time.perf_counter() - start)
        self.history += [user, reply.message()]
        return True

    def command(self, line: str) -> bool:
        """A /command; False when it ends the chat."""
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.reset()
            print("[history cleared]")
        elif name == "/mode" and rest in MODES:
            self.mode = rest
            print(f"[mode: {rest}]")
        elif name == "/mode":
            print(f"[mode: {self.mode}]" if not rest else f"unknown mode {rest!r}; choose from {', '.join(MODES)}")
        else:
            print(HELP)
        return True

    def interactive(self) -> int:
        print(f"dsv4 chat: {self.service.model_names[0]}, mode {self.mode}. /help for commands, /exit to quit.",
              file=sys.stderr)
        tty = sys.stdin.isatty()
        while True:
            try:
                line = input("> ")
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:
                print()
                return 0
            if not tty:
                print(line)  # echo piped input so the transcript reads like the terminal
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return 0
                continue
            self.turn(line)


def run(args: argparse.Namespace) -> int:
    try:
        service = build_service(args)
    except ValueError as err:  # OptionError, CheckpointError, the engine's checks
        print(error_line("chat", err), file=sys.stderr)
        return 2
    chat = Chat(service, args)
    try:
        if args.prompt is None:
            return chat.interactive()
        for text in args.prompt:
            print(f"> {text}")
            if not chat.turn(text):
                return 1
        return 0
    except KeyboardInterrupt:  # a second Ctrl-C while a reply was being stopped
        print()
        return 130
    finally:
        with contextlib.suppress(Exception):
            chat.close()
