"""Masked batch norm for padded batches: statistics, running statistics and gradients over the
real positions only.

For (N, C, L) input (or any (N, C, *)) and a boolean ``mask`` of shape (N, L) (the input's shape
without the channel axis; True = a real value), the layer normalises exactly as ordinary batch
norm applied to the real positions alone, and writes 0 at the padded ones. The output at real
positions does not depend on how much padding there is or what it holds (NaN included), and no
gradient reaches a padded input. A sequence model's (N, L, C) activations go in as
``x.transpose(1, 2)``: a (N, C, L) view of channels-last memory, which the backends read in
place.

Two ways to run it, chosen per call (``masked_path``; ``explain_backend(x, mask=mask)`` says
which):

* *native*: the backend's stages with their ``mask=`` option (``supports_mask``: the reference,
  Numba, Triton), through :class:`MaskedBatchNormFunction`: the kernels skip the padded
  positions while reducing, and the tensor is read in place.
* *compaction*, the fallback: the real positions are gathered into a dense (n, C) batch, run
  through the backend's ordinary stages (same validation, update and collectives, with count
  n) and scattered back. It serves a backend without the option, forward-mode AD and
  ``torch.func`` transforms (the native Function has no ``jvp``), and a batch with no real
  position at all (which, as an empty batch, updates nothing).
"""

from __future__ import annotations

from typing import Any

import torch

from .. import reference as ref
from .._xp import compute_dtype, per_channel, reduce_axes
from ..reference.masked import (
    masked_backward_elemt,
    masked_backward_reduce,
    masked_batch_stats,
)
from ..reference.stages import has_masked_stages
from .function import AXIS

__all__ = [
    "MaskedBatchNormFunction",
    "check_mask",
    "compact",
    "expand",
    "masked_path",
    "real_count",
]


