"""Running (population) statistics for inference, under every convention in use.

Frameworks disagree on two things (see ``docs/conventions.md`` for the table):

* **momentum**: PyTorch and Algorithm 2's moving averages weight the *new batch* by momentum
  (``convention="torch"``, default 0.1); Keras, Flax and Chainer weight the *old value*
  (``convention="keras"``, typically 0.99 or 0.9). ``momentum=None`` is the cumulative average
  of all batches so far (PyTorch's meaning), the same under both conventions.
* **variance**: the running variance stores the unbiased ``m/(m-1) * var_B`` (PyTorch, Chainer,
  Algorithm 2 line 10; ``variance="unbiased"``) or the biased ``var_B`` (Keras, Flax;
  ``variance="biased"``). The batch is always *normalised* with the biased variance.

A batch whose mean or variance is not finite is never written: those channels keep their old
values and a ``RuntimeWarning`` names them (``warn=False`` skips the warning and with it the one
host read of a flag, which matters on a GPU). This is a pure function; modules mutate buffers.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Literal, NamedTuple

from .._xp import Array, check_channel_vector, namespace

__all__ = ["RunningStats", "update_running_stats", "check_momentum", "CONVENTIONS"]

Convention = Literal["torch", "keras"]
Variance = Literal["unbiased", "biased"]

#: The framework defaults this module can reproduce; ``docs/conventions.md`` cites them.
CONVENTIONS: dict[str, dict[str, Any]] = {
    "pytorch": {"momentum": 0.1, "convention": "torch", "variance": "unbiased", "eps": 1e-5},
    "keras": {"momentum": 0.99, "convention": "keras", "variance": "biased", "eps": 1e-3},
    "flax": {"momentum": 0.99, "convention": "keras", "variance": "biased", "eps": 1e-5},
    "chainer": {"momentum": 0.9, "convention": "keras", "variance": "unbiased", "eps": 2e-5},
}


class RunningStats(NamedTuple):
    running_mean: Array
    running_var: Array
    num_batches_tracked: int


def check_momentum(momentum: float | None, convention: str, variance: str) -> None:
    if convention not in ("torch", "keras"):
        raise ValueError(f"convention must be 'torch' or 'keras', got {convention!r}")
    if variance not in ("unbiased", "biased"):
        raise ValueError(f"variance must be 'unbiased' or 'biased', got {variance!r}")
    if momentum is None:
        return
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):  # np.float32 too
        raise TypeError(f"momentum must be a float in [0, 1] or None, got {momentum!r}")
    if not (math.isfinite(momentum) and 0.0 <= momentum <= 1.0):
        raise ValueError(f"momentum must be in [0, 1] or None, got {momentum!r}")


def update_running_stats(
    running_mean: Array,
    running_var: Array,
    num_batches_tracked: int,
    batch_mean: Array,
    batch_var: Array,
    count: int,
    *,
    momentum: float | None = 0.1,
    convention: Convention = "torch",
    variance: Variance = "unbiased",
    warn: bool = True,
) -> RunningStats:
    """New running statistics after one batch of ``count`` values per channel.

    ``batch_var`` is the biased batch variance (what normalised the batch).
    """
    xp = namespace(running_mean, running_var, batch_mean, batch_var)
    check_momentum(momentum, convention, variance)
    channels = running_mean.shape[0] if running_mean.ndim == 1 else batch_mean.shape[0]
    for v, name in (
        (running_mean, "running_mean"),
        (running_var, "running_var"),
        (batch_mean, "batch mean"),
        (batch_var, "batch var"),
    ):
        check_channel_vector(v, channels, name)  # floating too: an integer buffer truncates
    chainer_one = convention == "keras" and count == 1  # Chainer: m / max(m - 1, 1)
    if variance == "unbiased" and count < 2 and not chainer_one:
        raise ValueError(f"the unbiased running variance needs count >= 2, got {count}")
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if momentum is None and int(num_batches_tracked) < 0:
        raise ValueError(f"num_batches_tracked must be >= 0, got {num_batches_tracked}")

    tracked = int(num_batches_tracked) + 1
    if momentum is None:
        weight_new = 1.0 / tracked
    elif convention == "torch":
        weight_new = float(momentum)
    else:
        weight_new = 1.0 - float(momentum)

    unbiased = count / max(count - 1, 1)
    var_estimate = batch_var * unbiased if variance == "unbiased" else batch_var
    mean_cast = xp.astype(batch_mean, running_mean.dtype)
    var_cast = xp.astype(var_estimate, running_var.dtype)
    new_mean = (1.0 - weight_new) * running_mean + weight_new * mean_cast
    new_var = (1.0 - weight_new) * running_var + weight_new * var_cast

    # The new values too: a finite batch variance can still overflow the update (3e38 * m/(m-1)).
    finite = (
        xp.isfinite(batch_mean) & xp.isfinite(batch_var) & xp.isfinite(new_mean)
        & xp.isfinite(new_var)
    )  # fmt: skip
    # Applied unconditionally: choosing on the host whether to apply it would stall a GPU.
    new_mean = xp.where(finite, new_mean, running_mean)
    new_var = xp.where(finite, new_var, running_var)
    if warn and not _all_true(xp.all(finite)):  # the warning alone reads one flag on the host
        bad = [i for i in range(channels) if not bool(finite[i])]
        warnings.warn(
            f"batch statistics (or their update) are not finite for channel(s) {bad[:10]}"
            f"{' ...' if len(bad) > 10 else ''}; their running statistics were left unchanged",
            RuntimeWarning,
            stacklevel=2,
        )
    return RunningStats(new_mean, new_var, tracked)


def _all_true(flag: Array) -> bool:
    """The flag's value, or True where it has none on the host: under ``jax.jit`` it is a
    tracer (bool() raises a TypeError), and the ``where`` above has kept the old values anyway."""
    try:
        return bool(flag)
    except TypeError:
        return True
