"""Helpers shared by the subcommands: argparse types, resolving MODEL arguments, usage errors, byte sizes."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ..config import PRESETS, ModelArgs, preset
from ..plan import GIB


class UsageError(ValueError):
    """Bad command-line input; the command prints it and exits with status 2."""


def int_at_least(low: int, name: str):
    """An argparse type: an integer >= `low` (`name` is what argparse calls the type)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = name
    return parse


positive_int = int_at_least(1, "positive_int")
non_negative_int = int_at_least(0, "non_negative_int")


_BYTE_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(?:i?b)?|b)?", re.IGNORECASE)
_BYTE_UNITS = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def byte_size(text: str) -> int:
    """argparse type: a size in bytes, plain ("8388608") or with a binary unit ("512M", "2G", "1.5GiB", "64KB":
    K, M, G and T are 1024-based with or without "iB" / "B"); at least one byte."""
    match = _BYTE_SIZE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"expected bytes or a size like 512M, 2G or 1.5GiB, got {text!r}")
    number, unit = match.groups()
    value = int(float(number) * _BYTE_UNITS[unit.lower()]) if unit else int(float(number))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
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
