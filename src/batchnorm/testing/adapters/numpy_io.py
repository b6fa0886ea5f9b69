"""What the NumPy styles (course, plain) share: the case's arrays in the layout the functions
expect, in the case's dtype, and their results back in the case's layout as float64."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..cases import Case, CaseData
from .base import NO_MASK_STYLE, ImplementationError, Style, as_float64, vector

NUMPY_DTYPES = {"float16": np.float16, "float32": np.float32, "float64": np.float64}


class Layout:
    """How a NumPy-style function sees a case: ``rows`` (m, C) or ``native`` (N, C, ...)."""

    def __init__(self, case: Case, layout: str) -> None:
        self.case, self.layout = case, layout
        self.dtype = NUMPY_DTYPES[case.dtype]
        self.moved_shape = tuple(
            np.moveaxis(
                np.empty(case.shape), case.channel_axis, -1 if layout == "rows" else 1
            ).shape
        )
        self.shape = (case.m, case.channels) if layout == "rows" else self.moved_shape

    def present(self, arr: np.ndarray) -> np.ndarray:
        a = arr.astype(self.dtype)
        if self.layout == "rows":
            return np.ascontiguousarray(np.moveaxis(a, self.case.channel_axis, -1)).reshape(
                self.shape
            )
        # A view: for channels-last cases the implementation gets a non-contiguous array.
        return np.moveaxis(a, self.case.channel_axis, 1)

    def restore(self, stage: str, name: str, value: Any) -> np.ndarray:
        arr = as_float64(stage, name, value)
        if arr.shape != self.shape:
            raise ImplementationError(
                f"{stage}: {name} has shape {arr.shape}, expected {self.shape} (the input's)"
            )
        if self.layout == "rows":
            return np.moveaxis(arr.reshape(self.moved_shape), -1, self.case.channel_axis)
        return np.moveaxis(arr, 1, self.case.channel_axis)


def numpy_unsupported(case: Case, layout: str) -> str | None:
    if case.dtype not in NUMPY_DTYPES:
        return f"NumPy has no {case.dtype}"
    if case.mask:
        return NO_MASK_STYLE
    return None


class NumpySession:
    def __init__(self, data: CaseData, layout: str) -> None:
        self.case = data.case
        self.layout = Layout(data.case, layout)
        c, dt = self.case.channels, self.layout.dtype
        self.gamma = np.ones(c, dt) if data.gamma is None else data.gamma.astype(dt)
        self.beta = np.zeros(c, dt) if data.beta is None else data.beta.astype(dt)
        self.cache: Any = None

    def grads(self, stage: str, dx: Any, dgamma: Any, dbeta: Any):
        c = self.case.channels
        return (
            self.layout.restore(stage, "dx", dx),
            vector(stage, "dgamma", dgamma, c),
            vector(stage, "dbeta", dbeta, c),
        )


class FunctionPairStyle(Style):
    """The NumPy styles' common shape: a ``forward`` and a ``backward`` function, each case
    handed over as an (m, C) matrix (``layout="rows"``) or as (N, C, ...) arrays (``"native"``).
    A subclass sets ``style``, ``grad_order``, ``calls`` (the two signatures, for the report's
    header) and ``session``."""

    target_counts = (2,)
    target_names = "two names (forward,backward)"
    calls: str

    def __init__(
        self, forward: Callable[..., Any], backward: Callable[..., Any], layout: str = "rows"
    ) -> None:
        if layout not in ("rows", "native"):
            raise ValueError(f"layout must be 'rows' or 'native', got {layout!r}")
        self.forward, self.backward, self.layout = forward, backward, layout
        self.signature = f"{self.calls}; layout {layout}"

    @classmethod
    def from_target(cls, objects: Sequence[Any], *, layout: str, device: str) -> Style:
        return cls(objects[0], objects[1], layout=layout)

    def unsupported(self, case: Case) -> str | None:
        return numpy_unsupported(case, self.layout)
