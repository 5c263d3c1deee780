import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# the Triton kernels run on the CPU through Triton's interpreter when there is no GPU (it must be set before
# triton is first imported)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `tests/launch_record.py`: the interpreted Triton launches of this run, kept for a Hopper build of them
if os.environ.get("DSV4_RECORD_LAUNCHES") and os.environ.get("TRITON_INTERPRET") == "1":
    import launch_record

    launch_record.install(os.environ["DSV4_RECORD_LAUNCHES"])

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        raise FileNotFoundError(f"the shared test data is expected at {SHARED}")
    return SHARED


def prepare_shakespeare_docs(root: Path, chars: int, parts: int) -> Path:
    """A small byte-level training set from the start of TinyShakespeare: its first `parts` paragraphs (within
    `chars` characters) as separate JSONL documents, so packed windows hold document boundaries. Returns the
    prepared data directory."""
    from dsv4.train.data import prepare

    text = (SHARED / "data" / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:chars]
    with open(root / "docs.jsonl", "w", encoding="utf-8") as f:
        for part in text.split("\n\n")[:parts]:
            f.write(json.dumps({"text": part}) + "\n")
    prepare([root / "docs.jsonl"], root / "data", tokenizer="bytes", val_fraction=0.1, seed=0)
    return root / "data"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
