"""`dsv4 chat` end to end in process: the command over a `ChatService` whose engine is `ScriptedEngine`
(tests/serve_stubs.py), so the template, the parser and the streaming all run for real; and one turn with the
real `tiny` engine (random weights)."""

from __future__ import annotations

import builtins
import io
import signal

import pytest
from serve_stubs import ScriptedEngine, ScriptedStream, think, tool_calls

from dsv4.chat.tokenizer import Tokenizer
from dsv4.cli import main
from dsv4.commands import chat as chat_command
from dsv4.serve.service import ChatService

REASONING = "The user greets me. I should greet back."
ANSWER = "Hello! Nice to meet you."
SECOND = "Paris is the capital of France."


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.bundled()


@pytest.fixture
def engine(tokenizer, monkeypatch) -> ScriptedEngine:
    """A scripted engine the command chats with (`build_service` replaced); replies depend on the prompt's mode."""
    def reply(prompt: str) -> str:
        answer = SECOND if "capital" in prompt.rsplit("<｜User｜>", 1)[-1] else ANSWER
        return think(REASONING, answer) if prompt.endswith("<think>") else answer

    engine = ScriptedEngine(tokenizer, replies=reply)
    service = ChatService(engine, tokenizer, ["dsv4-test"], max_context=2048, max_output_tokens=512)
    monkeypatch.setattr(chat_command, "build_service", lambda args: service)
    return engine


def prompts(engine: ScriptedEngine) -> list[str]:
    return [engine.tokenizer.decode(ids) for ids, _ in engine.requests]


def test_two_scripted_turns_show_reasoning_apart_and_keep_history(engine, capsys):
    assert main(["chat", "--prompt", "Hi there", "--prompt", "What is the capital of France?"]) == 0
    out = capsys.readouterr().out
    first, second = out.split("> What is the capital of France?")
    assert first.startswith("> Hi there\n")
    # reasoning under its label, then the answer under its own, then the stats line
    assert first.index("[thinking]") < first.index(REASONING) < first.index("[answer]") < first.index(ANSWER)
    assert f"[thinking]\n{REASONING}\n[answer]\n{ANSWER}\n" in first
    assert "tokens (" in first and "cached)" in first and "tok/s" in first
    assert SECOND in second and REASONING in second
    assert "\x1b[" not in out  # no ANSI codes when stdout is not a terminal
    # multi-turn: the second prompt holds the first turn (its answer; its reasoning dropped by the encoder)
    p1, p2 = prompts(engine)
    assert "Hi there" in p2 and ANSWER in p2 and REASONING not in p2
    assert p2.endswith("What is the capital of France?<｜Assistant｜><think>")


def test_non_think_mode_and_hide_reasoning(engine, capsys):
    assert main(["chat", "--mode", "non-think", "--prompt", "Hi"]) == 0
    out = capsys.readouterr().out
    assert "[thinking]" not in out and REASONING not in out and f"[answer]\n{ANSWER}\n" in out
    assert prompts(engine)[-1].endswith("<｜Assistant｜></think>")
    assert main(["chat", "--hide-reasoning", "--prompt", "Hi"]) == 0
    out = capsys.readouterr().out
    assert prompts(engine)[-1].endswith("<think>")  # the model still thinks; it is just not printed
    assert "[thinking]" not in out and REASONING not in out and ANSWER in out
    assert main(["chat", "--mode", "think-max", "--system", "Be brief.", "--prompt", "Hi"]) == 0
    assert REASONING in capsys.readouterr().out
    assert "Be brief." in prompts(engine)[-1]


def test_stdin_commands_reset_and_mode(engine, capsys, monkeypatch):
    script = "Hi\n/mode non-think\nWhat is the capital of France?\n/mode bogus\n/reset\nAnd now?\n/exit\nnever sent\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    assert main(["chat"]) == 0
    out = capsys.readouterr().out
    assert "[mode: non-think]" in out and "unknown mode 'bogus'" in out and "[history cleared]" in out
    p1, p2, p3 = prompts(engine)  # /exit ended it: "never sent" was not
    assert p1.endswith("<think>") and p2.endswith("</think>") and p3.endswith("</think>")
    assert ANSWER in p2  # history kept across the mode switch
    assert "Hi" not in p3 and ANSWER not in p3 and "And now?" in p3  # /reset forgot it
    after_switch = out.split("[mode: non-think]")[1]
    assert SECOND in after_switch and REASONING not in after_switch
    # EOF ends the chat too, and Ctrl-C at the prompt exits cleanly
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n"))
    assert main(["chat"]) == 0

    def ctrl_c(prompt: str = "") -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(builtins, "input", ctrl_c)
    assert main(["chat"]) == 0


def test_tool_calls_are_printed_with_their_arguments(engine, capsys):
    engine.replies = [tool_calls([{"name": "get_weather", "arguments": {"city": "Paris"}}], reasoning=REASONING),
                      think(REASONING, ANSWER)]
    assert main(["chat", "--prompt", "Weather?", "--prompt", "Thanks"]) == 0
    out = capsys.readouterr().out
    assert '[tool call] get_weather {"city": "Paris"}' in out
    assert "get_weather" in prompts(engine)[1]  # the call went back in the history


def test_ctrl_c_stops_the_reply_and_the_chat_goes_on(engine, tokenizer, capsys, monkeypatch):
    class Interrupting(ScriptedStream):
        async def __anext__(self):
            if self._i == 3 and self._owner.requests[0][0] == self._prompt:
                signal.raise_signal(signal.SIGINT)  # as if the user pressed Ctrl-C mid-reply
            return await super().__anext__()

    engine.stream_class = Interrupting
    engine.replies = [think(REASONING, "An answer nobody will read. " * 20), think(REASONING, ANSWER)]
    engine.delay = 0.001
    monkeypatch.setattr("sys.stdin", io.StringIO("Tell me a story\nHi\n"))
    assert main(["chat"]) == 0
    out = capsys.readouterr().out
    assert "[reply stopped]" in out and "nobody will read" not in out and ANSWER in out
    assert engine.aborted == [0] and not engine.active  # the engine request was aborted
    assert "Tell me a story" not in prompts(engine)[1]  # the stopped turn is not kept
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_bad_options_are_cli_errors(engine, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["chat", "--mode", "think-low"])
    assert exc.value.code == 2 and "invalid choice: 'think-low'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["chat", "--max-tokens", "0"])
    assert exc.value.code == 2 and "must be >= 1" in capsys.readouterr().err
    # a request the service refuses (max_tokens over its limit) is reported, not a traceback
    assert main(["chat", "--max-tokens", "100000", "--prompt", "Hi"]) == 1
    assert "at most 512" in capsys.readouterr().err


def test_missing_checkpoint_is_a_usage_error(capsys):
    assert main(["chat", "--model", "/nonexistent/checkpoint", "--prompt", "Hi"]) == 2
    assert "not a preset" in capsys.readouterr().err


def test_one_turn_with_the_real_tiny_engine(capsys):
    assert main(["chat", "--model", "tiny", "--max-tokens", "3", "--seed", "1", "--prompt", "Hello"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("> Hello\n") and "[3 tokens (" in out and "tok/s" in out


def test_terminal_output_dims_the_reasoning(engine, capsys, monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    assert main(["chat", "--prompt", "Hi"]) == 0
    out = capsys.readouterr().out
    assert f"\x1b[2m{REASONING}\x1b[0m" in out.replace("\x1b[0m\x1b[2m", "")  # the pieces, dimmed
    assert f"\n{ANSWER}\n" in out  # the answer itself is plain
