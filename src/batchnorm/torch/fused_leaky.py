"""Batch norm fused with a LeakyReLU that keeps only its *output* for the backward (In-Place ABN).

    z = gamma * x_hat + beta,   y = leaky_relu(z) = z if z > 0 else slope * z     (slope > 0)

Rota Bulò, Porzi and Kontschieder (2018), "In-Place Activated BatchNorm for Memory-Optimized
Training of DNNs", Sec. 3: an invertible activation lets the backward recompute what it needs
from the output, so neither x nor z is kept. Here:

    z     = y if y > 0 else y / slope            (the activation's inverse)
    dz    = dy if y > 0 else slope * dy          (its derivative; y > 0 exactly where z > 0)
    x_hat = (z - beta) / gamma

and then the usual compact backward (``backward_reduce`` + ``backward_elemt``) on ``dz``. That
backward is run by the backend's own stages, handed ``x := z``, ``mean := beta`` and
``invstd := 1/gamma`` (so that its ``(x - mean) * invstd`` is x_hat) and ``weight :=
gamma^2 * invstd`` (so that its ``weight * invstd`` is the true ``gamma * invstd``): every
backend that implements the stage protocol (reference, Numba, Triton) runs it unchanged.

Saved: ``y`` (which the next layer usually keeps anyway, so the storage is shared) and four
per-channel vectors. PyTorch's unfused BatchNorm2d + LeakyReLU keeps ``x`` and ``z``.

**Gamma near zero.** x_hat = (z - beta) / gamma loses x_hat to cancellation when |gamma| is
small (in the limit gamma = 0, y carries no information about x at all). A call in which some
channel has ``|gamma| < gamma_guard`` (default 1e-3) therefore saves ``x`` instead, as an
unfused layer would, and recomputes z from it: exact, without the memory saving; the module's
``last_backend`` then ends in ``"(fused, x saved)"``. The test reads gamma on the host once per
call; on a GPU that waits for every kernel queued before it (under ``torch.export``, which has
no values to read, ``x`` is saved). ``gamma_guard=0`` turns the guard
off (the output is always what is saved) and the read with it; then a channel whose gamma is
exactly 0 gets NaN gradients (its x_hat cannot be recovered at all), and ResNets initialised
with ``zero_init_residual`` start with such channels. In float16/bfloat16 the
recomputed x_hat carries the rounding of the stored output (as in In-Place ABN).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from .. import reference as ref
from .._xp import compute_dtype
from ..kernels import select_backend
from .function import AXIS, memory_format_of
from .functional import _batch_norm, check_call, check_functional_momentum, write_batch_stats
from .fused import _FusedBatchNorm2d
from .modules import _check_backend_name, forward_with_buffers

__all__ = ["BatchNormLeakyReLU2d", "FusedBatchNormLeakyReLUFunction", "batch_norm_leaky_relu"]

#: A call saves x instead of the output when some channel's |gamma| is below this.
GAMMA_GUARD = 1e-3


def check_slope(negative_slope: Any) -> float:
    """The activation must be invertible: a finite slope > 0 (0 would be the ReLU)."""
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, int | float):
        raise TypeError(f"negative_slope must be a float > 0, got {negative_slope!r}")
    if not (math.isfinite(negative_slope) and negative_slope > 0):
        raise ValueError(
            f"negative_slope must be finite and > 0 (invertible), got {negative_slope!r}"
        )
    return float(negative_slope)


def check_gamma_guard(gamma_guard: Any) -> float:
    """A finite threshold >= 0 on |gamma|; 0 never saves x (and reads nothing on the host)."""
    if isinstance(gamma_guard, bool) or not isinstance(gamma_guard, numbers.Real):
        raise TypeError(f"gamma_guard must be a float >= 0, got {gamma_guard!r}")
    if not (math.isfinite(gamma_guard) and gamma_guard >= 0):
        raise ValueError(f"gamma_guard must be finite and >= 0, got {gamma_guard!r}")
    return float(gamma_guard)


class FusedBatchNormLeakyReLUFunction(torch.autograd.Function):
    """``y, mean, var = apply(x, weight, bias, running_mean, running_var, training, eps,
    backend, negative_slope, from_output)``; ``from_output``: save the output (In-Place ABN)
    rather than x (the caller's gamma guard decides); see the module docstring."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        training: bool,
        eps: float,
        backend: Any,
        slope: float,
        from_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if training:
            y, mean, var, invstd, _ = ref.forward_train(backend, x, weight, bias, eps, AXIS)
        else:
            cdt = compute_dtype(x.dtype, torch)
            mean = running_mean.to(cdt, copy=True)  # copies: never alias the buffers
            var = running_var.to(cdt, copy=True)
            invstd = ref.inverse_std(var, eps)
            y = backend.forward_infer(x, running_mean, running_var, weight, bias, eps, AXIS)
        y = y.contiguous(memory_format=memory_format_of(x))
        if y is x:  # never write into the caller's input
            y = y.clone()
        torch.nn.functional.leaky_relu_(y, slope)
        ctx.from_output = from_output
        if from_output:
            ctx.save_for_backward(y, weight, bias, invstd)
        else:
            ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.training, ctx.backend, ctx.slope = training, backend, slope
        ctx.mark_non_differentiable(mean, var)
        ctx.set_materialize_grads(False)
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor | None, _dmean: Any, _dvar: Any) -> tuple:
        nones = (None,) * 7
        if dy is None:
            return (None,) * 3 + nones
        slope = ctx.slope
        if ctx.from_output:
            y, weight, bias, invstd = ctx.saved_tensors
            cdt = invstd.dtype
            gamma = torch.ones_like(invstd) if weight is None else weight.to(cdt)
            beta = torch.zeros_like(invstd) if bias is None else bias.to(cdt)
            positive = y > 0
            x_r = torch.where(positive, y, y / slope)  # z, the activation's inverse
            mean_r = beta
            invstd_r = 1.0 / gamma
            weight_r = gamma * gamma * invstd  # weight_r * invstd_r = gamma * invstd
            fmt = memory_format_of(y)
        else:
            x_r, weight, bias, mean_r, invstd_r = ctx.saved_tensors
            weight_r = weight
            z = ctx.backend.elemt(x_r, mean_r, invstd_r, weight, bias, AXIS).y
            positive = z > 0
            fmt = memory_format_of(x_r)
        dz = torch.where(positive, dy, dy * slope)
        dx, dweight, dbias, _ = ref.backward_train(
            ctx.backend, dz.contiguous(memory_format=fmt), x_r, mean_r, invstd_r, weight_r,
            AXIS, through_mean=ctx.training, through_var=ctx.training,
        )  # fmt: skip
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        return (
            dx.contiguous(memory_format=fmt) if need_x else None,
            dweight.to(weight.dtype) if need_weight else None,
            dbias.to(bias.dtype) if need_bias else None,
        ) + nones


