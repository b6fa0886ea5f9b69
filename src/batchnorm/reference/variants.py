"""The variants' math, beside the plain one: Batch Renormalization's correction and running
statistics (Ioffe 2017), and how Ghost batch norm cuts a batch into virtual batches (Hoffer et
al. 2017). Both are options of the same stages: Batch Renorm is ``elemt`` with the affine
``(gamma * r, gamma * d + beta)``, r and d held constant by the backward; Ghost batch norm is
``batch_stats``/``elemt`` over one more kept axis.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from .._xp import Array, namespace
from .running import RunningStats, update_running_stats

__all__ = [
    "renorm_correction",
    "renorm_limits",
    "update_renorm_stats",
    "check_renorm_limits",
    "ghost_groups",
]


def check_renorm_limits(r_max: Any, d_max: Any) -> None:
    for value, name, low in ((r_max, "r_max", 1.0), (d_max, "d_max", 0.0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {value!r}")
        if not (math.isfinite(value) or value == math.inf) or value < low:
            raise ValueError(f"{name} must be >= {low:g}, got {value!r}")


def renorm_limits(
    step: int,
    r_max: float,
    d_max: float,
    *,
    warmup: int = 0,
    r_max_at: int | None = None,
    d_max_at: int | None = None,
) -> tuple[float, float]:
    """``(r_max, d_max)`` in force at training step ``step`` (0-based): (1, 0), i.e. plain batch
    norm, for the first ``warmup`` steps, then growing linearly to the final values, reached at
    step ``r_max_at`` / ``d_max_at`` (at once when None). The paper's experiments: warmup 5000,
    r_max 3 at step 40k, d_max 5 at step 25k."""

    def ramp(final: float, start: float, at: int | None) -> float:
        if step < warmup:
            return start
        if at is None or at <= warmup or step >= at:
            return final
        return start + (final - start) * (step - warmup) / (at - warmup)

    return ramp(r_max, 1.0, r_max_at), ramp(d_max, 0.0, d_max_at)


def renorm_correction(
    mean: Array,
    var: Array,
    running_mean: Array,
    running_var: Array,
    eps: float,
    r_max: float,
    d_max: float,
) -> tuple[Array, Array]:
    """Ioffe (2017), Algorithm 1: ``r = clip(sigma_B / sigma, 1/r_max, r_max)`` and
    ``d = clip((mu_B - mu) / sigma, -d_max, d_max)``, with ``sigma_B = sqrt(var + eps)`` of the
    batch (var biased) and ``sigma = sqrt(running_var + eps)`` (the running average of
    sigma_B, see ``update_renorm_stats``). Computed in the dtype of ``mean``."""
    xp = namespace(mean)
    sigma_b = xp.sqrt(var + eps)
    sigma = xp.sqrt(xp.astype(running_var, mean.dtype) + eps)
    r = xp.clip(sigma_b / sigma, 1.0 / r_max, r_max)
    d = xp.clip((mean - xp.astype(running_mean, mean.dtype)) / sigma, -d_max, d_max)
    return r, d


def update_renorm_stats(
    running_mean: Array,
    running_var: Array,
    batch_mean: Array,
    batch_var: Array,
    *,
    momentum: float,
    eps: float,
    warn: bool = True,
) -> RunningStats:
    """The paper's moving averages: ``mu += momentum * (mu_B - mu)`` and
    ``sigma += momentum * (sigma_B - sigma)``, of the standard deviation (eps inside, as
    sigma_B), stored as ``running_var = sigma**2 - eps`` so that inference's
    ``sqrt(running_var + eps)`` is sigma. Through ``update_running_stats`` in the space of sigma,
    so the non-finite guard is the same as everywhere (``warn``: as there)."""
    xp = namespace(running_mean, running_var, batch_mean, batch_var)
    sigma = xp.sqrt(running_var + eps)
    sigma_b = xp.sqrt(batch_var + eps)
    new = update_running_stats(
        running_mean, sigma, 0, batch_mean, sigma_b, 1, momentum=momentum, variance="biased",
        warn=warn,
    )  # fmt: skip
    return RunningStats(new.running_mean, new.running_var**2 - eps, new.num_batches_tracked)


def ghost_groups(batch: int, virtual_batch_size: int, values_per_sample: int) -> list[int]:
    """Sizes of the virtual batches a batch of ``batch`` samples is cut into: full ones of
    ``virtual_batch_size``, then the remainder as a batch of its own, unless it would hold
    fewer than 2 values per channel (``values_per_sample`` per sample), in which case it joins
    the last full one. A batch no larger than ``virtual_batch_size`` is one virtual batch."""
    if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, numbers.Integral):
        raise TypeError(f"virtual_batch_size must be an int, got {virtual_batch_size!r}")
    if virtual_batch_size < 2:
        raise ValueError(f"virtual_batch_size must be at least 2, got {virtual_batch_size}")
    full, rest = divmod(batch, virtual_batch_size)
    if full == 0:
        return [batch]
    sizes = [virtual_batch_size] * full
    if rest and rest * values_per_sample < 2:
        sizes[-1] += rest
    elif rest:
        sizes.append(rest)
    return sizes
