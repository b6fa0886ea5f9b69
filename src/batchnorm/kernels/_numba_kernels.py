"""Numba kernels of the batch-norm stages. Imported only by ``numba_cpu`` (numba is optional).

Every kernel works on one of two *physical* views of a dense array, chosen by the launcher
(``numba_cpu._Prepared``) from the strides, so no transposing copy is ever made:

* ``rows`` (outer, C, inner), inner >= ``ROWS_MIN_INNER``: each (n, c) row of ``inner`` values is
  contiguous (NCHW, NCL, NCDHW). Work items are (range of n, channel), numbered so that a
  thread sweeps a slab of memory; the inner loops run over a row and are reductions,
  vectorised with ``fastmath`` reassociation (a sum in 16 SIMD lanes is *more* accurate than a
  sequential one, and the centring that protects the variance is explicit arithmetic that no
  flag removes). With long rows the backward is software-pipelined across channels
  (``rows_backward_pipelined``); with N = 1 the fused kernels give a thread a group of channels
  to reduce and then normalise while they are still in its cache.
* ``cols`` (outer, W) with W = C * inner, inner small: channels-last (NHWC, NDHWC: inner = 1),
  (N, C), and NC(L) with tiny L. Each of the W columns gets its own accumulator and the inner
  loops run along a contiguous row of columns: vectorised without any reduction in the loop.
  Work items are (chunk of rows, block of columns), so the reduction axis itself is parallel.

Outputs of large passes are written with streaming (non-temporal) stores, see ``_stream``.

Numerical policy (``batchnorm.reference.stats``), per work item:

* A *block* (up to ``BLOCK`` values: a piece of one row, consecutive short rows of one
  channel, or a chunk of rows of one column) is reduced
  two-pass and centred in the compute dtype: ``total = sum(x - K)`` with K the block's first
  value (so x = 1e4 + N(0, 1) sums O(1) numbers, not O(1e4) ones), then
  ``m2_b = sum((x - mean_b)**2)``; the block mean ``K + total / n_b`` is kept in float64. The
  block is in L1 (rows) or L2 (cols) for the second pass.
* Blocks merge into float64 (count, mean, m2) with Chan et al.'s exact formula, in a fixed order.
  Per-item partials then merge per channel in item order. The split into items depends only on
  the shape, never on the thread count or scheduling (the pipelined backward's channel ranges
  follow the thread count, but each channel is still summed in one fixed order), so results
  are bitwise identical run to run.
* The backward sums ``sum(dy)`` and ``sum(dy * (x - mean))`` accumulate per block in the compute
  dtype and across blocks in float64; ``x - mean`` is formed before any product.

Storage dtypes: float32 and float64 as themselves; float16 travels as its uint16 bits and
bfloat16 as its int16 bits (numba has no 16-bit float arrays). ``_load`` widens to float32 in
registers and ``_store`` rounds to nearest-even, so 16-bit data costs no extra pass.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import prange
from numba.core import types
from numba.extending import intrinsic, overload

__all__ = [
    "BLOCK",
    "COLS_CHUNK_ELEMS",
    "COLS_FLAT_ELEMS",
    "COLS_MAX_BLOCK",
    "COLS_MIN_CHUNKS",
    "ROWS_MIN_INNER",
    "ROWS_MIN_ITEMS",
    "ROWS_MIN_PARTS",
    "ROWS_PIPELINE_MIN_BYTES",
    "ROWS_GROUP_BYTES",
    "rows_forward_train",
    "rows_stats",
    "rows_elemt",
    "rows_backward_reduce",
    "rows_backward_elemt",
    "rows_backward_train",
    "rows_backward_pipelined",
    "cols_plan",
    "cols_stats",
    "cols_elemt",
    "cols_backward_reduce",
    "cols_backward_elemt",
]

#: Longest block of one row reduced in the compute dtype before a float64 merge (16 KiB f64).
BLOCK = 2048
#: Rows layout when a contiguous run per (n, c) has at least this many values; cols below.
#: (Measured fwd+bwd: cols wins at 49 and 100 values per run, rows at 196.)
ROWS_MIN_INNER = 128
#: Rows layout: split the n range of a channel until there are this many work items.
ROWS_MIN_ITEMS = 32
#: Rows layout: and into at least this many n-ranges (when N allows), so that the reductions
#: sweep memory slab by slab instead of channel by channel (measured fwd+bwd, in copy times:
#: (32, 128, 56, 56) 3.6 at 1 range, 3.4 at 16; (64, 256, 14, 14) 4.5 at 1, 2.7 at 16).
ROWS_MIN_PARTS = 16
#: Rows layout: the backward is software-pipelined across channels (``rows_backward_pipelined``)
#: when each contiguous row is at least this long; shorter rows read channel by channel are far
#: from memory order (measured backward, in copy times: (32, 128, 56, 56) 1.7 pipelined
#: vs 2.1 in two passes, NCHW (16, 64, 112, 112) 1.5 vs 2.0; (64, 256, 14, 14) 4.1 vs 1.8).
ROWS_PIPELINE_MIN_BYTES = 4096
#: Rows layout, fused kernels: channels per group, so that a group's data stays in L2 (1 MiB).
ROWS_GROUP_BYTES = 256 * 1024
#: Cols layout: at most this many columns per work item (their accumulators stay in L1).
COLS_MAX_BLOCK = 1024
#: Cols layout: up to this many values per work item (1 MiB float32, mostly re-read from L2;
#: fewer, larger chunks make the serial merge of chunk partials cheaper: measured at
#: (4096, 1024), 0.65 / 0.68 of a copy's time for stats / backward_reduce against 0.68 / 0.84
#: with 256 KiB chunks).
COLS_CHUNK_ELEMS = 262144
#: Cols layout: at least this many row chunks when there are 16 rows per chunk to be had.
COLS_MIN_CHUNKS = 8
#: Cols layout, narrow rows (NHWC with few channels): the elementwise kernels take this many
#: values of consecutive rows as one flat run, with the coefficient vectors tiled to match, so
#: that a 64-value row does not pay a loop's set-up alone (measured at (16, 64, 112, 112)
#: channels-last: per-row loops 2.2 copy times, flat runs 1.x).
COLS_FLAT_ELEMS = 1024

_JIT = {"cache": True, "nogil": True}
#: Reassociation lets LLVM split a sum across SIMD lanes; nsz/contract allow FMA and sign-of-zero
#: freedom. No nnan/ninf (NaN and inf must propagate) and no arcp (1/sqrt stays exact).
_REDUCE_MATH = {"reassoc", "nsz", "contract"}


# ---------------------------------------------------------------------------------------------
# 16-bit storage <-> compute dtype, in registers
# ---------------------------------------------------------------------------------------------


@intrinsic
def _half_bits_to_f32(typingctx, bits):
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@intrinsic
def _f32_to_half_bits(typingctx, value):
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        # fptrunc rounds to nearest-even, like numpy's float32 -> float16 cast.
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return sig, codegen


@intrinsic
def _bf16_bits_to_f32(typingctx, bits):
    sig = types.float32(types.int16)

    def codegen(context, builder, signature, args):
        wide = builder.zext(args[0], ir.IntType(32))
        return builder.bitcast(builder.shl(wide, ir.Constant(ir.IntType(32), 16)), ir.FloatType())

    return sig, codegen


@intrinsic
def _f32_to_bf16_bits(typingctx, value):
    sig = types.int16(types.float32)

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        bits = builder.bitcast(args[0], i32)
        # Round to nearest, ties to even: add 0x7FFF plus the lowest kept bit, then truncate.
        lsb = builder.and_(builder.lshr(bits, ir.Constant(i32, 16)), ir.Constant(i32, 1))
        rounded = builder.add(builder.add(bits, ir.Constant(i32, 0x7FFF)), lsb)
        # NaN must stay NaN (rounding could carry it into inf): emit a quiet NaN instead.
        quiet = builder.or_(bits, ir.Constant(i32, 0x00400000))
        is_nan = builder.fcmp_unordered("uno", args[0], args[0])
        chosen = builder.select(is_nan, quiet, rounded)
        return builder.trunc(builder.lshr(chosen, ir.Constant(i32, 16)), ir.IntType(16))

    return sig, codegen


@intrinsic
def _stream(typingctx, out, i, value):
    """``out[i] = value`` as a non-temporal (streaming) store: the line goes to memory without
    first being read into the cache, and does not evict the data the kernel is still reading.

    The store is marked 64-byte aligned so that LLVM may vectorise it into ``vmovntps``, which
    needs an aligned address: call it only on a range from ``_stream_span``, which starts on a
    64-byte boundary and is a whole number of 64-byte lines long."""
    if not isinstance(out, types.Array) or value != out.dtype:
        return None
    sig = types.void(out, types.intp, value)

    def codegen(context, builder, signature, args):
        array, index, v = args
        data = context.make_array(signature.args[0])(context, builder, array).data
        store = builder.store(v, builder.gep(data, [index], inbounds=True), align=64)
        store.set_metadata(
            "nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)])
        )
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(inline="always", **_JIT)
def _stream_span(out, stream):
    """[a, b): the part of the contiguous 1-D ``out`` that ``_stream`` may write (whole aligned
    64-byte lines); (n, n), i.e. none, when ``stream`` is off or ``out`` is misaligned."""
    n = out.shape[0]
    if not stream:
        return n, n
    misaligned = (-out.ctypes.data) % 64
    if misaligned % out.itemsize:
        return n, n
    a = min(n, misaligned // out.itemsize)
    lane = 64 // out.itemsize
    return a, a + ((n - a) // lane) * lane


def _load(v):  # pragma: no cover - replaced by the overload inside jitted code
    raise NotImplementedError


@overload(_load, inline="always")
def _load_impl(v):
    if isinstance(v, types.Float):
        return lambda v: v
    if v == types.uint16:
        return lambda v: _half_bits_to_f32(v)
    if v == types.int16:
        return lambda v: _bf16_bits_to_f32(v)
    return None


def _store(out, value):  # pragma: no cover
    raise NotImplementedError


@overload(_store, inline="always")
def _store_impl(out, value):
    """``value`` (compute dtype) converted to the element type of array ``out``."""
    dtype = out.dtype
    if dtype == types.float64:
        return lambda out, value: np.float64(value)
    if dtype == types.float32:
        return lambda out, value: np.float32(value)
    if dtype == types.uint16:
        return lambda out, value: _f32_to_half_bits(np.float32(value))
    if dtype == types.int16:
        return lambda out, value: _f32_to_bf16_bits(np.float32(value))
    return None


def _zero(x):  # pragma: no cover
    raise NotImplementedError


@overload(_zero, inline="always")
def _zero_impl(x):
    """0 in the compute dtype of array ``x``: float64 for float64 storage, else float32."""
    if x.dtype == types.float64:
        return lambda x: np.float64(0.0)
    return lambda x: np.float32(0.0)


def _like(value, ref):  # pragma: no cover
    raise NotImplementedError


@overload(_like, inline="always")
def _like_impl(value, ref):
    """``value`` cast to the (compute) float type of scalar ``ref``."""
    if ref == types.float64:
        return lambda value, ref: np.float64(value)
    return lambda value, ref: np.float32(value)


def _part(v, a, b):  # pragma: no cover
    raise NotImplementedError


@overload(_part, inline="always")
def _part_impl(v, a, b):
    """``v[a:b]`` for a per-column vector (cols layout), ``v`` itself for a per-row scalar
    (rows): one elementwise loop serves both layouts."""
    if isinstance(v, types.Array):
        return lambda v, a, b: v[a:b]
    return lambda v, a, b: v


def _at(v, i):  # pragma: no cover
    raise NotImplementedError


@overload(_at, inline="always")
def _at_impl(v, i):
    """``v[i]`` for a per-column vector, ``v`` itself for a per-row scalar."""
    if isinstance(v, types.Array):
        return lambda v, i: v[i]
    return lambda v, i: v


# ---------------------------------------------------------------------------------------------
# shared scalar helpers
# ---------------------------------------------------------------------------------------------


@numba.njit(inline="always", **_JIT)
def _merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al. (1979): exact merge of two (count, mean, m2) partials, float64."""
    if n_b == 0:
        return n_a, mean_a, m2_a
    n = n_a + n_b
    delta = mean_b - mean_a
    frac = n_b / n
    return n, mean_a + delta * frac, m2_a + m2_b + delta * delta * (n_a * frac)


