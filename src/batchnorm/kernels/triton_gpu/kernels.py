"""Triton kernels for the batch-norm stages. Imported only by ``triton_gpu`` (needs triton).

The kernels see every input as a dense 3-D array ``(outer, C, inner)`` in memory order:
element ``(o, c, i)`` lives at ``(o * C + c) * inner + i``. NCHW-style tensors (channel axis 1,
any spatial rank) are ``(N, C, prod(spatial))``; channels-last tensors and ``(N, C)`` are
``(N * prod(spatial), C, 1)``. A program works on tiles of shape ``[BLOCK_O, BLOCK_C, BLOCK_I]``:
``BLOCK_C = 1`` for NCHW (contiguous along ``i``) and ``BLOCK_I = 1`` for channels-last
(contiguous along ``c``), so one set of kernels serves both layouts with coalesced loads.

The m = outer * inner values of a channel are cut into ``tiles`` tiles. Reductions run on a 2-D
grid (channel blocks x splits); split ``s`` walks tiles ``[s * tiles_per_split, ...)`` in order
and writes one float32 partial per channel; a second kernel merges the partials of a channel in
split order. No atomics, so every result is bitwise reproducible for a given shape and plan.

Symbols are the paper's (Ioffe & Szegedy 2015) and ``batchnorm.reference``'s: ``mean``, ``var``
(biased), ``invstd`` = 1/sqrt(var + eps), ``x_hat`` = (x - mean) * invstd, ``sum_dy``,
``sum_dy_xhat``, ``count`` = m.

The ReLU mask (fused variants) keeps one bit per element, packed along the axis that is
contiguous in memory: along ``i`` (bytes ``(outer, C, ceil(inner / 8))``, bit ``i % 8``) when
``PACK_I``, else along ``o`` (bytes ``(ceil(outer / 8), C, inner)``, bit ``o % 8``).
"""

import triton
import triton.language as tl

# ----------------------------------------------------------------------------- tile helpers


# In the interpreter every call of a jit helper costs milliseconds, so the per-tile index math is
# one helper and the per-channel loads are written inline.


