"""Triton, imported lazily: the kernels module on first use, and whether it can run here."""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def _kernels() -> Any:
    from . import kernels

    return kernels


def triton_unavailable_reason() -> str | None:
    """``None`` if triton can be imported, else why not."""
    try:
        _kernels()
    except ImportError as exc:
        return f"triton is not installed or cannot be imported ({exc})"
    return None


def is_interpreter() -> bool:
    """True when the kernels were built for Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    if triton_unavailable_reason() is not None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_kernels()._stats_partial_kernel, InterpretedFunction)