def batch_norm_leaky_relu(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    negative_slope: float = 0.01,
    backend: str = "auto",
    gamma_guard: float = GAMMA_GUARD,
) -> torch.Tensor:
    """``leaky_relu(batch_norm(input, ...), negative_slope)``, saving only the output for the
    backward (see the module docstring); other arguments as ``batchnorm.torch.batch_norm``."""
    check_functional_momentum(momentum)
    return _fused_leaky(
        input, running_mean, running_var, weight, bias, training, momentum, eps,
        backend=backend, negative_slope=negative_slope, gamma_guard=gamma_guard,
    )[0]  # fmt: skip


def _fused_leaky(
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
    negative_slope: float,
    gamma_guard: float = GAMMA_GUARD,
    num_batches_tracked: int = 0,
    stats_sink: Any = None,
) -> tuple[torch.Tensor, str | None]:
    """``fused._fused`` for the LeakyReLU: validate everything, run, then write the buffers."""
    _check_backend_name(backend)
    slope = check_slope(negative_slope)
    guard = check_gamma_guard(gamma_guard)
    update = check_call(input, running_mean, running_var, weight, bias, training, momentum, eps)
    chosen, _ = select_backend(input, backend)
    # The gamma guard (module docstring): one host read per call, which on a GPU waits for
    # the kernels queued before it; gamma_guard=0 skips both. torch.export traces without
    # values to read: there x is saved, which is right for every gamma.
    if weight is None or guard == 0:
        from_output = True
    elif torch.compiler.is_exporting():
        from_output = False
    else:
        from_output = bool((weight.detach().abs() >= guard).all())
    if input.numel() == 0:  # the unfused sequence answers an empty batch as PyTorch does
        output, _ = _batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps,
            backend=backend, through_mean=True, through_var=True,
            num_batches_tracked=num_batches_tracked, stats_sink=stats_sink,
        )  # fmt: skip
        return torch.nn.functional.leaky_relu(output, slope), None
    output, mean, var = FusedBatchNormLeakyReLUFunction.apply(
        input, weight, bias, running_mean, running_var, bool(training), float(eps), chosen,
        slope, from_output,
    )  # fmt: skip
    if update:
        write_batch_stats(
            input, running_mean, running_var, mean, var, momentum, num_batches_tracked,
            stats_sink=stats_sink, backend=chosen,
        )  # fmt: skip
    return output, f"{chosen.name} (fused{'' if from_output else ', x saved'})"


class BatchNormLeakyReLU2d(_FusedBatchNorm2d):
    """``leaky_relu(BatchNorm2d(x), negative_slope)`` in one module that keeps only its output
    for the backward; arguments as :class:`BatchNormReLU2d` plus ``negative_slope`` (> 0,
    default 0.01 as ``torch.nn.LeakyReLU``) and ``gamma_guard`` (the module docstring; 0 turns
    the guard and its host read off). ``state_dict`` is ``BatchNorm2d``'s."""

    gamma_guard: float = GAMMA_GUARD  # modules pickled before the argument existed

    def __init__(
        self,
        num_features: int,
        *args: Any,
        negative_slope: float = 0.01,
        gamma_guard: float = GAMMA_GUARD,
        **kw: Any,
    ):
        slope, guard = check_slope(negative_slope), check_gamma_guard(gamma_guard)
        super().__init__(num_features, *args, **kw)
        self.negative_slope: float = slope
        self.gamma_guard = guard

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return forward_with_buffers(
            self, input, _fused_leaky, negative_slope=self.negative_slope,
            gamma_guard=self.gamma_guard,
        )  # fmt: skip

    def extra_repr(self) -> str:
        guard = "" if self.gamma_guard == GAMMA_GUARD else f", gamma_guard={self.gamma_guard}"
        return f"{super().extra_repr()}, negative_slope={self.negative_slope}{guard}"
