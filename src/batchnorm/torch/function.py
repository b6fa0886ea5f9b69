"""The autograd ``Function``: the backend's stages forward and backward.

Forward runs the backend's ``forward_train`` (its fused one, or ``batch_stats`` + ``elemt``) or
``forward_infer``; backward runs the same backend's compact backward (``backward_train``, or
``backward_reduce`` + ``backward_elemt`` with the switches)::

    backward_reduce:  sum_dy = sum(dy),  sum_dy_xhat = sum(dy * x_hat)   -> dbias, dweight
    backward_elemt:   dx = weight*invstd/m * (m*dy - sum_dy - x_hat*sum_dy_xhat)

never autograd over primitive ops. Only ``x``, ``weight``, ``mean`` and ``invstd`` are saved;
x_hat is recomputed from them in the backward pass.

Double backward: when the backward itself runs with grad enabled (``create_graph=True``), the
reference's stages are evaluated with differentiable torch ops (the one backend whose stages
are themselves differentiable), and ``mean``/``invstd`` are
*recomputed from x* rather than taken from the saved (constant) tensors, because in training they
are functions of x and the second derivative must see that. The gradient is then itself a
differentiable function, as in Chainer, and autograd differentiates the derived formula.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import reference as ref
from .._xp import compute_dtype, namespace, per_channel, reduce_axes, values_per_channel

__all__ = ["BatchNormFunction", "apply_batch_norm", "memory_format_of"]

#: Channel axis of every PyTorch batch-norm input, (N, C, *): also for channels_last tensors,
#: whose *logical* layout is still (N, C, H, W).
AXIS = 1


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """The memory format PyTorch's own batch norm gives its output and grad_input for ``x``."""
    if not x.is_contiguous():
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
        if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
            return torch.channels_last_3d
    return torch.contiguous_format


