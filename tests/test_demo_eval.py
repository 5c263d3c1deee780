"""`dsv4.demo.evaluate` and `dsv4 eval-demo`: the held-out evaluation through the real server, on the stand-in
model the demo-smoke recipe builds (barely trained, so only the report's structure and counts are checked), and
the grading rules on hand-written replies, right and wrong."""

from __future__ import annotations

import json

import pytest
from conftest import SHARED

from dsv4.cli import main
from dsv4.demo import corpus
from dsv4.demo.evaluate import (
    MODES,
    EvalError,
    evaluate,
    format_report,
    grade_arithmetic,
    grade_final,
    grade_tool_call,
    held_out,
    last_integer,
    serve_model,
)
from dsv4.demo.recipe import RECIPES, build_demo

PER_SKILL = 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-smoke")
    return build_demo(RECIPES["demo-smoke"], out, None, SHARED / "data" / "tinyshakespeare" / "input.txt")


def _check_counts(report, per_skill):
    assert report["modes"] == list(MODES)
    assert report["questions_per_skill"] == per_skill
    assert report["requests"] == len(MODES) * 5 * per_skill  # arithmetic + (tool call + final) x 2 tools
    for mode in MODES:
        m = report["metrics"][mode]
        expected = {"arithmetic": per_skill, "tool_call": 2 * per_skill, "final_answer": 2 * per_skill}
        if mode == "think-high":
            expected["reasoning"] = per_skill
        else:
            assert "reasoning" not in m
        for key, n in expected.items():
            assert m[key]["n"] == n, (mode, key)
            assert 0 <= m[key]["k"] <= n
            assert m[key]["rate"] == pytest.approx(m[key]["k"] / n)
        by_skill = m["tool_call"]["by_skill"]
        assert {s: c["n"] for s, c in by_skill.items()} == {"weather": per_skill, "calculator": per_skill}
        assert sum(c["k"] for c in by_skill.values()) == m["tool_call"]["k"]
        assert 0 <= m["tool_call"]["any_call"] <= 2 * per_skill
        assert m["completion_tokens"] > 0


def test_evaluate_through_the_server(model_dir, capsys):
    report = evaluate(model_dir, per_skill=PER_SKILL, max_tokens=12)
    _check_counts(report, PER_SKILL)
    assert report["model_dir"] == str(model_dir) and report["url"] is None
    assert report["model"] == model_dir.name
    out = capsys.readouterr().out
    assert "arithmetic exact answer" in out and "tool call" in out and f"/{PER_SKILL} (" in out
    assert out.strip().splitlines() == format_report(report)
    json.dumps(report)  # the report is JSON as it is


def test_cli_against_a_running_server(model_dir, tmp_path, capsys):
    with serve_model(model_dir) as url:
        rc = main(["eval-demo", "--url", url, "--questions", "1", "--max-tokens", "8", "--modes", "non-think",
                   "think-high", "--json", str(tmp_path / "report.json")])
    assert rc == 0
    report = json.loads((tmp_path / "report.json").read_text())
    _check_counts(report, 1)
    assert report["url"] == url and report["model_dir"] is None
    assert "final answer after tool result" in capsys.readouterr().out


def test_held_out_questions():
    picked = held_out(0, 5)
    assert {s: len(v) for s, v in picked.items()} == {"arithmetic": 5, "weather": 5, "calculator": 5}
    assert picked == held_out(0, 5)  # deterministic
    assert picked != held_out(1, 5)
    for skill, convs in picked.items():
        for c in convs:
            assert c.meta["skill"] == skill and c.messages[0]["role"] == "user"
            if skill != "arithmetic":
                assert c.tools and c.messages[1]["tool_calls"] and c.messages[2]["role"] == "tool"


def test_grading_can_fail():
    assert last_integer("123 + 45 = 168.") == 168
    assert last_integer("no digits") is None and last_integer(None) is None
    assert grade_arithmetic({"content": "123 + 45 = 168."}, 168)
    assert not grade_arithmetic({"content": "123 + 45 = 167."}, 168)
    assert not grade_arithmetic({"content": "168 is close, 123 + 45 = 169"}, 168)  # the last integer counts
    assert not grade_arithmetic({"content": None, "tool_calls": []}, 168)
    assert not grade_arithmetic(None, 168)

    def call(name, arguments):
        return {"content": None, "tool_calls": [{"id": "call_0", "type": "function",
                                                 "function": {"name": name, "arguments": arguments}}]}

    assert grade_tool_call(call("get_weather", '{"city": "Paris"}'), "get_weather", {"city": "Paris"})
    assert grade_tool_call(call("get_weather", '{ "city":"Paris" }'), "get_weather", {"city": "Paris"})
    assert not grade_tool_call(call("get_weather", '{"city": "Rome"}'), "get_weather", {"city": "Paris"})
    assert not grade_tool_call(call("calculator", '{"city": "Paris"}'), "get_weather", {"city": "Paris"})
    assert not grade_tool_call(call("get_weather", '{"city": "Paris"'), "get_weather", {"city": "Paris"})
    assert not grade_tool_call(call("get_weather", '{"city": "Paris", "days": 2}'), "get_weather", {"city": "Paris"})
    two = call("get_weather", '{"city": "Paris"}')
    two["tool_calls"] *= 2
    assert not grade_tool_call(two, "get_weather", {"city": "Paris"})  # exactly one call
    assert not grade_tool_call({"content": "It is sunny in Paris."}, "get_weather", {"city": "Paris"})

    assert grade_final({"content": "It is 18°C and cloudy in Paris right now."}, ["18", "cloudy"])
    assert not grade_final({"content": "It is 18°C and sunny in Paris right now."}, ["18", "cloudy"])
    assert not grade_final({"content": None}, ["18", "cloudy"])


def test_grading_accepts_the_corpus_answers():
    """The corpus's own replies pass: what the model is trained to write is graded correct."""
    picked = held_out(0, 3)
    for c in picked["arithmetic"]:
        assert grade_arithmetic(c.messages[-1], c.meta["answer"])
    for c in picked["weather"] + picked["calculator"]:
        assert grade_tool_call(c.messages[1], c.meta["tool"], c.meta["arguments"])
        assert grade_final(c.messages[-1], c.meta["final"])
        assert c.meta["skill"] in ("weather", "calculator") and c.meta["tool"] in {
            t["function"]["name"] for t in corpus.TOOLS}


def test_cli_missing_model(tmp_path, capsys):
    assert main(["eval-demo", "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dsv4 eval-demo:") and "nope" in err and len(err.splitlines()) == 1
    (tmp_path / "empty").mkdir()
    assert main(["eval-demo", "--model", str(tmp_path / "empty")]) == 2
    assert "config.json" in capsys.readouterr().err
    assert main(["eval-demo", "--model", str(tmp_path), "--url", "http://127.0.0.1:1"]) == 2
    assert "not both" in capsys.readouterr().err


def test_a_server_that_cannot_start_is_an_eval_error_naming_why(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(EvalError, match="exited with status"):
        with serve_model(tmp_path):
            pass
