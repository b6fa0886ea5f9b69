"""``TritonBackend``: the stage protocol (``batchnorm.reference.stages``) on the Triton kernels."""

from __future__ import annotations

from typing import Any

import torch

from ...reference.stages import BackwardOut, Elemt, ForwardOut
from ...reference.stats import BatchStats
from ..dynamo import outside_torch_compile
from . import launchers as run
from . import masked as masked_run
from .layout import _check_mask, _in_layout_of, _view
from .runtime import is_interpreter, triton_unavailable_reason

__all__ = ["SUPPORTED_DTYPES", "TritonBackend"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class TritonBackend:
    """The stage protocol on Triton kernels (CUDA tensors; CPU under the interpreter), with
    fused ``forward_train`` and ``backward_train`` that read the 1-bit ReLU mask in-kernel,
    and the ``mask=`` option (padded batches) on the kernels of ``masked_kernels``. Every stage
    runs outside ``torch.compile``'s Dynamo (``kernels.dynamo``)."""

    name = "triton"
    supports_mask = True

    def unavailable_reason(self, x: Any) -> str | None:
        reason = triton_unavailable_reason()
        if reason is not None:
            return reason
        if not isinstance(x, torch.Tensor):
            kind = f"{type(x).__module__}.{type(x).__qualname__}"
            return f"the Triton backend takes torch tensors, got {kind}"
        if x.dtype not in SUPPORTED_DTYPES:
            return (
                f"dtype {x.dtype} is not supported by the Triton kernels (float32, float16, "
                "bfloat16); the reference backend computes float64 in float64"
            )
        if x.device.type != "cuda" and not is_interpreter():
            return (
                f"the tensor is on {x.device}; the Triton kernels need a CUDA device (set "
                "TRITON_INTERPRET=1 before importing triton to run them on CPU, slowly)"
            )
        return None

    @outside_torch_compile
    def batch_stats(self, x, axis, *, mask=None):
        if mask is not None:
            return BatchStats(*masked_run.batch_stats(x, axis, mask))
        count, mean, var, _ = run.batch_stats(x, axis)
        return BatchStats(count, mean, var)

    @outside_torch_compile
    def elemt(self, x, mean, invstd, gamma, beta, axis, *, residual=None, relu=False, mask=None):
        if mask is not None:
            if residual is not None or relu:
                raise ValueError("mask= does not combine with residual= or relu=")
            y = masked_run.elemt(x, mean, invstd, gamma, beta, axis, mask)
            return Elemt(y, None)
        return Elemt(*run.elemt(x, mean, invstd, gamma, beta, axis, residual=residual, relu=relu))

    @outside_torch_compile
    def forward_infer(self, x, running_mean, running_var, gamma, beta, eps, axis):
        return run.forward_infer(x, running_mean, running_var, gamma, beta, eps, axis)[0]

    @outside_torch_compile
    def forward_train(self, x, gamma, beta, eps, axis, *, residual=None, relu=False):
        return ForwardOut(
            *run.forward_train(x, gamma, beta, eps, axis, residual=residual, relu=relu)
        )

    @outside_torch_compile
    def backward_reduce(self, dy, x, mean, invstd, axis, *, mask=None):
        if mask is not None:
            return masked_run.backward_reduce(dy, x, mean, invstd, axis, mask)
        return run.backward_reduce(dy, x, mean, invstd, axis)

    @outside_torch_compile
    def backward_elemt(
        self, dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, count, axis, *,
        through_mean=True, through_var=True, mask=None,
    ):  # fmt: skip
        # A switched-off path never reads its sum (the kernel's constexpr drops it).
        sum_dy = torch.zeros_like(mean) if sum_dy is None else sum_dy
        sum_dy_xhat = torch.zeros_like(mean) if sum_dy_xhat is None else sum_dy_xhat
        if mask is not None:
            return masked_run.backward_elemt(
                dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, count, axis, mask,
                through_mean=through_mean, through_var=through_var,
            )  # fmt: skip
        return run.backward_elemt(
            dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, count, axis,
            through_mean=through_mean, through_var=through_var,
        )[0]  # fmt: skip

    @outside_torch_compile
    def update_running(self, running_mean, running_var, mean, var, count, weight_new):
        """The running-statistics update in one kernel launch (``launchers.update_running``);
        False where it does not take these tensors (nothing written)."""
        return run.update_running(running_mean, running_var, mean, var, count, weight_new)

    @outside_torch_compile
    def relu_backward(self, dy, x, relu_mask, axis):
        """dy where the bit is set. The fused ``backward_train`` reads the bits inside its
        kernels; this unpacks them with torch ops, for compositions of the stages."""
        view = _view(x, axis)
        _check_mask(relu_mask, view)
        plan = view.plan
        shifts = torch.arange(8, dtype=torch.uint8, device=relu_mask.device)
        if plan.pack_i:  # bytes (outer, C, ceil(inner / 8)), bit i % 8
            packed = relu_mask.view(plan.outer, plan.channels, -1)
            bits = (packed[..., None] >> shifts) & 1
            keep = bits.reshape(plan.outer, plan.channels, -1)[..., : plan.inner]
        else:  # bytes (ceil(outer / 8), C, inner), bit o % 8
            packed = relu_mask.view(-1, plan.channels, plan.inner)
            bits = (packed[:, None] >> shifts[None, :, None, None]) & 1
            keep = bits.reshape(-1, plan.channels, plan.inner)[: plan.outer]
        dy = _in_layout_of(dy, view.x, "dy")
        # keep is in memory order; give it dy's logical shape through the same strides.
        keep = keep.reshape(-1).bool()
        memory = dy.permute(*_memory_order(dy)).reshape(-1)
        out = torch.where(keep, memory, torch.zeros_like(memory))
        return out.reshape(dy.permute(*_memory_order(dy)).shape).permute(
            *_inverse(_memory_order(dy))
        )

    @outside_torch_compile
    def backward_train(
        self, dy, x, mean, invstd, gamma, axis, *, through_mean=True, through_var=True,
        relu_mask=None, residual_grad=False,
    ):  # fmt: skip
        return BackwardOut(
            *run.backward_train(
                dy, x, mean, invstd, gamma, axis, mask=relu_mask, through_mean=through_mean,
                through_var=through_var, residual_grad=residual_grad,
            )
        )  # fmt: skip


def _memory_order(t: torch.Tensor) -> list[int]:
    """Axes of a dense tensor from the largest stride to the smallest (ties by position)."""
    return sorted(range(t.dim()), key=lambda i: (-t.stride(i), i))


def _inverse(perm: list[int]) -> list[int]:
    inverse = [0] * len(perm)
    for position, axis in enumerate(perm):
        inverse[axis] = position
    return inverse
