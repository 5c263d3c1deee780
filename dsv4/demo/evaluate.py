"""Held-out accuracy of the demo model, measured through the real HTTP server (`dsv4 eval-demo`).

The questions are the corpus's "test" split (`corpus.conversations(seed, ..., split="test")`), which no
training conversation shares; the first `per_skill` arithmetic, weather and calculator questions are graded.
Every request goes through the OpenAI route of a real server (in-process uvicorn over `dsv4 serve`'s context, or
`url=` for one already running), so the chat encoder, the engine, the detokenizer and the reply parser are part
of what is measured. Requests run concurrently (`workers`, default 8) so the engine batches them; decoding is
greedy (`temperature: 0`) and capped at `max_tokens`.

Metrics, per reasoning mode ("non-think": `thinking: {"type": "disabled"}`; "think-high": `reasoning_effort:
"high"`), each as k/n:
  arithmetic    the last integer in `message.content` equals the answer (the same questions in both modes);
  reasoning     think-high only: replies to the arithmetic questions with a non-empty `reasoning_content`;
  tool_call     weather and calculator questions (first user turn, with the conversation's `tools`): the
                reply's `tool_calls` is exactly one call of the expected tool whose arguments parse as JSON equal
                to the expected ones (well-formed and correct); `by_skill` splits it by tool;
  final_answer  the conversation up to and including the tool result (the corpus's own tool-call turn, then
                the tool message; non-think drops that turn's reasoning_content): every expected string (the
                temperature and sky, the calculator's value, or "no weather data") occurs in the content.

`evaluate(...)` prints the table and returns the report as a dict (`format_report` renders it again).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import corpus

__all__ = ["MODES", "SKILLS", "EvalError", "evaluate", "format_report", "grade_arithmetic", "grade_final",
           "grade_tool_call", "held_out", "last_integer", "serve_model", "stderr_progress"]

MODES = ("non-think", "think-high")
SKILLS = ("arithmetic", "weather", "calculator")
_INTEGER = re.compile(r"-?\d+")


class EvalError(RuntimeError):
    """The evaluation cannot run (no server, a request the server refused)."""


# ------------------------------------------------------------------------------------------------ questions
def held_out(seed: int, per_skill: int) -> dict[str, list[corpus.Conversation]]:
    """The first `per_skill` test-split conversations of each graded skill (deterministic in `seed`)."""
    if per_skill < 1:
        raise ValueError(f"per_skill must be >= 1, got {per_skill}")
    picked: dict[str, list[corpus.Conversation]] = {s: [] for s in SKILLS}
    for conv in corpus.conversations(seed, 10**9, "test"):
        bucket = picked.get(conv.meta["skill"])
        if bucket is not None and len(bucket) < per_skill:
            bucket.append(conv)
        if all(len(b) == per_skill for b in picked.values()):
            break
    return picked


# ------------------------------------------------------------------------------------------------ grading
def last_integer(text: str | None) -> int | None:
    """The last integer written in `text` (None if there is none)."""
    found = _INTEGER.findall(text or "")
    return int(found[-1]) if found else None


def grade_arithmetic(message: Mapping[str, Any] | None, answer: int) -> bool:
    """The last integer of the reply's content is the answer."""
    return message is not None and last_integer(message.get("content")) == answer


def grade_tool_call(message: Mapping[str, Any] | None, name: str, arguments: Mapping[str, Any]) -> bool:
    """The reply calls exactly one tool, `name`, with arguments that parse as JSON equal to `arguments`."""
    calls = (message or {}).get("tool_calls") or []
    if len(calls) != 1:
        return False
    function = calls[0].get("function") or {}
    if function.get("name") != name:
        return False
    try:
        return json.loads(function.get("arguments") or "") == dict(arguments)
    except (TypeError, ValueError):
        return False


def grade_final(message: Mapping[str, Any] | None, final: Sequence[str]) -> bool:
    """Every expected string occurs in the reply's content."""
    content = (message or {}).get("content") or ""
    return bool(final) and all(s in content for s in final)


