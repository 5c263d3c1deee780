"""The demo model's data: the synthetic chat corpus (`dsv4.demo.corpus`) and its BPE tokenizer
(`dsv4.demo.tokenizer`).

The corpus is what the demo model learns from and what its evaluation grades against, so every answer in
it is checked against Python: each line of an arithmetic trace, each tool result, each calculator value;
the train and test splits never share a question; every record renders in the V4 chat format and its tool
calls parse back through the server's parser. The tokenizer must carry every official special token with
the official flags, keep digits single and round-trip any text.
"""

from __future__ import annotations

import collections
import json
import random
import re

import pytest
import tokenizers
from conftest import SHARED

from dsv4.chat.encoding import encode_messages
from dsv4.chat.format import BOS, EOS, THINK_END, TOOL_RESULT_END, TOOL_RESULT_START
from dsv4.chat.parser import parse_completion
from dsv4.chat.tokenizer import Tokenizer
from dsv4.demo import corpus
from dsv4.demo.tokenizer import official_special_tokens, train_tokenizer


@pytest.fixture(scope="module")
def shakespeare() -> str:
    return (SHARED / "data" / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def train(shakespeare) -> list[dict]:
    return [c.record() for c in corpus.conversations(0, 3000, "train", shakespeare)]


@pytest.fixture(scope="module")
def held_out(shakespeare) -> list[dict]:
    return [c.record() for c in corpus.conversations(0, 1000, "test", shakespeare)]


def of_skill(records: list[dict], skill: str) -> list[dict]:
    found = [r for r in records if r["meta"]["skill"] == skill]
    assert found, f"no {skill} records"
    return found


def thinks(record: dict) -> bool:
    return any(m.get("reasoning_content") for m in record["messages"])


def render(record: dict) -> str:
    return encode_messages(record["messages"], tools=record.get("tools"),
                           thinking_mode="thinking" if thinks(record) else "chat")


# ------------------------------------------------------------------------------------------------ determinism, splits


def test_same_seed_same_records_other_seed_other_records(shakespeare, train):
    again = [c.record() for c in corpus.conversations(0, 3000, "train", shakespeare)]
    assert json.dumps(again) == json.dumps(train)
    other = [c.record() for c in corpus.conversations(1, 300, "train", shakespeare)]
    assert len(other) == 300
    assert json.dumps(other) != json.dumps(train[:300])
    # most conversations differ, not just one
    assert sum(a != b for a, b in zip(other, train[:300], strict=True)) > 250
    with pytest.raises(ValueError, match="split"):
        next(corpus.conversations(0, 1, "val", shakespeare))


_ARITH_REPLY = re.compile(r"^(\d+) ([-+]) (\d+) = (-?\d+)\.$")


def question_key(record: dict) -> tuple:
    """What makes two records the same question, read from the content: the operands for arithmetic (however
    phrased), the expression for the calculator, the question text otherwise."""
    skill = record["meta"]["skill"]
    if skill == "arithmetic":
        a, op, b, _ = _ARITH_REPLY.match(record["messages"][-1]["content"]).groups()
        return skill, int(a), op, int(b)
    if skill == "calculator":
        return skill, record["meta"]["arguments"]["expression"]
    return skill, record["messages"][0]["content"]


def corpus_key(record: dict) -> str:
    """The key the corpus hashes into a split, rebuilt from the content."""
    skill, *rest = question_key(record)
    if skill == "arithmetic":
        a, op, b = rest
        return f"arith|{a}{op}{b}"
    if skill == "calculator":
        return f"calc|{rest[0]}"
    question = rest[0]
    if skill == "weather":
        city = record["meta"]["arguments"]["city"]
        (q,) = [i for i, t in enumerate(corpus._WEATHER_QUESTIONS) if t.format(city=city) == question]
        return f"weather|{q}|{city}"
    return {"clarify": "nocity|", "refusal": "bad|"}[skill] + question


def test_train_and_test_share_no_question(train, held_out):
    graded = [r for r in train if r["meta"]["skill"] != "talk"]
    train_keys = {question_key(r) for r in graded}
    test_keys = {question_key(r) for r in held_out}
    assert len(test_keys) > 500  # enough distinct held-out questions for the check to mean something
    assert not train_keys & test_keys, sorted(train_keys & test_keys)[:5]
    # the split is the hash of the content: every record sits where split_of puts its question
    assert {corpus.split_of(corpus_key(r)) for r in graded} == {"train"}
    assert {corpus.split_of(corpus_key(r)) for r in held_out} == {"test"}
    # small talk is not graded, so none is held out
    assert not [r for r in held_out if r["meta"]["skill"] == "talk"]
    # roughly TEST_PERCENT of all questions hash to the test split
    keys = [f"arith|{a}+{b}" for a in range(10, 110) for b in range(10, 60)]
    share = sum(corpus.split_of(k) == "test" for k in keys) / len(keys)
    assert abs(share - corpus.TEST_PERCENT / 100) < 0.02


def test_mix_shares_roughly_match_the_recipe(train):
    counts = collections.Counter(r["meta"]["skill"] for r in train)
    assert set(counts) == set(corpus.MIX)
    for skill, share in corpus.MIX.items():
        assert abs(counts[skill] / len(train) - share) < 0.04, (skill, counts[skill] / len(train), share)
    think = sum(r["meta"]["think"] for r in train) / len(train)
    assert 0.45 < think < 0.55


# ------------------------------------------------------------------------------------------------ arithmetic

_ADD = re.compile(r"^(\d) \+ (\d) \+ (\d) = (\d+): write (\d), carry (\d+)\. So far: (\d+)$")
_SUB_OK = re.compile(r"^(\d) - (\d) - (\d) = (\d+): write (\d), borrow 0\. So far: (\d+)$")
_SUB_NEG = re.compile(r"^(\d) - (\d) - (\d) is negative, 1(\d) - (\d) - (\d) = (\d+): write (\d), borrow 1\. "
                      r"So far: (\d+)$")
_CARRY = re.compile(r"^Carry (\d+) remains\. So far: (\d+)$")
_DROP = re.compile(r"^Drop the leading zeros: (\d+)$")
_WORD = {"+": "sum", "-": "difference"}


def check_trace(a: int, op: str, b: int, trace: str) -> None:
    """Every line of the trace is arithmetically right, uses the right digits and carry, extends the previous
    "So far" by the digit it writes; the last "So far" (without leading zeros) and the last line are the answer."""
    expected = {"+": a + b, "-": a - b}[op]
    lines = trace.split("\n")
    head = {"+": f"Add {a} and {b} ", "-": f"Subtract {b} from {a} "}[op]
    assert lines[0].startswith(head), lines[0]
    assert lines[-1] == f"The {_WORD[op]} is {expected}.", lines[-1]
    xs = [int(c) for c in reversed(str(a))]
    ys = [int(c) for c in reversed(str(b))]
    columns = max(len(xs), len(ys)) if op == "+" else len(xs)
    body = lines[1:-1]
    so_far, carry = "", 0
    for i in range(columns):
        line = body[i]
        x = xs[i] if i < len(xs) else 0
        y = ys[i] if i < len(ys) else 0
        if op == "-":
            if m := _SUB_OK.match(line):
                lx, ly, lb, v, w, digits = map(str, m.groups())
                assert (int(lx), int(ly), int(lb)) == (x, y, carry), line
                assert int(v) == x - y - carry >= 0 and int(w) == int(v), line
                carry = 0
            else:
                m = _SUB_NEG.match(line)
                assert m, line
                lx, ly, lb, lx2, ly2, lb2, v, w, digits = m.groups()
                assert (int(lx), int(ly), int(lb)) == (int(lx2), int(ly2), int(lb2)) == (x, y, carry), line
                assert x - y - carry < 0 and int(v) == 10 + x - y - carry and int(w) == int(v), line
                carry = 1
        else:
            m = _ADD.match(line)
            assert m, line
            lx, ly, lc, v, w, c_out, digits = m.groups()
            assert (int(lx), int(ly), int(lc)) == (x, y, carry), line
            value = x + y + carry
            assert int(v) == value and int(w) == value % 10 and int(c_out) == value // 10, line
            carry = value // 10
        assert digits == w + so_far, line
        so_far = digits
    rest = body[columns:]
    if op == "-":
        assert carry == 0  # a >= b: nothing left to borrow
    elif carry:
        m = _CARRY.match(rest.pop(0))
        assert m and int(m.group(1)) == carry and m.group(2) == str(carry) + so_far
        so_far = m.group(2)
    if (so_far.lstrip("0") or "0") != so_far:
        m = _DROP.match(rest.pop(0))
        assert m and m.group(1) == (so_far.lstrip("0") or "0")
        so_far = m.group(1)
    assert rest == [], rest
    assert so_far == str(expected)


def test_arithmetic_traces_are_right_line_by_line():
    rng = random.Random(7)
    cases = [
        (999, "+", 1), (9999, "+", 9999), (5, "+", 9995), (10, "+", 90), (0, "+", 0),  # carry chains
        (1000, "-", 999), (1000, "-", 1000), (5000, "-", 4999), (100, "-", 1), (10, "-", 10), (9001, "-", 9),
    ]
    for _ in range(400):
        op = rng.choice("+-")
        a = rng.randint(0, 10 ** rng.randint(1, 5) - 1)
        b = rng.randint(0, 10 ** rng.randint(1, 5) - 1)
        if op == "-" and a < b:
            a, b = b, a
        cases.append((a, op, b))
    for a, op, b in cases:
        check_trace(a, op, b, corpus.arithmetic_trace(a, op, b))
    assert sum("Drop the leading zeros" in corpus.arithmetic_trace(a, o, b) for a, o, b in cases) > 10
    assert sum("remains" in corpus.arithmetic_trace(a, o, b) for a, o, b in cases) > 10
    with pytest.raises(ValueError):
        corpus.arithmetic_trace(12, "-", 13)
    with pytest.raises(ValueError, match="not '\\*'"):  # products go to the calculator
        corpus.arithmetic_trace(12, "*", 3)


def test_fact_drills_are_the_trace_steps():
    """The drills are every single-digit step the traces take, each right, written exactly as in a trace."""
    facts = corpus.facts()
    assert len(facts) == len(set(facts)) == 400
    for fact in facts:
        if m := re.fullmatch(r"(\d) \+ (\d) \+ ([01]) = (\d+)", fact):
            x, y, c, v = map(int, m.groups())
            assert v == x + y + c
        elif m := re.fullmatch(r"(\d) - (\d) - ([01]) = (\d)", fact):
            x, y, c, v = map(int, m.groups())
            assert v == x - y - c
        else:
            m = re.fullmatch(r"(\d) - (\d) - ([01]) is negative, 1\1 - \2 - \3 = (\d)", fact)
            assert m, fact
            x, y, c, v = map(int, m.groups())
            assert x - y - c < 0 and v == 10 + x - y - c
    rng = random.Random(3)
    used = set()
    for _ in range(2000):
        a, b = sorted((rng.randint(0, 9999), rng.randint(0, 9999)), reverse=True)
        for op in "+-":
            used.update(line.split(":")[0] for line in corpus.arithmetic_trace(a, op, b).split("\n")[1:])
    assert set(facts) <= used  # every fact is a step some trace takes...
    assert {u for u in used if " = " in u and not u.startswith(("Carry", "Drop"))} <= set(facts)  # ...and no other
    drills = corpus.fact_drills(0, 50)
    assert drills == corpus.fact_drills(0, 50) and drills != corpus.fact_drills(1, 50)
    lines = [line for d in drills for line in d.split("\n")]
    assert len(lines) == 50 * 40 and set(lines) <= set(facts) and len(set(lines)) > 390


def test_arithmetic_conversations_answer_right(train, held_out):
    records = of_skill(train, "arithmetic") + of_skill(held_out, "arithmetic")
    ops = collections.Counter()
    for r in records:
        user, reply = r["messages"]
        a, op, b, answer = _ARITH_REPLY.match(reply["content"]).groups()
        a, b, answer = int(a), int(b), int(answer)
        ops[op] += 1
        assert answer == {"+": a + b, "-": a - b}[op] == r["meta"]["answer"]
        assert 10 <= a <= 999 and 10 <= b <= 999
        numbers = [int(n) for n in re.findall(r"\d+", user["content"])]
        assert numbers == [a, b], user["content"]
        assert op in user["content"] or corpus._OPS[op] in user["content"]
        if r["meta"]["think"]:
            assert reply["reasoning_content"] == corpus.arithmetic_trace(a, op, b)
            check_trace(a, op, b, reply["reasoning_content"])
        else:
            assert "reasoning_content" not in reply
    assert min(ops.values()) > 100


# ------------------------------------------------------------------------------------------------ tools


def test_weather_tool_results_come_from_the_table(train, held_out):
    records = of_skill(train, "weather") + of_skill(held_out, "weather")
    known = 0
    for r in records:
        user, call, result, answer = r["messages"]
        (tool_call,) = call["tool_calls"]
        assert tool_call["function"]["name"] == "get_weather" and result["tool_call_id"] == tool_call["id"]
        city = json.loads(tool_call["function"]["arguments"])["city"]
        assert city in user["content"] and r["meta"]["arguments"] == {"city": city}
        assert corpus.WEATHER_TOOL in r["tools"]
        report = json.loads(result["content"])
        assert report == corpus.weather_report(city)
        if city in corpus.WEATHER:
            known += 1
            temp, sky = corpus.WEATHER[city]
            assert report == {"city": city, "temperature_c": temp, "condition": sky}
            assert f"{temp}°C" in answer["content"] and sky in answer["content"] and city in answer["content"]
            assert r["meta"]["final"] == [str(temp), sky]
        else:
            assert city in corpus.UNKNOWN_CITIES and "error" in report
            assert "no weather data" in answer["content"] and not re.search(r"\d", answer["content"])
    assert 0.6 < known / len(records) < 0.9  # both kinds occur, about as often per city


def _python_value(expr: str) -> int | float:
    a, op, b = expr.split()
    a, b = int(a), int(b)
    return {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[op]


def check_calculator(expr: str, value: str) -> None:
    expected = _python_value(expr)
    if isinstance(expected, int):
        assert value == str(expected), (expr, value)
    elif expected == int(expected):
        assert value == str(int(expected)), (expr, value)
    else:
        assert re.fullmatch(r"-?\d+\.\d{1,4}", value), (expr, value)  # at most 4 decimals, no trailing "."
        assert abs(float(value) - expected) <= 0.5e-4 + 1e-12, (expr, value)


def test_calculator_agrees_with_python(train, held_out):
    records = of_skill(train, "calculator") + of_skill(held_out, "calculator")
    for r in records:
        user, call, result, answer = r["messages"]
        (tool_call,) = call["tool_calls"]
        assert tool_call["function"]["name"] == "calculator" and result["tool_call_id"] == tool_call["id"]
        expr = json.loads(tool_call["function"]["arguments"])["expression"]
        assert expr in user["content"] and corpus.CALCULATOR_TOOL in r["tools"]
        assert result["content"] == corpus.calculate(expr) and answer["content"] == f"{expr} = {result['content']}."
        check_calculator(expr, result["content"])
    assert {r["meta"]["arguments"]["expression"].split()[1] for r in records} == {"+", "-", "*", "/"}

    rng = random.Random(3)
    for _ in range(500):  # the corpus's operand ranges, every operator, both kinds of quotient
        op = rng.choice("+-*/")
        a, b = rng.randint(100, 9999), rng.randint(10, 999)
        if op == "/" and rng.random() < 0.5:
            a = rng.randint(10, 999) * b
        check_calculator(f"{a} {op} {b}", corpus.calculate(f"{a} {op} {b}"))
    for expr in ("12 * -3", "-7 + 2", "0 - 5", "1 / 3", "2 / 3", "-9 / 4", "10 / 4"):
        check_calculator(expr, corpus.calculate(expr))
    assert corpus.calculate("5 / 0") == "error: division by zero"
    for bad in ("5 /", "5 % 2", "1 + 2 + 3", "1.5 * 2", "x * 2", ""):
        assert corpus.calculate(bad).startswith("error:"), bad


def test_malformed_questions_never_get_a_number(train, held_out):
    records = of_skill(train, "refusal") + of_skill(held_out, "refusal")
    for r in records:
        user, reply = r["messages"]
        asked = set(re.findall(r"\d+", user["content"]))
        for text in (reply["content"], reply.get("reasoning_content", "")):
            assert "=" not in text, text
            # only the question's own numbers (and the example "12" of a missing operand) are repeated
            assert set(re.findall(r"\d+", text)) <= asked | {"12"}, (user["content"], text)
        assert "answer" not in r["meta"]
    kinds = collections.Counter(re.sub(r"\d+", "N", r["messages"][0]["content"])[:12] for r in records)
    assert len(kinds) >= 3


def test_clarifications_ask_for_a_city_and_call_nothing(train):
    for r in of_skill(train, "clarify"):
        user, reply = r["messages"]
        assert user["content"] in corpus._NO_CITY_QUESTIONS and "tool_calls" not in reply
        assert reply["content"].endswith("?") and corpus.WEATHER_TOOL in r["tools"]


def test_shakespeare_passages_are_whole_lines_of_the_text(shakespeare, train):
    chunks = corpus.shakespeare_chunks(shakespeare, random.Random(0), 100)
    for c in chunks:
        start = shakespeare.find(c)
        assert start > 0 and shakespeare[start - 1] == "\n" and shakespeare[start + len(c)] == "\n"
        assert 0 < len(c) <= 400
    replies = {r["messages"][1]["content"] for r in of_skill(train, "talk")}
    verses = [t for t in replies if t != corpus.IDENTITY and "\n" in t]
    assert verses and all(v in shakespeare for v in verses)


# ------------------------------------------------------------------------------------------------ chat format


def test_every_record_renders_and_tool_calls_parse_back(train, held_out):
    calls = 0
    for r in train[:600] + held_out[:200]:
        think = thinks(r)
        assistants = [m for m in r["messages"] if m["role"] == "assistant"]
        # thinking iff the record says so, and then every assistant turn has its reasoning
        assert think == r["meta"]["think"]
        assert all(bool(m.get("reasoning_content")) == think for m in assistants)
        text = render(r)
        assert text.startswith(BOS) and text.endswith(EOS)
        for m in r["messages"]:
            assert m["content"] in text
            if m["role"] == "tool":
                assert TOOL_RESULT_START + m["content"] + TOOL_RESULT_END in text
        if think:
            assert assistants[-1]["reasoning_content"] + THINK_END + assistants[-1]["content"] in text
        for tool in r.get("tools") or ():
            assert tool["function"]["name"] in text

        for k, m in enumerate(r["messages"]):
            if not m.get("tool_calls"):
                continue
            mode = "thinking" if think else "chat"
            prompt = encode_messages(r["messages"][:k], tools=r.get("tools"), thinking_mode=mode)
            full = encode_messages(r["messages"][:k + 1], tools=r.get("tools"), thinking_mode=mode)
            assert full.startswith(prompt)
            parsed = parse_completion(full[len(prompt):], thinking=think, tools=r.get("tools"))
            assert parsed.finish_reason == "tool_calls" and parsed.content == m["content"]
            assert parsed.reasoning_content == m.get("reasoning_content", "")
            assert [(c.name, json.loads(c.arguments), c.warnings) for c in parsed.tool_calls] == [
                (c["function"]["name"], json.loads(c["function"]["arguments"]), ()) for c in m["tool_calls"]]
            calls += 1
    assert calls > 50


# ------------------------------------------------------------------------------------------------ tokenizer


@pytest.fixture(scope="module")
def texts(train) -> list[str]:
    return [render(r) for r in train[:400]]


@pytest.fixture(scope="module")
def tok(texts) -> Tokenizer:
    return train_tokenizer(texts, 600)


def test_every_official_special_token_is_one_id_with_the_official_flag(tok):
    official = Tokenizer.bundled()
    official_added = {t.content: t.special for t in official.hf.get_added_tokens_decoder().values()
                      if "place▁holder" not in t.content and "place_holder" not in t.content}
    specials = official_special_tokens()
    assert {t.content: t.special for t in specials} == official_added
    mine = tok.hf.get_added_tokens_decoder()
    assert len(mine) == len(specials)
    for t in specials:
        ids = tok.encode(t.content)
        assert len(ids) == 1, t.content
        assert mine[ids[0]].content == t.content and mine[ids[0]].special == official_added[t.content], t.content
        assert tok.decode(ids) == t.content
    # BOS, EOS and pad keep the official ids 0, 1, 2
    for i in range(3):
        assert mine[i].content == official.hf.id_to_token(i)
    assert (tok.bos_id, tok.eos_id) == (official.bos_id, official.eos_id) == (0, 1)
    assert tok.vocab_size == 600


def test_digits_are_single_tokens(tok, texts):
    assert len(tok.encode("12345")) == 5
    assert len(tok.encode("x 2024 = 99")) >= 6
    rng = random.Random(0)
    for _ in range(50):
        n = str(rng.randint(0, 10 ** 9))
        assert len(tok.encode(n)) == len(n)
    for text in texts[:50]:  # the arithmetic conversations hold thousands of digits
        for i in tok.encode(text):
            piece = tok.decode([i])
            if any(c.isdigit() for c in piece):  # one digit, with the space before it if any
                assert len(piece.removeprefix(" ")) == 1, piece


def _contains(ids: list[int], part: list[int]) -> bool:
    return any(ids[i:i + len(part)] == part for i in range(len(ids) - len(part) + 1))


def test_a_city_is_the_same_tokens_in_the_question_and_in_the_call(tok):
    """Filling in get_weather's `city` copies the user's tokens: a capitalised word keeps no space before it,
    so " Oslo" in a sentence and "Oslo" after `">` in the DSML call (or a quote in JSON) are the same ids."""
    tools = [corpus.WEATHER_TOOL]
    for city in [*corpus.WEATHER, "Atlantis", "El Dorado"]:
        name = tok.encode(city)
        question = [{"role": "user", "content": f"What's the weather in {city}?"}]
        call = {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]}
        prompt = encode_messages(question, tools=tools, thinking_mode="chat")
        full = encode_messages([*question, call], tools=tools, thinking_mode="chat")
        assert _contains(tok.encode(prompt), name), city
        assert _contains(tok.encode(full[len(prompt):]), name), city
        assert _contains(tok.encode(json.dumps({"city": city})), name), city
    assert tok.decode(tok.encode("in New York.")) == "in New York."


def test_decode_inverts_encode(tok, texts):
    for text in texts:
        assert tok.decode(tok.encode(text)) == text
    for text in ("It is 23°C and sunny in Tokyo.", "12 × 3 = 36", "naïve café — “quoted” 日本語 🙂\n\t  ",
                 "Straße\r\nЖ", BOS + "x" + EOS, ""):
        assert tok.decode(tok.encode(text)) == text, text


def test_training_is_deterministic_and_chat_tokenizer_accepts_it(tok, texts, tmp_path):
    again = train_tokenizer(texts, 600)
    assert again.hf.to_str() == tok.hf.to_str()
    other = train_tokenizer(texts[:200], 600)
    assert other.hf.to_str() != tok.hf.to_str()
    (tmp_path / "tokenizer.json").write_text(tok.hf.to_str(pretty=True), encoding="utf-8")
    loaded = Tokenizer.load(tmp_path)
    assert (loaded.bos_id, loaded.eos_id) == (0, 1) and loaded.vocab_size == 600
    assert loaded.encode(texts[0]) == tok.encode(texts[0])
    plain = Tokenizer(tokenizers.Tokenizer.from_str(tok.hf.to_str()))
    assert plain.think_end_id == tok.encode(THINK_END)[0] and plain.bos_id in plain.special_ids
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(texts[:5], 200)
