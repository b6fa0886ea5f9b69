"""``NumbaBackend``: the stage protocol (``batchnorm.reference.stages``) on the Numba kernels."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from ...reference.stages import (
    BackwardOut,
    Elemt,
    ForwardOut,
    compose_backward_train,
)
from ...reference.stats import BatchStats
from . import compiled, masked_run
from . import launchers as run
from .compiled import sized_threads
from .layout import Prepared, _dtype_name, _is_torch

__all__ = ["NumbaBackend", "SUPPORTED_DTYPES", "unavailable_reason"]

Array = Any

#: Supported dtypes (by name, for NumPy and torch alike).
SUPPORTED_DTYPES = ("float16", "bfloat16", "float32", "float64")


def unavailable_reason(x: Array) -> str | None:
    """``None`` if the numba kernels can run on ``x``, else a sentence saying why not."""
    if compiled.NUMBA_IMPORT_ERROR is not None:
        return compiled.NUMBA_IMPORT_ERROR
    if _is_torch(x):
        if x.device.type != "cpu":
            return f"the input is on device {x.device}; the numba backend runs on CPU tensors only"
        if str(x.layout) != "torch.strided":
            return f"the input has layout {x.layout}; the numba backend needs a strided tensor"
        torch = sys.modules["torch"]
        if type(x) not in (torch.Tensor, torch.nn.Parameter):
            # torch.export traces with such subclasses (fake tensors: no memory to read)
            return (
                f"the input is a {type(x).__name__}, a tensor subclass whose memory the numba "
                "kernels cannot read (torch.export traces with fake tensors: use "
                'backend="auto" or "reference" there)'
            )
    elif not isinstance(x, np.ndarray):
        return f"the numba backend takes NumPy arrays or torch CPU tensors, got {type(x).__name__}"
    if _dtype_name(x) not in SUPPORTED_DTYPES:
        return f"dtype {_dtype_name(x)} is not supported (supported: {', '.join(SUPPORTED_DTYPES)})"
    return None


class NumbaBackend:
    """The stage protocol on NumPy arrays and torch CPU tensors, with fused ``forward_train``
    and ``backward_train``.

    Inputs are assumed validated; ``axis`` is a non-negative channel axis. Outputs have the
    input's kind, dtype and memory layout; the statistics are float32 (float64 for float64
    input). The fused ReLU's ``relu_mask`` is a uint8 array of 1 bit per element. The
    ``mask=`` option (padded batches) runs the kernels of ``masked``.
    """

    name = "numba"
    supports_mask = True
    #: ``backend="auto"`` leaves smaller inputs to the reference: measured on 2 cores, a
    #: (60, 100) training step took 6.9 ms here against 1.7 ms in the reference (thread start-up
    #: and synchronisation dominate); at 65,536 elements the two tie, above it numba wins.
    auto_min_numel = 1 << 16

    def unavailable_reason(self, x: Array) -> str | None:
        return unavailable_reason(x)

    @sized_threads
    def batch_stats(self, x, axis, *, mask=None):
        prep = Prepared(x, axis)
        if mask is not None:
            where = masked_run.Positions(prep, mask, axis)
            mean, var = masked_run.stats(prep, where)
            return BatchStats(where.count, prep.out_vector(mean), prep.out_vector(var))
        mean, var, _ = run._stats(prep, 1.0)
        return BatchStats(prep.count, prep.out_vector(mean), prep.out_vector(var))

    @sized_threads
    def elemt(self, x, mean, invstd, gamma, beta, axis, *, residual=None, relu=False, mask=None):
        prep = Prepared(x, axis)
        scale = (prep.vector(gamma, 1.0) * prep.vector(invstd)).astype(prep.cdt)
        if mask is not None:
            if residual is not None or relu:
                raise ValueError("mask= does not combine with residual= or relu=")
            where = masked_run.Positions(prep, mask, axis)
            y = masked_run.elemt(prep, where, prep.vector(mean), scale, prep.vector(beta, 0.0))
            return Elemt(y, None)
        return self._elemt(prep, prep.vector(mean), scale, prep.vector(beta, 0.0), residual, relu)

    def _elemt(self, prep, mean, scale, shift, residual, relu) -> Elemt:
        if not relu:
            y = run._elemt(prep, mean, scale, shift)
            if residual is not None:  # no kernel of its own: the add alone saves nothing
                y = y + residual
            return Elemt(y, None)
        res = None if residual is None else prep.same_layout(residual, "residual")
        return Elemt(*run.relu_elemt(prep, mean, scale, shift, res))

    @sized_threads
    def forward_infer(self, x, running_mean, running_var, gamma, beta, eps, axis):
        prep = Prepared(x, axis)
        mean = prep.vector(running_mean)
        # 1/sqrt(var + eps) in float64, rounded once to the compute dtype.
        invstd = 1.0 / np.sqrt(prep.vector(running_var).astype(np.float64) + float(eps))
        scale = (prep.vector(gamma, 1.0) * invstd).astype(prep.cdt)
        return run._elemt(prep, mean, scale, prep.vector(beta, 0.0))

    @sized_threads
    def forward_train(self, x, gamma, beta, eps, axis, *, residual=None, relu=False):
        prep = Prepared(x, axis)
        if residual is None and not relu:
            y, mean, var, invstd = run._forward_train(prep, gamma, beta, float(eps))
            relu_mask = None
        else:
            mean, var, invstd = run._stats(prep, float(eps))
            scale = (prep.vector(gamma, 1.0) * invstd).astype(prep.cdt)
            y, relu_mask = self._elemt(prep, mean, scale, prep.vector(beta, 0.0), residual, relu)
        vectors = (prep.out_vector(v) for v in (mean, var, invstd))
        return ForwardOut(y, *vectors, relu_mask)

    @sized_threads
    def backward_reduce(self, dy, x, mean, invstd, axis, *, mask=None):
        prep = Prepared(x, axis)
        if mask is not None:
            where = masked_run.Positions(prep, mask, axis)
            sums = masked_run.backward_reduce(
                prep, where, prep.same_layout(dy), prep.vector(mean), prep.vector(invstd)
            )
            return tuple(prep.out_vector(s) for s in sums)
        sums = run._backward_reduce(
            prep, prep.same_layout(dy), prep.vector(mean), prep.vector(invstd)
        )
        return tuple(prep.out_vector(s) for s in sums)

    @sized_threads
    def backward_elemt(
        self, dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, count, axis, *,
        through_mean=True, through_var=True, mask=None,
    ):  # fmt: skip
        prep = Prepared(x, axis)
        zeros = np.zeros(prep.channels, dtype=prep.cdt)
        # Dropping a path through a moment is the same as that moment's sum being zero.
        s_dy = prep.vector(sum_dy) if through_mean else zeros
        s_dy_xhat = prep.vector(sum_dy_xhat) if through_var else zeros
        if mask is not None:
            return masked_run.backward_elemt(
                prep, masked_run.Positions(prep, mask, axis), prep.same_layout(dy),
                prep.vector(mean), prep.vector(invstd), prep.vector(gamma, 1.0), s_dy,
                s_dy_xhat, count,
            )  # fmt: skip
        return run._backward_elemt(
            prep, prep.same_layout(dy), prep.vector(mean), prep.vector(invstd),
            prep.vector(gamma, 1.0), s_dy, s_dy_xhat, int(count),
        )  # fmt: skip

    @sized_threads
    def relu_backward(self, dy, x, relu_mask, axis):
        prep = Prepared(x, axis)
        return run.relu_backward(prep, prep.same_layout(dy), relu_mask)

    @sized_threads
    def backward_train(
        self, dy, x, mean, invstd, gamma, axis, *, through_mean=True, through_var=True,
        relu_mask=None, residual_grad=False,
    ):  # fmt: skip
        dresidual = None
        if relu_mask is not None:
            dy = self.relu_backward(dy, x, relu_mask, axis)
            dresidual = dy if residual_grad else None
        elif residual_grad:
            raise ValueError("residual_grad needs the relu_mask of the fused forward")
        if not (through_mean and through_var):  # the fused kernels: the full gradient only
            out = compose_backward_train(
                self, dy, x, mean, invstd, gamma, axis,
                through_mean=through_mean, through_var=through_var,
            )  # fmt: skip
            return out._replace(dresidual=dresidual)
        prep = Prepared(x, axis)
        dx, sum_dy, sum_dy_xhat = run._backward_train(
            prep, prep.same_layout(dy), prep.vector(mean), prep.vector(invstd),
            prep.vector(gamma, 1.0),
        )  # fmt: skip
        return BackwardOut(dx, prep.out_vector(sum_dy_xhat), prep.out_vector(sum_dy), dresidual)
