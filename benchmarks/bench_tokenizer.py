"""Tokenizer throughput: encode, full decode and streaming (incremental) detokenize, in tokens/s.

The text is a long mix of English, Chinese, emoji, code and chat-format markup (DSML tool calls,
think tags), so multi-byte characters split across tokens are common.

    python benchmarks/bench_tokenizer.py [--model-dir DIR] [--repeat 200]
"""

from __future__ import annotations

import argparse
import time

from dsv4.chat import format as fmt
from dsv4.chat.tokenizer import Tokenizer

BLOCK = (
    fmt.USER
    + "Explain the following code and translate the comments into Chinese. 请解释下面的代码 🤔🎉👍🏽\n"
    + "```python\ndef fib(n: int) -> int:\n    # naive recursion\n"
    + "    return n if n < 2 else fib(n - 1) + fib(n - 2)\n```\n"
    + fmt.ASSISTANT
    + fmt.THINK_START
    + "用户想要解释斐波那契函数。The function is recursive; complexity O(φ^n) ≈ 1.618^n. 😀 Let me check.\n"
    + fmt.THINK_END
    + "这个函数递归地计算斐波那契数列。 Ça marche très bien, naïve façade. Привет! 👨‍👩‍👧‍👦🇫🇷\n\n"
    + fmt.TOOL_CALLS_START
    + "\n"
    + fmt.INVOKE_START
    + 'run_python">\n'
    + fmt.PARAMETER_START
    + 'code" string="true">print(fib(10))'
    + fmt.PARAMETER_END
    + "\n"
    + fmt.INVOKE_END
    + "\n"
    + fmt.TOOL_CALLS_END
    + fmt.EOS
)


def rate(n_tokens: int, seconds: float) -> str:
    return f"{n_tokens / seconds / 1e6:7.2f} M tokens/s  ({seconds * 1e3:8.1f} ms)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=None, help="a model directory with its own tokenizer.json")
    ap.add_argument("--repeat", type=int, default=200, help="copies of the text block")
    args = ap.parse_args()

    t0 = time.perf_counter()
    tok = Tokenizer.load(args.model_dir)
    print(f"{tok}: loaded in {time.perf_counter() - t0:.2f} s")

    text = BLOCK * args.repeat
    t0 = time.perf_counter()
    ids = tok.encode(text)
    t_enc = time.perf_counter() - t0
    print(f"text: {len(text):,} chars, {len(text.encode()):,} bytes -> {len(ids):,} tokens")
    print(f"encode                    {rate(len(ids), t_enc)}")

    t0 = time.perf_counter()
    full = tok.decode(ids)
    print(f"decode (whole)            {rate(len(ids), time.perf_counter() - t0)}")
    assert full == text

    for label, chunk in (("token by token", 1), ("chunks of 16", 16)):
        detok = tok.detokenizer()
        t0 = time.perf_counter()
        if chunk == 1:
            parts = [detok.add(i) for i in ids]
        else:
            parts = [detok.add(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
        parts.append(detok.flush())
        dt = time.perf_counter() - t0
        assert "".join(parts) == text
        print(f"incremental, {label:14} {rate(len(ids), dt)}  ({dt / len(ids) * 1e9:.0f} ns/token)")


if __name__ == "__main__":
    main()
