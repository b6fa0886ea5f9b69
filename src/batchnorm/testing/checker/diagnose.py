"""Naming what went wrong: the diagnosis of one quantity's failure (the known mistake that fits,
or why none is named), and :class:`Quantity`, the worst error of a quantity over a case's steps
with the diagnosis made at its first failure."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ..cases import Case, tolerance
from ..mistakes import MISTAKES, first_fit

#: The start of every diagnosis that names no mistake.
NO_FIT = "no known mistake fits"
ALL_NONFINITE = "every value is not finite"


def precision(case: Case, quantity: str, error: float) -> tuple[tuple[str, ...], str] | None:
    """float64 input whose error is what float32 arithmetic would leave.

    Only where float32 would still be accurate to 1%: on worse-conditioned cases float32
    leaves errors as large as those of real mistakes, so it explains nothing.
    """
    if case.dtype != "float64":
        return None
    bound = tolerance(case, quantity, compute="float32")
    if bound < 1e-2 and error <= bound:
        return named("float32_compute")
    return None


class Quantity:
    """Worst error of one quantity over the steps of a case, diagnosed at its first failure."""

    def __init__(self, case: Case, name: str) -> None:
        self.case, self.name = case, name
        self.tol, self.error = tolerance(case, name), 0.0
        self.mistakes: tuple[str, ...] = ()
        self.text = ""
        self.failed = False
        #: The diagnosis to fall back on if a guess made from this case alone (one-pass) is
        #: ruled out by the other cases.
        self.otherwise: tuple[tuple[str, ...], str] | None = None

    def update(self, error: float, diagnose: Callable[[], tuple[tuple[str, ...], str]]) -> None:
        error = math.inf if math.isnan(error) else error
        self.error = max(self.error, error)
        if error > self.tol and not self.failed:
            self.failed = True
            self.mistakes, self.text = diagnose()
            if self.text.startswith(NO_FIT):  # is it just float32 arithmetic?
                self.mistakes, self.text = precision(self.case, self.name, error) or (
                    self.mistakes,
                    self.text,
                )


def no_fit(actual: np.ndarray, expected: np.ndarray) -> tuple[tuple[str, ...], str]:
    if actual.shape != expected.shape:
        return (), f"shape {actual.shape}, expected {expected.shape}"
    bad = int(np.sum(~np.isfinite(actual)))
    if bad == actual.size:
        return (), f"{NO_FIT}; {ALL_NONFINITE} ({bad})"
    if bad:
        return (), f"{NO_FIT}; {bad} value(s) are not finite"
    idx = np.unravel_index(int(np.argmax(np.abs(actual - expected))), actual.shape)
    where = ", ".join(str(int(i)) for i in idx)
    return (), (f"{NO_FIT} (worst at [{where}]: {actual[idx]:.6g}, expected {expected[idx]:.6g})")


FORWARD_WRONG = "forward(train) is already wrong in this case (see its row)"
RUNNING_INVALID = (
    "the running statistics it normalises with are invalid (running_var < 0 or not finite; "
    "see the running rows)"
)


def named(key: str) -> tuple[tuple[str, ...], str]:
    return (key,), MISTAKES[key]


def fit_or_explain(
    actual: np.ndarray,
    expected: np.ndarray,
    candidates: dict[str, np.ndarray],
    tol: float,
    scale: float | None = None,
    forward_failed: bool = False,
) -> tuple[tuple[str, ...], str]:
    key = first_fit(actual, candidates, tol, scale)
    if key is not None:
        return named(key)
    if forward_failed:
        return (), FORWARD_WRONG
    return no_fit(actual, expected)
