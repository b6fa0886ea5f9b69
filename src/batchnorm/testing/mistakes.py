"""The classic batch-norm mistakes, each computed exactly, to name the one a failure fits.

A failing check is compared with what each known mistake would have produced on the same
input (all in float64, from the reference stages). The first mistake whose numbers fit within
the case's tolerance is the diagnosis. Mistakes that cannot be reproduced exactly (the
one-pass variance, whose error depends on the summation order) are recognised by the variance
the implementation *implied*: the per-channel slope and intercept of its output against x.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import reference as ref
from .._xp import per_channel, to_channel_rows
from .cases import MACHINE_EPS, Case

__all__ = [
    "MISTAKES",
    "Implied",
    "implied_stats",
    "forward_candidates",
    "backward_candidates",
    "eval_candidates",
    "one_pass_fits",
    "padding_counted",
    "padding_counted_grads",
    "rel_error",
]

#: key -> what the diagnosis says when that mistake fits the numbers.
MISTAKES: dict[str, str] = {
    "mean_constant": "dx matches the gradient with the batch mean treated as a constant "
    "(no gradient through the mean)",
    "var_constant": "dx matches the gradient with the batch variance treated as a constant "
    "(no gradient through the variance)",
    "both_constant": "dx matches the gradient with mean and variance both treated as "
    "constants (dx = gamma * dy / sqrt(var + eps))",
    "eps_outside_sqrt": "eps added outside the square root: (x - mean) / (sqrt(var) + eps)",
    "eps_missing": "leaves eps out: (x - mean) / sqrt(var)",
    "eps_fixed": "ignores the eps it is given: consistent with a hard-coded eps = 1e-5 "
    "(PyTorch's default)",
    "eps_missing_backward": "dx leaves eps out of its 1/sqrt(var + eps) factor "
    "(gamma / sqrt(var) * ...)",
    "unbiased_normalize": "normalises with the unbiased variance (divides by m - 1; "
    "torch.var's default, np.var(ddof=1)); Algorithm 1 uses the biased one",
    "float32_compute": "the error is the size of float32 rounding: float64 input computed in "
    "float32? (a systematic mistake as small would look the same)",
    "one_pass": "variance loses precision at large mean: consistent with the one-pass "
    "E[x^2] - E[x]^2 formula (use the centred two-pass formula or Welford)",
    "swapped": "dgamma and dbeta are swapped",
    "eval_batch_stats": "eval output is normalised with the batch statistics, not the running "
    "statistics",
    "eval_eps_outside_sqrt": "eval adds eps outside the square root: "
    "(x - running_mean) / (sqrt(running_var) + eps)",
    "eval_eps_missing": "eval leaves eps out: (x - running_mean) / sqrt(running_var)",
    "eval_eps_fixed": "eval ignores the eps it is given: consistent with a hard-coded "
    "eps = 1e-5 (PyTorch's default)",
    "forward_stats": "consistent with the (wrong) mean/variance of this implementation's own "
    "forward (see forward(train))",
    "not_updated": "running statistics were not updated",
    "momentum_old": "momentum applied to the old value: running = momentum * running + "
    "(1 - momentum) * batch (Keras/Flax/cs231n meaning), but the PyTorch meaning (weight of "
    "the new batch) was expected",
    "momentum_new": "momentum applied to the new batch: running = (1 - momentum) * running + "
    "momentum * batch (PyTorch meaning), but the Keras/Flax meaning (weight of the old "
    "value) was expected",
    "biased_running_var": "running variance is the biased estimate (divides by m), but the "
    "unbiased m/(m-1) estimate was expected",
    "unbiased_running_var": "running variance is the unbiased m/(m-1) estimate, but the "
    "biased one was expected",
    "eval_changed_running": "eval mode changed the running statistics",
    "padding_counted": "the padded positions are counted in the statistics (batch norm over "
    "every position, the mask only applied to the output); use the real positions only",
}


def rel_error(actual: np.ndarray, expected: np.ndarray, scale: float | None = None) -> float:
    """``max|actual - expected| / scale``; inf if shapes differ or ``actual`` is not finite.

    ``scale`` is the size of the terms the quantity is computed from (rounding errors are
    relative to those, not to the result, which may cancel to nearly 0); ``max|expected|``
    when not given.
    """
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        return math.inf
    if actual.size == 0:
        return 0.0
    if not np.all(np.isfinite(actual)):
        return math.inf
    if scale is None:
        scale = float(np.max(np.abs(expected)))
    return float(np.max(np.abs(actual - expected))) / max(scale, np.finfo(np.float64).tiny)


def _train_with(x: np.ndarray, gamma, beta, axis: int, mean, invstd) -> np.ndarray:
    return ref.elemt(x, mean, invstd, gamma, beta, axis)


def _grads_with(dy, x, gamma, axis, mean, invstd, *, through_mean=True, through_var=True):
    """The compact backward evaluated at the given moments (``mean``, ``invstd``)."""
    sum_dy, sum_dy_xhat = ref.backward_reduce(dy, x, mean, invstd, axis)
    count = x.size // x.shape[axis]
    dx = ref.backward_elemt(
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
    return ref.Grads(dx, sum_dy_xhat, sum_dy)


def _eps_outside(var: np.ndarray, eps: float) -> np.ndarray:
    return 1.0 / (np.sqrt(var) + eps)


def _no_eps(var: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1.0 / np.sqrt(var)


def _unbiased_invstd(stats: ref.BatchStats, eps: float) -> np.ndarray:
    return ref.inverse_std(stats.var * stats.count / (stats.count - 1), eps)


#: The eps an implementation that ignores its argument most likely hard-codes.
DEFAULT_EPS = 1e-5


def forward_candidates(x, gamma, beta, axis: int, eps: float) -> dict[str, np.ndarray]:
    """Training-forward outputs of the mistakes that change the forward."""
    stats = ref.batch_stats(x, axis)
    out = {
        "eps_outside_sqrt": _train_with(
            x, gamma, beta, axis, stats.mean, _eps_outside(stats.var, eps)
        ),
        "eps_missing": _train_with(x, gamma, beta, axis, stats.mean, _no_eps(stats.var)),
        "unbiased_normalize": _train_with(
            x, gamma, beta, axis, stats.mean, _unbiased_invstd(stats, eps)
        ),
    }
    if eps != DEFAULT_EPS:  # at the default, ignoring eps changes nothing
        out["eps_fixed"] = _train_with(
            x, gamma, beta, axis, stats.mean, ref.inverse_std(stats.var, DEFAULT_EPS)
        )
    return out


@dataclass(frozen=True)
class Implied:
    """Per-channel moments an implementation's forward output implies (float64)."""

    mean: np.ndarray
    invstd: np.ndarray
    #: Per channel, max |x_hat - invstd * (x - mean)| / max |x_hat|: how far the output is
    #: from a per-channel affine function of x (float rounding: about 1e-7 in float32).
    residual: np.ndarray

    def var(self, eps: float) -> np.ndarray:
        return 1.0 / self.invstd**2 - eps


