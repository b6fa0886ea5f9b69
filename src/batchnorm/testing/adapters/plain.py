"""The blog-post style of ``seeds/001``: ``forward(X, gamma, beta, eps)``, no running
statistics."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..cases import Case, CaseData
from .base import ImplementationError, Session, Style, call_user, returned
from .numpy_io import NumpySession, numpy_unsupported


class PlainStyle(Style):
    """``forward(X, gamma, beta, eps) -> (out, cache)``, ``backward(dout, cache) ->
    (dX, dbeta, dgamma)`` (note the order): the blog-post style of ``seeds/001``.

    No running statistics and no eval mode, so only the training forward and the backward are
    checked. ``layout`` as for :class:`CourseStyle`.
    """

    style = "plain"
    grad_order = "(dX, dbeta, dgamma)"
    no_running = "the plain style keeps no running statistics"
    no_eval = "the plain style has no eval mode"
    target_counts = (2,)
    target_names = "two names (forward,backward)"

    def __init__(
        self, forward: Callable[..., Any], backward: Callable[..., Any], layout: str = "rows"
    ) -> None:
        if layout not in ("rows", "native"):
            raise ValueError(f"layout must be 'rows' or 'native', got {layout!r}")
        self.forward, self.backward, self.layout = forward, backward, layout
        self.signature = (
            f"forward(X, gamma, beta, eps) -> (out, cache); "
            f"backward(dout, cache) -> (dX, dbeta, dgamma); layout {layout}"
        )

    @classmethod
    def from_target(cls, objects: Sequence[Any], *, layout: str, device: str) -> PlainStyle:
        return cls(objects[0], objects[1], layout=layout)

    def unsupported(self, case: Case) -> str | None:
        return numpy_unsupported(case, self.layout)

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
