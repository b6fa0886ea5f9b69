"""Running one case: the training steps (forward, backward, running statistics after each),
then the eval forward, each compared with ``batchnorm.reference`` in float64 on the exact
inputs the implementation saw, and diagnosed where it fails. The result is an
:class:`Outcome`; turning outcomes into report rows is ``check``'s job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ... import reference as ref
from ..._xp import per_channel, reduce_axes
from ..adapters import Adapter, ImplementationError, Session
from ..cases import Case, CaseData, make_data, real_values, with_padding
from ..mistakes import (
    MISTAKES,
    Implied,
    backward_candidates,
    eval_candidates,
    first_fit,
    forward_candidates,
    implied_stats,
    one_pass_fits,
    padding_counted,
    padding_counted_grads,
    rel_error,
)
from .conventions import record_running
from .diagnose import RUNNING_INVALID, Quantity, fit_or_explain, named, no_fit
from .report import Check


@dataclass
@dataclass
class Outcome:
    case: Case
    checks: list[Check] = field(default_factory=list)
    quantities: dict[str, Quantity] = field(default_factory=dict)
    #: running candidate -> [max error of running_mean, of running_var] over the steps
    running: dict[Any, list[float]] | None = None
    running_error: str | None = None

    def quantity(self, name: str) -> Quantity:
        if name not in self.quantities:
            self.quantities[name] = Quantity(self.case, name)
        return self.quantities[name]

    def error(self, quantity: str, message: str) -> None:
        self.checks.append(Check(self.case.name, quantity, "ERROR", diagnosis=message))


def run_case(adapter: Adapter, case: Case, momentum: float) -> Outcome:
    out = Outcome(case)
    reason = adapter.unsupported(case)
    if reason is not None:
        out.checks.append(Check(case.name, "-", "skip", diagnosis=reason))
        return out
    data = make_data(case)
    try:
        session = adapter.session(data, momentum)
    except ImplementationError as exc:
        out.error("setup", str(exc))
        return out
    track = adapter.no_running is None
    if track:
        try:
            track = session.running() is not None
        except ImplementationError as exc:
            out.running_error, track = str(exc), False
        if track:
            out.running = {}
    if not _run_steps(adapter, session, data, out, track, momentum):
        return out
    if adapter.no_eval is None:
        _run_eval(session, data, out, track)
    return out


def _run_steps(
    adapter: Adapter, session: Session, data: CaseData, out: Outcome, track: bool, momentum: float
) -> bool:
    """The training steps; False if the forward could not run (the case stops there)."""
    case, eps, mask = data.case, data.case.eps, data.mask
    # A masked case's expected values: the reference on the real positions as (m, C) rows,
    # scattered back with 0 at the padding. Unmasked, real_values and with_padding do nothing.
    ax = case.channel_axis if mask is None else 1
    gamma, beta = data.gamma, data.beta
    backward_ok = True
    for step in range(case.steps):
        x_all, dy = data.xs[step], data.dys[step]
        x = real_values(x_all, mask)
        y_ref, saved = ref.batch_norm_train(x, gamma, beta, axis=ax, eps=eps)
        y_ref = with_padding(y_ref, mask)
        prev = _read_running(session, out) if track and out.running_error is None else None
        try:
            y = session.forward_train(x_all)
        except ImplementationError as exc:
            out.error("forward(train)", str(exc))
            return False
        implied = implied_stats(x, real_values(y, mask), gamma, beta, ax)
        fwd = out.quantity("forward(train)")
        tol = fwd.tol

        def diagnose_forward(y=y, x=x, x_all=x_all, y_ref=y_ref, tol=tol, fwd=fwd):
            candidates = forward_candidates(x, gamma, beta, ax, eps)
            candidates = {k: with_padding(v, mask) for k, v in candidates.items()}
            if mask is not None:
                candidates["padding_counted"] = padding_counted(x_all, mask, gamma, beta, eps)
            key = first_fit(y, candidates, tol)
            if key is not None:
                return named(key)
            if one_pass_fits(case, x, y, gamma, beta):
                fwd.otherwise = no_fit(y, y_ref)
                return named("one_pass")
            return no_fit(y, y_ref)

        fwd.update(rel_error(y, y_ref), diagnose_forward)

        if backward_ok:
            backward_ok = _run_backward(adapter, session, data, out, x_all, dy, saved, implied)
        if prev is not None:
            cur = _read_running(session, out)
            if cur is not None:
                record_running(out, x_all, mask, momentum, prev, cur, implied, eps)
    return True


def _run_backward(
    adapter: Adapter,
    session: Session,
    data: CaseData,
    out: Outcome,
    x_all: np.ndarray,
    dy_all: np.ndarray,
    saved: ref.Saved,
    implied: Implied | None,
) -> bool:
    """Unmasked, ``x_all`` and ``dy_all`` are the case's arrays; masked, the expected values
    are computed on their real positions and compared with 0 at the padding."""
    eps, gamma, mask = data.case.eps, data.gamma, data.mask
    ax = data.case.channel_axis if mask is None else 1
    x, dy = real_values(x_all, mask), real_values(dy_all, mask)
    try:
        dx, dgamma, dbeta = session.backward(dy_all)
    except ImplementationError as exc:
        out.error("backward", str(exc))
        return False
    g = ref.backward(dy, saved)
    g = ref.Grads(with_padding(g.dx, mask), g.dgamma, g.dbeta)
    forward_failed = out.quantity("forward(train)").failed
    # Error scales: the size of the terms each gradient sums (it may cancel to nearly 0, as
    # dx does at m = 2), so that rounding is judged against what it acts on.
    axes = reduce_axes(x.ndim, ax)
    gain = saved.invstd if gamma is None else np.abs(gamma) * saved.invstd
    x_hat = ref.normalize(x, saved.mean, saved.invstd, ax)
    scales = {
        "dx": float(np.max(np.abs(dy * per_channel(gain, x.ndim, ax, np)))),
        "dgamma": float(np.max(np.sum(np.abs(dy * x_hat), axis=axes))),
        "dbeta": float(np.max(np.sum(np.abs(dy), axis=axes))),
    }
    cache: dict[str, dict[str, ref.Grads]] = {}

    def candidates() -> dict[str, ref.Grads]:
        if "c" not in cache:
            found = backward_candidates(dy, x, gamma, ax, eps, implied)
            cache["c"] = {
                k: ref.Grads(with_padding(v.dx, mask), v.dgamma, v.dbeta) for k, v in found.items()
            }
            if mask is not None:
                cache["c"]["padding_counted"] = padding_counted_grads(
                    x_all, dy_all, mask, gamma, eps
                )
        return cache["c"]

    q = out.quantity("dx")
    q.update(
        rel_error(dx, g.dx, scales["dx"]),
        lambda: fit_or_explain(
            dx,
            g.dx,
            {k: v.dx for k, v in candidates().items()},
            q.tol,
            scales["dx"],
            forward_failed,
        ),
    )
    if dgamma is None or dbeta is None:
        return True

    def swapped() -> bool:
        tol = out.quantity("dgamma").tol
        return (
            rel_error(dgamma, g.dbeta, scales["dbeta"]) <= tol
            and rel_error(dbeta, g.dgamma, scales["dgamma"]) <= tol
        )

    swap_text = f"{MISTAKES['swapped']} (this style returns {adapter.grad_order})"
    for name, actual, expected, pick in (
        ("dgamma", dgamma, g.dgamma, "dgamma"),
        ("dbeta", dbeta, g.dbeta, "dbeta"),
    ):
        q = out.quantity(name)

        def diagnose(actual=actual, expected=expected, pick=pick, tol=q.tol):
            if swapped():
                return ("swapped",), swap_text
            return fit_or_explain(
                actual,
                expected,
                {k: getattr(v, pick) for k, v in candidates().items()},
                tol,
                scales[pick],
                forward_failed,
            )

        q.update(rel_error(actual, expected, scales[pick]), diagnose)
    return True


def _read_running(session: Session, out: Outcome) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        return session.running()
    except ImplementationError as exc:
        if out.running_error is None:
            out.running_error = str(exc)
        return None


def _run_eval(session: Session, data: CaseData, out: Outcome, track: bool) -> None:
    eps, gamma, beta, mask = data.case.eps, data.gamma, data.beta, data.mask
    ax = data.case.channel_axis if mask is None else 1
    prev = _read_running(session, out) if track and out.running_error is None else None
    if prev is None:
        prev = (data.running_mean, data.running_var)
    x = real_values(data.x_eval, mask)
    try:
        y = session.forward_eval(data.x_eval)
    except ImplementationError as exc:
        out.error("forward(eval)", str(exc))
        return
    q = out.quantity("forward(eval)")
    if not (np.all(np.isfinite(prev[0])) and np.all(np.isfinite(prev[1])) and np.all(prev[1] >= 0)):
        q.update(math.inf, lambda: ((), RUNNING_INVALID))
        return
    expected = with_padding(
        ref.batch_norm_infer(x, prev[0], prev[1], gamma, beta, axis=ax, eps=eps), mask
    )

    def diagnose() -> tuple[tuple[str, ...], str]:
        candidates = eval_candidates(x, prev[0], prev[1], gamma, beta, ax, eps)
        candidates = {k: with_padding(v, mask) for k, v in candidates.items()}
        return fit_or_explain(y, expected, candidates, q.tol)

    q.update(rel_error(y, expected), diagnose)
    if track and out.running_error is None:
        after = _read_running(session, out)
        if after is not None:
            changed = max(rel_error(after[0], prev[0]), rel_error(after[1], prev[1]))
            out.quantity("eval keeps running").update(
                changed, lambda: named("eval_changed_running")
            )