@triton.jit
def _tile(
    t,
    tiles_i,
    c,
    outer,
    channels,
    inner,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    """Tile ``t`` of channel block ``c``: ``(o, i, offsets, valid)``; tiles go ``i``-fastest.

    Element ``(o, c, i)`` of the dense (outer, channels, inner) array is at
    ``(o * channels + c) * inner + i``.
    """
    o = (t // tiles_i) * BLOCK_O + tl.arange(0, BLOCK_O)
    i = (t % tiles_i) * BLOCK_I + tl.arange(0, BLOCK_I)
    rows = o.to(tl.int64) if INDEX_64 else o
    offsets = (rows[:, None, None] * channels + c[None, :, None]) * inner + i[None, None, :]
    valid = (o < outer)[:, None, None] & (c < channels)[None, :, None] & (i < inner)[None, None, :]
    return o, i, offsets, valid


@triton.jit
def _store_relu_mask(
    mask_ptr,
    keep,
    t,
    tiles_i,
    o,
    c,
    i,
    outer,
    channels,
    inner,
    PACK_I: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_I: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    """Pack ``keep`` (True where the ReLU passed its input) of tile ``t`` to one bit per element.

    Tiles start at multiples of 8 along the packed axis, so a byte never straddles two tiles.
    Out-of-bounds elements must arrive as False: a byte can hold bits of a tile's padding.
    """
    bits = keep.to(tl.int32)
    if PACK_I:
        by_eight = tl.reshape(bits, (BLOCK_O, BLOCK_C, BLOCK_I // 8, 8))
        weights = (1 << tl.arange(0, 8))[None, None, None, :]
        packed = tl.sum(by_eight * weights, axis=3)
        ib = (t % tiles_i) * (BLOCK_I // 8) + tl.arange(0, BLOCK_I // 8)
        inner_bytes = (inner + 7) // 8
        rows = o.to(tl.int64) if INDEX_64 else o
        offsets = (rows[:, None, None] * channels + c[None, :, None]) * inner_bytes
        offsets += ib[None, None, :]
        valid = (o < outer)[:, None, None] & (c < channels)[None, :, None]
        valid = valid & (ib < inner_bytes)[None, None, :]
    else:
        by_eight = tl.reshape(bits, (BLOCK_O // 8, 8, BLOCK_C, BLOCK_I))
        weights = (1 << tl.arange(0, 8))[None, :, None, None]
        packed = tl.sum(by_eight * weights, axis=1)
        ob = (t // tiles_i) * (BLOCK_O // 8) + tl.arange(0, BLOCK_O // 8)
        outer_bytes = (outer + 7) // 8
        rows = ob.to(tl.int64) if INDEX_64 else ob
        offsets = (rows[:, None, None] * channels + c[None, :, None]) * inner + i[None, None, :]
        valid = (ob < outer_bytes)[:, None, None] & (c < channels)[None, :, None]
        valid = valid & (i < inner)[None, None, :]
    tl.store(mask_ptr + offsets, packed.to(tl.uint8), mask=valid)


@triton.jit
def _load_relu_mask(
    mask_ptr, o, c, i, valid, channels, inner, PACK_I: tl.constexpr, INDEX_64: tl.constexpr
):
    """True where the forward's ReLU passed its input (the bits ``_store_relu_mask`` wrote)."""
    if PACK_I:
        rows = o.to(tl.int64) if INDEX_64 else o
        row_bytes = (inner + 7) // 8
        offsets = (rows[:, None, None] * channels + c[None, :, None]) * row_bytes
        offsets += (i // 8)[None, None, :]
        shift = (i % 8)[None, None, :]
    else:
        rows = (o // 8).to(tl.int64) if INDEX_64 else o // 8
        offsets = (rows[:, None, None] * channels + c[None, :, None]) * inner + i[None, None, :]
        shift = (o % 8)[:, None, None]
    byte = tl.load(mask_ptr + offsets, mask=valid, other=0).to(tl.int32)
    return ((byte >> shift) & 1) != 0


# ----------------------------------------------------------------------------- forward: stats

# Every value is first shifted by K, the channel's first value (x[0, c, 0] in the (outer, C,
# inner) view; 0 if it is not finite), as ``reference.stats`` shifts its first pass: the means
# merged below are then of x - K, a few standard deviations at most, so float32 keeps their
# digits where a mean near 1e4 would be off by ulps of 1e4 (~1e-3). Per split, for each tile
# (n_t values, all in registers) the corrected two-pass moments of d = x - K
#     m = sum(d / n_t),   e = x - (K + m),   mean_t = m + sum(e) / n_t,
#     M2_t = sum(e^2) - sum(e)^2 / n_t
# merged into the split's running (count, mean, M2) with the exact parallel formula of Chan,
# Golub & LeVeque (1979):
#     delta = mean_t - mean,  count' = count + n_t,
#     mean' = mean + delta * n_t / count',  M2' = M2 + M2_t + delta^2 * count * n_t / count'.
# E[x^2] - E[x]^2 is never formed, so a large mean does not cancel the variance away. The
# combine adds K back. A channel holding inf keeps mean inf (both infinities, or a NaN: NaN),
# as the reference's plain sum gives it.


@triton.jit
def _channel_shift(x_ptr, c, channels, inner, INDEX_64: tl.constexpr):
    """K per channel lane: the channel's first value in memory order (0 if not finite)."""
    first = (c.to(tl.int64) if INDEX_64 else c) * inner
    k = tl.load(x_ptr + first, mask=c < channels, other=0.0).to(tl.float32)
    return tl.where(k - k == 0.0, k, 0.0)


@triton.jit
def _chan_merge(count, mean, m2, n_b, mean_b, m2_b):
    """``(count, mean, M2)`` of the union of two parts, from each part's (Chan et al.)."""
    total = count + n_b
    delta = mean_b - mean
    # With an inf on either side the weighted form gives inf - inf; the sum is what a plain
    # mean gives (inf, or NaN for both infinities or a NaN).
    finite = (mean - mean == 0.0) & (mean_b - mean_b == 0.0)
    mean = tl.where(finite, mean + delta * (n_b / total), mean + mean_b)
    # delta * (delta * w), not delta * delta * w: for the first part w = 0, and a delta near
    # the float32 maximum would otherwise make inf * 0 = NaN.
    m2 += m2_b + delta * (delta * (count * n_b / total))
    return total, mean, m2


@triton.jit
def _stats_partial_kernel(
    x_ptr,
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
    count = 0.0
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    shift = _channel_shift(x_ptr, c, channels, inner, INDEX_64)
    t_start = split * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, tiles)
    for t in range(t_start, t_end):
        o, i, offsets, valid = _tile(
            t, tiles_i, c, outer, channels, inner, BLOCK_O, BLOCK_I, INDEX_64
        )
        x = tl.load(x_ptr + offsets, mask=valid, other=0.0)
        x = x.to(tl.float32)
        rows = tl.minimum(outer - (t // tiles_i) * BLOCK_O, BLOCK_O)
        cols = tl.minimum(inner - (t % tiles_i) * BLOCK_I, BLOCK_I)
        n_t = (rows * cols).to(tl.float32)
        # Summed as d / n_t, like the reference's fallback: finite d cannot overflow the sum.
        d = tl.where(valid, (x - shift[None, :, None]) * (1.0 / n_t), 0.0)
        mean_t = tl.sum(tl.sum(d, axis=2), axis=0)
        # The second pass centres x itself on the tile mean M (x - M is exact where x and M
        # are within a factor 2), not d, which rounds when K is far from the data.
        centre = shift + mean_t
        e = tl.where(valid, x - centre[None, :, None], 0.0)
        s1 = tl.sum(tl.sum(e, axis=2), axis=0)
        m2_t = tl.sum(tl.sum(e * e, axis=2), axis=0) - s1 * (s1 / n_t)
        # s1 is what the first sum's rounding left, large when K is an outlier: it corrects
        # the mean as well, which M2 is already about. Where x holds an inf, s1 is NaN and
        # the mean stays the plain sum's.
        mean_t = tl.where(s1 - s1 == 0.0, (centre - shift) + s1 / n_t, mean_t)
        count, mean, m2 = _chan_merge(count, mean, m2, n_t, mean_t, m2_t)
    out = split * channels + c
    keep = c < channels
    tl.store(part_count_ptr + out, tl.zeros([BLOCK_C], dtype=tl.float32) + count, mask=keep)
    tl.store(part_mean_ptr + out, mean, mask=keep)
    tl.store(part_m2_ptr + out, m2, mask=keep)


@triton.jit
def _stats_combine_kernel(
    part_count_ptr,
    part_mean_ptr,
    part_m2_ptr,
    x_ptr,
    inner,
    mean_ptr,
    var_ptr,
    invstd_ptr,
    channels,
    splits,
    eps,
    BLOCK_C: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    """Chan's merge of the splits' partials in split order, K added back; then var (biased)
    and invstd."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = c < channels
    count = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s in range(0, splits):
        n_s = tl.load(part_count_ptr + s * channels + c, mask=keep, other=1.0)
        mean_s = tl.load(part_mean_ptr + s * channels + c, mask=keep, other=0.0)
        m2_s = tl.load(part_m2_ptr + s * channels + c, mask=keep, other=0.0)
        count, mean, m2 = _chan_merge(count, mean, m2, n_s, mean_s, m2_s)
    var = m2 / count
    mean += _channel_shift(x_ptr, c, channels, inner, INDEX_64)
    tl.store(mean_ptr + c, mean, mask=keep)
    tl.store(var_ptr + c, var, mask=keep)
    # Padding lanes (c >= channels) take 1: with eps = 0 their 1/0 would only be noise (the
    # interpreter warns about it).
    tl.store(invstd_ptr + c, 1.0 / tl.sqrt_rn(tl.where(keep, var + eps, 1.0)), mask=keep)


# ----------------------------------------------------------------------------- forward: elemt

# y = (x - mean) * (gamma * invstd) + beta   [+ residual]   [then ReLU, keeping a 1-bit mask]
# (x - mean) is formed first, not x * scale + shift: with a large mean and a small spread the
# folded form loses the digits that the subtraction of two close numbers keeps exactly.


@triton.jit
def _forward_elemt_kernel(
    x_ptr,
    y_ptr,
    mean_ptr,
    invstd_ptr,
    weight_ptr,
    bias_ptr,
    residual_ptr,
    mask_ptr,
    outer,
    channels,
    inner,
    tiles_i,
    tiles,
    tiles_per_program,
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FROM_VAR: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    RELU: tl.constexpr,
    PACK_I: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_I: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    """``FROM_VAR``: ``invstd_ptr`` holds a (running) variance and invstd is formed here."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mean = tl.load(mean_ptr + c, mask=c < channels, other=0.0).to(tl.float32)
    if FROM_VAR:
        invstd = 1.0 / tl.sqrt_rn(
            tl.load(invstd_ptr + c, mask=c < channels, other=1.0).to(tl.float32) + eps
        )
    else:
        invstd = tl.load(invstd_ptr + c, mask=c < channels, other=1.0).to(tl.float32)
    scale = invstd
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
        x = tl.load(x_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
        y = (x - mean[None, :, None]) * scale[None, :, None] + shift[None, :, None]
        if HAS_RESIDUAL:
            y += tl.load(residual_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
        if RELU:
            # Written as "not <= 0" so that NaN propagates (value and gradient), like torch.relu.
            clipped = y <= 0.0
            y = tl.where(clipped, 0.0, y)
            _store_relu_mask(
                mask_ptr,
                valid & ~clipped,
                t,
                tiles_i,
                o,
                c,
                i,
                outer,
                channels,
                inner,
                PACK_I,
                BLOCK_O,
                BLOCK_C,
                BLOCK_I,
                INDEX_64,
            )
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------- backward: reduce

# sum_dy = sum(dy),  sum_dy_xhat = sum(dy * x_hat) = invstd * sum(dy * (x - mean)).
# With a ReLU mask, dy is first replaced by dy * mask (the gradient reaching batch norm's output).
# Per-lane float32 accumulators over the split's tiles, one tree sum at the end.


@triton.jit
def _backward_reduce_partial_kernel(
    dy_ptr,
    x_ptr,
    mask_ptr,
    mean_ptr,
    part_sum_dy_ptr,
    part_sum_dy_xc_ptr,
    outer,
    channels,
    inner,
    tiles_i,
    tiles,
    tiles_per_split,
    HAS_MASK: tl.constexpr,
    PACK_I: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_I: tl.constexpr,
    INDEX_64: tl.constexpr,
):
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
        dy = tl.load(dy_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
        if HAS_MASK:
            keep = _load_relu_mask(mask_ptr, o, c, i, valid, channels, inner, PACK_I, INDEX_64)
            dy = tl.where(keep, dy, 0.0)
        x = tl.load(x_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
        acc_dy += dy
        acc_dy_xc += dy * (x - mean[None, :, None])
    out = split * channels + c
    keep_c = c < channels
    tl.store(part_sum_dy_ptr + out, tl.sum(tl.sum(acc_dy, axis=2), axis=0), mask=keep_c)
    tl.store(part_sum_dy_xc_ptr + out, tl.sum(tl.sum(acc_dy_xc, axis=2), axis=0), mask=keep_c)


@triton.jit
def _backward_combine_kernel(
    part_sum_dy_ptr,
    part_sum_dy_xc_ptr,
    invstd_ptr,
    sum_dy_ptr,
    sum_dy_xhat_ptr,
    channels,
    splits,
    BLOCK_C: tl.constexpr,
):
    """Sum the splits' partials in split order; scale sum(dy * (x - mean)) by invstd."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = c < channels
    sum_dy = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_dy_xc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s in range(0, splits):
        sum_dy += tl.load(part_sum_dy_ptr + s * channels + c, mask=keep, other=0.0)
        sum_dy_xc += tl.load(part_sum_dy_xc_ptr + s * channels + c, mask=keep, other=0.0)
    invstd = tl.load(invstd_ptr + c, mask=c < channels, other=1.0).to(tl.float32)
    tl.store(sum_dy_ptr + c, sum_dy, mask=keep)
    tl.store(sum_dy_xhat_ptr + c, sum_dy_xc * invstd, mask=keep)


# ----------------------------------------------------------------------------- backward: elemt

# dx = gamma * invstd / m * (m * dy - sum_dy - x_hat * sum_dy_xhat)
#    = (gamma * invstd) * (dy - sum_dy / m - (x - mean) * (invstd * sum_dy_xhat / m)).
# THROUGH_MEAN / THROUGH_VAR = False drop the path through the batch mean / variance (the
# moments-as-constants gradient of ``reference.backward_elemt``; both False = inference).
# With a ReLU mask dy is masked first; WRITE_DRESIDUAL also writes the residual's gradient,
# which is that masked dy.


@triton.jit
def _backward_elemt_kernel(
    dy_ptr,
    x_ptr,
    mask_ptr,
    mean_ptr,
    invstd_ptr,
    weight_ptr,
    sum_dy_ptr,
    sum_dy_xhat_ptr,
    dx_ptr,
    dresidual_ptr,
    count,
    outer,
    channels,
    inner,
    tiles_i,
    tiles,
    tiles_per_program,
    HAS_WEIGHT: tl.constexpr,
    HAS_MASK: tl.constexpr,
    WRITE_DRESIDUAL: tl.constexpr,
    THROUGH_MEAN: tl.constexpr,
    THROUGH_VAR: tl.constexpr,
    PACK_I: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_I: tl.constexpr,
    INDEX_64: tl.constexpr,
):
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
        dy = tl.load(dy_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
        if HAS_MASK:
            keep = _load_relu_mask(mask_ptr, o, c, i, valid, channels, inner, PACK_I, INDEX_64)
            dy = tl.where(keep, dy, 0.0)
        if WRITE_DRESIDUAL:
            tl.store(dresidual_ptr + offsets, dy.to(dresidual_ptr.dtype.element_ty), mask=valid)
        inner_grad = dy
        if THROUGH_MEAN:
            inner_grad -= mean_dy[None, :, None]
        if THROUGH_VAR:
            x = tl.load(x_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
            inner_grad -= (x - mean[None, :, None]) * xc_coef[None, :, None]
        dx = inner_grad * scale[None, :, None]
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------- running statistics

# The moving averages of PyTorch's convention, unbiased variance, as
# ``reference.update_running_stats`` writes them, per channel:
#     running_mean <- (1 - w) * running_mean + w * mean
#     running_var  <- (1 - w) * running_var  + w * var * m / (m - 1)
# except that a channel whose new mean or variance is not finite keeps both old values. One
# launch instead of a dozen small ATen ops: on a GPU each launch costs the host more than the
# work on C values. Every product and sum is rounded to the buffers' dtype in the order the
# reference's torch ops round them (launched without FMA contraction), so the values are its own.


@triton.jit
def _is_finite(v):
    """Not inf or NaN: the exponent bits of the float32 value are not all ones (a bit test,
    which no floating-point simplification can fold away)."""
    bits = v.to(tl.float32).to(tl.int32, bitcast=True)
    return ((bits >> 23) & 0xFF) != 0xFF


@triton.jit
def _rounded(v, like):
    """float32 ``v`` rounded to ``like``'s dtype (to nearest, ties to even; as torch rounds) and
    widened back. bfloat16 by its bits (torch's formula): a GPU's conversion rounds, but the
    interpreter's truncates, and the tests run there."""
    if like.dtype == tl.bfloat16:
        bits = v.to(tl.int32, bitcast=True)
        up = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return tl.where(_is_finite(v), up.to(tl.float32, bitcast=True), v)
    else:
        return v.to(like.dtype).to(tl.float32)


@triton.jit
def _running_update_kernel(
    running_mean_ptr,
    running_var_ptr,
    mean_ptr,
    var_ptr,
    channels,
    keep,
    w,
    unbias,
    BLOCK_C: tl.constexpr,
):
    """``keep`` = 1 - w (rounded as the reference's scalar is); ``unbias`` = m / (m - 1)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    valid = c < channels
    old_mean = tl.load(running_mean_ptr + c, mask=valid, other=0.0)
    old_var = tl.load(running_var_ptr + c, mask=valid, other=0.0)
    batch_mean = _rounded(tl.load(mean_ptr + c, mask=valid, other=0.0), old_mean)
    estimate = _rounded(tl.load(var_ptr + c, mask=valid, other=0.0) * unbias, old_var)
    new_mean = _rounded(
        _rounded(old_mean.to(tl.float32) * keep, old_mean) + _rounded(batch_mean * w, old_mean),
        old_mean,
    )
    new_var = _rounded(
        _rounded(old_var.to(tl.float32) * keep, old_var) + _rounded(estimate * w, old_var),
        old_var,
    )
    finite = _is_finite(new_mean) & _is_finite(new_var)
    new_mean = tl.where(finite, new_mean, old_mean.to(tl.float32))
    new_var = tl.where(finite, new_var, old_var.to(tl.float32))
    tl.store(running_mean_ptr + c, new_mean.to(old_mean.dtype), mask=valid)
    tl.store(running_var_ptr + c, new_var.to(old_var.dtype), mask=valid)
