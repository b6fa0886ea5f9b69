"""How the Numba backend sees an array: in memory order, as (outer, C, inner), never transposed
by a copy; and how an output gets the caller's kind (NumPy or torch), dtype and layout."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .compiled import _k
from .memory import POOL, STREAM_CACHE_BYTES
from .tuning import ROWS_GROUP_BYTES, ROWS_MIN_INNER, ROWS_MIN_ITEMS, ROWS_MIN_PARTS

Array = Any


def _is_torch(a: Any) -> bool:
    return type(a).__module__.split(".")[0] == "torch"


def _dtype_name(a: Any) -> str:
    return str(a.dtype).removeprefix("torch.")


def _storage(a: Array) -> np.ndarray:
    """A NumPy view of ``a`` (NumPy array or torch CPU tensor); 16-bit floats as their bits."""
    if _is_torch(a):
        import torch

        t = a.detach()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy()
        arr = t.numpy()
    else:
        arr = a
    if arr.dtype == np.float16:
        return arr.view(np.uint16)
    return arr


def _compute_dtype(storage: np.ndarray) -> type:
    return np.float64 if storage.dtype == np.float64 else np.float32


class Prepared:
    """``x`` seen in memory order: (outer, C, inner) with the channel axis physically in the
    middle, plus what it takes to give an output the caller's kind, dtype and layout."""

    def __init__(self, x: Array, axis: int) -> None:
        self.like = x
        self.torch = _is_torch(x)
        self.bf16 = self.torch and _dtype_name(x) == "bfloat16"
        arr = _storage(x)
        self.ndim = arr.ndim
        # Memory order: axes by decreasing stride (size-1 axes anywhere, ties by position).
        perm = sorted(range(arr.ndim), key=lambda i: (-abs(arr.strides[i]), i))
        phys = arr.transpose(perm)
        if not phys.flags.c_contiguous:
            # Not a permutation of a dense array (gaps, broadcast, negative strides): copy.
            arr = np.ascontiguousarray(arr)
            perm = list(range(arr.ndim))
            phys = arr
        self.perm = tuple(perm)
        inverse = [0] * len(perm)
        for position, source in enumerate(perm):
            inverse[source] = position
        self.inverse = tuple(inverse)
        p = self.perm.index(axis)
        self.phys_shape = phys.shape
        self.outer = math.prod(phys.shape[:p])
        self.channels = phys.shape[p]
        self.inner = math.prod(phys.shape[p + 1 :])
        self.count = self.outer * self.inner
        self.phys = phys
        self.cdt = _compute_dtype(arr)
        self.rows = self.inner >= ROWS_MIN_INNER

    @property
    def size(self) -> int:
        return self.phys.size

    def stream(self, arrays: int) -> bool:
        """Whether a pass over ``arrays`` tensors like x writes its output with streaming
        stores. Not for short rows that do not start on cache lines (e.g. 196 float32 values):
        each would be split into a normal head and tail and a streamed middle, which measured
        slower than normal stores throughout."""
        if arrays * self.phys.nbytes < STREAM_CACHE_BYTES:
            return False
        row_bytes = self.inner * self.phys.itemsize
        return not self.rows or row_bytes % 64 == 0 or row_bytes >= 8192

    def view(self, phys: np.ndarray) -> np.ndarray:
        """The kernel's view of a physical array: (outer, C, inner) rows or (outer, C*inner)."""
        if self.rows:
            return phys.reshape(self.outer, self.channels, self.inner)
        return phys.reshape(self.outer, self.channels * self.inner)

    def same_layout(self, other: Array, name: str = "grad_output (dy)") -> np.ndarray:
        """``other`` (same logical shape as x) in x's memory order, copied only if it must be."""
        phys = _storage(other).transpose(self.perm)
        if phys.dtype != self.phys.dtype:
            raise TypeError(
                f"{name} has dtype {_dtype_name(other)} but the input has dtype "
                f"{_dtype_name(self.like)}; they must be equal"
            )
        return np.ascontiguousarray(phys)

    def empty(self) -> np.ndarray:
        return POOL.empty(self.phys_shape, self.phys.dtype)

    def bits_shape(self) -> tuple[int, ...]:
        """The fused ReLU's mask: each kernel row (rows: ``inner`` values, cols: ``C * inner``)
        packed 8 values a byte and padded to whole bytes, so no byte is shared by two rows."""
        if self.rows:
            return (self.outer, self.channels, -(-self.inner // 8))
        return (self.outer, -(-(self.channels * self.inner) // 8))

    def wrap(self, phys: np.ndarray) -> Array:
        """A physical output array as the caller's kind (NumPy/torch) in logical axis order."""
        logical = phys.transpose(self.inverse)
        if logical.dtype == np.uint16:
            logical = logical.view(np.float16)
        if not self.torch:
            return logical
        import torch

        out = torch.from_numpy(logical)
        return out.view(torch.bfloat16) if self.bf16 else out

    def vector(self, v: Array | None, fill: float | None = None) -> np.ndarray:
        """A per-channel vector in the compute dtype (``fill`` when ``v`` is None)."""
        if v is None:
            return np.full(self.channels, fill, dtype=self.cdt)
        if _is_torch(v):
            import torch

            v = v.detach()
            want = torch.float64 if self.cdt is np.float64 else torch.float32
            if v.dtype != want or v.device.type != "cpu":
                v = v.to(device="cpu", dtype=want)
            v = v.numpy()
        return np.ascontiguousarray(v, dtype=self.cdt)

    def columns(self, v: np.ndarray) -> np.ndarray:
        """A per-channel vector repeated per column of the cols view (channel = column // inner)."""
        return v if self.inner == 1 else np.repeat(v, self.inner)

    def out_vector(self, v: np.ndarray) -> Array:
        """A per-channel result (or the ReLU mask) as the caller's kind."""
        if not self.torch:
            return v
        import torch

        return torch.from_numpy(v)

    def group(self, arrays: int) -> int:
        """Rows layout, fused kernels: adjacent channels per group, so that the group's data
        (``arrays`` tensors' worth) stays in cache between its two passes, keeping at least 16
        groups for the threads."""
        channel_bytes = max(1, self.count * self.phys.itemsize * arrays)
        return max(1, min(ROWS_GROUP_BYTES // channel_bytes, self.channels // 16))

    def cols_partials_shape(self) -> tuple[int, int]:
        """Cols layout: (chunks, columns) of the per-chunk partials (the kernels' own plan)."""
        width = self.channels * self.inner
        return (_k().cols_plan(self.outer, width)[1], width)

    def parts(self) -> int:
        """Rows layout: how many n-ranges each channel's reduction is split into (shape only)."""
        wanted = max(ROWS_MIN_PARTS, -(-ROWS_MIN_ITEMS // max(self.channels, 1)))
        return max(1, min(self.outer, wanted))
