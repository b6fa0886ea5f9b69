"""Numba CPU backend: fused, vectorised, parallel batch-norm stages on NumPy arrays and torch
CPU tensors.

Two ways in:

* ``NumbaBackend`` implements the :class:`batchnorm.kernels.Backend` protocol (what
  ``batchnorm.torch`` calls with ``backend="numba"``, and what ``"auto"`` picks for CPU tensors).
* Plain functions mirroring ``batchnorm.reference`` (``batch_stats``, ``elemt``,
  ``batch_norm_train``, ``batch_norm_infer``, ``backward_reduce``, ``backward_elemt``,
  ``backward``), which validate their arguments like the reference does and accept NumPy arrays
  or torch CPU tensors, returning the same kind.

Layouts are read from the strides, never fixed by a transposing copy: any *dense* array (a
permutation of a C-contiguous one, e.g. torch ``channels_last`` or a NumPy NHWC array with
``axis=-1``) is used in place and the output gets the same memory layout. Only non-dense inputs
(slices with gaps, broadcast or negative strides) are copied first. float16/bfloat16 are read and
written as 16-bit data and computed in float32 in registers (no conversion pass). The kernels and
their numerical policy are described in ``_numba_kernels``; ``docs/kernels.md`` has the numbers.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from typing import Any

import numpy as np

from .._xp import check_same_shape, values_per_channel
from ..reference import BatchStats, Grads, Saved, check_input
from ..reference.backward import check_grad_output

try:
    import numba as _numba
except ImportError as _exc:  # pragma: no cover - exercised where numba is missing
    NUMBA_IMPORT_ERROR: str | None = f"numba is not installed ({_exc})"
else:
    NUMBA_IMPORT_ERROR = None

__all__ = [
    "NumbaBackend",
    "OutputPool",
    "POOL",
    "batch_stats",
    "elemt",
    "forward_train",
    "batch_norm_train",
    "batch_norm_infer",
    "backward_reduce",
    "backward_elemt",
    "backward_train",
    "backward",
    "unavailable_reason",
]

Array = Any

#: Supported dtypes (by name, for NumPy and torch alike).
SUPPORTED_DTYPES = ("float16", "bfloat16", "float32", "float64")

_kernels_module: Any = None


def _k() -> Any:
    """The jitted kernels, imported (and loaded from the on-disk JIT cache) on first use."""
    global _kernels_module
    if _kernels_module is None:
        if NUMBA_IMPORT_ERROR is not None:
            from . import BackendUnavailable

            raise BackendUnavailable(NUMBA_IMPORT_ERROR)
        from . import _numba_kernels

        _kernels_module = _numba_kernels
    return _kernels_module


def _is_torch(a: Any) -> bool:
    return type(a).__module__.split(".")[0] == "torch"


def _dtype_name(a: Any) -> str:
    return str(a.dtype).removeprefix("torch.")


def unavailable_reason(x: Array) -> str | None:
    """``None`` if the numba kernels can run on ``x``, else a sentence saying why not."""
    if NUMBA_IMPORT_ERROR is not None:
        return NUMBA_IMPORT_ERROR
    if _is_torch(x):
        if x.device.type != "cpu":
            return f"the input is on device {x.device}; the numba backend runs on CPU tensors only"
        if str(x.layout) != "torch.strided":
            return f"the input has layout {x.layout}; the numba backend needs a strided tensor"
    elif not isinstance(x, np.ndarray):
        return f"the numba backend takes NumPy arrays or torch CPU tensors, got {type(x).__name__}"
    if _dtype_name(x) not in SUPPORTED_DTYPES:
        return f"dtype {_dtype_name(x)} is not supported (supported: {', '.join(SUPPORTED_DTYPES)})"
    return None


def _check_available(x: Array) -> None:
    reason = unavailable_reason(x)
    if reason is not None:
        from . import BackendUnavailable

        raise BackendUnavailable(f"backend 'numba' cannot run on this input: {reason}")


# -------------------------------------------------------------------------------------------
# arrays in and out: NumPy views of the caller's memory, outputs in the caller's layout/kind
# -------------------------------------------------------------------------------------------


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


def _compute_dtype(storage: np.ndarray) -> type:
    return np.float64 if storage.dtype == np.float64 else np.float32


class _Prepared:
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
        self.rows = self.inner >= _k().ROWS_MIN_INNER

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

    def same_layout(self, other: Array) -> np.ndarray:
        """``other`` (same logical shape as x) in x's memory order, copied only if it must be."""
        phys = _storage(other).transpose(self.perm)
        if phys.dtype != self.phys.dtype:
            raise TypeError(
                f"grad_output (dy) has dtype {_dtype_name(other)} but the input has dtype "
                f"{_dtype_name(self.like)}; they must be equal"
            )
        return np.ascontiguousarray(phys)

    def empty(self) -> np.ndarray:
        return POOL.empty(self.phys_shape, self.phys.dtype)

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
        if not self.torch:
            return v
        import torch

        return torch.from_numpy(v)

    def group(self, arrays: int) -> int:
        """Rows layout, fused kernels: adjacent channels per group, so that the group's data
        (``arrays`` tensors' worth) stays in cache between its two passes, keeping at least 16
        groups for the threads."""
        k = _k()
        channel_bytes = max(1, self.count * self.phys.itemsize * arrays)
        return max(1, min(k.ROWS_GROUP_BYTES // channel_bytes, self.channels // 16))

    def cols_partials_shape(self) -> tuple[int, int]:
        """Cols layout: (chunks, columns) of the per-chunk partials (the kernels' own plan)."""
        width = self.channels * self.inner
        return (_k().cols_plan(self.outer, width)[1], width)

    def parts(self) -> int:
        """Rows layout: how many n-ranges each channel's reduction is split into (shape only)."""
        k = _k()
        wanted = max(k.ROWS_MIN_PARTS, -(-k.ROWS_MIN_ITEMS // max(self.channels, 1)))
        return max(1, min(self.outer, wanted))


# -------------------------------------------------------------------------------------------
# the stages (no validation: the Backend protocol and the public functions below validate)
# -------------------------------------------------------------------------------------------


def _plain_means(prep: _Prepared, mean: np.ndarray) -> None:
    """Channels whose mean came out NaN get a plain float64 mean instead: the kernels shift
    their sums by a value of the data, so a channel holding an inf comes out NaN (inf - inf),
    where the reference's plain sum says +inf or -inf (NaN only with both signs or a NaN)."""
    bad = np.flatnonzero(np.isnan(mean))
    if bad.size == 0:
        return
    rows = prep.phys.reshape(prep.outer, prep.channels, prep.inner)
    for c in bad:
        values = np.ascontiguousarray(rows[:, c, :])
        if prep.bf16:  # the bits of bfloat16 are the top half of a float32's
            values = (values.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif values.dtype == np.uint16:
            values = values.view(np.float16)
        with np.errstate(invalid="ignore"):  # inf and -inf together: NaN, as intended
            mean[c] = np.sum(values, dtype=np.float64) / prep.count


def _stats(prep: _Prepared, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean = np.empty(prep.channels, dtype=prep.cdt)
    var = np.empty_like(mean)
    invstd = np.empty_like(mean)
    if prep.size == 0:
        mean[:] = var[:] = invstd[:] = np.nan  # no values: no moments (and no channels: no-op)
    elif prep.rows:
        _k().rows_stats(prep.view(prep.phys), prep.parts(), eps, mean, var, invstd)
    else:
        shape = prep.cols_partials_shape()
        _k().cols_stats(
            prep.view(prep.phys), prep.inner, eps, mean, var, invstd,
            _scratch("means", shape, np.float64), _scratch("m2s", shape, np.float64),
        )  # fmt: skip
    _plain_means(prep, mean)
    return mean, var, invstd


def _elemt(prep: _Prepared, mean: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> Array:
    y = prep.empty()
    if prep.size:
        if prep.rows:
            _k().rows_elemt(prep.view(prep.phys), mean, scale, shift, prep.view(y), prep.stream(2))
        else:
            cols = prep.columns
            _k().cols_elemt(
                prep.view(prep.phys), cols(mean), cols(scale), cols(shift), prep.view(y),
                prep.stream(2),
            )  # fmt: skip
    return prep.wrap(y)


def _forward_train(prep: _Prepared, weight: Array | None, bias: Array | None, eps: float):
    w, b = prep.vector(weight, 1.0), prep.vector(bias, 0.0)
    if not prep.rows or prep.size == 0:
        mean, var, invstd = _stats(prep, eps)
        y = _elemt(prep, mean, w * invstd, b)
        return y, mean, var, invstd
    y = prep.empty()
    mean = np.empty(prep.channels, dtype=prep.cdt)
    var = np.empty_like(mean)
    invstd = np.empty_like(mean)
    _k().rows_forward_train(
        prep.view(prep.phys),
        prep.parts(),
        prep.group(1),
        eps,
        w,
        b,
        prep.view(y),
        mean,
        var,
        invstd,
        prep.stream(2),
    )
    _plain_means(prep, mean)
    return prep.wrap(y), mean, var, invstd


def _backward_reduce(prep: _Prepared, dy: np.ndarray, mean: np.ndarray, invstd: np.ndarray):
    sum_dy = np.empty(prep.channels, dtype=prep.cdt)
    sum_dy_xhat = np.empty_like(sum_dy)
    if prep.size == 0:
        sum_dy[:] = sum_dy_xhat[:] = 0.0
    elif prep.rows:
        _k().rows_backward_reduce(
            prep.view(dy), prep.view(prep.phys), mean, invstd, prep.parts(), sum_dy, sum_dy_xhat
        )
    else:
        shape = prep.cols_partials_shape()
        _k().cols_backward_reduce(
            prep.view(dy), prep.view(prep.phys), prep.columns(mean), prep.inner, invstd,
            sum_dy, sum_dy_xhat, _scratch("sums_dy", shape, prep.cdt),
            _scratch("sums_dy_xc", shape, prep.cdt),
        )  # fmt: skip
    return sum_dy, sum_dy_xhat


def _backward_elemt(prep, dy, mean, invstd, w, sum_dy, sum_dy_xhat, count) -> Array:
    dx = prep.empty()
    if prep.size:
        k = _k()
        if prep.rows:
            k.rows_backward_elemt(
                prep.view(dy),
                prep.view(prep.phys),
                mean,
                invstd,
                w,
                sum_dy,
                sum_dy_xhat,
                count,
                prep.view(dx),
                prep.stream(3),
            )
        else:
            k_dy, k_xc, k_0 = (np.empty_like(mean) for _ in range(3))
            k.grad_coefficients(invstd, w, sum_dy, sum_dy_xhat, count, k_dy, k_xc, k_0)
            cols = prep.columns
            k.cols_backward_elemt(
                prep.view(dy),
                prep.view(prep.phys),
                cols(mean),
                cols(k_dy),
                cols(k_xc),
                cols(k_0),
                prep.view(dx),
                prep.stream(3),
            )
    return prep.wrap(dx)


def _backward_train(prep, dy, mean, invstd, w):
    if prep.rows and prep.size:
        k = _k()
        dx = prep.empty()
        sum_dy = np.empty(prep.channels, dtype=prep.cdt)
        sum_dy_xhat = np.empty_like(sum_dy)
        views = (prep.view(dy), prep.view(prep.phys), mean, invstd, w)
        if prep.inner * prep.phys.itemsize >= k.ROWS_PIPELINE_MIN_BYTES and prep.channels > 1:
            # Lanes only balance the threads: the results do not depend on their number.
            lanes = min(prep.channels, 4 * _numba.get_num_threads())
            k.rows_backward_pipelined(
                *views, lanes, prep.view(dx), sum_dy, sum_dy_xhat, prep.stream(3)
            )
        else:
            k.rows_backward_train(
                *views, prep.parts(), prep.group(2), prep.view(dx), sum_dy, sum_dy_xhat,
                prep.stream(3),
            )  # fmt: skip
        return prep.wrap(dx), sum_dy, sum_dy_xhat
    sum_dy, sum_dy_xhat = _backward_reduce(prep, dy, mean, invstd)
    dx = _backward_elemt(prep, dy, mean, invstd, w, sum_dy, sum_dy_xhat, prep.count)
    return dx, sum_dy, sum_dy_xhat


class NumbaBackend:
    """The :class:`batchnorm.kernels.Backend` protocol on NumPy arrays and torch CPU tensors.

    Inputs are assumed validated (``batchnorm.torch`` validates before calling); ``axis`` is a
    non-negative channel axis. Outputs have the input's kind, dtype and memory layout; the
    statistics are float32 (float64 for float64 input).
    """

    name = "numba"
    #: ``backend="auto"`` leaves smaller inputs to the reference: measured on 2 cores, a
    #: (60, 100) training step took 6.9 ms here against 1.7 ms in the reference (thread start-up
    #: and synchronisation dominate); at 65,536 elements the two tie, above it numba wins.
    auto_min_numel = 1 << 16

    def unavailable_reason(self, x: Array) -> str | None:
        return unavailable_reason(x)

    def forward_train(self, x, weight, bias, eps, axis):
        prep = _Prepared(x, axis)
        y, mean, var, invstd = _forward_train(prep, weight, bias, float(eps))
        return y, prep.out_vector(mean), prep.out_vector(var), prep.out_vector(invstd)

    def forward_infer(self, x, running_mean, running_var, weight, bias, eps, axis):
        prep = _Prepared(x, axis)
        mean = prep.vector(running_mean)
        # 1/sqrt(var + eps) in float64, rounded once to the compute dtype.
        invstd = 1.0 / np.sqrt(prep.vector(running_var).astype(np.float64) + float(eps))
        scale = (prep.vector(weight, 1.0) * invstd).astype(prep.cdt)
        return _elemt(prep, mean, scale, prep.vector(bias, 0.0))

    def backward_reduce(self, dy, x, mean, invstd, axis):
        prep = _Prepared(x, axis)
        sums = _backward_reduce(prep, prep.same_layout(dy), prep.vector(mean), prep.vector(invstd))
        return tuple(prep.out_vector(s) for s in sums)

    def backward_elemt(
        self,
        dy,
        x,
        mean,
        invstd,
        weight,
        sum_dy,
        sum_dy_xhat,
        count,
        axis,
        *,
        through_mean=True,
        through_var=True,
    ):
        prep = _Prepared(x, axis)
        zeros = np.zeros(prep.channels, dtype=prep.cdt)
        # Dropping a path through a moment is the same as that moment's sum being zero.
        s_dy = prep.vector(sum_dy) if through_mean else zeros
        s_dy_xhat = prep.vector(sum_dy_xhat) if through_var else zeros
        return _backward_elemt(
            prep,
            prep.same_layout(dy),
            prep.vector(mean),
            prep.vector(invstd),
            prep.vector(weight, 1.0),
            s_dy,
            s_dy_xhat,
            int(count),
        )

    def backward_train(self, dy, x, mean, invstd, weight, axis):
        prep = _Prepared(x, axis)
        dx, sum_dy, sum_dy_xhat = _backward_train(
            prep,
            prep.same_layout(dy),
            prep.vector(mean),
            prep.vector(invstd),
            prep.vector(weight, 1.0),
        )
        return dx, prep.out_vector(sum_dy_xhat), prep.out_vector(sum_dy)


_BACKEND = NumbaBackend()


# -------------------------------------------------------------------------------------------
# public functions: the reference's API, validated, on NumPy arrays or torch CPU tensors
# -------------------------------------------------------------------------------------------


def batch_stats(x: Array, axis: int = 1) -> BatchStats:
    """Mean and biased variance per channel (see ``batchnorm.reference.batch_stats``)."""
    _, axis = check_input(x, axis, 1e-5, training=False)
    _check_available(x)
    prep = _Prepared(x, axis)
    mean, var, _ = _stats(prep, 1.0)
    return BatchStats(prep.count, prep.out_vector(mean), prep.out_vector(var))


def elemt(
    x: Array, mean: Array, invstd: Array, gamma: Array | None, beta: Array | None, axis: int
) -> Array:
    """``y = gamma * (x - mean) * invstd + beta`` in x's dtype and layout."""
    _, axis = check_input(
        x, axis, 1e-5, training=False, gamma=gamma, beta=beta, running_mean=mean, running_var=invstd
    )
    _check_available(x)
    prep = _Prepared(x, axis)
    scale = (prep.vector(gamma, 1.0) * prep.vector(invstd)).astype(prep.cdt)
    return _elemt(prep, prep.vector(mean), scale, prep.vector(beta, 0.0))


def forward_train(
    x: Array, gamma: Array | None, beta: Array | None, eps: float = 1e-5, axis: int = 1
) -> tuple[Array, Array, Array, Array]:
    """Fused training forward: ``(y, mean, var, invstd)``, var biased."""
    _, axis = check_input(x, axis, eps, training=True, gamma=gamma, beta=beta)
    _check_available(x)
    return _BACKEND.forward_train(x, gamma, beta, eps, axis)


def batch_norm_train(
    x: Array,
    gamma: Array | None = None,
    beta: Array | None = None,
    *,
    axis: int = 1,
    eps: float = 1e-5,
) -> tuple[Array, Saved]:
    """Algorithm 1 (as ``batchnorm.reference.batch_norm_train``): ``(y, saved)``."""
    _, axis = check_input(x, axis, eps, training=True, gamma=gamma, beta=beta)
    _check_available(x)
    y, mean, var, invstd = _BACKEND.forward_train(x, gamma, beta, eps, axis)
    count = values_per_channel(tuple(x.shape), axis)
    return y, Saved(x, mean, var, invstd, gamma, axis, float(eps), count)


def batch_norm_infer(
    x: Array,
    running_mean: Array,
    running_var: Array,
    gamma: Array | None = None,
    beta: Array | None = None,
    *,
    axis: int = 1,
    eps: float = 1e-5,
) -> Array:
    """Algorithm 2 (as ``batchnorm.reference.batch_norm_infer``)."""
    _, axis = check_input(
        x,
        axis,
        eps,
        training=False,
        gamma=gamma,
        beta=beta,
        running_mean=running_mean,
        running_var=running_var,
    )
    _check_available(x)
    return _BACKEND.forward_infer(x, running_mean, running_var, gamma, beta, eps, axis)


def _check_backward(dy: Array, x: Array, axis: int, *vectors: tuple[Array | None, str]) -> int:
    _, axis = check_input(x, axis, 1e-5, training=False)
    check_grad_output(dy, x)
    check_same_shape(dy, x, "grad_output (dy)", "input (x)")
    for v, name in vectors:
        if v is not None and tuple(v.shape) != (x.shape[axis],):
            raise ValueError(f"{name} must have shape ({x.shape[axis]},), got {tuple(v.shape)}")
    _check_available(x)
    return axis


def backward_reduce(
    dy: Array, x: Array, mean: Array, invstd: Array, axis: int
) -> tuple[Array, Array]:
    """``(sum_dy, sum_dy_xhat)`` per channel."""
    axis = _check_backward(dy, x, axis, (mean, "mean"), (invstd, "invstd"))
    return _BACKEND.backward_reduce(dy, x, mean, invstd, axis)


def backward_elemt(
    dy: Array,
    x: Array,
    mean: Array,
    invstd: Array,
    gamma: Array | None,
    sum_dy: Array,
    sum_dy_xhat: Array,
    count: int,
    axis: int,
    *,
    through_mean: bool = True,
    through_var: bool = True,
) -> Array:
    """``dx = gamma*invstd/m * (m*dy - sum_dy - x_hat*sum_dy_xhat)``; m = ``count``."""
    axis = _check_backward(
        dy,
        x,
        axis,
        (mean, "mean"),
        (invstd, "invstd"),
        (gamma, "weight (gamma)"),
        (sum_dy, "sum_dy"),
        (sum_dy_xhat, "sum_dy_xhat"),
    )
    if isinstance(count, bool) or int(count) != count or count < 1:
        raise ValueError(f"count (m) must be a positive integer, got {count!r}")
    return _BACKEND.backward_elemt(
        dy,
        x,
        mean,
        invstd,
        gamma,
        sum_dy,
        sum_dy_xhat,
        count,
        axis,
        through_mean=through_mean,
        through_var=through_var,
    )


def backward_train(
    dy: Array, x: Array, mean: Array, invstd: Array, gamma: Array | None, axis: int
) -> tuple[Array, Array, Array]:
    """Fused backward: ``(dx, dgamma, dbeta)`` = (dx, sum_dy_xhat, sum_dy)."""
    axis = _check_backward(
        dy, x, axis, (mean, "mean"), (invstd, "invstd"), (gamma, "weight (gamma)")
    )
    return _BACKEND.backward_train(dy, x, mean, invstd, gamma, axis)


def backward(
    dy: Array, saved: Saved, *, through_mean: bool = True, through_var: bool = True
) -> Grads:
    """Gradient of the training forward (as ``batchnorm.reference.backward``)."""
    if through_mean and through_var:
        dx, dgamma, dbeta = backward_train(
            dy, saved.x, saved.mean, saved.invstd, saved.gamma, saved.axis
        )
        return Grads(dx, dgamma, dbeta)
    sum_dy, sum_dy_xhat = backward_reduce(dy, saved.x, saved.mean, saved.invstd, saved.axis)
    dx = backward_elemt(
        dy,
        saved.x,
        saved.mean,
        saved.invstd,
        saved.gamma,
        sum_dy,
        sum_dy_xhat,
        saved.count,
        saved.axis,
        through_mean=through_mean,
        through_var=through_var,
    )
    return Grads(dx, sum_dy_xhat, sum_dy)