@numba.njit(inline="always", **_JIT)
def _split(total, parts, p):
    """[start, stop) of part ``p`` of ``parts`` near-equal parts of range(total)."""
    return (total * p) // parts, (total * (p + 1)) // parts


# ---------------------------------------------------------------------------------------------
# rows layout (outer, C, inner): reductions along contiguous rows
#
# Inner loops index 1-D views from 0 (``row[i0:i1]``, then ``seg[i]``): with an offset index
# numba must allow for a negative (wrap-around) index, and that check alone stops LLVM from
# vectorising the loop (measured: 10x slower).
# ---------------------------------------------------------------------------------------------


@numba.njit(fastmath=_REDUCE_MATH, **_JIT)
def _block_sum(x, c, n0, n1, i0, i1, centre):
    """Sum of x - centre over values i0:i1 of rows n0:n1 of channel c, in the compute dtype.
    Short rows go four at a time: one loop and one horizontal sum per four rows instead of
    per row (measured at (64, 256, 14, 14): 0.7 of a copy's time against 1.0)."""
    total = _zero(x)
    n = n0
    while n + 4 <= n1:
        a, b = x[n, c, i0:i1], x[n + 1, c, i0:i1]
        e, f = x[n + 2, c, i0:i1], x[n + 3, c, i0:i1]
        for i in range(a.shape[0]):
            total += ((_load(a[i]) - centre) + (_load(b[i]) - centre)) + (
                (_load(e[i]) - centre) + (_load(f[i]) - centre)
            )
        n += 4
    for left in range(n, n1):  # left-over rows, one at a time
        seg = x[left, c, i0:i1]
        for i in range(seg.shape[0]):
            total += _load(seg[i]) - centre
    return total