def _x_hat(y, gamma, beta, axis: int) -> np.ndarray | None:
    """(y - beta) / gamma; None where gamma has a zero."""
    x_hat = y
    if beta is not None:
        x_hat = x_hat - per_channel(beta, y.ndim, axis, np)
    if gamma is not None:
        if np.any(gamma == 0):
            return None
        x_hat = x_hat / per_channel(gamma, y.ndim, axis, np)
    return x_hat


def _fit_rows(xr: np.ndarray, hr: np.ndarray) -> Implied | None:
    """Least-squares ``hr = invstd * (xr - mean)`` per row (channel); None if degenerate."""
    x_mean = xr.mean(axis=1)
    xc = xr - x_mean[:, None]
    ss = np.sum(xc * xc, axis=1)
    if np.any(ss == 0):
        return None
    h_mean = hr.mean(axis=1)
    slope = np.sum(xc * (hr - h_mean[:, None]), axis=1) / ss
    if np.any(slope <= 0):
        return None
    # x_hat = slope * (x - mean): its own mean is slope * (x_mean - mean).
    mean = x_mean - h_mean / slope
    fitted = slope[:, None] * (xr - mean[:, None])
    scale = np.maximum(np.max(np.abs(hr), axis=1), np.finfo(np.float64).tiny)
    residual = np.max(np.abs(hr - fitted), axis=1) / scale
    return Implied(mean, slope, residual)


