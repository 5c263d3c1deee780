import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        raise FileNotFoundError(f"the shared test data is expected at {SHARED}")
    return SHARED


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
