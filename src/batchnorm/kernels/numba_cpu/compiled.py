"""The jitted kernels as one namespace, imported (and loaded from numba's on-disk JIT cache) on
first use: importing the backend needs no numba, so that it can say numba is missing."""

from __future__ import annotations

import functools
import os
from types import SimpleNamespace
from typing import Any

from ..dynamo import outside_torch_compile

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


#: Inputs of at most this many bytes run on the calling thread alone: waking Numba's OpenMP
#: workers costs about 0.1 ms per parallel region on this machine (they sleep between calls
#: under OMP_WAIT_POLICY=PASSIVE, and a training step has 4-5 regions), more than a second
#: thread saves on a small input. Measured with a convolution between calls, training step
#: through the backend's stages, min ms on 1 / 2 threads: (16, 256, 4, 4) 0.28 / 0.53,
#: (32, 512, 2, 2) 0.26 / 0.53, (32, 128, 8, 8) 0.61 / 0.81, (64, 256, 4, 4) 0.65 / 0.75;
#: from 2 MiB two threads win: (32, 256, 8, 8) 1.58 / 1.20, (32, 64, 16, 16) 0.88 / 0.80.
#: ((32, 256, 4, 4) once measured 0.82 / 0.50, and 0.34 / 0.63 when measured again.)
#: ``BATCHNORM_NUMBA_SERIAL_MAX_KB`` sets it (0: always the full thread count).
SERIAL_MAX_BYTES = int(float(os.environ.get("BATCHNORM_NUMBA_SERIAL_MAX_KB", "1024")) * 1024)


def _nbytes(x: Any) -> int:
    nbytes = getattr(x, "nbytes", None)  # NumPy arrays, and torch tensors since 2.x
    if nbytes is None:
        nbytes = x.numel() * x.element_size()
    return int(nbytes)


def sized_threads(stage: Any) -> Any:
    """A backend stage method run on one thread when its first array argument (x, or dy of
    x's shape) has at most ``SERIAL_MAX_BYTES``; the caller's own Numba thread count is
    restored after (and never raised: a caller at 1 thread stays there)."""

    @outside_torch_compile
    @functools.wraps(stage)
    def run(self: Any, first: Any, *args: Any, **kwargs: Any) -> Any:
        if NUMBA_IMPORT_ERROR is not None or _nbytes(first) > SERIAL_MAX_BYTES:
            return stage(self, first, *args, **kwargs)
        threads = _numba.get_num_threads()
        if threads == 1:
            return stage(self, first, *args, **kwargs)
        _numba.set_num_threads(1)
        try:
            return stage(self, first, *args, **kwargs)
        finally:
            _numba.set_num_threads(threads)

    return run
