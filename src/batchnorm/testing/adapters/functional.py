"""The functional style: a function like ``torch.nn.functional.batch_norm``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..cases import Case, CaseData
from .base import ImplementationError, Session, Style, call_user, check_device, takes_mask
from .torch_io import TorchIO


class FunctionalStyle(Style):
    """``fn(input, running_mean, running_var, weight=None, bias=None, training=False,
    momentum=0.1, eps=1e-5)`` like ``torch.nn.functional.batch_norm``: updates the running
    tensors in place when training; gradients by autograd."""

    style = "functional"
    #: Like torch.nn.BatchNorm / F.batch_norm: PyTorch's running-statistics conventions.
    conventions = ("torch", "unbiased")
    grad_order = "(grad weight, grad bias)"

    def __init__(self, fn: Callable[..., Any], device: str = "cpu") -> None:
        self.fn, self.device = fn, check_device(device)
        name = getattr(fn, "__name__", "fn")
        self.signature = (
            f"{name}(input, running_mean, running_var, weight=, bias=, training=, "
            f"momentum=, eps=) on {device}"
        )

    @classmethod
    def from_target(cls, objects: Sequence[Any], *, layout: str, device: str) -> FunctionalStyle:
        return cls(objects[0], device=device)

    def unsupported(self, case: Case) -> str | None:
        if case.mask and not takes_mask(self.fn):
            return f"masked cases: {getattr(self.fn, '__name__', 'fn')} has no mask parameter"
        return None

    def session(self, data: CaseData, momentum: float) -> Session:
        return _FunctionalSession(self, data, momentum)


class _FunctionalSession:
    def __init__(self, style: FunctionalStyle, data: CaseData, momentum: float) -> None:
        self.style, self.case, self.momentum = style, data.case, momentum
        self.io = io = TorchIO(data.case, style.device)
        self.running_mean = io.tensor(data.running_mean)
        self.running_var = io.tensor(data.running_var)
        self.weight = self.bias = None
        if data.case.affine:
            self.weight = io.tensor(data.gamma, requires_grad=True)
            self.bias = io.tensor(data.beta, requires_grad=True)
        self.kwargs = io.mask_kwargs(data)

    def _call(self, stage: str, x: Any, training: bool) -> Any:
        return call_user(
            stage,
            self.style.fn,
            self.io.channels_first(x),
            self.running_mean,
            self.running_var,
            weight=self.weight,
            bias=self.bias,
            training=training,
            momentum=self.momentum,
            eps=self.case.eps,
            **self.kwargs,
        )

    def forward_train(self, x: np.ndarray) -> np.ndarray:
        self.x = self.io.tensor(x, requires_grad=True)
        self.y = self._call("forward (training=True)", self.x, True)
        return self.io.output("forward", "output", self.y)

    def backward(self, dy: np.ndarray):
        torch = self.io.torch
        if not getattr(self.y, "requires_grad", False):
            raise ImplementationError("the output does not require grad: no autograd graph")
        inputs = [self.x] + ([self.weight, self.bias] if self.case.affine else [])
        dyt = self.io.channels_first(self.io.tensor(dy))
        grads = call_user("backward", torch.autograd.grad, self.y, inputs, dyt, allow_unused=True)
        if grads[0] is None:
            raise ImplementationError("backward: no gradient reached the input")
        dx = self.io.output("backward", "dx", grads[0].movedim(self.case.channel_axis, 1))
        if not self.case.affine:
            return dx, None, None
        return (
            dx,
            self.io.vector("backward", "grad weight", grads[1]),
            self.io.vector("backward", "grad bias", grads[2]),
        )

    def running(self) -> tuple[np.ndarray, np.ndarray]:
        return (
            self.io.vector("running", "running_mean", self.running_mean),
            self.io.vector("running", "running_var", self.running_var),
        )

    def forward_eval(self, x: np.ndarray) -> np.ndarray:
        with self.io.torch.no_grad():
            y = self._call("forward (training=False)", self.io.tensor(x), False)
        return self.io.output("forward (eval)", "output", y)
