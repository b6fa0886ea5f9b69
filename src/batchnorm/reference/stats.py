"""Batch moments and their exact merge: the numerical policy, written once.

Numerical choices (every backend follows them):

* The variance that normalises is the **biased** batch variance, ``sum((x - mean)**2) / m``.
* It is computed **two-pass and centred**: first the mean, then the mean of squared deviations.
  The one-pass ``E[x^2] - E[x]^2`` cancels catastrophically (x = 1e4 + N(0, 1) in float32 loses
  every digit of the variance), so it is never used.
* The first pass sums ``x - K``, K a value of the channel, so its partial sums stay at the data's
  spread rather than its offset: NumPy sums an (m, C) array row by row, and 65536 rows of
  1e4 + N(0, 1) summed plainly in float32 leave the mean off by far more than the spread
  (measured: the variance 8x too large). The second pass is the corrected two-pass of Chan,
  Golub & LeVeque (1983): with e = x - mean, ``mean += mean(e)`` and
  ``var = mean(e^2) - mean(e)^2``, which removes what rounding left in the first pass's mean.
* Arithmetic is done in ``compute_dtype``: float64 for float64 input, float32 for everything
  narrower (float16/bfloat16 are upcast), so saved ``mean``/``invstd`` are float32 or better.
* Partial statistics (per rank, per block) merge exactly with the parallel-variance formula of
  Chan, Golub & LeVeque (1979): ``M2 = sum_p M2_p + sum_p n_p (mean_p - mean)**2``. Parts with
  ``n_p = 0`` contribute nothing, so empty ranks and uneven splits are exact.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .._xp import (
    Array,
    channel_axis,
    compute_dtype,
    namespace,
    per_channel,
    reduce_axes,
    values_per_channel,
)

__all__ = ["BatchStats", "batch_stats", "merge_stats", "inverse_std"]


class BatchStats(NamedTuple):
    """Per-channel moments of a batch: ``count`` values each, biased ``var``; ``m2 = var*count``.

    ``count`` is an int from ``batch_stats`` and a 0-d array from ``merge_stats`` (reading it on
    the host would synchronise a GPU; callers that need a Python int call ``int()``).
    """

    count: Any
    mean: Array
    var: Array

    @property
    def m2(self) -> Array:
        return self.var * self.count


def batch_stats(x: Array, axis: int = 1) -> BatchStats:
    """Mean and biased variance of every channel of ``x`` (two-pass, centred).

    ``axis``: the channel axis, negative counting from the end; the batch axis 0 is refused
    (``_xp.channel_axis``: a wrong one silently reduced over the wrong axes, or raised an
    IndexError).
    """
    xp = namespace(x)
    axis = channel_axis(x.ndim, axis)
    axes = reduce_axes(x.ndim, axis)
    xc = xp.astype(x, compute_dtype(x.dtype, xp))
    count = values_per_channel(tuple(x.shape), axis)
    if count == 0:  # no values: NaN moments, as the plain mean of nothing
        mean = xp.mean(xc, axis=axes)
        return BatchStats(count, mean, xp.mean(xc * xc, axis=axes))
    first = tuple(slice(None) if i == axis else 0 for i in range(x.ndim))
    shift = xc[first]
    # A channel led by an inf or NaN is shifted by 0, so that its mean stays the plain one.
    shift = xp.where(xp.isfinite(shift), shift, xp.zeros_like(shift))
    mean = shift + xp.mean(xc - per_channel(shift, x.ndim, axis, xp), axis=axes)
    # An inf in the data, or x - K overflowing near the float max: the plain mean instead, as
    # a sum of x / count so that finite data cannot overflow. Computed for every channel rather
    # than only when one needs it, because asking whether any does would read a flag on the
    # host: a GPU sync and a torch.compile graph break.
    mean = xp.where(xp.isfinite(mean), mean, xp.sum(xc / count, axis=axes))
    centred = xc - per_channel(mean, x.ndim, axis, xp)
    residual = xp.mean(centred, axis=axes)
    var = xp.mean(centred * centred, axis=axes) - residual * residual
    var = xp.where(var < 0, xp.zeros_like(var), var)  # rounding, when every e is 0 or nearly
    # An inf in the channel makes the residual NaN; its mean is then the inf itself.
    mean = xp.where(xp.isfinite(residual), mean + residual, mean)
    return BatchStats(count, mean, var)


def merge_stats(counts: Array, means: Array, m2s: Array, xp: Any | None = None) -> BatchStats:
    """Merge P partial statistics exactly (Chan et al. 1979).

    ``counts`` has shape (P,), ``means`` and ``m2s`` shape (P, C), where ``m2`` is the sum of
    squared deviations from the part's own mean. Parts with a count of 0 are ignored. The merged
    ``count`` is a 0-d array in the dtype of ``means``.
    """
    xp = xp or namespace(means)
    counts = xp.astype(xp.asarray(counts), means.dtype)
    total = xp.sum(counts)
    n = counts[:, None]
    # Parts with n = 0 may carry a NaN mean (0/0); mask them, since 0 * NaN is NaN.
    present = n > 0
    zeros = xp.zeros_like(means)
    mean = xp.sum(xp.where(present, n * means, zeros), axis=0) / total
    delta = means - mean[None, :]
    spread = xp.where(present, n * delta * delta + m2s, zeros)
    m2 = xp.sum(spread, axis=0)
    return BatchStats(total, mean, m2 / total)


def inverse_std(var: Array, eps: float) -> Array:
    """``1 / sqrt(var + eps)``: the paper's 1/sqrt(sigma_B^2 + epsilon)."""
    xp = namespace(var)
    return 1.0 / xp.sqrt(var + eps)