def check_mask(mask: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """``mask`` if it fits ``input``, else a ``TypeError``/``ValueError`` naming what is wrong."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor of booleans, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must have dtype torch.bool (True = a real value), got {mask.dtype}")
    if not isinstance(input, torch.Tensor) or input.dim() < 2:
        raise ValueError("a mask needs an input of shape (N, C, *)")
    want = (input.shape[0], *input.shape[2:])
    if tuple(mask.shape) != want:
        raise ValueError(
            f"mask must have the input's shape without the channel axis, {want}, for input of "
            f"shape {tuple(input.shape)}; got {tuple(mask.shape)}"
        )
    if mask.device != input.device:
        raise ValueError(f"mask is on {mask.device} but the input is on {input.device}")
    return mask


def real_count(mask: torch.Tensor) -> int:
    """m, the number of real positions (a host read: on a GPU, one synchronisation)."""
    return int(mask.sum())


def masked_path(backend: Any, input: torch.Tensor | None = None, count: int | None = None) -> str:
    """``"native"`` (the backend's masked stages) or ``"compaction"`` (gather, plain stages,
    scatter), for this backend, input and count of real positions."""
    if not has_masked_stages(backend):
        return "compaction"
    if torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0:
        return "compaction"
    if count == 0 or (input is not None and input.numel() == 0):
        return "compaction"
    return "native"


def compact(input: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The real positions as a dense (n, C) batch (differentiable: a gather)."""
    return input.movedim(AXIS, -1)[mask]


def expand(values: torch.Tensor, mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(n, C) ``values`` back at the real positions of ``like``'s shape, 0 elsewhere
    (differentiable: a scatter), channels last in memory where ``like`` is (an (N, L, C)
    sequence seen as (N, C, L), channels_last images), else contiguous."""
    out = values.new_zeros(like.movedim(AXIS, -1).shape)
    out = out.index_put((mask,), values).movedim(-1, AXIS)
    return out if like.movedim(AXIS, -1).is_contiguous() else out.contiguous()


def in_layout_of(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` channels-last in memory where ``like`` is (as ``expand``), else contiguous."""
    if like.movedim(AXIS, -1).is_contiguous() and not like.is_contiguous():
        return t.movedim(AXIS, -1).contiguous().movedim(-1, AXIS)
    return t.contiguous()


class MaskedBatchNormFunction(torch.autograd.Function):
    """``y, mean, var, invstd = apply(x, weight, bias, running_mean, running_var, training, eps,
    backend, through_mean, through_var, mask, count)``: ``BatchNormFunction`` over the real
    positions, on the backend's masked stages. ``count`` is m, the number of real positions
    (validated by the caller: > 1 in training). The backward is the same backend's masked
    ``backward_reduce`` + ``backward_elemt``; under ``create_graph=True`` the reference's masked
    math in differentiable torch ops, the moments recomputed from x."""

    @staticmethod
    def forward(x, weight, bias, running_mean, running_var, training, eps, backend,
                through_mean, through_var, mask, count):  # fmt: skip
        if training:
            out = ref.forward_train(backend, x, weight, bias, eps, AXIS, mask=mask)
            y, mean, var, invstd = out.y, out.mean, out.var, out.invstd
        else:
            cdt = compute_dtype(x.dtype, torch)
            mean = running_mean.to(cdt, copy=True)
            var = running_var.to(cdt, copy=True)
            invstd = ref.inverse_std(var, eps)
            y = backend.elemt(x, mean, invstd, weight, bias, AXIS, mask=mask).y
        return in_layout_of(y, x), mean, var, invstd

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        x, weight, bias, _, _, training, eps, backend, through_mean, through_var, mask, count = (
            inputs
        )
        _, mean, var, invstd = output
        ctx.save_for_backward(x, weight, mean, invstd, mask)
        ctx.training, ctx.eps, ctx.backend, ctx.count = training, eps, backend, count
        ctx.through_mean, ctx.through_var = through_mean, through_var
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, var, invstd)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor | None, *_: Any) -> tuple:
        nones = (None,) * 9
        if dy is None:
            return (None, None, None) + nones
        x, weight, mean, invstd, mask = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        through_mean = ctx.training and ctx.through_mean
        through_var = ctx.training and ctx.through_var
        if torch.is_grad_enabled():
            dx, dweight, dbias = _differentiable_backward(ctx, dy, x, weight, mask)
        elif need_x and through_mean and through_var:
            dx, dweight, dbias = ref.backward_train(
                ctx.backend, dy, x, mean, invstd, weight, AXIS, mask=mask, count=ctx.count
            )[:3]
        else:
            dweight = dbias = dx = None
            if need_weight or need_bias or through_mean or through_var:
                dbias, dweight = ctx.backend.backward_reduce(dy, x, mean, invstd, AXIS, mask=mask)
            if need_x:
                dx = ctx.backend.backward_elemt(
                    dy, x, mean, invstd, weight, dbias, dweight, ctx.count, AXIS,
                    through_mean=through_mean, through_var=through_var, mask=mask,
                )  # fmt: skip
        if dx is not None:
            dx = in_layout_of(dx, x)
        if weight is not None and dweight is not None:
            dweight = dweight.to(weight.dtype)
        if ctx.bias_dtype is not None and dbias is not None:
            dbias = dbias.to(ctx.bias_dtype)
        return (
            dx if need_x else None,
            dweight if need_weight else None,
            dbias if need_bias else None,
        ) + nones


def _differentiable_backward(ctx, dy, x, weight, mask):
    """The reference's masked backward in torch ops that record a graph (double backward):
    in training the moments are functions of x, recomputed here (a moment the first backward
    holds constant is detached, and the variance then taken about the detached mean)."""
    _, _, mean, invstd, _ = ctx.saved_tensors
    if ctx.training:
        stats = masked_batch_stats(x, mask, AXIS)
        mean, var = stats.mean, stats.var
        if not ctx.through_mean:
            mean = mean.detach()
            real = mask.unsqueeze(AXIS)
            centred = x.to(mean.dtype) - per_channel(mean, x.ndim, AXIS, torch)
            centred = torch.where(real, centred, torch.zeros_like(centred))
            var = (centred * centred).sum(dim=reduce_axes(x.ndim, AXIS)) / ctx.count
        invstd = ref.inverse_std(var, ctx.eps)
        if not ctx.through_var:
            invstd = invstd.detach()
    sum_dy, sum_dy_xhat = masked_backward_reduce(dy, x, mask, mean, invstd, AXIS)
    dx = masked_backward_elemt(
        dy, x, mask, mean, invstd, weight, sum_dy, sum_dy_xhat, ctx.count, AXIS,
        through_mean=ctx.training and ctx.through_mean,
        through_var=ctx.training and ctx.through_var,
    )  # fmt: skip
    return dx, sum_dy_xhat, sum_dy
