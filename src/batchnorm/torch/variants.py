"""Batch norm for small batches, on the same stages: Ghost batch norm and Batch Renormalization.

* ``GhostBatchNorm1d/2d/3d(num_features, virtual_batch_size)`` (Hoffer et al. 2017): in
  training each virtual batch of ``virtual_batch_size`` samples is normalised with its own
  statistics. The full virtual batches run as ONE computation: the batch is viewed as
  (virtual batches, samples, C, ...) and the virtual-batch axis joins the channels, so the
  backend's stages see (samples, G*C, ...) channels; no Python loop over chunks. A remainder
  (N not a multiple) is a virtual batch of its own, or joins the last full one when it would
  hold fewer than 2 values per channel (``reference.variants.ghost_groups``). Running
  statistics: one update per forward with the exact merge of all virtual batches, i.e. the
  statistics of the whole batch, as a plain layer would write them. Eval: running statistics.
* ``BatchRenorm1d/2d/3d(num_features, r_max=3, d_max=5, warmup=0, ...)`` (Ioffe 2017):
  normalise with the batch statistics, then correct towards the running ones,
  ``x_hat * r + d`` with ``r = clip(sigma_B / sigma, 1/r_max, r_max)`` and
  ``d = clip((mu_B - mu) / sigma, -d_max, d_max)``, held constant by the backward, as in the
  paper: the stages are ``elemt`` with the affine ``(gamma * r, gamma * d + beta)`` and the
  plain backward with ``gamma * r``. Moving averages of the mean and of sigma (the paper's,
  ``reference.variants.update_renorm_stats``). ``r_max``/``d_max`` are relaxed from (1, 0) after
  ``warmup`` steps to their final values at ``r_max_at``/``d_max_at`` (``PAPER_SCHEDULE`` is
  the paper's); the step is ``num_batches_tracked``, a buffer, so it survives a state dict.
  Not inside an activation-checkpointed block (refused with a clear error: its recomputed
  correction would differ).

Both subclass ``torch.nn.BatchNormNd`` (their eval is plain batch norm: folding and freezing
apply) and take ``backend=`` like the other layers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from .. import reference as ref
from .._xp import compute_dtype, values_per_channel
from ..kernels import select_backend
from ..reference.variants import (
    check_renorm_limits,
    ghost_groups,
    renorm_correction,
    renorm_limits,
    update_renorm_stats,
)
from .function import AXIS, apply_batch_norm, memory_format_of
from .functional import check_call
from .modules import _BatchNorm
from .native import host_read_is_cheap
from .stats_sink import deliver, recomputing

__all__ = [
    "PAPER_SCHEDULE",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
]

#: Ioffe (2017), section 4: r_max 1 and d_max 0 for 5000 steps, then relaxed to r_max 3 at
#: step 40k and d_max 5 at step 25k.
PAPER_SCHEDULE = {"r_max": 3.0, "d_max": 5.0, "warmup": 5000, "r_max_at": 40000, "d_max_at": 25000}


class _GhostBatchNorm(_BatchNorm):
    def __init__(self, num_features: int, virtual_batch_size: int, *args: Any, **kwargs: Any):
        super().__init__(num_features, *args, **kwargs)
        ghost_groups(virtual_batch_size, virtual_batch_size, 1)  # validates it
        self.virtual_batch_size = int(virtual_batch_size)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(input)
        self._check_input_dim(input)
        tracking = self.track_running_stats and self.running_mean is not None
        check_call(
            input, self.running_mean if tracking else None, self.running_var if tracking else None,
            self.weight, self.bias, True, self.momentum, self.eps,
        )  # fmt: skip
        ghost_groups(self.virtual_batch_size, self.virtual_batch_size, 1)  # set since, maybe
        if input.numel() == 0:  # as torch.nn: an empty output (and the batch counted)
            return super().forward(input)
        n = input.shape[0]
        per_sample = values_per_channel(tuple(input.shape), AXIS) // max(n, 1)
        sizes = ghost_groups(n, self.virtual_batch_size, per_sample)
        if any(s * per_sample < 2 for s in sizes):  # e.g. N = 1 with one value per channel
            raise ValueError(
                f"virtual batches of {sizes} sample(s) x {per_sample} value(s) per channel: "
                "each needs more than 1 value per channel"
            )
        chosen, _ = select_backend(input, self.backend)
        full = sum(1 for s in sizes if s == self.virtual_batch_size)
        parts, stats = [], []
        if full:
            parts.append(
                self._batched(input[: full * self.virtual_batch_size], full, chosen, stats)
            )
        if full < len(sizes):
            rest = input[full * self.virtual_batch_size :]
            y, mean, var, _ = apply_batch_norm(
                rest, self.weight, self.bias, None, None, True, float(self.eps), chosen,
                self.through_mean, self.through_var,
            )  # fmt: skip
            parts.append(y)
            stats.append((values_per_channel(tuple(rest.shape), AXIS), mean, var))
        self.last_backend = chosen.name
        if tracking:  # the exact merge of the virtual batches: the whole batch's statistics
            means = torch.stack([m.double() for _, m, _ in stats])
            m2s = torch.stack([v.double() * c for c, _, v in stats])
            # Filled on the statistics' device: a tensor built from the host's list would be
            # copied there, and that copy waits for the GPU's queue.
            counts = torch.full((len(stats),), float(stats[0][0]), dtype=torch.float64,
                                device=means.device)  # fmt: skip
            counts[-1] = float(stats[-1][0])
            merged = ref.merge_stats(counts, means, m2s)
            deliver(self, merged.mean, merged.var, sum(c for c, _, _ in stats))
        output = parts[0] if len(parts) == 1 else torch.cat(parts)
        return output.contiguous(memory_format=memory_format_of(input))

    def _batched(self, x: torch.Tensor, groups: int, backend: Any, stats: list) -> torch.Tensor:
        """``groups`` equal virtual batches as one batch norm over G*C channels."""
        size, channels, rest = self.virtual_batch_size, x.shape[1], x.shape[2:]
        wide = x.reshape(groups, size, channels, *rest).transpose(0, 1)
        wide = wide.reshape(size, groups * channels, *rest)
        weight = None if self.weight is None else self.weight.repeat(groups)
        bias = None if self.bias is None else self.bias.repeat(groups)
        y, mean, var, _ = apply_batch_norm(
            wide, weight, bias, None, None, True, float(self.eps), backend, self.through_mean,
            self.through_var,
        )  # fmt: skip
        count = values_per_channel(tuple(wide.shape), AXIS)
        stats.extend(
            zip([count] * groups, mean.view(groups, -1), var.view(groups, -1), strict=True)
        )
        y = y.reshape(size, groups, channels, *rest).transpose(0, 1)
        return y.reshape(groups * size, channels, *rest)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"


class GhostBatchNorm1d(_GhostBatchNorm, torch.nn.BatchNorm1d):
    """Ghost batch norm for (N, C) or (N, C, L); arguments as ``BatchNorm1d`` after
    ``virtual_batch_size`` (samples per virtual batch, >= 2)."""


class GhostBatchNorm2d(_GhostBatchNorm, torch.nn.BatchNorm2d):
    """Ghost batch norm for (N, C, H, W); arguments as :class:`GhostBatchNorm1d`."""


class GhostBatchNorm3d(_GhostBatchNorm, torch.nn.BatchNorm3d):
    """Ghost batch norm for (N, C, D, H, W); arguments as :class:`GhostBatchNorm1d`."""


class _RenormFunction(torch.autograd.Function):
    """``y, mean, var = apply(x, weight, bias, running_mean, running_var, eps, r_max, d_max,
    backend)``: the stages with the corrected affine; r and d are constants of the backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, r_max, d_max, backend):
        stats = backend.batch_stats(x, AXIS)
        invstd = ref.inverse_std(stats.var, eps)
        r, d = renorm_correction(
            stats.mean, stats.var, running_mean, running_var, eps, r_max, d_max
        )
        cdt = stats.mean.dtype
        gamma = r if weight is None else weight.detach().to(cdt) * r
        beta = d if weight is None else weight.detach().to(cdt) * d
        if bias is not None:
            beta = beta + bias.detach().to(cdt)
        y, _ = backend.elemt(x, stats.mean, invstd, gamma, beta, AXIS)
        ctx.save_for_backward(x, stats.mean, invstd, gamma, r, d)
        ctx.backend, ctx.count = backend, stats.count
        ctx.dtypes = (
            None if weight is None else weight.dtype,
            None if bias is None else bias.dtype,
        )
        ctx.mark_non_differentiable(stats.mean, stats.var)
        return y.contiguous(memory_format=memory_format_of(x)), stats.mean, stats.var

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _dmean, _dvar):
        x, mean, invstd, gamma, r, d = ctx.saved_tensors
        backend = ctx.backend
        sum_dy, sum_dy_xhat = backend.backward_reduce(dy, x, mean, invstd, AXIS)
        dx = backend.backward_elemt(
            dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, ctx.count, AXIS
        )
        weight_dtype, bias_dtype = ctx.dtypes
        dweight = None if weight_dtype is None else (r * sum_dy_xhat + d * sum_dy).to(weight_dtype)
        dbias = None if bias_dtype is None else sum_dy.to(bias_dtype)
        fmt = memory_format_of(x)
        return dx.contiguous(memory_format=fmt), dweight, dbias, *(None,) * 6


