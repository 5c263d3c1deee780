"""The demo model's synthetic chat corpus: arithmetic with and without a reasoning trace, tool use, refusals
and clarifications, small talk and Shakespeare, in the V4 chat format, deterministic from a seed.

Every conversation is an OpenAI-shaped record `{"messages": [...], "tools"?: [...]}` that `dsv4.chat.encoding`
renders (and `dsv4 prepare-data` tokenizes with the assistant-only loss mask), plus a `meta` dict saying what
a correct answer is, so the evaluation (`dsv4.demo.evaluate`) grades held-out questions without parsing prose.

Skills, and why each looks the way it does:
  * arithmetic (+ and - on numbers of 2 or 3 digits). In thinking mode the reasoning is a column-by-column
    trace from the ones, and each line repeats the digits found "so far", so a small model only ever copies
    from the line above and adds two digits - the answer is the last "so far". In non-think mode the answer
    comes straight away, which a model this size can only guess at: think-high beats it. Products go to the
    calculator: by hand they need 440 more single-digit facts than a few-million-parameter model learns
    in an hour on a CPU.
  * fact drills (`fact_drills`, pre-training text): every single-digit step a trace can take ("7 + 4 + 1 =
    12"), in random order. Inside the traces each fact is seen a few dozen times, and a model this size
    then still gets half the steps wrong; drilled on their own, the facts come much sooner.
  * tool use over `TOOLS`: `get_weather` (a fixed table, `WEATHER`) and `calculator` (for products too big to
    do by hand). The assistant calls the tool, a tool turn returns JSON, and the final answer copies from it.
    An unknown city gets the tool's error back and an apology; a weather question without a city gets a
    clarifying question and no call.
  * malformed arithmetic (a missing number, a word for a number, two operators, division by zero) is met with
    an explanation, never a made-up number.
  * small talk (who it is, what it can do) and Shakespeare on request, so free text is English.

Held-out split: a question belongs to "test" when a hash of its *content* (the operands, the city and
phrasing) falls in the last `TEST_PERCENT` percent, so no test question is ever seen in training, however
many training conversations are drawn. Shakespeare text is split by position (the first 90% trains).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .tools import CALCULATOR_TOOL, TOOLS, WEATHER, WEATHER_TOOL, weather_report

__all__ = [
    "CALCULATOR_TOOL", "IDENTITY", "SPLITS", "TEST_PERCENT", "TOOLS", "WEATHER", "WEATHER_TOOL",
    "Conversation", "arithmetic", "arithmetic_trace", "calculate", "conversations", "fact_drills", "facts",
    "shakespeare_chunks", "split_of", "weather_report",
]

SPLITS = ("train", "test")
TEST_PERCENT = 10
IDENTITY = ("I am dsv4-demo, a tiny DeepSeek-V4-architecture model trained from scratch by dsv4 on a CPU. "
            "I can do arithmetic step by step, look up the weather, use a calculator, and quote Shakespeare.")

UNKNOWN_CITIES = ("Atlantis", "Gotham", "Narnia", "Springfield", "El Dorado", "Mordor", "Lilliput", "Xanadu")

_OPS = {"+": "plus", "-": "minus"}
_ARITH_QUESTIONS = (
    "What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?", "What is {a} {word} {b}?",
    "Calculate {a} {op} {b}", "How much is {a} {op} {b}?", "Please work out {a} {op} {b}.", "{a} {op} {b}",
)
_WEATHER_QUESTIONS = (
    "What's the weather in {city}?", "How is the weather in {city} today?", "Is it sunny in {city}?",
    "What is the temperature in {city} right now?", "Tell me the weather for {city}.", "Weather in {city}?",
    "Should I take an umbrella in {city} today?", "How warm is it in {city}?",
)
_CALC_QUESTIONS = (
    "Use the calculator: what is {expr}?", "What is {expr}? Use a tool.", "Compute {expr} with the calculator.",
    "I need {expr} exactly.", "What does {expr} come to?",
)
_NO_CITY_QUESTIONS = ("What's the weather?", "How is the weather today?", "Is it going to rain?",
                      "Tell me the temperature.", "Weather please.", "Is it cold outside?", "Will it be sunny?",
                      "What's the forecast?", "How hot is it?", "Do I need a coat today?")
_GREETINGS = (("Hello!", "Hello! How can I help you today?"),
              ("Hi", "Hi! Ask me a sum, the weather, or for some Shakespeare."),
              ("Good morning.", "Good morning! What can I do for you?"), ("Thanks!", "You are welcome."),
              ("Thank you for the help.", "Glad to help."))
_WHO_QUESTIONS = ("Who are you?", "What are you?", "What can you do?", "Introduce yourself.", "What is your name?")
_VERSE_REQUESTS = ("Recite some Shakespeare.", "Write a few lines in the style of Shakespeare.",
                   "Give me a passage from a play.", "Say something like a Shakespeare character.")


@dataclass
class Conversation:
    """One record: OpenAI-shaped `messages`, request `tools` (or None), and `meta` for the evaluation."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    meta: dict[str, Any]

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"messages": self.messages}
        if self.tools:
            out["tools"] = self.tools
        out["meta"] = self.meta
        return out


