"""Helpers inlined into every Numba kernel: compile settings, 16-bit storage <-> compute dtype
in registers, streaming stores, and the exact merge of (count, mean, M2) partials.

float16 travels as its uint16 bits and bfloat16 as its int16 bits (numba has no 16-bit float
arrays); ``_load`` widens to float32 in registers and ``_store`` rounds to nearest-even, so
16-bit data costs no extra pass.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic, overload

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
def _finish_stats(count, mean, m2, eps, mean_out, var_out, invstd_out, c):
    var = m2 / count
    mean_out[c] = mean
    var_out[c] = var
    invstd_out[c] = 1.0 / np.sqrt(var + eps)
