"""Aligned plain-text tables, for the reports of the commands and the demo evaluation."""

from __future__ import annotations


def table(header: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    """First column left-aligned, the others right-aligned, each as wide as its widest cell."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for r in [header, *rows]:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        lines.append(indent + "  ".join(cells).rstrip())
    return lines