def split_of(key: str) -> str:
    """"test" for the last TEST_PERCENT percent of a stable hash of a question's content, else "train"."""
    h = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")
    return "test" if h % 100 >= 100 - TEST_PERCENT else "train"


# ================================================================================================ arithmetic


def arithmetic(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _add_step(x: int, y: int, carry: int) -> str:
    return f"{x} + {y} + {carry} = {x + y + carry}"


def _subtract_step(x: int, y: int, borrow: int) -> str:
    v = x - y - borrow
    if v >= 0:
        return f"{x} - {y} - {borrow} = {v}"
    return f"{x} - {y} - {borrow} is negative, 1{x} - {y} - {borrow} = {v + 10}"


def facts() -> list[str]:
    """Every single-digit step of an addition or subtraction trace, as the trace writes it (400 lines)."""
    return [step(x, y, c) for step in (_add_step, _subtract_step) for x in range(10) for y in range(10)
            for c in (0, 1)]


def fact_drills(seed: int | str, documents: int, lines: int = 40) -> list[str]:
    """`documents` texts of `lines` facts each, drawn in random order (pre-training text)."""
    rng = random.Random(f"dsv4-demo-drills-{seed}")
    table = facts()
    return ["\n".join(rng.sample(table, lines)) for _ in range(documents)]


def arithmetic_trace(a: int, op: str, b: int) -> str:
    """The think-mode reasoning for `a op b`: one line per column from the ones, each ending with every
    digit written so far, so the last line holds the answer (see the module docstring)."""
    xs = [int(c) for c in reversed(str(a))]
    ys = [int(c) for c in reversed(str(b))]
    lines = []
    digits = ""
    if op == "+":
        lines.append(f"Add {a} and {b} column by column, starting from the ones.")
        carry = 0
        for i in range(max(len(xs), len(ys))):
            x = xs[i] if i < len(xs) else 0
            y = ys[i] if i < len(ys) else 0
            v = x + y + carry
            digits = str(v % 10) + digits
            lines.append(f"{_add_step(x, y, carry)}: write {v % 10}, carry {v // 10}. So far: {digits}")
            carry = v // 10
        if carry:
            digits = str(carry) + digits
            lines.append(f"Carry {carry} remains. So far: {digits}")
    elif op == "-":
        if a < b:
            raise ValueError("the trace covers a - b with a >= b")
        lines.append(f"Subtract {b} from {a} column by column, starting from the ones.")
        borrow = 0
        for i, x in enumerate(xs):
            y = ys[i] if i < len(ys) else 0
            v = x - y - borrow
            digits = str(v % 10) + digits
            lines.append(f"{_subtract_step(x, y, borrow)}: write {v % 10}, borrow {int(v < 0)}. So far: {digits}")
            borrow = int(v < 0)
        stripped = digits.lstrip("0") or "0"
        if stripped != digits:
            lines.append(f"Drop the leading zeros: {stripped}")
    else:
        raise ValueError(f"the trace covers + and -, not {op!r}")
    word = {"+": "sum", "-": "difference"}[op]
    lines.append(f"The {word} is {arithmetic(a, op, b)}.")
    return "\n".join(lines)


def _operands(rng: random.Random, op: str) -> tuple[int, int]:
    def number(lo: int, hi: int) -> int:
        n = rng.randint(lo, hi)
        return rng.randint(10 ** (n - 1), 10 ** n - 1)

    a, b = number(2, 3), number(2, 3)
    if op == "-" and a < b:
        a, b = b, a
    return a, b


def _arithmetic(rng: random.Random, think: bool) -> tuple[str, Conversation]:
    op = rng.choice("+-")
    a, b = _operands(rng, op)
    q = rng.randrange(len(_ARITH_QUESTIONS))
    question = _ARITH_QUESTIONS[q].format(a=a, op=op, b=b, word=_OPS[op])
    answer = arithmetic(a, op, b)
    reply: dict[str, Any] = {"role": "assistant", "content": f"{a} {op} {b} = {answer}."}
    if think:
        reply = {"role": "assistant", "reasoning_content": arithmetic_trace(a, op, b), **reply}
    conv = Conversation([{"role": "user", "content": question}, reply], None,
                        {"skill": "arithmetic", "think": think, "answer": answer})
    return f"arith|{a}{op}{b}", conv


# ================================================================================================ tools


def calculate(expression: str) -> str:
    """What the demo's `calculator` tool returns: the value of "A op B" (integers; / gives at most 4 decimals)
    or an error message."""
    parts = expression.split()
    if len(parts) != 3 or parts[1] not in ("+", "-", "*", "/"):
        return "error: expected 'A op B' with op one of + - * /"
    try:
        a, b = int(parts[0]), int(parts[2])
    except ValueError:
        return "error: the operands must be integers"
    if parts[1] == "/":
        if b == 0:
            return "error: division by zero"
        q = a / b
        return str(int(q)) if q == int(q) else f"{q:.4f}".rstrip("0").rstrip(".")
    return str(arithmetic(a, parts[1], b))


def _tool_set(rng: random.Random, needed: dict[str, Any]) -> list[dict[str, Any]]:
    """The tools a request offers: the needed one, usually with the other, in either order."""
    tools = [needed] + ([t for t in TOOLS if t is not needed] if rng.random() < 0.7 else [])
    rng.shuffle(tools)
    return tools


def _call(name: str, arguments: dict[str, Any], index: int) -> dict[str, Any]:
    return {"id": f"call_{index}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def _weather(rng: random.Random, think: bool) -> tuple[str, Conversation]:
    known = rng.random() < 0.75  # 24 known cities, 8 unknown: about as many conversations of each city
    city = rng.choice(list(WEATHER)) if known else rng.choice(UNKNOWN_CITIES)
    q = rng.randrange(len(_WEATHER_QUESTIONS))
    question = _WEATHER_QUESTIONS[q].format(city=city)
    report = weather_report(city)
    call: dict[str, Any] = {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", {"city": city}, 0)]}
    if known:
        temp, sky = WEATHER[city]
        final = f"It is {temp}°C and {sky} in {city} right now."
        thought = f"The tool says {city} is {temp}°C and {sky}."
    else:
        final = f"Sorry, I have no weather data for {city}."
        thought = f"The tool has no data for {city}."
    answer: dict[str, Any] = {"role": "assistant", "content": final}
    if think:
        call["reasoning_content"] = f"The user asks about the weather in {city}. I will call get_weather for {city}."
        answer["reasoning_content"] = thought
    messages = [{"role": "user", "content": question}, call,
                {"role": "tool", "tool_call_id": "call_0", "content": json.dumps(report)}, answer]
    meta = {"skill": "weather", "think": think, "tool": "get_weather", "arguments": {"city": city},
            "final": [str(report["temperature_c"]), report["condition"]] if known else ["no weather data"]}
    return f"weather|{q}|{city}", Conversation(messages, _tool_set(rng, WEATHER_TOOL), meta)


def _calculator(rng: random.Random, think: bool) -> tuple[str, Conversation]:
    op = rng.choice("*+-/") if rng.random() < 0.5 else "*"
    a = rng.randint(100, 9999)
    b = rng.randint(10, 999)
    if op == "/" and rng.random() < 0.7:
        a = rng.randint(10, 999) * b  # a whole quotient
    expr = f"{a} {op} {b}"
    q = rng.randrange(len(_CALC_QUESTIONS))
    question = _CALC_QUESTIONS[q].format(expr=expr)
    value = calculate(expr)
    call: dict[str, Any] = {"role": "assistant", "content": "",
                            "tool_calls": [_call("calculator", {"expression": expr}, 0)]}
    answer: dict[str, Any] = {"role": "assistant", "content": f"{expr} = {value}."}
    if think:
        # not restating the expression: every copy of a long number is one more chance to slip a digit
        call["reasoning_content"] = "This is too long to work out by hand reliably. I will use the calculator."
        answer["reasoning_content"] = f"The calculator returned {value}."
    messages = [{"role": "user", "content": question}, call,
                {"role": "tool", "tool_call_id": "call_0", "content": value}, answer]
    meta = {"skill": "calculator", "think": think, "tool": "calculator", "arguments": {"expression": expr},
            "final": [value]}
    return f"calc|{expr}", Conversation(messages, _tool_set(rng, CALCULATOR_TOOL), meta)


def _no_city(rng: random.Random, think: bool) -> tuple[str, Conversation]:
    question = rng.choice(_NO_CITY_QUESTIONS)
    reply: dict[str, Any] = {"role": "assistant", "content": "Which city would you like the weather for?"}
    if think:
        reply["reasoning_content"] = "The user did not say which city. I need to ask before calling get_weather."
    return f"nocity|{question}", Conversation([{"role": "user", "content": question}, reply],
                                              _tool_set(rng, WEATHER_TOOL), {"skill": "clarify", "think": think})


# ================================================================================================ refusals


def _malformed(rng: random.Random, think: bool) -> tuple[str, Conversation]:
    a, b = rng.randint(10, 9999), rng.randint(10, 9999)
    op = rng.choice("+-*")
    kind = rng.randrange(4)
    if kind == 0:
        question = f"What is {a} {op} ?"
        content = f"The question is missing the number after '{op}'. Please give both numbers, for example {a} {op} 12."
        thought = f"There is no second number after '{op}', so there is nothing to compute."
    elif kind == 1:
        word = rng.choice(("apple", "banana", "seven", "blue", "many", "cat", "x", "ten"))
        question = f"What is {a} {op} {word}?"
        content = f"'{word}' is not a number, so I cannot compute {a} {op} {word}. Please use digits."
        thought = f"'{word}' is not written as a number."
    elif kind == 2:
        op2 = rng.choice("+-*/")
        question = f"What is {a} {op}{op2} {b}?"
        content = f"The expression '{a} {op}{op2} {b}' is malformed: it has two operators in a row."
        thought = "Two operators in a row: the expression is not well formed."
    else:
        question = f"What is {a} / 0?"
        content = f"Division by zero is undefined, so {a} / 0 has no answer."
        thought = "The divisor is zero."
    reply: dict[str, Any] = {"role": "assistant", "content": content}
    if think:
        reply["reasoning_content"] = thought
    return f"bad|{question}", Conversation([{"role": "user", "content": question}, reply], None,
                                           {"skill": "refusal", "think": think})


# ================================================================================================ free text


def shakespeare_chunks(text: str, rng: random.Random, count: int, min_chars: int = 120,
                       max_chars: int = 400) -> list[str]:
    """`count` passages of `text` starting at line boundaries, each ending at the end of a line."""
    out = []
    for _ in range(count):
        start = text.find("\n", rng.randrange(len(text) - max_chars - 1)) + 1
        end = text.rfind("\n", start, start + rng.randint(min_chars, max_chars))
        out.append(text[start:end] if end > start else text[start:start + max_chars])
    return out


def _small_talk(rng: random.Random, think: bool, verses: list[str]) -> tuple[str, Conversation]:
    kind = rng.randrange(3)
    if kind == 0:
        question, content = rng.choice(_GREETINGS)
    elif kind == 1:
        question, content = rng.choice(_WHO_QUESTIONS), IDENTITY
    else:
        question, content = rng.choice(_VERSE_REQUESTS), rng.choice(verses)
    reply: dict[str, Any] = {"role": "assistant", "content": content}
    if think:
        reply["reasoning_content"] = "No calculation or tool is needed; I can answer directly."
    tools = list(TOOLS) if rng.random() < 0.15 else None  # tools on offer do not mean a tool must be called
    return f"talk|{rng.random()}", Conversation([{"role": "user", "content": question}, reply], tools,
                                                {"skill": "talk", "think": think})


# ================================================================================================ the mix

# skill -> share of the conversations
MIX = {"arithmetic": 0.60, "weather": 0.13, "calculator": 0.08, "clarify": 0.02, "refusal": 0.06, "talk": 0.11}


def conversations(seed: int, count: int, split: str, shakespeare: str = "") -> Iterator[Conversation]:
    """`count` conversations of `split` ("train" or "test"), deterministic from `seed`. Half think, half not.
    `shakespeare` (the training text) is only read for the train split's verse requests.
    Questions are drawn until one of the requested split comes up, so the two splits never share one."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"dsv4-demo-{seed}-{split}")
    verses = shakespeare_chunks(shakespeare, rng, 200) if split == "train" else []  # test: graded skills only
    makers = {"arithmetic": _arithmetic, "weather": _weather, "calculator": _calculator, "clarify": _no_city,
              "refusal": _malformed}
    skills, weights = zip(*MIX.items(), strict=True)
    made = 0
    while made < count:
        skill = rng.choices(skills, weights)[0]
        think = rng.random() < 0.5
        if skill == "talk":
            if split == "test":  # small talk is not graded; keep the test split to graded questions
                continue
            _, conv = _small_talk(rng, think, verses)
        else:
            key, conv = makers[skill](rng, think)
            if split_of(key) != split:
                continue
        made += 1
        yield conv


def write_jsonl(path: str | Path, records: Iterator[dict[str, Any]]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n
