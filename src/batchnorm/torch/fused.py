"""Batch norm fused with the ReLU (and the residual add) that follow it in almost every CNN.

    batch_norm_relu:      y = relu(bn(x))
    batch_norm_add_relu:  y = relu(bn(x) + residual)      (the tail of a ResNet block)

Every backend runs them: the tail is its ``elemt`` stage with ``residual`` and ``relu=True``,
one elementwise pass after the statistics, and instead of the activation the forward keeps the
backend's ReLU mask (1 bit per element on Numba and Triton, a boolean array on the reference).
Backward sends dy back through the mask (the gradient reaching batch norm's output, which is
also the residual's gradient) and runs the batch-norm backward on it: inside the kernels on
Triton, as one extra pass on Numba. PyTorch's unfused sequence writes and re-reads the
intermediate ``bn(x)`` (and ``bn(x) + residual``) and keeps the activation for the ReLU's
backward. An empty batch takes the unfused sequence, which answers it as PyTorch does.

With ``backend="auto"``, a call small enough that our stages' fixed cost would outweigh the
fusion runs PyTorch's own kernel and then the activation in place on its output, the unfused
sequence of ``torch.nn`` (``native.py``, the same size limits and guarantees as the plain
layers); ``last_backend`` then says ``"torch"`` and the forward keeps what ``torch.nn`` keeps.

Semantics are those of ``batchnorm.torch.batch_norm`` (PyTorch's ``F.batch_norm``): running
statistics are updated in place in training (momentum weights the new batch, unbiased running
variance); bad arguments raise before any buffer changes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from .. import reference as ref
from .._xp import check_same_shape, compute_dtype
from ..kernels import select_backend
from .function import AXIS, memory_format_of
from .functional import _batch_norm, check_call, check_functional_momentum, write_batch_stats
from .modules import _check_backend_name, forward_with_buffers
from .native import NATIVE, native_batch_norm, why_not_native
from .native import module_forward as native_module_forward

__all__ = [
    "BatchNormAddReLU2d",
    "BatchNormReLU2d",
    "FusedBatchNormReLUFunction",
    "batch_norm_add_relu",
    "batch_norm_relu",
]


class FusedBatchNormReLUFunction(torch.autograd.Function):
    """``y, mean, var = apply(x, weight, bias, residual, running_mean, running_var, training,
    eps, backend)`` on ``backend``'s stages; ``residual`` may be None (BN+ReLU).

    ``mean``/``var`` (compute dtype, var biased) normalised ``x`` and serve the
    running-statistics update; in eval they are copies of the running statistics. Only ``x``,
    ``weight``, ``mean``, ``invstd`` and the ReLU mask are saved. Validation is the caller's job.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        residual: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        training: bool,
        eps: float,
        backend: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if training:
            y, mean, var, invstd, relu_mask = ref.forward_train(
                backend, x, weight, bias, eps, AXIS, residual=residual, relu=True
            )
        else:
            cdt = compute_dtype(x.dtype, torch)
            # Copies, so the outputs never alias the caller's buffers.
            mean = running_mean.to(cdt, copy=True)
            var = running_var.to(cdt, copy=True)
            invstd = ref.inverse_std(var, eps)
            y, relu_mask = backend.elemt(
                x, mean, invstd, weight, bias, AXIS, residual=residual, relu=True
            )
        ctx.save_for_backward(x, weight, mean, invstd, relu_mask)
        ctx.training, ctx.backend = training, backend
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, var)
        ctx.set_materialize_grads(False)
        return y.contiguous(memory_format=memory_format_of(x)), mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor | None, _dmean: Any, _dvar: Any) -> tuple:
        nones = (None,) * 5
        if dy is None:
            return (None,) * 4 + nones
        x, weight, mean, invstd, relu_mask = ctx.saved_tensors
        need_x, need_weight, need_bias, need_residual = ctx.needs_input_grad[:4]
        # In eval the moments are the running statistics, constants: both paths off.
        dx, dweight, dbias, dresidual = ref.backward_train(
            ctx.backend, dy, x, mean, invstd, weight, AXIS, through_mean=ctx.training,
            through_var=ctx.training, relu_mask=relu_mask, residual_grad=need_residual,
        )  # fmt: skip
        fmt = memory_format_of(x)
        return (
            dx.contiguous(memory_format=fmt) if need_x else None,
            dweight.to(weight.dtype) if need_weight else None,
            dbias.to(ctx.bias_dtype) if need_bias else None,
            dresidual.contiguous(memory_format=fmt) if need_residual else None,
        ) + nones


def batch_norm_relu(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``relu(batch_norm(input, ...))``; arguments as ``batchnorm.torch.batch_norm``.

    The chosen backend (``"auto"``: as ``explain_backend`` says) runs the fused stages; a named
    backend that cannot run on ``input`` raises ``BackendUnavailable``.
    """
    check_functional_momentum(momentum)
    return _fused(
        input,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        momentum,
        eps,
        backend=backend,
        residual=None,
    )[0]


def batch_norm_add_relu(
    input: torch.Tensor,
    residual: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``relu(batch_norm(input, ...) + residual)``; ``residual`` has ``input``'s shape and dtype.

    Arguments and backends as :func:`batch_norm_relu`.
    """
    check_functional_momentum(momentum)
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"residual must be a torch.Tensor, got {type(residual).__name__}")
    return _fused(
        input,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        momentum,
        eps,
        backend=backend,
        residual=residual,
    )[0]