def implied_stats(x, y, gamma, beta, axis: int) -> Implied | None:
    """Least-squares fit of ``x_hat = (y - beta) / gamma`` against ``x``, per channel.

    With y = gamma * (x - mean) * invstd + beta, the slope is invstd and the intercept
    -mean * invstd. ``None`` if y is not finite or the fit is degenerate.
    """
    if not np.all(np.isfinite(y)):
        return None
    x_hat = _x_hat(y, gamma, beta, axis)
    if x_hat is None:
        return None
    return _fit_rows(to_channel_rows(x, axis, np), to_channel_rows(x_hat, axis, np))


#: The most an output may stray from a per-channel affine function of x and still count as a
#: normalisation with wrong moments (float32 rounding leaves about 1e-7, float16 about 1e-3).
AFFINE_RESIDUAL = 1e-2


def one_pass_fits(case: Case, x: np.ndarray, y: np.ndarray, gamma, beta) -> bool:
    """Whether a forward failure looks like ``E[x^2] - E[x]^2`` rounding on a large-offset case.

    That formula's variance has an absolute error of order eps * E[x]^2 (the two terms agree
    in every digit they share), while the mean stays accurate and the output stays a
    per-channel affine function of x. A negative variance under the sqrt makes whole channels
    non-finite; the other channels must then fit, and at least one must be finite (an output
    that is NaN everywhere says nothing about its variance).
    """
    if not case.large_offset:
        return False
    axis = case.channel_axis
    x_hat = _x_hat(y, gamma, beta, axis)
    if x_hat is None:
        return False
    xr, hr = to_channel_rows(x, axis, np), to_channel_rows(x_hat, axis, np)
    finite = np.isfinite(hr)
    whole = np.all(finite, axis=1)
    if not np.all(whole | ~np.any(finite, axis=1)) or not np.any(whole):
        return False  # non-finite values scattered within a channel, or everywhere
    implied = _fit_rows(xr[whole], hr[whole])
    if implied is None or np.any(implied.residual > AFFINE_RESIDUAL):
        return False
    stats = ref.batch_stats(x, axis)
    mean, var = stats.mean[whole], stats.var[whole]
    var_error = np.abs(implied.var(case.eps) - var)
    budget = 16.0 * MACHINE_EPS[case.dtype] * (mean**2) * math.log2(max(case.m, 2))
    mean_ok = np.abs(implied.mean - mean) <= 1e-2 * np.sqrt(var)
    if not np.all(whole):
        return bool(np.all(mean_ok) and np.all(var_error <= budget))
    return bool(np.all(mean_ok) and np.all(var_error <= budget) and np.any(var_error > 1e-3 * var))


