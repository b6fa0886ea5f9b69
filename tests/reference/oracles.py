"""Independent oracles for the reference tests, written without the code under test."""

from __future__ import annotations

import numpy as np


def numerical_grad(f, a: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central finite differences of the scalar ``f`` w.r.t. every entry of ``a`` (float64)."""
    a = np.array(a, dtype=np.float64)
    grad = np.zeros_like(a)
    flat, gflat = a.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        up = f(a)
        flat[i] = old - h
        down = f(a)
        flat[i] = old
        gflat[i] = (up - down) / (2 * h)
    return grad


def bn_numpy(x, gamma, beta, axis, eps, frozen_mean=None, frozen_var=None):
    """Textbook batch norm in NumPy; a frozen moment is a constant (the moments-as-constants view).

    With ``frozen_mean`` given, the variance is still computed from x, around that constant mean.
    """
    axes = tuple(i for i in range(x.ndim) if i != axis)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    mean = x.mean(axis=axes, keepdims=True) if frozen_mean is None else frozen_mean.reshape(shape)
    if frozen_var is None:
        var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    else:
        var = frozen_var.reshape(shape)
    y = (x - mean) / np.sqrt(var + eps)
    return y * gamma.reshape(shape) + beta.reshape(shape)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


#: Central differences with h = 1e-6 on O(1) losses carry ~1e-10 of rounding noise per entry,
#: so comparisons against them need this absolute floor besides the relative bound.
FD_ATOL = 1e-8


def fd_close(got, fd, rtol: float = 1e-7) -> bool:
    got, fd = np.asarray(got, dtype=np.float64), np.asarray(fd, dtype=np.float64)
    return float(np.max(np.abs(got - fd))) <= rtol * float(np.max(np.abs(fd))) + FD_ATOL
