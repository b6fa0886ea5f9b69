"""The blog-post style of ``seeds/001``: ``forward(X, gamma, beta, eps)``, no running
statistics."""

from __future__ import annotations

import numpy as np

from ..cases import CaseData
from .base import ImplementationError, Session, call_user, returned
from .numpy_io import FunctionPairStyle, NumpySession


class PlainStyle(FunctionPairStyle):
    """``forward(X, gamma, beta, eps) -> (out, cache)``, ``backward(dout, cache) ->
    (dX, dbeta, dgamma)`` (note the order): the blog-post style of ``seeds/001``.

    No running statistics and no eval mode, so only the training forward and the backward are
    checked. ``layout`` as for :class:`CourseStyle`.
    """

    style = "plain"
    grad_order = "(dX, dbeta, dgamma)"
    no_running = "the plain style keeps no running statistics"
    no_eval = "the plain style has no eval mode"
    calls = (
        "forward(X, gamma, beta, eps) -> (out, cache); backward(dout, cache) -> (dX, dbeta, dgamma)"
    )

    def session(self, data: CaseData, momentum: float) -> Session:
        return _PlainSession(self, data)


class _PlainSession(NumpySession):
    def __init__(self, style: PlainStyle, data: CaseData) -> None:
        super().__init__(data, style.layout)
        self.style = style

    def forward_train(self, x: np.ndarray) -> np.ndarray:
        value = call_user(
            "forward",
            self.style.forward,
            self.layout.present(x),
            self.gamma.copy(),
            self.beta.copy(),
            self.case.eps,
        )
        out, self.cache = returned("forward", value, ("out", "cache"))
        return self.layout.restore("forward", "out", out)

    def backward(self, dy: np.ndarray):
        value = call_user("backward", self.style.backward, self.layout.present(dy), self.cache)
        dx, dbeta, dgamma = returned("backward", value, ("dX", "dbeta", "dgamma"))
        return self.grads("backward", dx, dgamma, dbeta)

    def running(self) -> None:
        return None

    def forward_eval(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - no_eval is set
        raise ImplementationError("the plain style has no eval mode")