def backward_candidates(
    dy, x, gamma, axis: int, eps: float, implied: Implied | None
) -> dict[str, ref.Grads]:
    """Gradients of the mistakes that change the backward, in order of preference."""
    stats = ref.batch_stats(x, axis)
    invstd = ref.inverse_std(stats.var, eps)
    grads = {
        "mean_constant": _grads_with(dy, x, gamma, axis, stats.mean, invstd, through_mean=False),
        "var_constant": _grads_with(dy, x, gamma, axis, stats.mean, invstd, through_var=False),
        "both_constant": _grads_with(
            dy, x, gamma, axis, stats.mean, invstd, through_mean=False, through_var=False
        ),
        "eps_outside_sqrt": _grads_with(
            dy, x, gamma, axis, stats.mean, _eps_outside(stats.var, eps)
        ),
        "eps_missing": _grads_with(dy, x, gamma, axis, stats.mean, _no_eps(stats.var)),
        "unbiased_normalize": _grads_with(
            dy, x, gamma, axis, stats.mean, _unbiased_invstd(stats, eps)
        ),
    }
    if eps != DEFAULT_EPS:
        grads["eps_fixed"] = _grads_with(
            dy, x, gamma, axis, stats.mean, ref.inverse_std(stats.var, DEFAULT_EPS)
        )
    exact = _grads_with(dy, x, gamma, axis, stats.mean, invstd)
    # Only the leading factor loses eps; x_hat inside the bracket keeps it.
    with np.errstate(divide="ignore", invalid="ignore"):
        no_eps = per_channel(np.sqrt((stats.var + eps) / stats.var), x.ndim, axis, np)
    grads["eps_missing_backward"] = ref.Grads(exact.dx * no_eps, exact.dgamma, exact.dbeta)
    if implied is not None:
        grads["forward_stats"] = _grads_with(dy, x, gamma, axis, implied.mean, implied.invstd)
    return grads


def eval_candidates(x, running_mean, running_var, gamma, beta, axis, eps) -> dict[str, np.ndarray]:
    stats = ref.batch_stats(x, axis)
    return {
        "eval_batch_stats": _train_with(
            x, gamma, beta, axis, stats.mean, ref.inverse_std(stats.var, eps)
        ),
        "eval_eps_outside_sqrt": _train_with(
            x, gamma, beta, axis, running_mean, _eps_outside(running_var, eps)
        ),
        "eval_eps_missing": _train_with(x, gamma, beta, axis, running_mean, _no_eps(running_var)),
        **(
            {}
            if eps == DEFAULT_EPS
            else {
                "eval_eps_fixed": _train_with(
                    x, gamma, beta, axis, running_mean, ref.inverse_std(running_var, DEFAULT_EPS)
                )
            }
        ),
    }


def first_fit(
    actual: np.ndarray,
    candidates: dict[str, np.ndarray],
    tol: float,
    scale: float | None = None,
) -> str | None:
    """The named mistake that fits ``actual`` best, if any fits within ``tol`` (ties: dict
    order); else ``forward_stats`` if that fits.

    The best, not the first: where eps is not negligible, leaving it out and adding it
    outside the square root both come within tolerance of one another's output.
    ``forward_stats`` (the backward at the moments the forward implies) reproduces any forward
    mistake's gradient, so it only speaks when no named mistake does."""
    best, best_error = None, math.inf
    for key, value in candidates.items():
        if key == "forward_stats":
            continue
        error = rel_error(actual, value, scale)
        if error <= tol and error < best_error:
            best, best_error = key, error
    if best is None and "forward_stats" in candidates:
        if rel_error(actual, candidates["forward_stats"], scale) <= tol:
            return "forward_stats"
    return best


def _padding_counted_saved(x: np.ndarray, gamma, beta, eps: float):
    with np.errstate(all="ignore"):  # NaN padding makes every statistic NaN
        return ref.batch_norm_train(x, gamma, beta, axis=1, eps=eps)


def padding_counted(x: np.ndarray, mask: np.ndarray, gamma, beta, eps: float) -> np.ndarray:
    """The output of batch norm over every position of (N, C, L) ``x``, padding included,
    zeroed at the padding (``bn(x) * mask``): the classic masked mistake."""
    y, _ = _padding_counted_saved(x, gamma, beta, eps)
    return y * mask[:, None, :]


def padding_counted_grads(x: np.ndarray, dy: np.ndarray, mask: np.ndarray, gamma, eps: float):
    """The gradients of :func:`padding_counted` (dx reaches the padding through the
    statistics)."""
    _, saved = _padding_counted_saved(x, gamma, None, eps)
    with np.errstate(all="ignore"):
        return ref.backward(dy * mask[:, None, :], saved)
