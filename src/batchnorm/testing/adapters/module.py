"""The module style: a ``torch.nn.Module`` class built like ``torch.nn.BatchNorm2d``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..cases import Case, CaseData
from .base import ImplementationError, Session, Style, call_user, check_device, takes_mask
from .torch_io import TorchIO


class ModuleStyle(Style):
    """A ``torch.nn.Module`` class built like ``torch.nn.BatchNorm*``:
    ``cls(num_features, eps=..., momentum=..., affine=False)`` (``affine`` only when off),
    with ``weight``/``bias`` parameters and ``running_mean``/``running_var`` buffers.

    ``classes`` is one class for every rank, or three, for rank 2-3, 4 and 5 inputs (like
    ``BatchNorm1d, BatchNorm2d, BatchNorm3d``). One class whose ``_check_input_dim`` refuses a
    rank (as ``nn.BatchNorm2d``'s does all but 4) skips that rank's cases, saying so.
    Channels-last cases are given as a permuted, non-contiguous (N, C, ...) view.
    """

    style = "module"
    #: Like torch.nn.BatchNorm / F.batch_norm: PyTorch's running-statistics conventions.
    conventions = ("torch", "unbiased")
    grad_order = "(weight.grad, bias.grad)"
    target_counts = (1, 3)
    target_names = "one class, or three (for rank 2-3, 4, 5 inputs)"

    def __init__(self, classes: Any | Sequence[Any], device: str = "cpu") -> None:
        classes = list(classes) if isinstance(classes, (list, tuple)) else [classes]
        if len(classes) not in (1, 3):
            raise ValueError(
                f"give one module class, or three (for rank 2-3, 4, 5); got {len(classes)}"
            )
        self.classes, self.device = classes, check_device(device)
        names = ", ".join(getattr(c, "__name__", repr(c)) for c in classes)
        self.signature = f"{names}(num_features, eps=, momentum=[, affine=False]) on {device}"

    @classmethod
    def from_target(cls, objects: Sequence[Any], *, layout: str, device: str) -> ModuleStyle:
        return cls(objects, device=device)

    def unsupported(self, case: Case) -> str | None:
        cls = self.cls_for(case)
        name = getattr(cls, "__name__", "module")
        if case.mask and not takes_mask(getattr(cls, "forward", None)):
            return f"masked cases: {name}.forward has no mask parameter"
        if len(self.classes) == 1 and not _takes_rank(cls, len(case.shape)):
            return f"rank-{len(case.shape)} cases: {name}._check_input_dim refuses that rank"
        return None

    def cls_for(self, case: Case) -> Any:
        if len(self.classes) == 1:
            return self.classes[0]
        return self.classes[max(len(case.shape) - 3, 0)]

    def session(self, data: CaseData, momentum: float) -> Session:
        return _ModuleSession(self, data, momentum)


def _takes_rank(cls: Any, rank: int) -> bool:
    """False where the class says, as torch.nn's ``BatchNorm2d`` does through
    ``_check_input_dim``, that it takes no input of this rank; one class "like
    nn.BatchNorm2d" is then not failed on the rank-3 and rank-5 cases. Asked with a meta tensor
    (no data); any answer but a ValueError counts as yes."""
    check = getattr(cls, "_check_input_dim", None)
    if check is None:
        return True
    import torch

    try:
        check(None, torch.empty((2,) * rank, device="meta"))
    except ValueError:
        return False
    except Exception:  # it needs its instance: leave the question to the cases
        return True
    return True


class _ModuleSession:
    def __init__(self, style: ModuleStyle, data: CaseData, momentum: float) -> None:
        self.case = case = data.case
        self.io = io = TorchIO(case, style.device)
        torch = io.torch
        kwargs: dict[str, Any] = {"eps": case.eps, "momentum": momentum}
        if not case.affine:
            kwargs["affine"] = False
        cls = style.cls_for(case)
        name = getattr(cls, "__name__", "module")
        self.module = call_user(f"{name}({case.channels}, ...)", cls, case.channels, **kwargs)
        if not hasattr(self.module, "to"):
            raise ImplementationError(f"{name} is not a torch.nn.Module (it has no .to())")
        self.module = (
            call_user("module.to", self.module.to, device=style.device, dtype=io.dtype)
            or self.module
        )
        self.params: dict[str, Any] = {}
        with torch.no_grad():
            if case.affine:
                for attr, value in (("weight", data.gamma), ("bias", data.beta)):
                    param = getattr(self.module, attr, None)
                    if not isinstance(param, torch.Tensor):
                        raise ImplementationError(
                            f"{name} has no tensor attribute {attr!r} (affine=True)"
                        )
                    param.copy_(io.tensor(value))
                    self.params[attr] = param
            self.has_running = all(
                isinstance(getattr(self.module, a, None), torch.Tensor)
                for a in ("running_mean", "running_var")
            )
            if self.has_running:
                self.module.running_mean.copy_(io.tensor(data.running_mean))
                self.module.running_var.copy_(io.tensor(data.running_var))
        self.x: Any = None
        self.y: Any = None
        #: a masked case's mask, handed to every forward as ``mask=``
        self.kwargs = io.mask_kwargs(data)

    def forward_train(self, x: np.ndarray) -> np.ndarray:
        call_user("module.train", self.module.train)
        for param in self.params.values():
            param.grad = None
        self.x = self.io.tensor(x, requires_grad=True)
        self.y = call_user("forward", self.module, self.io.channels_first(self.x), **self.kwargs)
        return self.io.output("forward", "output", self.y)

    def backward(self, dy: np.ndarray):
        if not getattr(self.y, "requires_grad", False):
            raise ImplementationError("the output does not require grad: no autograd graph")
        dyt = self.io.channels_first(self.io.tensor(dy))
        call_user("backward", self.y.backward, dyt)
        if self.x.grad is None:
            raise ImplementationError("backward: no gradient reached the input")
        dx = self.io.output("backward", "dx", self.x.grad.movedim(self.case.channel_axis, 1))
        if not self.case.affine:
            return dx, None, None
        return (
            dx,
            self.io.vector("backward", "weight.grad", self.params["weight"].grad),
            self.io.vector("backward", "bias.grad", self.params["bias"].grad),
        )

    def running(self) -> tuple[np.ndarray, np.ndarray] | None:
        if not self.has_running:
            return None
        return (
            self.io.vector("module", "running_mean", self.module.running_mean),
            self.io.vector("module", "running_var", self.module.running_var),
        )

    def forward_eval(self, x: np.ndarray) -> np.ndarray:
        call_user("module.eval", self.module.eval)
        with self.io.torch.no_grad():
            y = call_user(
                "forward (eval)",
                self.module,
                self.io.channels_first(self.io.tensor(x)),
                **self.kwargs,
            )
        return self.io.output("forward (eval)", "output", y)
