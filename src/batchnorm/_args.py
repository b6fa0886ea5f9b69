"""Argument types shared by the command lines: a bad number is an argparse error naming the
option (exit 2), never a traceback from deep inside a run."""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

__all__ = ["positive_int", "non_negative_int", "positive_float", "out_dir"]


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1 (counts: seeds, steps, repeats)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (seeds, which NumPy requires non-negative; threads, 0 = default)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates: NaN or inf would train to NaN and exit 0)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def out_dir(text: str) -> Path:
    """An output directory: it may exist, but not as a file, and it (or, if it is still to be
    made, its nearest existing parent) must be writable, so that a run cannot do all its work
    and then fail to write it. Nothing is created here."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"cannot create {text}: {existing} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise argparse.ArgumentTypeError(f"cannot write to {text} ({existing}: {reason})") from None
    return path