# ------------------------------------------------------------------------------------------------ HTTP
@contextlib.contextmanager
def serve_model(model_dir: str | Path, max_concurrent: int = 8, timeout: float = 120.0) -> Iterator[str]:
    """`dsv4 serve --model model_dir` in a child process on a free loopback port (`dsv4 serve`'s defaults, the
    batch `max_concurrent`); yields the base URL once it answers, and stops the server on exit.

    A child, not a thread of this process: the client's request threads and the server's engine would share one
    interpreter lock, and the engine's step loop is Python (measured on 2 cores, 1,000 requests: 5.6 minutes
    with the server in this process, 3.3 with it in its own)."""
    from ..serve.background import free_port

    port = free_port()
    command = [sys.executable, "-m", "dsv4", "serve", "--model", str(model_dir), "--port", str(port),
               "--max-concurrent", str(max_concurrent), "--log-level", "warning"]
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        env = {k: v for k, v in os.environ.items() if k != "DSV4_API_KEY"}  # an open server on loopback
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, env=env)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if child.poll() is not None:
                    log.seek(0)
                    tail = log.read().decode("utf-8", "replace").strip().splitlines()[-5:]
                    raise EvalError(f"the evaluation server exited with status {child.returncode}: "
                                    + " / ".join(tail))
                try:
                    with urllib.request.urlopen(f"{url}/v1/models", timeout=5):
                        break
                except urllib.error.HTTPError:  # it answers; the requests will say what is wrong
                    break
                except (urllib.error.URLError, OSError):
                    if time.monotonic() > deadline:
                        raise EvalError(f"the evaluation server did not answer within {timeout:.0f} s") from None
                    time.sleep(0.2)
            yield url
        finally:
            child.terminate()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def _http(url: str, body: Any = None, api_key: str | None = None, timeout: float = 600.0) -> Any:
    data = None if body is None else json.dumps(body).encode("utf-8")
    headers = {"content-type": "application/json"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        detail = err.read().decode("utf-8", "replace")
        try:
            detail = json.loads(detail)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            pass
        raise EvalError(f"{url}: HTTP {err.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as err:
        raise EvalError(f"{url}: {getattr(err, 'reason', err)}") from None


def _served_model(url: str, api_key: str | None) -> str:
    models = _http(f"{url}/v1/models", api_key=api_key).get("data") or []
    if not models:
        raise EvalError(f"{url}/v1/models lists no model")
    return models[0]["id"]


# ------------------------------------------------------------------------------------------------ the run
@dataclass
class _Task:
    metric: str  # "arithmetic" | "tool_call" | "final_answer"
    mode: str
    conv: corpus.Conversation
    messages: list[dict[str, Any]]
    message: dict[str, Any] | None = None  # the reply
    tokens: int = 0


def _without_reasoning(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in m.items() if k != "reasoning_content"} for m in messages]


def _tasks(questions: Mapping[str, list[corpus.Conversation]], modes: Sequence[str]) -> list[_Task]:
    tasks = []
    for mode in modes:
        for conv in questions["arithmetic"]:
            tasks.append(_Task("arithmetic", mode, conv, conv.messages[:1]))
        for skill in ("weather", "calculator"):
            for conv in questions[skill]:
                tasks.append(_Task("tool_call", mode, conv, conv.messages[:1]))
                upto_result = conv.messages[:3]  # user, the tool-call turn, the tool result
                if mode == "non-think":
                    upto_result = _without_reasoning(upto_result)
                tasks.append(_Task("final_answer", mode, conv, upto_result))
    return tasks


def _body(task: _Task, model: str, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": task.messages, "temperature": 0, "max_tokens": max_tokens}
    if task.conv.tools:
        body["tools"] = task.conv.tools
    if task.mode == "non-think":
        body["thinking"] = {"type": "disabled"}
    else:
        body["reasoning_effort"] = "high"
    return body


def _count(k: int, n: int) -> dict[str, Any]:
    return {"k": k, "n": n, "rate": k / n if n else 0.0}


def _grade(tasks: list[_Task], modes: Sequence[str]) -> dict[str, dict[str, Any]]:
    metrics: dict[str, dict[str, Any]] = {}
    for mode in modes:
        mine = [t for t in tasks if t.mode == mode]
        arith = [t for t in mine if t.metric == "arithmetic"]
        calls = [t for t in mine if t.metric == "tool_call"]
        finals = [t for t in mine if t.metric == "final_answer"]
        row: dict[str, Any] = {
            "arithmetic": _count(sum(grade_arithmetic(t.message, t.conv.meta["answer"]) for t in arith), len(arith)),
        }
        if mode != "non-think":
            row["reasoning"] = _count(sum(bool((t.message or {}).get("reasoning_content")) for t in arith),
                                      len(arith))
        ok = [grade_tool_call(t.message, t.conv.meta["tool"], t.conv.meta["arguments"]) for t in calls]
        row["tool_call"] = _count(sum(ok), len(calls))
        row["tool_call"]["by_skill"] = {
            s: _count(sum(g for g, t in zip(ok, calls, strict=True) if t.conv.meta["skill"] == s),
                      sum(t.conv.meta["skill"] == s for t in calls)) for s in ("weather", "calculator")}
        row["tool_call"]["any_call"] = sum(bool((t.message or {}).get("tool_calls")) for t in calls)
        row["final_answer"] = _count(sum(grade_final(t.message, t.conv.meta["final"]) for t in finals), len(finals))
        row["completion_tokens"] = sum(t.tokens for t in mine)
        metrics[mode] = row
    return metrics


def evaluate(model_dir: str | Path | None = None, *, url: str | None = None, per_skill: int = 100, seed: int = 0,
             max_tokens: int = 400, workers: int = 8, modes: Sequence[str] = MODES, api_key: str | None = None,
             verbose: bool = True, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Grade `per_skill` held-out questions per skill through the server at `url`, or through one started here
    over `model_dir` (default `dsv4.demo.MODEL_DIR`). Prints the table when `verbose`; returns the report.
    `progress(done, total)` is called after each request. Raises EvalError when a request fails outright."""
    modes = tuple(modes)
    if not modes or any(m not in MODES for m in modes):
        raise ValueError(f"modes must be some of {MODES}, got {modes}")
    if url is None:
        from . import MODEL_DIR

        model_dir = Path(model_dir) if model_dir is not None else MODEL_DIR
        t0 = time.perf_counter()
        with serve_model(model_dir, max_concurrent=workers) as local:
            load_s = time.perf_counter() - t0
            report = evaluate(url=local, per_skill=per_skill, seed=seed, max_tokens=max_tokens, workers=workers,
                              modes=modes, api_key=api_key, verbose=False, progress=progress)
        report.update(model_dir=str(model_dir), url=None, load_seconds=load_s)
        if verbose:
            print("\n".join(format_report(report)))
        return report

    url = url.rstrip("/")
    questions = held_out(seed, per_skill)
    model = _served_model(url, api_key)
    tasks = _tasks(questions, modes)

    def ask(task: _Task) -> _Task:
        reply = _http(f"{url}/v1/chat/completions", _body(task, model, max_tokens), api_key=api_key)
        task.message = reply["choices"][0]["message"]
        task.tokens = (reply.get("usage") or {}).get("completion_tokens", 0)
        return task

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(ask, t) for t in tasks]
        for done, future in enumerate(as_completed(futures), 1):
            future.result()  # EvalError: the server refused or failed a request, which is not a wrong answer
            if progress is not None:
                progress(done, len(tasks))
    seconds = time.perf_counter() - t0
    report = {"model": model, "model_dir": None, "url": url, "seed": seed, "questions_per_skill": per_skill,
              "max_tokens": max_tokens, "workers": workers, "modes": list(modes), "requests": len(tasks),
              "seconds": seconds, "load_seconds": 0.0, "metrics": _grade(tasks, modes)}
    if verbose:
        print("\n".join(format_report(report)))
    return report


def format_report(report: Mapping[str, Any]) -> list[str]:
    """The report as a table: one row per metric, one column per mode, cells "k/n (rate%)"."""
    from ..text_table import table

    modes = report["modes"]
    metrics = report["metrics"]
    names = {"arithmetic": "arithmetic exact answer", "reasoning": "  with reasoning_content",
             "tool_call": "tool call (name + arguments)", "weather": "  get_weather", "calculator": "  calculator",
             "final_answer": "final answer after tool result"}

    def cell(c: Mapping[str, Any] | None) -> str:
        return "-" if c is None else f"{c['k']}/{c['n']} ({100 * c['rate']:.1f}%)"

    rows = []
    for key in ("arithmetic", "reasoning", "tool_call", "weather", "calculator", "final_answer"):
        if key in ("weather", "calculator"):
            cells = [cell(metrics[m]["tool_call"]["by_skill"][key]) for m in modes]
        else:
            cells = [cell(metrics[m].get(key)) for m in modes]
        rows.append([names[key], *cells])
    tokens = sum(metrics[m]["completion_tokens"] for m in modes)
    where = report.get("model_dir") or report["url"]
    head = (f"dsv4 eval-demo: {where} ({report['model']}), seed {report['seed']}, {report['questions_per_skill']} "
            f"questions per skill, greedy, max_tokens {report['max_tokens']}")
    tail = (f"{report['requests']} requests, {tokens} completion tokens in {report['seconds']:.1f} s "
            f"({tokens / max(report['seconds'], 1e-9):.1f} tok/s, {report['workers']} concurrent)")
    if report.get("load_seconds"):
        tail += f"; model load + server start {report['load_seconds']:.1f} s"
    return [head, *table(["metric", *modes], rows), tail]


def stderr_progress(every: int = 25) -> Callable[[int, int], None]:
    def show(done: int, total: int) -> None:
        if done % every == 0 or done == total:
            print(f"dsv4 eval-demo: {done}/{total} requests", file=sys.stderr, flush=True)
    return show
