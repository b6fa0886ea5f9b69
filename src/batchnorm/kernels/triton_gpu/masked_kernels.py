"""Triton kernels of masked batch norm: the stages over the real positions of a padded batch.
Imported only by ``triton_gpu.masked`` (needs triton).

The (outer, C, inner) view and the tiles are ``kernels``'s. ``pos_ptr`` is the mask in the same
memory order without the channel axis, one byte per position: position (o, i) at
``o * inner + i``, the same for every channel. A tile's padded positions are never loaded
(``mask=real`` on every load), so whatever the padding holds, NaN or inf, cannot reach a sum;
outputs there are written as 0. ``n_t``, a tile's count of real positions, is the same for
every channel of the tile; a tile without one adds nothing to the merge (``_merge_some``).

Statistics follow ``kernels``' plain ones, with K, the value at the first real position of each
channel, as the shift (the plain kernels' x[0, c, 0] may be padding); the launcher passes it.
"""

import triton
import triton.language as tl

from .kernels import _tile


@triton.jit
def _real(pos_ptr, o, i, valid, outer, inner, INDEX_64: tl.constexpr):
    """(real, n_t): where the tile holds real values (valid ones only), and how many positions."""
    rows = o.to(tl.int64) if INDEX_64 else o
    in_tile = (o < outer)[:, None] & (i < inner)[None, :]
    flags = tl.load(pos_ptr + rows[:, None] * inner + i[None, :], mask=in_tile, other=0) != 0
    n_t = tl.sum(tl.sum(flags.to(tl.float32), axis=1), axis=0)
    return valid & flags[:, None, :], n_t


@triton.jit
def _merge_some(count, mean, m2, n_b, mean_b, m2_b):
    """``kernels._chan_merge`` where either part may be empty (then the other is the result):
    the weights divide by at least 1, so two empty parts give 0, not 0/0."""
    total = count + n_b
    weight = n_b / tl.maximum(total, 1.0)
    delta = mean_b - mean
    finite = (mean - mean == 0.0) & (mean_b - mean_b == 0.0)
    merged = tl.where(finite, mean + delta * weight, mean + mean_b)
    mean = tl.where(n_b > 0.0, tl.where(count > 0.0, merged, mean_b), mean)
    m2 = tl.where(n_b > 0.0, m2 + m2_b + delta * (delta * (count * weight)), m2)
    return total, mean, m2


@triton.jit
def _masked_stats_partial_kernel(
    x_ptr,
    pos_ptr,
    shift_ptr,
    part_count_ptr,
    part_mean_ptr,
    part_m2_ptr,
    outer,
    channels,
    inner,
    tiles_i,
    tiles,
    tiles_per_split,
    BLOCK_O: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_I: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(1)
    count = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    shift = tl.load(shift_ptr + c, mask=c < channels, other=0.0)
    t_start = split * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, tiles)
    for t in range(t_start, t_end):
        o, i, offsets, valid = _tile(
            t, tiles_i, c, outer, channels, inner, BLOCK_O, BLOCK_I, INDEX_64
        )
        real, n_t = _real(pos_ptr, o, i, valid, outer, inner, INDEX_64)
        scale = 1.0 / tl.maximum(n_t, 1.0)
        x = tl.load(x_ptr + offsets, mask=real, other=0.0).to(tl.float32)
        # The corrected two-pass moments of the tile, as in kernels._stats_partial_kernel.
        d = tl.where(real, (x - shift[None, :, None]) * scale, 0.0)
        mean_t = tl.sum(tl.sum(d, axis=2), axis=0)
        centre = shift + mean_t
        e = tl.where(real, x - centre[None, :, None], 0.0)
        s1 = tl.sum(tl.sum(e, axis=2), axis=0)
        m2_t = tl.sum(tl.sum(e * e, axis=2), axis=0) - s1 * (s1 * scale)
        mean_t = tl.where(s1 - s1 == 0.0, (centre - shift) + s1 * scale, mean_t)
        n_b = tl.zeros([BLOCK_C], dtype=tl.float32) + n_t
        count, mean, m2 = _merge_some(count, mean, m2, n_b, mean_t, m2_t)
    out = split * channels + c
    keep = c < channels
    tl.store(part_count_ptr + out, count, mask=keep)
    tl.store(part_mean_ptr + out, mean, mask=keep)
    tl.store(part_m2_ptr + out, m2, mask=keep)


