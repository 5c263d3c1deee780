"""Helpers shared by the subcommands: resolving MODEL arguments, usage errors, aligned tables."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import PRESETS, ModelArgs, preset
from ..plan import GIB


class UsageError(ValueError):
    """Bad command-line input; the command prints it and exits with status 2."""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def resolve_model(text: str) -> tuple[str, ModelArgs]:
    """(label, ModelArgs) for a preset name or a checkpoint directory (only its config is read)."""
    from ..checkpoint.reader import CheckpointError, read_args

    if text in PRESETS:
        return f"{text} (preset)", preset(text)
    path = Path(text)
    if not path.exists():
        if "/" in text or "\\" in text or text.startswith("."):
            raise UsageError(f"checkpoint path {text!r} does not exist")
        raise UsageError(f"unknown preset {text!r}; choose from {', '.join(PRESETS)} or give a checkpoint directory")
    root = path if path.is_dir() else path.parent
    try:
        return str(path), read_args(root)[0]
    except CheckpointError as err:
        raise UsageError(str(err)) from None


def human_bytes(n: float) -> str:
    """Bytes in the largest binary unit that keeps the value >= 1 (GiB for deployments, KiB for `tiny`)."""
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"


def table(header: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    """First column left-aligned, the others right-aligned, each as wide as its widest cell."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for r in [header, *rows]:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        lines.append(indent + "  ".join(cells).rstrip())
    return lines
