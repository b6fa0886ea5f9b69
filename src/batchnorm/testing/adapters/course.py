"""The course-assignment style (cs231n): ``forward(x, gamma, beta, bn_param)``."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..cases import CaseData
from .base import ImplementationError, Session, call_user, returned, vector
from .numpy_io import FunctionPairStyle, NumpySession


class CourseStyle(FunctionPairStyle):
    """``forward(x, gamma, beta, bn_param) -> (out, cache)``, ``backward(dout, cache) ->
    (dx, dgamma, dbeta)``: the course-assignment style (cs231n).

    ``bn_param`` holds ``mode`` ('train'/'test'), ``eps``, ``momentum``, ``running_mean`` and
    ``running_var``; the forward stores the updated running statistics back into it.
    ``layout="rows"`` gives every case to the functions as an (m, C) matrix (channels last);
    ``layout="native"`` as (N, C, ...) arrays (the spatial variant).
    """

    style = "course"
    grad_order = "(dx, dgamma, dbeta)"
    calls = (
        "forward(x, gamma, beta, bn_param) -> (out, cache); "
        "backward(dout, cache) -> (dx, dgamma, dbeta)"
    )

    def session(self, data: CaseData, momentum: float) -> Session:
        return _CourseSession(self, data, momentum)


class _CourseSession(NumpySession):
    def __init__(self, style: CourseStyle, data: CaseData, momentum: float) -> None:
        super().__init__(data, style.layout)
        self.style = style
        dt = self.layout.dtype
        self.bn_param: dict[str, Any] = {
            "mode": "train",
            "eps": self.case.eps,
            "momentum": momentum,
            "running_mean": data.running_mean.astype(dt),
            "running_var": data.running_var.astype(dt),
        }

    def _forward(self, stage: str, x: np.ndarray) -> np.ndarray:
        value = call_user(
            stage,
            self.style.forward,
            self.layout.present(x),
            self.gamma.copy(),
            self.beta.copy(),
            self.bn_param,
        )
        out, cache = returned(stage, value, ("out", "cache"))
        self.cache = cache
        return self.layout.restore(stage, "out", out)

    def forward_train(self, x: np.ndarray) -> np.ndarray:
        self.bn_param["mode"] = "train"
        return self._forward("forward (mode 'train')", x)

    def backward(self, dy: np.ndarray):
        value = call_user("backward", self.style.backward, self.layout.present(dy), self.cache)
        return self.grads("backward", *returned("backward", value, ("dx", "dgamma", "dbeta")))

    def running(self) -> tuple[np.ndarray, np.ndarray]:
        stats = []
        for key in ("running_mean", "running_var"):
            if key not in self.bn_param:
                raise ImplementationError(f"bn_param has no {key!r} after forward")
            stats.append(
                vector("forward", f"bn_param[{key!r}]", self.bn_param[key], self.case.channels)
            )
        return stats[0], stats[1]

    def forward_eval(self, x: np.ndarray) -> np.ndarray:
        self.bn_param["mode"] = "test"
        return self._forward("forward (mode 'test')", x)
