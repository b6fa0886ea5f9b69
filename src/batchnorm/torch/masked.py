"""Masked batch norm for padded batches: statistics, running statistics and gradients over the
real positions only.

For (N, C, L) input (or any (N, C, *)) and a boolean ``mask`` of shape (N, L) (the input's shape
without the channel axis; True = a real value), the layer normalises exactly as ordinary batch
norm applied to the real positions alone, and writes 0 at the padded ones. The output at real
positions does not depend on how much padding there is or what it holds (NaN included), and no
gradient reaches a padded input. A sequence model's (N, L, C) activations go in as
``x.transpose(1, 2)``: a (N, C, L) view of channels-last memory, which the backends read in
place.

How: the real positions are gathered into a dense (n, C) batch, run through the same stages
(and the same validation, running-statistics update, SyncBatchNorm collectives, with count n),
and scattered back. Every backend therefore runs it; the price is the gather and the scatter,
each one pass over the real values (a kernel that skipped padded positions while reducing would
avoid them: not written yet).
"""

from __future__ import annotations

import torch

from .function import AXIS

__all__ = ["check_mask", "compact", "expand"]


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
