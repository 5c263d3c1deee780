"""The demo model: a small DeepSeek-V4 trained by dsv4 itself on a synthetic chat corpus, shipped in the package.

corpus.py     the synthetic conversations (arithmetic with reasoning traces, tool use, refusals, Shakespeare)
tools.py      the two tools' definitions and the weather table (also served to the chat page)
tokenizer.py  the demo's byte-level BPE with every V4 special token
recipe.py     corpus -> tokenizer -> shards -> pre-train -> fine-tune -> official checkpoint
              (`dsv4 train --recipe demo`)
evaluate.py   held-out accuracy through the real server (`dsv4 eval-demo`)

`MODEL_DIR` is the shipped model (official checkpoint format: FP8 weights, FP4 experts, config.json,
tokenizer.json, generation_config.json): what `dsv4 serve`, `dsv4 chat` and `dsv4 generate` run by default.
"""

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"
MODEL_NAME = "dsv4-demo"

__all__ = ["MODEL_DIR", "MODEL_NAME"]
