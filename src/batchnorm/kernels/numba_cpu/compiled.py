"""The jitted kernels as one namespace, imported (and loaded from numba's on-disk JIT cache) on
first use: importing the backend needs no numba, so that it can say numba is missing."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

try:
    import numba as _numba
except ImportError as _exc:  # pragma: no cover - exercised where numba is missing
    NUMBA_IMPORT_ERROR: str | None = f"numba is not installed ({_exc})"
else:
    NUMBA_IMPORT_ERROR = None

_namespace: Any = None


def _k() -> Any:
    """Every kernel of ``rows``, ``cols``, ``relu``, ``masked`` and ``elementwise``, and the
    constants of ``tuning``, as attributes of one namespace."""
    global _namespace
    if _namespace is None:
        if NUMBA_IMPORT_ERROR is not None:
            from .. import BackendUnavailable

            raise BackendUnavailable(NUMBA_IMPORT_ERROR)
        from . import cols, elementwise, masked, relu, rows, tuning

        names: dict[str, Any] = {}
        for module in (tuning, elementwise, rows, cols, relu, masked):
            names.update({k: v for k, v in vars(module).items() if not k.startswith("__")})
        _namespace = SimpleNamespace(**names)
    return _namespace


def num_threads() -> int:
    return _numba.get_num_threads()