class _BatchRenorm(_BatchNorm):
    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.01,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup: int = 0,
        r_max_at: int | None = None,
        d_max_at: int | None = None,
        **kwargs: Any,
    ) -> None:
        _check_renorm_settings(r_max, d_max, warmup, r_max_at, d_max_at)
        if momentum is None:
            raise ValueError("Batch Renorm's moving averages need a float momentum, not None")
        if not track_running_stats:
            raise ValueError("Batch Renorm corrects towards the running statistics: it needs them")
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs
        )
        self.r_max, self.d_max = float(r_max), float(d_max)
        self.warmup, self.r_max_at, self.d_max_at = int(warmup), r_max_at, d_max_at

    def limits(self) -> tuple[float, float]:
        """``(r_max, d_max)`` at the current step (``num_batches_tracked``)."""
        scheduled = self.warmup > 0 or self.r_max_at is not None or self.d_max_at is not None
        # Without a schedule the step does not matter, and reading it would make the host wait
        # for the GPU at every training call.
        step = int(self.num_batches_tracked) if scheduled else 0
        return renorm_limits(
            step, self.r_max, self.d_max, warmup=self.warmup, r_max_at=self.r_max_at,
            d_max_at=self.d_max_at,
        )  # fmt: skip

    def _write_batch_stats(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        new = update_renorm_stats(
            self.running_mean, self.running_var, mean.to(self.running_mean.dtype),
            var.to(self.running_var.dtype), momentum=self.momentum, eps=self.eps,
            warn=host_read_is_cheap(self.running_mean),  # the warning's test is a host read
        )  # fmt: skip
        with torch.no_grad():
            self.running_mean.copy_(new.running_mean)
            self.running_var.copy_(new.running_var)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(input)
        self._check_input_dim(input)
        check_call(
            input, self.running_mean, self.running_var, self.weight, self.bias, True,
            self.momentum, self.eps,
        )  # fmt: skip
        # Again at every call, as momentum and eps are: the attributes may have been set since.
        _check_renorm_settings(self.r_max, self.d_max, self.warmup, self.r_max_at, self.d_max_at)
        if self.momentum is None:
            raise ValueError("Batch Renorm's moving averages need a float momentum, not None")
        if input.numel() == 0:
            return super().forward(input)
        if recomputing():
            # r and d depend on running statistics that the first forward has since updated:
            # recomputed, they would differ, and so would the gradient.
            raise RuntimeError(
                f"{type(self).__name__} cannot be recomputed by activation checkpointing: its "
                "correction depends on running statistics the first forward updated; leave it "
                "outside the checkpointed block"
            )
        chosen, _ = select_backend(input, self.backend)
        r_max, d_max = self.limits()
        cdt = compute_dtype(input.dtype, torch)
        output, mean, var = _RenormFunction.apply(
            input, self.weight, self.bias, self.running_mean.to(cdt), self.running_var.to(cdt),
            float(self.eps), r_max, d_max, chosen,
        )  # fmt: skip
        self.last_backend = chosen.name
        deliver(self, mean, var, values_per_channel(tuple(input.shape), AXIS))
        return output

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r_max={self.r_max:g}, d_max={self.d_max:g}"


def _check_renorm_settings(r_max: Any, d_max: Any, warmup: Any, r_max_at: Any, d_max_at: Any):
    check_renorm_limits(r_max, d_max)
    for value, name in ((warmup, "warmup"), (r_max_at, "r_max_at"), (d_max_at, "d_max_at")):
        if value is not None and (isinstance(value, bool) or int(value) != value or value < 0):
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")


class BatchRenorm1d(_BatchRenorm, torch.nn.BatchNorm1d):
    """Batch Renormalization for (N, C) or (N, C, L). Arguments as ``BatchNorm1d`` (momentum
    default 0.01, as in the paper's experiments; ``None`` is refused), plus keyword-only
    ``r_max`` (>= 1), ``d_max`` (>= 0), ``warmup``, ``r_max_at``, ``d_max_at``."""


class BatchRenorm2d(_BatchRenorm, torch.nn.BatchNorm2d):
    """Batch Renormalization for (N, C, H, W); arguments as :class:`BatchRenorm1d`."""


class BatchRenorm3d(_BatchRenorm, torch.nn.BatchNorm3d):
    """Batch Renormalization for (N, C, D, H, W); arguments as :class:`BatchRenorm1d`."""
