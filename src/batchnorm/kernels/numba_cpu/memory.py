"""Memory the Numba backend manages itself: a pool of large output buffers, the streaming-store
threshold, and per-thread scratch arrays for the kernels' partial results."""

from __future__ import annotations

import math
import os
import sys
import threading
from typing import Any

import numpy as np

__all__ = ["OutputPool", "POOL", "STREAM_CACHE_BYTES"]


class OutputPool:
    """Recycles large output buffers once nothing references them any more.

    The first touch of a fresh output costs page faults: measured here, about 4 ms per 51 MB
    even with the huge pages NumPy asks for (27 ms with 4 KiB pages), as much as the kernel that
    fills it. Like PyTorch's CUDA caching allocator, the pool keeps the buffers it hands out and
    reuses one of the same size once the pool is the only holder: every NumPy view and every
    ``torch.from_numpy`` tensor of a buffer holds a reference to it, so its reference count says
    when the caller has let go. Buffers under ``min_bytes`` are left to malloc, which recycles
    those itself. At most ``limit_bytes`` are tracked (in use or free); beyond that outputs are
    allocated plainly. ``BATCHNORM_NUMBA_POOL_MB`` sets the limit (0 turns the pool off);
    ``clear()`` returns the free buffers to the system.
    """

    def __init__(self, limit_bytes: int, min_bytes: int = 1 << 20) -> None:
        self.limit_bytes = limit_bytes
        self.min_bytes = min_bytes
        self._buffers: list[np.ndarray] = []
        self._lock = threading.Lock()

    def _free(self, i: int) -> bool:
        # Exactly two references when nobody else holds it: the pool's list and the argument.
        # (No loop variable may name the buffer while testing: it would count too.)
        return sys.getrefcount(self._buffers[i]) == 2

    def empty(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """An uninitialised array starting on a 64-byte (cache line) boundary."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < self.min_bytes:
            return np.empty(shape, dtype)
        if nbytes > self.limit_bytes:
            return _aligned(_owner(nbytes), nbytes, shape, dtype)
        with self._lock:
            buffers = self._buffers
            for i in range(len(buffers)):
                if buffers[i].nbytes == nbytes + _ALIGN and self._free(i):
                    buffers.append(buffers.pop(i))  # most recently used last
                    return _aligned(buffers[-1], nbytes, shape, dtype)
            held = self.held_bytes
            i = 0
            while held + nbytes > self.limit_bytes and i < len(buffers):
                if self._free(i):  # drop free buffers, oldest first, to make room
                    held -= buffers.pop(i).nbytes - _ALIGN
                else:
                    i += 1
            if held + nbytes > self.limit_bytes:
                return _aligned(_owner(nbytes), nbytes, shape, dtype)
            buffers.append(_owner(nbytes))
            return _aligned(buffers[-1], nbytes, shape, dtype)

    def clear(self) -> None:
        """Forget every buffer (those still in use are freed when their users let go)."""
        with self._lock:
            self._buffers.clear()

    @property
    def held_bytes(self) -> int:
        return sum(buf.nbytes - _ALIGN for buf in self._buffers)


#: Outputs start on a cache line: the streaming stores need it, and rows then split evenly
#: into lines. (malloc aligns large blocks to 16 bytes only.)
_ALIGN = 64


def _owner(nbytes: int) -> np.ndarray:
    return np.empty(nbytes + _ALIGN, np.uint8)


def _aligned(owner: np.ndarray, nbytes: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """The ``nbytes`` of ``owner`` from its first 64-byte boundary, as ``shape`` and ``dtype``.
    (Views keep a reference to ``owner`` itself, which is what the pool's count looks at.)"""
    start = -owner.ctypes.data % _ALIGN
    return owner[start : start + nbytes].view(dtype).reshape(shape)


#: The pool behind every output of this backend.
POOL = OutputPool(int(float(os.environ.get("BATCHNORM_NUMBA_POOL_MB", "512")) * (1 << 20)))


def _l3_bytes() -> int:
    try:
        size = os.sysconf("SC_LEVEL3_CACHE_SIZE")
    except (ValueError, OSError, AttributeError):
        size = 0
    return size if size > 0 else 32 << 20


#: Streaming (non-temporal) stores write an output when the pass's arrays together (x and y;
#: x, dy and dx) exceed this many bytes, the last-level cache: a normal store first reads each
#: line it writes, and evicts input still to be read. Measured on this machine (L3 32 MiB),
#: in copy times: forward elemt on 51 MB 0.83 streamed vs 0.98, but on 12.8 MB (2 x 12.8 MB
#: stays in L3 between calls) 1.79 vs 1.31; backward elemt on 12 MiB (3 arrays: 36 MiB) 1.52
#: vs 1.72. ``BATCHNORM_NUMBA_STREAM_MB`` sets it (0: always stream, a huge value: never).
STREAM_CACHE_BYTES = int(
    float(os.environ.get("BATCHNORM_NUMBA_STREAM_MB", _l3_bytes() / (1 << 20))) * (1 << 20)
)


_scratch_arrays = threading.local()


def _scratch(name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A work array kept between calls (per thread, never handed to a caller): the kernels'
    partial results are overwritten each call, and a fresh allocation of them would cost page
    faults every call."""
    arrays = getattr(_scratch_arrays, "arrays", None)
    if arrays is None:
        arrays = _scratch_arrays.arrays = {}
    arr = arrays.get(name)
    if arr is None or arr.shape != shape or arr.dtype != dtype:
        arr = arrays[name] = np.empty(shape, dtype)
    return arr