@numba.njit(fastmath=_REDUCE_MATH, **_JIT)
def _block_centred_sums(x, c, n0, n1, i0, i1, centre):
    """(sum of d, sum of d**2), d = x - centre, as ``_block_sum``. (One function with a flag
    for the first pass's plain sum measured 25% slower on 784-value rows, hence two.)"""
    total = _zero(x)
    squares = _zero(x)
    n = n0
    while n + 4 <= n1:
        a, b = x[n, c, i0:i1], x[n + 1, c, i0:i1]
        e, f = x[n + 2, c, i0:i1], x[n + 3, c, i0:i1]
        for i in range(a.shape[0]):
            d, g = _load(a[i]) - centre, _load(b[i]) - centre
            h, k = _load(e[i]) - centre, _load(f[i]) - centre
            total += (d + g) + (h + k)
            squares += (d * d + g * g) + (h * h + k * k)
        n += 4
    for left in range(n, n1):  # left-over rows, one at a time
        seg = x[left, c, i0:i1]
        for i in range(seg.shape[0]):
            d = _load(seg[i]) - centre
            total += d
            squares += d * d
    return total, squares


@numba.njit(inline="always", **_JIT)
def _corrected(count, centre, total, squares):
    """float64 (mean, m2) from the second pass's sums about ``centre``: the corrected two-pass
    formula (Chan, Golub & LeVeque 1983), mean = centre + sum(d)/n, m2 = sum(d^2) - sum(d)^2/n.
    The first pass's mean carries the rounding of sums shifted by a data value (about
    eps * |shift|, 1e-5 relative on a zero-mean channel); sum(d) about it is small and
    removes that, and the same term removes m2's n * (mean error)**2."""
    t = float(total)
    m2 = float(squares) - t * t / count
    if m2 < 0.0:  # rounding, when every d is 0 or nearly
        m2 = 0.0
    return float(centre) + t / count, m2


@numba.njit(**_JIT)
def _block_moments(x, c, n0, n1, i0, i1):
    """Two-pass centred moments of one block, values i0:i1 of rows n0:n1 of channel c:
    float64 (count, mean_b, m2_b).

    Sums run in the compute dtype. The first, shifted by the block's first value, gives a mean
    to centre on; the second pass (from L1) sums d = x - that mean and d**2, and the corrected
    two-pass formula (``_corrected``) makes the float64 mean and m2 of them.
    """
    shift = _load(x[n0, c, i0])
    total = _block_sum(x, c, n0, n1, i0, i1, shift)
    count = (n1 - n0) * (i1 - i0)
    mean_c = shift + total / _like(count, shift)  # an int divisor would promote to float64
    total_d, squares = _block_centred_sums(x, c, n0, n1, i0, i1, mean_c)
    mean_b, m2_b = _corrected(count, mean_c, total_d, squares)
    return float(count), mean_b, m2_b