def _detached_moments(
    x: torch.Tensor, eps: float, through_mean: bool, through_var: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, invstd)`` of x as differentiable functions of x, for double backward.

    A moment that the first backward treats as a constant (``through_mean``/``through_var`` off)
    is detached here, so the second derivative is that of the same detached graph. With the mean
    detached the variance is taken about that constant: var_c(x) = mean((x - c)^2), whose second
    derivative differs from that of the batch variance even though the values agree.
    """
    stats = ref.batch_stats(x, AXIS)
    mean, var = stats.mean, stats.var
    if not through_mean:
        xp = namespace(x)
        mean = mean.detach()
        centred = xp.astype(x, mean.dtype) - per_channel(mean, x.ndim, AXIS, xp)
        var = xp.mean(centred * centred, axis=reduce_axes(x.ndim, AXIS))
    invstd = ref.inverse_std(var, eps)
    if not through_var:
        invstd = invstd.detach()
    return mean, invstd


class BatchNormFunction(torch.autograd.Function):
    """``y, mean, var, invstd = BatchNormFunction.apply(x, weight, bias, running_mean,
    running_var, training, eps, backend, through_mean, through_var)``.

    ``backend`` is a resolved backend object (see ``batchnorm.kernels.select_backend``).
    ``mean`` and ``var`` (biased) are the statistics that normalised ``x``, and ``invstd``
    1/sqrt(var + eps), in the compute dtype (float32, or float64 for float64 input); they are
    not differentiable outputs and serve the running-statistics update. In eval mode they are
    the running statistics. Validation is the caller's job (``batchnorm.torch.batch_norm`` does
    it before any state changes).

    Written with ``setup_context`` (forward without ``ctx``), so that ``torch.func.grad``,
    ``vjp`` and ``jacrev`` can use it, and with a ``jvp`` for forward-mode AD
    (``torch.func.jvp``, ``torch.autograd.forward_ad``). ``torch.func.vmap`` (and so
    ``jacfwd``) is not supported: the backends run whole tensors, not per-sample slices.
    """

    @staticmethod
    def forward(
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        training: bool,
        eps: float,
        backend: Any,
        through_mean: bool = True,
        through_var: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        fmt = memory_format_of(x)
        if training:
            y, mean, var, invstd, _ = ref.forward_train(backend, x, weight, bias, eps, AXIS)
        else:
            y = backend.forward_infer(x, running_mean, running_var, weight, bias, eps, AXIS)
            cdt = compute_dtype(x.dtype, namespace(x))
            # Copies, so the outputs never alias the caller's buffers.
            mean = running_mean.to(cdt, copy=True)
            var = running_var.to(cdt, copy=True)
            invstd = ref.inverse_std(var, eps)
        return y.contiguous(memory_format=fmt), mean, var, invstd

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        inputs = tuple(inputs) + (True, True)[len(inputs) - 8 :]  # the switches' defaults
        x, weight, bias, _, _, training, eps, backend, through_mean, through_var = inputs
        _, mean, var, invstd = output
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.save_for_forward(x, weight, mean, invstd)
        ctx.training, ctx.eps, ctx.backend = training, eps, backend
        ctx.through_mean, ctx.through_var = through_mean, through_var
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, var, invstd)
        ctx.set_materialize_grads(False)

    @staticmethod
    def jvp(ctx: Any, dx: Any, dweight: Any, dbias: Any, *_: Any) -> tuple:
        """Tangent of y: weight * dx_hat + dweight * x_hat + dbias, where in training
        dx_hat = invstd * (dx - mean(dx) - x_hat * mean(x_hat * dx)) (the two means are the
        paths through the batch mean and variance; the switches drop them as the backward does)
        and in eval dx_hat = invstd * dx."""
        x, weight, mean, invstd = ctx.saved_tensors
        xp, nd = namespace(x), x.ndim
        axes = reduce_axes(nd, AXIS)
        x_hat = (x.to(mean.dtype) - per_channel(mean, nd, AXIS, xp)) * per_channel(
            invstd, nd, AXIS, xp
        )
        dy = None
        if dx is not None:
            d = dx.to(mean.dtype)
            if ctx.training and ctx.through_mean:
                d = d - d.mean(dim=axes, keepdim=True)
            if ctx.training and ctx.through_var:
                d = d - x_hat * (x_hat * dx.to(mean.dtype)).mean(dim=axes, keepdim=True)
            dy = d * per_channel(invstd, nd, AXIS, xp)
            if weight is not None:
                dy = dy * per_channel(weight.to(mean.dtype), nd, AXIS, xp)
        if dweight is not None:
            term = x_hat * per_channel(dweight.to(mean.dtype), nd, AXIS, xp)
            dy = term if dy is None else dy + term
        if dbias is not None:
            term = per_channel(dbias.to(mean.dtype), nd, AXIS, xp).expand_as(x_hat)
            dy = term if dy is None else dy + term
        if dy is not None:
            dy = dy.to(x.dtype).contiguous(memory_format=memory_format_of(x))
        return dy, None, None, None

    @staticmethod
    def backward(
        ctx: Any, dy: torch.Tensor | None, _dmean: Any, _dvar: Any, _dinvstd: Any
    ) -> tuple:
        nones = (None,) * 7
        if dy is None:
            return (None, None, None) + nones
        x, weight, mean, invstd = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            dx, dweight, dbias = _differentiable_backward(ctx, dy, x, weight, mean, invstd)
            if dx is not None and x.requires_grad and not dx.requires_grad:
                if not torch._C._are_functorch_transforms_active():  # they track it themselves
                    dx = _ConstantIn.apply(dx, x)
        else:
            dx, dweight, dbias = _backend_backward(ctx, dy, x, weight, mean, invstd)
        if dx is not None:
            dx = dx.contiguous(memory_format=memory_format_of(x))
        if weight is not None and dweight is not None:
            dweight = dweight.to(weight.dtype)
        if ctx.bias_dtype is not None and dbias is not None:
            dbias = dbias.to(ctx.bias_dtype)
        return (
            dx if need_x else None,
            dweight if need_weight else None,
            dbias if need_bias else None,
        ) + nones


class _ConstantIn(torch.autograd.Function):
    """``dx`` as a function of ``x`` with a zero derivative (None). Where dx does not depend on
    x (evaluation, or both moments switches off) and dy needs no gradient, the graph of a
    ``create_graph=True`` gradient would end here, and a gradient penalty's backward raise
    ("does not require grad"); ATen's evaluation double backward links it, with None for x."""

    @staticmethod
    def forward(dx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return dx.clone()  # not a view: a view of a Function's output refuses in-place changes

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:  # torch.func wants it
        pass

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return grad, None


def _backend_backward(ctx, dy, x, weight, mean, invstd):
    """First-order backward through the backend's stages (no graph is recorded)."""
    backend = ctx.backend
    need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
    # In eval the moments are constants (running statistics): both switches off.
    through_mean = ctx.training and ctx.through_mean
    through_var = ctx.training and ctx.through_var
    if need_x and through_mean and through_var:
        return ref.backward_train(backend, dy, x, mean, invstd, weight, AXIS)[:3]
    sum_dy = sum_dy_xhat = None
    if need_weight or need_bias or through_mean or through_var:
        sum_dy, sum_dy_xhat = backend.backward_reduce(dy, x, mean, invstd, AXIS)
    dx = None
    if need_x:
        count = values_per_channel(tuple(x.shape), AXIS)
        dx = backend.backward_elemt(
            dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count, AXIS,
            through_mean=through_mean, through_var=through_var,
        )  # fmt: skip
    return dx, sum_dy_xhat, sum_dy


def _differentiable_backward(ctx, dy, x, weight, mean, invstd):
    """The same formulas with torch ops that record a graph, for ``create_graph=True``."""
    if ctx.training:
        mean, invstd = _detached_moments(x, ctx.eps, ctx.through_mean, ctx.through_var)
    sum_dy, sum_dy_xhat = ref.backward_reduce(dy, x, mean, invstd, AXIS)
    dx = ref.backward_elemt(
        dy,
        x,
        mean,
        invstd,
        weight,
        sum_dy,
        sum_dy_xhat,
        values_per_channel(tuple(x.shape), AXIS),
        AXIS,
        through_mean=ctx.training and ctx.through_mean,
        through_var=ctx.training and ctx.through_var,
    )
    return dx, sum_dy_xhat, sum_dy


def apply_batch_norm(*args: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``BatchNormFunction.apply`` where a gradient can be asked for; the same forward called
    directly where none can (no input requires grad, or grad mode is off, and no forward-mode
    AD or torch.func transform is active): an evaluation layer then skips the autograd
    machinery, which on a small layer cost more than the kernel (``Function.apply`` inspects
    the forward's signature on every call). ``args`` are those of ``BatchNormFunction.apply``.
    An evaluation call without a gradient returns ``(y, None, None, None)``: the statistics
    serve the running-statistics update and the backward, neither of which follows it, and
    copying them cost three small ops (on a GPU, three launches).
    """
    x, weight, bias = args[:3]
    if torch._C._are_functorch_transforms_active():
        return BatchNormFunction.apply(*args)
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias)
    )
    if wants_grad or torch.autograd.forward_ad._current_level >= 0:
        # What ``Function.apply`` does outside torch.func, less its binding of the forward's
        # default arguments through ``inspect.signature`` (24 us a call, a tenth of a small
        # layer's training step): ``setup_context`` fills in the two defaults itself.
        return _APPLY(*args)
    if not args[5]:
        running_mean, running_var, _, eps, backend = args[3:8]
        y = backend.forward_infer(x, running_mean, running_var, weight, bias, eps, AXIS)
        return y.contiguous(memory_format=memory_format_of(x)), None, None, None
    return BatchNormFunction.forward(*args)


#: The C++ ``apply`` that ``torch.autograd.Function.apply`` ends in.
_APPLY = super(torch.autograd.Function, BatchNormFunction).apply
