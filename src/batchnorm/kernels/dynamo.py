"""Backend stages run as plain Python under ``torch.compile``.

A layer on our stages breaks Dynamo's graph at its autograd Function (one with a ``jvp`` is not
traced), and Dynamo then runs the call with its frame hook still set: every Python frame below
is offered to Dynamo to compile. Inside a kernel launcher that failed: in numba's dispatcher on
its first call of a new signature (an AssertionError from the bytecode analysis), and in
Triton's interpreter (Dynamo's fake tensors met a ``uint64`` pointer offset), each ending the
user's compiled step. A stage wrapped here runs with the hook off, as eager code.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

__all__ = ["outside_torch_compile"]


def outside_torch_compile(fn: Any) -> Any:
    """``fn`` wrapped in ``torch.compiler.disable`` (about 1 us a call), decided at the first
    call, not at import: torch may be imported after the backend (a NumPy user of the Numba
    backend), and where it is not imported at all there is no Dynamo to keep out."""
    disabled: list[Any] = []

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if not disabled:
            torch = sys.modules.get("torch")
            if torch is None:
                return fn(*args, **kwargs)
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)

    return call