@numba.njit(inline="always", **_JIT)
def _block_plan(inner):
    """(row pieces, rows per block) of a channel's blocks: a long row is cut into near-equal
    pieces of at most ``BLOCK`` values; short rows are taken several at a time (consecutive n of
    one channel), so that a block is never much shorter than ``BLOCK`` and the per-block float64
    merge stays cheap."""
    if inner >= BLOCK:
        return (inner + BLOCK - 1) // BLOCK, 1
    return 1, max(1, BLOCK // inner)


@numba.njit(**_JIT)
def _rows_channel_moments(x, c, n0, n1):
    """float64 (count, mean, m2) of channel c over rows n0:n1, block by block in fixed order."""
    inner = x.shape[2]
    pieces, rows = _block_plan(inner)
    count, mean, m2 = 0.0, 0.0, 0.0
    for n in range(n0, n1, rows):
        for b in range(pieces):
            i0, i1 = _split(inner, pieces, b)
            n_b, mean_b, m2_b = _block_moments(x, c, n, min(n + rows, n1), i0, i1)
            count, mean, m2 = _merge(count, mean, m2, n_b, mean_b, m2_b)
    return count, mean, m2


@numba.njit(fastmath=_REDUCE_MATH, **_JIT)
def _block_grad_sums(dy, x, c, n0, n1, i0, i1, mean):
    """(sum(dy), sum(dy * (x - mean))) over one block (as in ``_block_moments``), in the
    compute dtype; short rows two at a time (four measured no better here: four more
    streams)."""
    sum_dy = _zero(x)
    sum_dy_xc = _zero(x)
    n = n0
    while n + 2 <= n1:
        dy_a, x_a = dy[n, c, i0:i1], x[n, c, i0:i1]
        dy_b, x_b = dy[n + 1, c, i0:i1], x[n + 1, c, i0:i1]
        for i in range(x_a.shape[0]):
            g, h = _load(dy_a[i]), _load(dy_b[i])
            sum_dy += g + h
            sum_dy_xc += g * (_load(x_a[i]) - mean) + h * (_load(x_b[i]) - mean)
        n += 2
    if n < n1:
        dy_seg, x_seg = dy[n, c, i0:i1], x[n, c, i0:i1]
        for i in range(x_seg.shape[0]):
            g = _load(dy_seg[i])
            sum_dy += g
            sum_dy_xc += g * (_load(x_seg[i]) - mean)
    return sum_dy, sum_dy_xc


@numba.njit(**_JIT)
def _rows_channel_grad_sums(dy, x, c, n0, n1, mean):
    inner = x.shape[2]
    pieces, rows = _block_plan(inner)
    sum_dy, sum_dy_xc = 0.0, 0.0
    for n in range(n0, n1, rows):
        for b in range(pieces):
            i0, i1 = _split(inner, pieces, b)
            s_dy, s_dy_xc = _block_grad_sums(dy, x, c, n, min(n + rows, n1), i0, i1, mean)
            sum_dy += float(s_dy)
            sum_dy_xc += float(s_dy_xc)
    return sum_dy, sum_dy_xc


@numba.njit(**_JIT)
def _affine_run(x, y, mean, scale, shift, streaming):
    if streaming:
        for i in range(x.shape[0]):
            _stream(y, i, _store(y, (_load(x[i]) - _at(mean, i)) * _at(scale, i) + _at(shift, i)))
    else:
        for i in range(x.shape[0]):
            y[i] = _store(y, (_load(x[i]) - _at(mean, i)) * _at(scale, i) + _at(shift, i))


@numba.njit(**_JIT)
def _affine(x_row, y_row, mean, scale, shift, stream):
    """y = (x - mean) * scale + shift along a contiguous row; x - mean first (exact for large
    offsets). The coefficients are scalars (rows layout) or per-column vectors (cols).
    With ``stream``, the aligned middle of the row is written with streaming stores. (Loops
    index views from 0: see the note on the rows layout below.)"""
    n = x_row.shape[0]
    a, b = _stream_span(y_row, stream)
    if a == n or (a == 0 and b == n):  # one call per row where possible: rows can be short
        _affine_run(x_row, y_row, mean, scale, shift, a == 0)
        return
    for i0, i1, streaming in ((0, a, False), (a, b, True), (b, n, False)):
        _affine_run(
            x_row[i0:i1], y_row[i0:i1],
            _part(mean, i0, i1), _part(scale, i0, i1), _part(shift, i0, i1), streaming,
        )  # fmt: skip


@numba.njit(**_JIT)
def _grad_run(dy, x, dx, mean, k_dy, k_xc, k_0, streaming):
    if streaming:
        for i in range(x.shape[0]):
            value = _at(k_dy, i) * _load(dy[i]) + _at(k_xc, i) * (_load(x[i]) - _at(mean, i))
            _stream(dx, i, _store(dx, value + _at(k_0, i)))
    else:
        for i in range(x.shape[0]):
            value = _at(k_dy, i) * _load(dy[i]) + _at(k_xc, i) * (_load(x[i]) - _at(mean, i))
            dx[i] = _store(dx, value + _at(k_0, i))


@numba.njit(**_JIT)
def _grad(dy_row, x_row, dx_row, mean, k_dy, k_xc, k_0, stream):
    """dx = k_dy * dy + k_xc * (x - mean) + k_0 (the compact backward, expanded), along a row
    like ``_affine``."""
    n = x_row.shape[0]
    a, b = _stream_span(dx_row, stream)
    if a == n or (a == 0 and b == n):  # one call per row where possible: rows can be short
        _grad_run(dy_row, x_row, dx_row, mean, k_dy, k_xc, k_0, a == 0)
        return
    for i0, i1, streaming in ((0, a, False), (a, b, True), (b, n, False)):
        _grad_run(
            dy_row[i0:i1], x_row[i0:i1], dx_row[i0:i1], _part(mean, i0, i1),
            _part(k_dy, i0, i1), _part(k_xc, i0, i1), _part(k_0, i0, i1), streaming,
        )  # fmt: skip


@numba.njit(**_JIT)
def _finish_stats(count, mean, m2, eps, mean_out, var_out, invstd_out, c):
    var = m2 / count
    mean_out[c] = mean
    var_out[c] = var
    invstd_out[c] = 1.0 / np.sqrt(var + eps)


@numba.njit(**_JIT)
def _grad_coefficients(invstd, weight, sum_dy, sum_dy_xhat, count):
    """Per-channel (k_dy, k_xc, k_0) of dx = k_dy*dy + k_xc*(x - mean) + k_0, from
    dx = weight*invstd/m * (m*dy - sum_dy - x_hat*sum_dy_xhat), x_hat = (x - mean)*invstd.
    Either sum may be 0 (moments treated as constants: that term drops)."""
    k_dy = float(weight) * float(invstd)
    k_xc = -k_dy * float(invstd) * (float(sum_dy_xhat) / count)
    k_0 = -k_dy * (float(sum_dy) / count)
    return _like(k_dy, invstd), _like(k_xc, invstd), _like(k_0, invstd)


@numba.njit(parallel=True, **_JIT)
def rows_stats(x, parts, eps, mean_out, var_out, invstd_out):
    """Per-channel mean, biased var and invstd of x (outer, C, inner).

    Work item (p, c) reduces channel c over the p-th of ``parts`` ranges of n; the C * parts
    float64 partials then merge per channel in p order (serial: a few thousand merges at most).
    Items are numbered n-range first, so a thread's share of them is one slab of memory
    x[n0:n1] swept channel by channel: measured at (32, 128, 56, 56), 0.38 of a copy's time
    with 8 n-ranges against 0.82 channel by channel (whole channels are 32 strided runs)."""
    outer, channels = x.shape[0], x.shape[1]
    counts = np.empty((channels, parts))
    means = np.empty((channels, parts))
    m2s = np.empty((channels, parts))
    for item in prange(channels * parts):
        p, c = item // channels, item % channels
        n0, n1 = _split(outer, parts, p)
        counts[c, p], means[c, p], m2s[c, p] = _rows_channel_moments(x, c, n0, n1)
    for c in range(channels):
        count, mean, m2 = 0.0, 0.0, 0.0
        for p in range(parts):
            count, mean, m2 = _merge(count, mean, m2, counts[c, p], means[c, p], m2s[c, p])
        _finish_stats(count, mean, m2, eps, mean_out, var_out, invstd_out, c)


@numba.njit(parallel=True, **_JIT)
def rows_elemt(x, mean, scale, shift, y, stream):
    """y = (x - mean) * scale + shift per channel; scale = weight*invstd, shift = bias.

    Without streaming the loop is called directly, not through ``_affine``: for short rows the
    extra call level per row was most of the cost (measured at (64, 256, 14, 14), single thread
    in cache: 1.5 -> 1.2 copy times; two threads from memory: 0.68 -> 0.62)."""
    outer, channels = x.shape[0], x.shape[1]
    if stream:
        for item in prange(outer * channels):
            n, c = item // channels, item % channels
            _affine(x[n, c], y[n, c], mean[c], scale[c], shift[c], True)
        return
    for item in prange(outer * channels):
        n, c = item // channels, item % channels
        _affine_run(x[n, c], y[n, c], mean[c], scale[c], shift[c], False)


@numba.njit(parallel=True, **_JIT)
def rows_forward_train(
    x, parts, group, eps, weight, bias, y, mean_out, var_out, invstd_out, stream
):
    """Fused stats + elemt.

    With the n range split (``parts > 1``, the usual case) the partials must be merged first:
    the reduction, then an elementwise pass in memory order. With one item per channel (N = 1)
    a thread takes ``group`` adjacent channels, reduces them, then normalises them while they
    are still in its cache (2 bytes moved per byte of x instead of 3).
    """
    outer, channels = x.shape[0], x.shape[1]
    if parts > 1:
        rows_stats(x, parts, eps, mean_out, var_out, invstd_out)
        rows_elemt(x, mean_out, weight * invstd_out, bias, y, stream)
        return
    for g in prange((channels + group - 1) // group):
        c0, c1 = g * group, min(channels, (g + 1) * group)
        for c in range(c0, c1):
            count, mean, m2 = _rows_channel_moments(x, c, 0, outer)
            _finish_stats(count, mean, m2, eps, mean_out, var_out, invstd_out, c)
        for n in range(outer):
            for c in range(c0, c1):
                scale = weight[c] * invstd_out[c]
                _affine(x[n, c], y[n, c], mean_out[c], scale, bias[c], stream)


@numba.njit(parallel=True, **_JIT)
def rows_backward_reduce(dy, x, mean, invstd, parts, sum_dy_out, sum_dy_xhat_out):
    """sum_dy = sum(dy), sum_dy_xhat = invstd * sum(dy * (x - mean)) per channel; work items
    and merge order as in ``rows_stats``."""
    outer, channels = x.shape[0], x.shape[1]
    sums_dy = np.empty((channels, parts))
    sums_dy_xc = np.empty((channels, parts))
    for item in prange(channels * parts):
        p, c = item // channels, item % channels
        n0, n1 = _split(outer, parts, p)
        sums_dy[c, p], sums_dy_xc[c, p] = _rows_channel_grad_sums(dy, x, c, n0, n1, mean[c])
    for c in range(channels):
        s_dy, s_dy_xc = 0.0, 0.0
        for p in range(parts):
            s_dy += sums_dy[c, p]
            s_dy_xc += sums_dy_xc[c, p]
        sum_dy_out[c] = s_dy
        sum_dy_xhat_out[c] = s_dy_xc * invstd[c]


@numba.njit(parallel=True, **_JIT)
def rows_backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count, dx, stream):
    """dx per row, as ``rows_elemt``; the coefficients are computed once per channel, not per
    row (with the direct call: (64, 256, 14, 14) from memory, 1.2-1.7 -> 0.8-1.1 copy times)."""
    outer, channels = x.shape[0], x.shape[1]
    k_dy, k_xc, k_0 = np.empty_like(mean), np.empty_like(mean), np.empty_like(mean)
    grad_coefficients(invstd, weight, sum_dy, sum_dy_xhat, count, k_dy, k_xc, k_0)
    if stream:
        for item in prange(outer * channels):
            n, c = item // channels, item % channels
            _grad(dy[n, c], x[n, c], dx[n, c], mean[c], k_dy[c], k_xc[c], k_0[c], True)
        return
    for item in prange(outer * channels):
        n, c = item // channels, item % channels
        _grad_run(dy[n, c], x[n, c], dx[n, c], mean[c], k_dy[c], k_xc[c], k_0[c], False)


@numba.njit(parallel=True, **_JIT)
def rows_backward_train(
    dy, x, mean, invstd, weight, parts, group, dx, sum_dy_out, sum_dy_xhat_out, stream
):
    """Fused reduce + elemt, like ``rows_forward_train``: two passes when the n range is split;
    grouped channels re-read from cache when it is not (3 bytes moved per byte of x, not 5)."""
    outer, channels = x.shape[0], x.shape[1]
    count = outer * x.shape[2]
    if parts > 1:
        rows_backward_reduce(dy, x, mean, invstd, parts, sum_dy_out, sum_dy_xhat_out)
        rows_backward_elemt(
            dy, x, mean, invstd, weight, sum_dy_out, sum_dy_xhat_out, count, dx, stream
        )
        return
    k_dy, k_xc, k_0 = np.empty_like(mean), np.empty_like(mean), np.empty_like(mean)
    for g in prange((channels + group - 1) // group):
        c0, c1 = g * group, min(channels, (g + 1) * group)
        for c in range(c0, c1):
            s_dy, s_dy_xc = _rows_channel_grad_sums(dy, x, c, 0, outer, mean[c])
            sum_dy_out[c] = s_dy
            sum_dy_xhat_out[c] = s_dy_xc * invstd[c]
            k_dy[c], k_xc[c], k_0[c] = _grad_coefficients(
                invstd[c], weight[c], sum_dy_out[c], sum_dy_xhat_out[c], count
            )
        for n in range(outer):
            for c in range(c0, c1):
                _grad(dy[n, c], x[n, c], dx[n, c], mean[c], k_dy[c], k_xc[c], k_0[c], stream)


@numba.njit(parallel=True, **_JIT)
def rows_backward_pipelined(
    dy, x, mean, invstd, weight, lanes, dx, sum_dy_out, sum_dy_xhat_out, stream
):
    """Fused reduce + elemt, software-pipelined over channels: each of ``lanes`` contiguous
    ranges of channels is walked so that the sums of channel c + 1 are read from memory in the
    same sweep over n that writes dx of channel c from cache (its x and dy were read by the
    previous sweep). Memory is then read once, not twice, and never idles while dx is computed.

    A channel's sums are accumulated block by block in one fixed order, by one call site
    (whichever lane or sweep the channel falls in: with ``fastmath`` reassociation, two call
    sites of the same sum may be vectorised differently and round differently), so results do
    not depend on ``lanes``."""
    outer, channels, inner = x.shape
    count = outer * inner
    pieces, rows = _block_plan(inner)
    for lane in prange(lanes):
        c0, c1 = _split(channels, lanes, lane)
        # Sweep `step` reduces channel step + 1 and writes dx of channel step (the first sweep
        # only reduces, the last only writes). One call site for the block sums, so every
        # channel's sums come from the same machine code whichever lane or sweep it falls in.
        for step in range(c0 - 1, c1):
            reduce_c, write_c = step + 1, step
            reducing, writing = reduce_c < c1, write_c >= c0
            k_dy = k_xc = k_0 = _like(0.0, invstd[0])  # the compute dtype: `* 0` would widen
            if writing:
                k_dy, k_xc, k_0 = _grad_coefficients(
                    invstd[write_c], weight[write_c], sum_dy_out[write_c],
                    sum_dy_xhat_out[write_c], count,
                )  # fmt: skip
            s_dy, s_dy_xc = 0.0, 0.0
            for n0 in range(0, outer, rows):
                n1 = min(n0 + rows, outer)
                if reducing:
                    for b in range(pieces):
                        i0, i1 = _split(inner, pieces, b)
                        a, b_ = _block_grad_sums(dy, x, reduce_c, n0, n1, i0, i1, mean[reduce_c])
                        s_dy += float(a)
                        s_dy_xc += float(b_)
                if writing:
                    m = mean[write_c]
                    for n in range(n0, n1):
                        c = write_c
                        _grad(dy[n, c], x[n, c], dx[n, c], m, k_dy, k_xc, k_0, stream)
            if reducing:
                sum_dy_out[reduce_c] = s_dy
                sum_dy_xhat_out[reduce_c] = s_dy_xc * invstd[reduce_c]


# ---------------------------------------------------------------------------------------------
# cols layout (outer, W), W = C * inner: one accumulator per column, vectorised across columns
# ---------------------------------------------------------------------------------------------


@numba.njit(**_JIT)
def cols_plan(outer, width):
    """(column block, number of row chunks): a function of the shape only."""
    block = min(width, COLS_MAX_BLOCK)
    # 16 to 256 rows: enough that merging the chunk partials is cheap, few enough that a
    # column's partial sum in the compute dtype stays short, the chunk stays in cache and
    # both threads get work.
    most = (outer + COLS_MIN_CHUNKS - 1) // COLS_MIN_CHUNKS
    rows = max(16, min(256, COLS_CHUNK_ELEMS // block, most))
    chunks = max(1, (outer + rows - 1) // rows)
    return block, chunks


@numba.njit(**_JIT)
def cols_flat_rows(width):
    """Rows per flat run of the elementwise kernels (1: row by row)."""
    if width > COLS_MAX_BLOCK:
        return 1
    return max(1, COLS_FLAT_ELEMS // width)


@numba.njit(**_JIT)
def _cols_item(outer, width, block, chunks, item):
    """Rows [r0, r1) and columns [w0, w1) of work item ``item``."""
    wblocks = (width + block - 1) // block
    q, wb = item // wblocks, item % wblocks
    r0, r1 = _split(outer, chunks, q)
    return q, r0, r1, wb * block, min(width, (wb + 1) * block)


@numba.njit(**_JIT)
def _cols_chunk_moments(x, r0, r1, w0, w1, mean_out, m2_out):
    """Two-pass centred moments of columns w0:w1 over rows r0:r1 -> float64 views mean_out,
    m2_out. As in ``_block_moments``: sums in the compute dtype, the first shifted by each
    column's first value, the second about that mean, combined by ``_corrected``."""
    first = x[r0, w0:w1]
    centre = np.full(first.shape[0], _zero(x))
    total = np.full(first.shape[0], _zero(x))
    for j in range(first.shape[0]):
        centre[j] = _load(first[j])
    for r in range(r0, r1):
        row = x[r, w0:w1]
        for j in range(row.shape[0]):
            total[j] += _load(row[j]) - centre[j]
    rows = r1 - r0
    squares = np.full(first.shape[0], _zero(x))
    for j in range(centre.shape[0]):
        centre[j] = centre[j] + total[j] / rows
        total[j] = 0.0
    r = r0
    while r + 2 <= r1:  # two rows per sweep: half the accumulator loads and stores
        a, b = x[r, w0:w1], x[r + 1, w0:w1]
        for j in range(a.shape[0]):
            d, e = _load(a[j]) - centre[j], _load(b[j]) - centre[j]
            total[j] += d + e
            squares[j] += d * d + e * e
        r += 2
    if r < r1:
        row = x[r, w0:w1]
        for j in range(row.shape[0]):
            d = _load(row[j]) - centre[j]
            total[j] += d
            squares[j] += d * d
    for j in range(total.shape[0]):
        mean_out[j], m2_out[j] = _corrected(rows, centre[j], total[j], squares[j])


@numba.njit(**_JIT)
def _merge_chunk_moments(outer, chunks, means, m2s, mean_w, m2_w):
    """Merge (chunks, W) float64 partials column by column, in chunk order (Chan et al.).
    All columns of a chunk share its count, so the weights are scalars and the loop over
    columns vectorises (a per-column merge with its own division measured 3x the kernel)."""
    count = 0.0
    for q in range(chunks):
        r0, r1 = _split(outer, chunks, q)
        n_b = float(r1 - r0)
        frac = n_b / (count + n_b)
        spread = count * frac
        chunk_mean, chunk_m2 = means[q], m2s[q]
        for w in range(mean_w.shape[0]):
            delta = chunk_mean[w] - mean_w[w]
            mean_w[w] += delta * frac
            m2_w[w] += chunk_m2[w] + delta * delta * spread
        count += n_b
    return count


@numba.njit(parallel=True, **_JIT)
def cols_stats(x, inner, eps, mean_out, var_out, invstd_out, means, m2s):
    """Per-channel mean, biased var, invstd of x (outer, C*inner); column w is channel w//inner.

    ``means``, ``m2s``: float64 (chunks, W) scratch from ``cols_plan``, overwritten. (The caller
    keeps them between calls: allocating them here cost 0.4 ms of page faults per call at
    (4096, 1024), as much as the reduction.)"""
    outer, width = x.shape
    block, chunks = cols_plan(outer, width)
    wblocks = (width + block - 1) // block
    for item in prange(chunks * wblocks):
        q, r0, r1, w0, w1 = _cols_item(outer, width, block, chunks, item)
        _cols_chunk_moments(x, r0, r1, w0, w1, means[q, w0:w1], m2s[q, w0:w1])
    # Fixed order: chunk by chunk per column, then a channel's inner positions in order.
    mean_w = np.zeros(width)
    m2_w = np.zeros(width)
    count = _merge_chunk_moments(outer, chunks, means, m2s, mean_w, m2_w)
    for c in range(width // inner):
        total, mean, m2 = 0.0, 0.0, 0.0
        for j in range(c * inner, (c + 1) * inner):
            total, mean, m2 = _merge(total, mean, m2, count, mean_w[j], m2_w[j])
        _finish_stats(total, mean, m2, eps, mean_out, var_out, invstd_out, c)


@numba.njit(**_JIT)
def _tile(v, rows):
    """``rows`` copies of the vector ``v`` end to end."""
    out = np.empty(rows * v.shape[0], v.dtype)
    for t in range(rows):
        part = out[t * v.shape[0] : (t + 1) * v.shape[0]]
        for j in range(v.shape[0]):
            part[j] = v[j]
    return out


@numba.njit(parallel=True, **_JIT)
def cols_elemt(x, mean_w, scale_w, shift_w, y, stream):
    """y = (x - mean) * scale + shift; the per-column vectors are per-channel ones repeated.
    For narrow rows the vectors are tiled ``cols_flat_rows(W)`` times and whole rows taken
    that many at a time as one contiguous run (x and y are C-contiguous)."""
    outer, width = x.shape
    block, chunks = cols_plan(outer, width)
    wblocks = (width + block - 1) // block
    rows = cols_flat_rows(width)
    mean_t, scale_t, shift_t = _tile(mean_w, rows), _tile(scale_w, rows), _tile(shift_w, rows)
    flat_x, flat_y = x.reshape(-1), y.reshape(-1)
    for item in prange(chunks * wblocks):
        _, r0, r1, w0, w1 = _cols_item(outer, width, block, chunks, item)
        r = r0
        while rows > 1 and r + rows <= r1:  # rows > 1 only when a row is one block
            i0, i1 = r * width, (r + rows) * width
            _affine(flat_x[i0:i1], flat_y[i0:i1], mean_t, scale_t, shift_t, stream)
            r += rows
        mean, scale, shift = mean_t[w0:w1], scale_t[w0:w1], shift_t[w0:w1]
        for left in range(r, r1):  # rows left over after the flat runs
            _affine(x[left, w0:w1], y[left, w0:w1], mean, scale, shift, stream)


@numba.njit(parallel=True, **_JIT)
def cols_backward_reduce(
    dy, x, mean_w, inner, invstd, sum_dy_out, sum_dy_xhat_out, sums_dy, sums_dy_xc
):
    """sum_dy, sum_dy_xhat per channel; per-chunk sums in the compute dtype, merged in float64.
    ``sums_dy``, ``sums_dy_xc``: (chunks, W) compute-dtype scratch, overwritten."""
    outer, width = x.shape
    block, chunks = cols_plan(outer, width)
    wblocks = (width + block - 1) // block
    for item in prange(chunks * wblocks):
        q, r0, r1, w0, w1 = _cols_item(outer, width, block, chunks, item)
        s_dy, s_dy_xc, mean = sums_dy[q, w0:w1], sums_dy_xc[q, w0:w1], mean_w[w0:w1]
        for j in range(s_dy.shape[0]):
            s_dy[j] = 0.0
            s_dy_xc[j] = 0.0
        for r in range(r0, r1):
            dy_row, x_row = dy[r, w0:w1], x[r, w0:w1]
            for j in range(x_row.shape[0]):
                g = _load(dy_row[j])
                s_dy[j] += g
                s_dy_xc[j] += g * (_load(x_row[j]) - mean[j])
    # Fixed order: chunk by chunk per column (vectorised over columns), then inner positions.
    col_dy = np.zeros(width)
    col_dy_xc = np.zeros(width)
    for q in range(chunks):
        chunk_dy, chunk_dy_xc = sums_dy[q], sums_dy_xc[q]
        for w in range(width):
            col_dy[w] += chunk_dy[w]
            col_dy_xc[w] += chunk_dy_xc[w]
    for c in range(width // inner):
        total_dy, total_dy_xc = 0.0, 0.0
        for j in range(c * inner, (c + 1) * inner):
            total_dy += col_dy[j]
            total_dy_xc += col_dy_xc[j]
        sum_dy_out[c] = total_dy
        sum_dy_xhat_out[c] = total_dy_xc * invstd[c]


@numba.njit(parallel=True, **_JIT)
def cols_backward_elemt(dy, x, mean_w, k_dy_w, k_xc_w, k_0_w, dx, stream):
    """dx = k_dy*dy + k_xc*(x - mean) + k_0 with per-column coefficient vectors, in flat runs
    as in ``cols_elemt``."""
    outer, width = x.shape
    block, chunks = cols_plan(outer, width)
    wblocks = (width + block - 1) // block
    rows = cols_flat_rows(width)
    mean_t, k_dy_t, k_xc_t, k_0_t = (
        _tile(mean_w, rows),
        _tile(k_dy_w, rows),
        _tile(k_xc_w, rows),
        _tile(k_0_w, rows),
    )
    flat_dy, flat_x, flat_dx = dy.reshape(-1), x.reshape(-1), dx.reshape(-1)
    for item in prange(chunks * wblocks):
        _, r0, r1, w0, w1 = _cols_item(outer, width, block, chunks, item)
        r = r0
        while rows > 1 and r + rows <= r1:
            i0, i1 = r * width, (r + rows) * width
            _grad(
                flat_dy[i0:i1], flat_x[i0:i1], flat_dx[i0:i1],
                mean_t, k_dy_t, k_xc_t, k_0_t, stream,
            )  # fmt: skip
            r += rows
        mean, k_dy, k_xc, k_0 = mean_t[w0:w1], k_dy_t[w0:w1], k_xc_t[w0:w1], k_0_t[w0:w1]
        for left in range(r, r1):
            _grad(dy[left, w0:w1], x[left, w0:w1], dx[left, w0:w1], mean, k_dy, k_xc, k_0, stream)


@numba.njit(**_JIT)
def grad_coefficients(invstd, weight, sum_dy, sum_dy_xhat, count, k_dy, k_xc, k_0):
    """Vector form of ``_grad_coefficients`` for the cols launcher."""
    for c in range(invstd.shape[0]):
        k_dy[c], k_xc[c], k_0[c] = _grad_coefficients(
            invstd[c], weight[c], sum_dy[c], sum_dy_xhat[c], count
        )
