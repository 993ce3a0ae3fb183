"""Sizes as people read them, in every message, table and card: one format, so that the same number
reads the same wherever it is printed."""

from __future__ import annotations


def size_text(n: float) -> str:
    """Bytes in decimal units (as disks and the Hub count them): GB from 0.1 GB up, MB below."""
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def params_text(n: float) -> str:
    """A parameter count: billions from 0.1 B up, millions below."""
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"