@triton.jit
def _masked_stats_combine_kernel(
    part_count_ptr,
    part_mean_ptr,
    part_m2_ptr,
    shift_ptr,
    mean_ptr,
    var_ptr,
    channels,
    splits,
    BLOCK_C: tl.constexpr,
):
    """Chan's merge of the splits' partials in split order (empty ones left out), K added
    back; var biased. No real position at all: NaN, the mean of nothing."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = c < channels
    count = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s in range(0, splits):
        n_s = tl.load(part_count_ptr + s * channels + c, mask=keep, other=0.0)
        mean_s = tl.load(part_mean_ptr + s * channels + c, mask=keep, other=0.0)
        m2_s = tl.load(part_m2_ptr + s * channels + c, mask=keep, other=0.0)
        count, mean, m2 = _merge_some(count, mean, m2, n_s, mean_s, m2_s)
    shift = tl.load(shift_ptr + c, mask=keep, other=0.0)
    some = count > 0.0
    tl.store(mean_ptr + c, tl.where(some, mean + shift, float("nan")), mask=keep)
    tl.store(var_ptr + c, tl.where(some, m2 / tl.maximum(count, 1.0), float("nan")), mask=keep)


@triton.jit
def _masked_elemt_kernel(
    x_ptr,
    pos_ptr,
    y_ptr,
    mean_ptr,
    invstd_ptr,
    weight_ptr,
    bias_ptr,
    outer,
    channels,
    inner,
    tiles_i,
    tiles,
    tiles_per_program,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_I: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    """y = (x - mean) * invstd * gamma + beta at real positions, 0 at padded ones."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mean = tl.load(mean_ptr + c, mask=c < channels, other=0.0).to(tl.float32)
    scale = tl.load(invstd_ptr + c, mask=c < channels, other=1.0).to(tl.float32)
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + c, mask=c < channels, other=1.0).to(tl.float32)
    shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_BIAS:
        shift = tl.load(bias_ptr + c, mask=c < channels, other=0.0).to(tl.float32)
    t_start = tl.program_id(1) * tiles_per_program
    t_end = tl.minimum(t_start + tiles_per_program, tiles)
    for t in range(t_start, t_end):
        o, i, offsets, valid = _tile(
            t, tiles_i, c, outer, channels, inner, BLOCK_O, BLOCK_I, INDEX_64
        )
        real, _ = _real(pos_ptr, o, i, valid, outer, inner, INDEX_64)
        x = tl.load(x_ptr + offsets, mask=real, other=0.0).to(tl.float32)
        y = (x - mean[None, :, None]) * scale[None, :, None] + shift[None, :, None]
        y = tl.where(real, y, 0.0)
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _masked_backward_reduce_partial_kernel(
    dy_ptr,
    x_ptr,
    pos_ptr,
    mean_ptr,
    part_sum_dy_ptr,
    part_sum_dy_xc_ptr,
    outer,
    channels,
    inner,
    tiles_i,
    tiles,
    tiles_per_split,
    BLOCK_O: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_I: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    """Per split, sum(dy) and sum(dy * (x - mean)) over the real positions; merged by
    ``kernels._backward_combine_kernel``."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(1)
    mean = tl.load(mean_ptr + c, mask=c < channels, other=0.0).to(tl.float32)
    acc_dy = tl.zeros([BLOCK_O, BLOCK_C, BLOCK_I], dtype=tl.float32)
    acc_dy_xc = tl.zeros([BLOCK_O, BLOCK_C, BLOCK_I], dtype=tl.float32)
    t_start = split * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, tiles)
    for t in range(t_start, t_end):
        o, i, offsets, valid = _tile(
            t, tiles_i, c, outer, channels, inner, BLOCK_O, BLOCK_I, INDEX_64
        )
        real, _ = _real(pos_ptr, o, i, valid, outer, inner, INDEX_64)
        dy = tl.load(dy_ptr + offsets, mask=real, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offsets, mask=real, other=0.0).to(tl.float32)
        acc_dy += dy
        acc_dy_xc += tl.where(real, dy * (x - mean[None, :, None]), 0.0)
    out = split * channels + c
    keep_c = c < channels
    tl.store(part_sum_dy_ptr + out, tl.sum(tl.sum(acc_dy, axis=2), axis=0), mask=keep_c)
    tl.store(part_sum_dy_xc_ptr + out, tl.sum(tl.sum(acc_dy_xc, axis=2), axis=0), mask=keep_c)


@triton.jit
def _masked_backward_elemt_kernel(
    dy_ptr,
    x_ptr,
    pos_ptr,
    mean_ptr,
    invstd_ptr,
    weight_ptr,
    sum_dy_ptr,
    sum_dy_xhat_ptr,
    dx_ptr,
    count,
    outer,
    channels,
    inner,
    tiles_i,
    tiles,
    tiles_per_program,
    HAS_WEIGHT: tl.constexpr,
    THROUGH_MEAN: tl.constexpr,
    THROUGH_VAR: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_I: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    """dx = gamma * invstd * (dy - sum_dy / m - (x - mean) * invstd * sum_dy_xhat / m) at real
    positions (m = count, the real positions), 0 at padded ones; switches as the plain kernel."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    invstd = tl.load(invstd_ptr + c, mask=c < channels, other=1.0).to(tl.float32)
    scale = invstd
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + c, mask=c < channels, other=1.0).to(tl.float32)
    mean = tl.load(mean_ptr + c, mask=c < channels, other=0.0).to(tl.float32)
    mean_dy = tl.load(sum_dy_ptr + c, mask=c < channels, other=0.0).to(tl.float32) / count
    xc_coef = (
        invstd * tl.load(sum_dy_xhat_ptr + c, mask=c < channels, other=0.0).to(tl.float32) / count
    )
    t_start = tl.program_id(1) * tiles_per_program
    t_end = tl.minimum(t_start + tiles_per_program, tiles)
    for t in range(t_start, t_end):
        o, i, offsets, valid = _tile(
            t, tiles_i, c, outer, channels, inner, BLOCK_O, BLOCK_I, INDEX_64
        )
        real, _ = _real(pos_ptr, o, i, valid, outer, inner, INDEX_64)
        inner_grad = tl.load(dy_ptr + offsets, mask=real, other=0.0).to(tl.float32)
        if THROUGH_MEAN:
            inner_grad -= mean_dy[None, :, None]
        if THROUGH_VAR:
            x = tl.load(x_ptr + offsets, mask=real, other=0.0).to(tl.float32)
            inner_grad -= (x - mean[None, :, None]) * xc_coef[None, :, None]
        dx = tl.where(real, inner_grad * scale[None, :, None], 0.0)
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=valid)
