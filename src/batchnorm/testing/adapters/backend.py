"""A backend of ``batchnorm.kernels.REGISTRY``, through its stage protocol (``--backend``)."""

from __future__ import annotations

import functools

import numpy as np

from ..cases import Case, CaseData
from .base import ImplementationError, Session, Style, as_float64, call_user, check_device, returned
from .torch_io import TorchIO


class BackendStyle(Style):
    """A backend of ``batchnorm.kernels.REGISTRY``, called through its stage protocol on torch
    tensors: ``forward_train`` and ``backward_train`` (its fused ones, or its stages composed)
    and ``forward_infer``.

    Backends keep no running statistics (the modules do, with ``reference.update_running_stats``),
    so those are not checked here; the eval forward uses the case's running statistics.
    """

    style = "backend"
    grad_order = "(dx, dweight, dbias)"
    no_running = "backends keep no running statistics (batchnorm.torch does)"

    def __init__(self, name: str, device: str = "cpu") -> None:
        from ...kernels import REGISTRY

        if name != "auto" and name not in REGISTRY:
            known = ", ".join(sorted(REGISTRY))
            raise ValueError(f"unknown backend {name!r}; known: {known}, auto")
        self.name, self.device = name, check_device(device)
        what = "whichever backend auto picks per case" if name == "auto" else f"backend {name!r}"
        self.signature = f"batchnorm.kernels {what} on {device}"

    def unsupported(self, case: Case) -> str | None:
        from ...kernels import BackendUnavailable, select_backend

        if case.mask:
            return (
                "masked cases: the stage protocol takes no mask (batchnorm.torch gathers the "
                "real positions; check it with --style module or functional)"
            )
        try:
            select_backend(TorchIO(case, self.device).tensor(np.zeros(case.shape)), self.name)
        except BackendUnavailable as exc:
            return str(exc)
        return None

    def session(self, data: CaseData, momentum: float) -> Session:
        return _BackendSession(self, data)


class _BackendSession:
    def __init__(self, style: BackendStyle, data: CaseData) -> None:
        from ...kernels import select_backend

        self.case, self.data = data.case, data
        self.io = io = TorchIO(data.case, style.device)
        # "auto" resolves per case, as batchnorm.torch does for each input.
        self.backend = select_backend(io.tensor(data.xs[0]), style.name)[0]
        self.weight = None if data.gamma is None else io.tensor(data.gamma)
        self.bias = None if data.beta is None else io.tensor(data.beta)

    def forward_train(self, x: np.ndarray) -> np.ndarray:
        self.x = self.io.tensor(x)
        from ...reference.stages import forward_train

        value = call_user(
            "forward_train",
            functools.partial(forward_train, self.backend),
            self.x,
            self.weight,
            self.bias,
            self.case.eps,
            self.case.channel_axis,
        )
        y, self.mean, _var, self.invstd, _ = returned(
            "forward_train", value, ("y", "mean", "var", "invstd", "relu_mask")
        )
        return as_float64("forward_train", "y", y)

    def backward(self, dy: np.ndarray):
        from ...reference.stages import backward_train

        value = call_user(
            "backward_train",
            functools.partial(backward_train, self.backend),
            self.io.tensor(dy),
            self.x,
            self.mean,
            self.invstd,
            self.weight,
            self.case.channel_axis,
        )
        dx, dweight, dbias, _ = returned(
            "backward_train", value, ("dx", "dweight", "dbias", "dresidual")
        )
        dx = as_float64("backward_train", "dx", dx)
        if dx.shape != self.case.shape:
            raise ImplementationError(
                f"backward_train: dx has shape {dx.shape}, expected {self.case.shape}"
            )
        if not self.case.affine:
            return dx, None, None
        return (
            dx,
            self.io.vector("backward_train", "dweight", dweight),
            self.io.vector("backward_train", "dbias", dbias),
        )

    def running(self) -> None:
        return None

    def forward_eval(self, x: np.ndarray) -> np.ndarray:
        value = call_user(
            "forward_infer",
            self.backend.forward_infer,
            self.io.tensor(x),
            self.io.tensor(self.data.running_mean),
            self.io.tensor(self.data.running_var),
            self.weight,
            self.bias,
            self.case.eps,
            self.case.channel_axis,
        )
        return as_float64("forward_infer", "y", value)
