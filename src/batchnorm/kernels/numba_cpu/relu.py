"""Numba kernels of the fused activation: ``y = relu(bn(x) [+ residual])`` with a 1-bit mask,
and its backward through the mask.

The mask keeps one bit per element, packed along each kernel row (``view`` of the launcher:
(outer, C, inner) rows when ``inner`` is long, (outer, C * inner) otherwise), bit ``i % 8`` of
byte ``i // 8``; a row is padded to whole bytes, so that no byte is shared by two rows and the
rows can be written by different threads. A bit is set where the ReLU passed its input, i.e.
where ``not z <= 0`` (z > 0, and NaN, which ``torch.relu`` passes through with its gradient):
the gradient reaching batch norm's output is ``dy`` there and 0 elsewhere (0 at z = 0), as
PyTorch's ``threshold_backward`` and the Triton kernels give it. The bit is read from the
stored output (y > 0 or NaN), which is z's sign except where a 16-bit output rounds a tiny
positive z to 0: there the gradient is blocked, as in PyTorch's unfused sequence, whose ReLU
sees the rounded value. The backward kernels take the gradients as integers of the same width
(``dy & -bit``).

``z`` is formed in the compute dtype, the residual added there, and the result rounded once to
the storage dtype (PyTorch's unfused sequence rounds bn(x) before the add: 16-bit outputs may
differ in the last bit).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from .jit import _JIT, _at, _like, _load, _store

__all__ = ["rows_relu_elemt", "cols_relu_elemt", "rows_relu_backward", "cols_relu_backward"]


@numba.njit(**_JIT)
def _relu_run(x, residual, has_residual, y, bits, mean, scale, shift):
    """One row: y = relu((x - mean) * scale + shift [+ residual]), then its bits.

    Two loops, not one: the first is a select LLVM vectorises; the bits come after, from the
    stored output while it is in L1 (measured at (32, 64, 32, 32) float32, 2 threads: 0.21 ms
    against 0.50 ms with the bits packed in the same loop under a branch)."""
    n = x.shape[0]
    for i in range(n):
        z = (_load(x[i]) - _at(mean, i)) * _at(scale, i) + _at(shift, i)
        if has_residual:
            z += _like(_load(residual[i]), z)
        # z > 0 or NaN: passed through, value and gradient, as torch.relu.
        y[i] = _store(y, z if not z <= 0 else _like(0.0, z))
    full = n // 8
    for j in range(full):
        byte = 0
        for k in range(8):
            byte |= _passed(y[8 * j + k]) << k
        bits[j] = byte
    if full < bits.shape[0]:
        byte = 0
        for k in range(n - 8 * full):
            byte |= _passed(y[8 * full + k]) << k
        bits[full] = byte


@numba.njit(inline="always", **_JIT)
def _passed(stored):
    """1 where the stored output passed the gradient: not <= 0 (positive, or NaN)."""
    return 0 if _load(stored) <= 0 else 1


@numba.njit(**_JIT)
def _relu_backward_run(dy, bits, dz, table):
    """One row: dz = dy where the bit is set, 0 elsewhere, on the values' integer bits (an AND
    with 0 or all ones: exact, and a NaN or inf in dy at a blocked position gives 0).

    Written so that LLVM vectorises a loop at every row length: its scalar code here takes
    3-4 ns per element against 0.13-0.35 vectorised (float32, 1 thread, AVX-512). The loop over
    bytes (8 shifts each) is vectorised only from 40 bytes (320 values) per row; it alone
    took 2.7-3 ns per element on rows of 128-319 values (12x12 to 17x17 maps). 16- and 32-bit
    values: that loop from ``BYTE_LOOP_MIN`` values, below it a loop over the elements, each
    shifting its own byte. 64-bit values, where the loop over elements stays scalar up to about
    a thousand values, AND with the 8 masks of each byte read from ``table``
    (``RELU_MASKS``)."""
    if dy.itemsize < 8:
        _narrow_backward_run(dy, bits, dz)
    else:
        _wide_backward_run(dy, bits, dz, table)


#: Rows at least this long (16- and 32-bit values) take the loop over bytes, which LLVM
#: vectorises from 40 bytes (320 values) per row here and which is then faster than the loop
#: over elements (float32, 1 thread: 0.14-0.20 against 0.21-0.29 ns per element at 512-3136
#: values). Below, the loop over elements: 0.13-0.35 ns, but 0.7-1.0 at 160 and 300 values,
#: whose remainder after the vector loop runs scalar.
BYTE_LOOP_MIN = 512


@numba.njit(**_JIT)
def _narrow_backward_run(dy, bits, dz):
    # Two loops in two functions: written in one, LLVM left the loop over elements scalar.
    if dy.shape[0] >= BYTE_LOOP_MIN:
        _byte_loop(dy, bits, dz)
    else:
        _element_loop(dy, bits, dz)


@numba.njit(**_JIT)
def _element_loop(dy, bits, dz):
    one = dy.dtype.type(1)
    for i in range(dy.shape[0]):
        dz[i] = dy[i] & -((dy.dtype.type(bits[i >> 3]) >> (i & 7)) & one)


@numba.njit(**_JIT)
def _byte_loop(dy, bits, dz):
    n = dy.shape[0]
    one = dy.dtype.type(1)
    full = n // 8
    for j in range(full):
        byte = dy.dtype.type(bits[j])
        for k in range(8):
            dz[8 * j + k] = dy[8 * j + k] & -((byte >> k) & one)
    for i in range(8 * full, n):
        dz[i] = dy[i] & -((dy.dtype.type(bits[i >> 3]) >> (i & 7)) & one)


@numba.njit(**_JIT)
def _wide_backward_run(dy, bits, dz, table):
    n = dy.shape[0]
    full = n // 8
    for j in range(full):
        masks = table[bits[j]]
        for k in range(8):
            dz[8 * j + k] = dy[8 * j + k] & masks[k]
    if 8 * full < n:
        masks = table[bits[full]]
        for i in range(8 * full, n):
            dz[i] = dy[i] & masks[i - 8 * full]


#: Row b: the 8 masks (0 or all ones) of the bits of byte b, lowest bit first.
RELU_MASKS = np.array([[-((b >> k) & 1) for k in range(8)] for b in range(256)], np.int64)


@numba.njit(parallel=True, **_JIT)
def rows_relu_elemt(x, residual, has_residual, mean, scale, shift, y, bits):
    """Rows view (outer, C, inner); ``bits`` (outer, C, ceil(inner / 8)) uint8."""
    outer, channels = x.shape[0], x.shape[1]
    for item in prange(outer * channels):
        n, c = item // channels, item % channels
        _relu_run(
            x[n, c], residual[n, c], has_residual, y[n, c], bits[n, c], mean[c], scale[c],
            shift[c],
        )  # fmt: skip


@numba.njit(parallel=True, **_JIT)
def cols_relu_elemt(x, residual, has_residual, mean_w, scale_w, shift_w, y, bits):
    """Cols view (outer, W) with per-column coefficients; ``bits`` (outer, ceil(W / 8))."""
    for n in prange(x.shape[0]):
        _relu_run(x[n], residual[n], has_residual, y[n], bits[n], mean_w, scale_w, shift_w)


@numba.njit(parallel=True, **_JIT)
def rows_relu_backward(dy, bits, dz):
    outer, channels = dy.shape[0], dy.shape[1]
    for item in prange(outer * channels):
        n, c = item // channels, item % channels
        _relu_backward_run(dy[n, c], bits[n, c], dz[n, c], RELU_MASKS)


@numba.njit(parallel=True, **_JIT)
def cols_relu_backward(dy, bits, dz):
    for n in prange(dy.shape[0]):
        _relu_backward_run(dy[n], bits[n], dz[n], RELU_MASKS)