def _fused(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    *,
    backend: str,
    residual: torch.Tensor | None,
    num_batches_tracked: int = 0,
    stats_sink: Any = None,
) -> tuple[torch.Tensor, str | None]:
    """``functional._batch_norm``'s arguments, then the ReLU (after adding ``residual`` when it
    is not None). Returns ``(output, what ran)``: ``"<backend> (fused)"``, ``"torch"`` where
    ``"auto"`` ran PyTorch's kernel and then the activation (``native.py``), None for an empty
    batch."""
    _check_backend_name(backend)
    if residual is not None:
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        check_same_shape(residual, input, "residual", "input")
        if residual.dtype != input.dtype:
            raise TypeError(
                f"residual has dtype {residual.dtype} but input has dtype {input.dtype}; "
                "they must be equal"
            )
        if residual.device != input.device:
            raise ValueError(
                f"residual is on {residual.device} but input is on {input.device}; "
                "they must be on the same device"
            )
    update = check_call(input, running_mean, running_var, weight, bias, training, momentum, eps)
    chosen, _ = select_backend(input, backend)
    if input.numel() == 0:  # the unfused sequence answers an empty batch as PyTorch does
        output, _ = _batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps,
            backend=backend, through_mean=True, through_var=True,
            num_batches_tracked=num_batches_tracked, stats_sink=stats_sink,
        )  # fmt: skip
        output = output if residual is None else output + residual
        return torch.relu(output), None
    if backend == "auto" and why_not_native(input, bool(training), stats_sink=stats_sink) is None:
        # A small call: PyTorch's kernel, then the activation in place on its fresh output
        # (what torch.nn's BatchNorm2d + ReLU(inplace=True) do), as in ``_batch_norm``.
        output = native_batch_norm(
            input, weight, bias, running_mean, running_var, bool(training), momentum,
            float(eps), num_batches_tracked,
        )  # fmt: skip
        if output is not None:
            return torch.relu_(output if residual is None else output.add_(residual)), NATIVE
    output, mean, var = FusedBatchNormReLUFunction.apply(
        input, weight, bias, residual, running_mean, running_var, bool(training), float(eps),
        chosen,
    )  # fmt: skip
    if update:
        write_batch_stats(
            input, running_mean, running_var, mean, var, momentum, num_batches_tracked,
            stats_sink=stats_sink, backend=chosen,
        )  # fmt: skip
    return output, f"{chosen.name} (fused)"


class _FusedBatchNorm2d(_TorchBatchNorm):
    """PyTorch's ``_BatchNorm`` buffers and ``state_dict`` (those of ``BatchNorm2d``), our forward.

    Deliberately not a subclass of ``torch.nn.BatchNorm2d``: code that fuses or folds
    "every BatchNorm2d" (conv-bn folding) would silently drop the ReLU.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        backend: str = "auto",
    ) -> None:
        extra = {} if bias else {"bias": False}  # as modules._BatchNorm
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **extra
        )
        self.backend: str = _check_backend_name(backend)
        #: What the latest forward ran: "<backend name> (fused)", or "torch" where ``"auto"``
        #: ran PyTorch's kernel and the activation after it (a small call, ``native.py``).
        self.last_backend: str | None = None

    @classmethod
    def from_batch_norm(cls, bn: torch.nn.modules.batchnorm._BatchNorm, **kwargs: Any) -> Any:
        """A fused module taking over ``bn``'s parameters and buffers (the same tensors)."""
        module = cls(
            bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, **kwargs
        )
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            setattr(module, name, getattr(bn, name))
        module.train(bn.training)
        return module

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (N, C, H, W), got {input.dim()}D input")

    #: The full gradient always (``native.module_forward`` reads the switches).
    through_mean = through_var = True

    def _run(self, input: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        if self.backend == "auto" and (residual is None or _plain_residual(residual, input)):
            # A small call: the plain layers' cheap checks and PyTorch's kernel (``native``),
            # then the activation in place on its fresh output.
            output = native_module_forward(self, input)
            if output is not None:
                return torch.relu_(output if residual is None else output.add_(residual))
        return forward_with_buffers(self, input, _fused, residual=residual)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text if self.backend == "auto" else f"{text}, backend={self.backend!r}"


class BatchNormReLU2d(_FusedBatchNorm2d):
    """``relu(BatchNorm2d(x))`` in one module; arguments as ``batchnorm.torch.BatchNorm2d``
    (without the moments-as-constants switches). ``state_dict`` is ``BatchNorm2d``'s."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._run(input, None)


class BatchNormAddReLU2d(_FusedBatchNorm2d):
    """``relu(BatchNorm2d(x) + residual)``: ``forward(input, residual)``; arguments as
    :class:`BatchNormReLU2d`."""

    def forward(self, input: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"residual must be a torch.Tensor, got {type(residual).__name__}")
        return self._run(input, residual)


def _plain_residual(residual: Any, input: Any) -> bool:
    """Whether ``residual`` can be added to ``input``'s batch norm as it is (else ``_fused``
    checks it and raises, before any buffer changes)."""
    return (
        isinstance(residual, torch.Tensor)
        and isinstance(input, torch.Tensor)
        and residual.shape == input.shape
        and residual.dtype == input.dtype
        and residual.device == input.device
    )
