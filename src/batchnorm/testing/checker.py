"""The checker: run an adapter on every case, compare with the reference, diagnose failures.

For each case it runs ``case.steps`` training steps (forward, backward, running statistics
after each), then one eval forward. Expected values come from ``batchnorm.reference`` in
float64 on the exact inputs the implementation saw. Each step's running statistics are
predicted from the implementation's *own* previous values, so one wrong step does not hide
or smear the next, and every running-statistics convention of
``reference.update_running_stats`` is tried: the declared one decides the verdict (or, when
none is declared, the one that fits the most cases is inferred and reported), the others
serve as diagnoses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import reference as ref
from .._xp import per_channel, reduce_axes
from .adapters import Adapter, ImplementationError, Session
from .cases import (
    CASES,
    QUANTITIES,
    Case,
    CaseData,
    make_data,
    real_values,
    tolerance,
    with_padding,
)
from .mistakes import (
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

__all__ = ["Check", "Report", "check", "MOMENTUM_CONVENTIONS", "RUNNING_VARS"]

MOMENTUM_CONVENTIONS: tuple[str, ...] = ("torch", "keras")
RUNNING_VARS: tuple[str, ...] = ("unbiased", "biased")
_COMBOS = tuple((c, v) for c in MOMENTUM_CONVENTIONS for v in RUNNING_VARS)

_MOMENTUM_MEANING = {
    "torch": "weighs the new batch (PyTorch meaning)",
    "keras": "weighs the old value (Keras/Flax/cs231n meaning)",
}


@dataclass(frozen=True)
class Check:
    """One row of the report.

    ``verdict`` is ``"pass"``, ``"FAIL"`` (numbers differ), ``"ERROR"`` (the implementation
    raised or returned something malformed; ``diagnosis`` holds the message) or ``"skip"``.
    ``mistakes`` are the keys of :data:`MISTAKES` the diagnosis names.
    """

    case: str
    quantity: str
    verdict: str
    error: float | None = None
    tol: float | None = None
    diagnosis: str = ""
    mistakes: tuple[str, ...] = ()


@dataclass
class Report:
    signature: str
    checks: list[Check]
    notes: list[str] = field(default_factory=list)
    #: (momentum convention, running variance) that decided the running-statistics verdicts
    running_convention: tuple[str, str] | None = None

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.verdict in ("FAIL", "ERROR")]

    @property
    def ok(self) -> bool:
        return not self.failures and any(c.verdict == "pass" for c in self.checks)

    def find(self, case: str, quantity: str) -> Check | None:
        return next((c for c in self.checks if c.case == case and c.quantity == quantity), None)

    def summary(self) -> str:
        cases = list(dict.fromkeys(c.case for c in self.checks))
        skipped = [n for n in cases if all(c.verdict == "skip" for c in self.checks if c.case == n)]
        ran = len(cases) - len(skipped)
        n_pass = sum(c.verdict == "pass" for c in self.checks)
        n_fail = sum(c.verdict == "FAIL" for c in self.checks)
        n_error = sum(c.verdict == "ERROR" for c in self.checks)
        bad_cases = len({c.case for c in self.failures})
        tail = f" ({len(skipped)} case(s) skipped)" if skipped else ""
        if self.ok:
            return f"PASS: all {n_pass} checks in {ran} cases{tail}"
        if not ran or n_pass + n_fail + n_error == 0:
            return f"FAIL: nothing could be checked{tail}"
        return (
            f"FAIL: {n_fail} check(s) failed and {n_error} raised an error, in {bad_cases} "
            f"of {ran} cases; {n_pass} passed{tail}"
        )

    def table(self, *, verbose: bool = False) -> str:
        """The report as a text table; passing cases collapse to one row unless ``verbose``."""
        rows: list[tuple[str, ...]] = []
        by_case: dict[str, list[Check]] = {}
        for c in self.checks:
            by_case.setdefault(c.case, []).append(c)
        first_seen: dict[str, str] = {}  # error message -> first case that raised it
        for name, checks in by_case.items():
            if not verbose and all(c.verdict == "skip" for c in checks):
                continue
            if not verbose and all(c.verdict in ("pass", "skip") for c in checks):
                passed = [c for c in checks if c.verdict == "pass"]
                worst = max(passed, key=_ratio)
                rows.append(
                    (
                        name,
                        f"all {len(passed)}",
                        _num(worst.error),
                        _num(worst.tol),
                        "pass",
                        f"worst: {worst.quantity}",
                    )
                )
                continue
            for c in checks:
                if not verbose and c.verdict in ("pass", "skip"):
                    continue
                text = c.diagnosis
                if c.verdict in ("ERROR", "FAIL") and not verbose and text:
                    # The same exception or diagnosis in every case says nothing new after
                    # the first; the per-case error still shows where it bites.
                    first = first_seen.setdefault(f"{c.quantity}\0{text}", c.case)
                    if first != c.case:
                        text = f"same {'error' if c.verdict == 'ERROR' else 'as'} {first}"
                        text = text.replace("same error", "same error as")
                rows.append((c.case, c.quantity, _num(c.error), _num(c.tol), c.verdict, text))
        header = ("case", "quantity", "max error", "tol", "verdict", "diagnosis")
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
        lines = []
        for r in [header, *rows]:
            lines.append("  ".join(r[i].ljust(widths[i]) for i in range(5)) + "  " + r[5])
        return "\n".join(line.rstrip() for line in lines)

    def diagnoses(self) -> str:
        """Each distinct diagnosis of a failure, with the cases and quantities it covers."""
        groups: dict[str, tuple[set[str], list[str]]] = {}
        for c in self.failures:
            # Unnamed failures differ only in their worst element: one group for them all.
            text = _NO_FIT if c.diagnosis.startswith(_NO_FIT + " (worst") else c.diagnosis
            cases, quantities = groups.setdefault(text, (set(), []))
            cases.add(c.case)
            if c.quantity not in quantities:
                quantities.append(c.quantity)
        if not groups:
            return ""
        lines = ["diagnoses:"]
        for text, (cases, quantities) in sorted(groups.items(), key=lambda g: -len(g[1][0])):
            lines.append(f"  {len(cases):>3} case(s), {', '.join(quantities)}: {text}")
        return "\n".join(lines)

    def format(self, *, verbose: bool = False) -> str:
        parts = [
            self.signature,
            *[f"note: {n}" for n in self.notes],
            "",
            self.table(verbose=verbose),
        ]
        if self.failures:
            parts += ["", self.diagnoses()]
        parts += ["", self.summary()]
        return "\n".join(parts)


#: The start of every diagnosis that names no mistake.
_NO_FIT = "no known mistake fits"
_ALL_NONFINITE = "every value is not finite"


def _ratio(c: Check) -> float:
    if c.error is None or c.tol is None:
        return 0.0
    return c.error / c.tol if c.tol > 0 else (math.inf if c.error > 0 else 0.0)


def _num(v: float | None) -> str:
    if v is None:
        return "-"
    return "inf" if math.isinf(v) else f"{v:.1e}"


def _precision(case: Case, quantity: str, error: float) -> tuple[tuple[str, ...], str] | None:
    """float64 input whose error is what float32 arithmetic would leave.

    Only where float32 would still be accurate to 1%: on worse-conditioned cases float32
    leaves errors as large as those of real mistakes, so it explains nothing.
    """
    if case.dtype != "float64":
        return None
    bound = tolerance(case, quantity, compute="float32")
    if bound < 1e-2 and error <= bound:
        return _named("float32_compute")
    return None


class _Quantity:
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
            if self.text.startswith(_NO_FIT):  # is it just float32 arithmetic?
                self.mistakes, self.text = _precision(self.case, self.name, error) or (
                    self.mistakes,
                    self.text,
                )


@dataclass
class _Outcome:
    case: Case
    checks: list[Check] = field(default_factory=list)
    quantities: dict[str, _Quantity] = field(default_factory=dict)
    #: running candidate -> [max error of running_mean, of running_var] over the steps
    running: dict[Any, list[float]] | None = None
    running_error: str | None = None

    def quantity(self, name: str) -> _Quantity:
        if name not in self.quantities:
            self.quantities[name] = _Quantity(self.case, name)
        return self.quantities[name]

    def error(self, quantity: str, message: str) -> None:
        self.checks.append(Check(self.case.name, quantity, "ERROR", diagnosis=message))


def _no_fit(actual: np.ndarray, expected: np.ndarray) -> tuple[tuple[str, ...], str]:
    if actual.shape != expected.shape:
        return (), f"shape {actual.shape}, expected {expected.shape}"
    bad = int(np.sum(~np.isfinite(actual)))
    if bad == actual.size:
        return (), f"{_NO_FIT}; {_ALL_NONFINITE} ({bad})"
    if bad:
        return (), f"{_NO_FIT}; {bad} value(s) are not finite"
    idx = np.unravel_index(int(np.argmax(np.abs(actual - expected))), actual.shape)
    where = ", ".join(str(int(i)) for i in idx)
    return (), (f"{_NO_FIT} (worst at [{where}]: {actual[idx]:.6g}, expected {expected[idx]:.6g})")


_FORWARD_WRONG = "forward(train) is already wrong in this case (see its row)"
_RUNNING_INVALID = (
    "the running statistics it normalises with are invalid (running_var < 0 or not finite; "
    "see the running rows)"
)


def _named(key: str) -> tuple[tuple[str, ...], str]:
    return (key,), MISTAKES[key]


def _fit_or_explain(
    actual: np.ndarray,
    expected: np.ndarray,
    candidates: dict[str, np.ndarray],
    tol: float,
    scale: float | None = None,
    forward_failed: bool = False,
) -> tuple[tuple[str, ...], str]:
    key = first_fit(actual, candidates, tol, scale)
    if key is not None:
        return _named(key)
    if forward_failed:
        return (), _FORWARD_WRONG
    return _no_fit(actual, expected)


def _run_case(adapter: Adapter, case: Case, momentum: float) -> _Outcome:
    out = _Outcome(case)
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
    adapter: Adapter, session: Session, data: CaseData, out: _Outcome, track: bool, momentum: float
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
                return _named(key)
            if one_pass_fits(case, x, y, gamma, beta):
                fwd.otherwise = _no_fit(y, y_ref)
                return _named("one_pass")
            return _no_fit(y, y_ref)

        fwd.update(rel_error(y, y_ref), diagnose_forward)

        if backward_ok:
            backward_ok = _run_backward(adapter, session, data, out, x_all, dy, saved, implied)
        if prev is not None:
            cur = _read_running(session, out)
            if cur is not None:
                _record_running(out, x_all, mask, momentum, prev, cur, implied, eps)
    return True


def _run_backward(
    adapter: Adapter,
    session: Session,
    data: CaseData,
    out: _Outcome,
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
        lambda: _fit_or_explain(
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
            return _fit_or_explain(
                actual,
                expected,
                {k: getattr(v, pick) for k, v in candidates().items()},
                tol,
                scales[pick],
                forward_failed,
            )

        q.update(rel_error(actual, expected, scales[pick]), diagnose)
    return True


def _read_running(session: Session, out: _Outcome) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        return session.running()
    except ImplementationError as exc:
        if out.running_error is None:
            out.running_error = str(exc)
        return None


def _record_running(
    out: _Outcome,
    x_all: np.ndarray,
    mask: np.ndarray | None,
    momentum: float,
    prev: tuple[np.ndarray, np.ndarray],
    cur: tuple[np.ndarray, np.ndarray],
    implied: Implied | None,
    eps: float,
) -> None:
    assert out.running is not None
    ax = out.case.channel_axis if mask is None else 1
    stats = ref.batch_stats(real_values(x_all, mask), ax)
    # A masked case: what the statistics of every position, padding included, would give.
    every = None if mask is None else ref.batch_stats(x_all, 1)
    predictions: dict[Any, tuple[np.ndarray, np.ndarray]] = {}
    for conv, var in _COMBOS:
        new = ref.update_running_stats(
            prev[0],
            prev[1],
            0,
            stats.mean,
            stats.var,
            stats.count,
            momentum=momentum,
            convention=conv,
            variance=var,
            warn=False,
        )
        predictions[(conv, var)] = (new.running_mean, new.running_var)
        if implied is not None:
            new = ref.update_running_stats(
                prev[0],
                prev[1],
                0,
                implied.mean,
                implied.var(eps),
                stats.count,
                momentum=momentum,
                convention=conv,
                variance=var,
                warn=False,
            )
            predictions[("forward_stats", conv, var)] = (new.running_mean, new.running_var)
        if every is not None:
            new = ref.update_running_stats(
                prev[0],
                prev[1],
                0,
                every.mean,
                every.var,
                every.count,
                momentum=momentum,
                convention=conv,
                variance=var,
                warn=False,
            )
            predictions[("padding_counted", conv, var)] = (new.running_mean, new.running_var)
    predictions["not_updated"] = prev

    def scales(batch: ref.BatchStats) -> tuple[float, float]:
        """The larger of the two values each update mixes."""
        unbiased = batch.var * batch.count / (batch.count - 1)
        return (
            max(float(np.max(np.abs(prev[0]))), float(np.max(np.abs(batch.mean)))),
            max(float(np.max(np.abs(prev[1]))), float(np.max(unbiased))),
        )

    for key, (mean, var) in predictions.items():
        errors = out.running.setdefault(key, [0.0, 0.0])
        # the padding's statistics are on their own scale (float32 rounds them there)
        scale = scales(every if every is not None and key[0] == "padding_counted" else stats)
        for i, (actual, expected) in enumerate(((cur[0], mean), (cur[1], var))):
            e = rel_error(actual, expected, scale[i])
            errors[i] = max(errors[i], math.inf if math.isnan(e) else e)


def _run_eval(session: Session, data: CaseData, out: _Outcome, track: bool) -> None:
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
        q.update(math.inf, lambda: ((), _RUNNING_INVALID))
        return
    expected = with_padding(
        ref.batch_norm_infer(x, prev[0], prev[1], gamma, beta, axis=ax, eps=eps), mask
    )

    def diagnose() -> tuple[tuple[str, ...], str]:
        candidates = eval_candidates(x, prev[0], prev[1], gamma, beta, ax, eps)
        candidates = {k: with_padding(v, mask) for k, v in candidates.items()}
        return _fit_or_explain(y, expected, candidates, q.tol)

    q.update(rel_error(y, expected), diagnose)
    if track and out.running_error is None:
        after = _read_running(session, out)
        if after is not None:
            changed = max(rel_error(after[0], prev[0]), rel_error(after[1], prev[1]))
            out.quantity("eval keeps running").update(
                changed, lambda: _named("eval_changed_running")
            )


def _momentum_keys(fitting: str, expected: str) -> tuple[str, ...]:
    if fitting == expected:
        return ()
    return ("momentum_old",) if fitting == "keras" else ("momentum_new",)


def _diagnose_running(
    errors: dict[Any, list[float]],
    chosen: tuple[str, str],
    index: int,
    tol: float,
    forward_failed: bool,
) -> tuple[tuple[str, ...], str]:
    """Which other convention (or not updating at all) fits running_mean (0) / running_var (1)."""
    others = sorted(
        (cv for cv in _COMBOS if cv != chosen),
        key=lambda cv: (cv[0] != chosen[0]) + (cv[1] != chosen[1]),
    )
    for conv, var in others:
        if errors[(conv, var)][index] <= tol:
            keys = _momentum_keys(conv, chosen[0])
            if index == 1 and var != chosen[1]:
                keys += ("biased_running_var",) if var == "biased" else ("unbiased_running_var",)
            if keys:
                return keys, "; ".join(MISTAKES[k] for k in keys)
    if errors["not_updated"][index] <= tol:
        return _named("not_updated")
    key = ("padding_counted", *chosen)
    if key in errors and errors[key][index] <= tol:
        return _named("padding_counted")
    key = ("forward_stats", *chosen)
    if key in errors and errors[key][index] <= tol:
        return _named("forward_stats")
    if forward_failed:
        return (), _FORWARD_WRONG
    return (), _NO_FIT


def _resolve_running(
    outcomes: Sequence[_Outcome],
    momentum_convention: str | None,
    running_var: str | None,
    by_style: tuple[str | None, str | None] = (None, None),
) -> tuple[tuple[str, str] | None, str]:
    """Pick the convention that decides the verdicts; returns it and a note for the report."""
    allowed = [
        cv
        for cv in _COMBOS
        if momentum_convention in (None, cv[0]) and running_var in (None, cv[1])
    ]
    tracked = [o for o in outcomes if o.running]
    if not tracked:
        return None, ""

    def fits(o: _Outcome, cv: tuple[str, str]) -> bool:
        assert o.running is not None
        em, ev = o.running[cv]
        return em <= tolerance(o.case, "running_mean") and ev <= tolerance(o.case, "running_var")

    declared = (momentum_convention, running_var)

    def agrees_where_inferred(a: tuple[str, str], b: tuple[str, str]) -> bool:
        return all(d is not None or x == y for d, x, y in zip(declared, a, b, strict=True))

    scores = [sum(fits(o, cv) for o in tracked) for cv in allowed]
    # When a declared part is wrong nothing allowed fits; the inferred part is then the one
    # that fits together with *some* value of the declared part, so that the diagnosis
    # names only what is wrong with the declaration.
    partial = [
        sum(
            any(fits(o, other) for other in _COMBOS if agrees_where_inferred(cv, other))
            for o in tracked
        )
        for cv in allowed
    ]
    best = max(range(len(allowed)), key=lambda i: (scores[i], partial[i], -i))
    chosen = allowed[best]
    how = []
    parts = (("momentum", momentum_convention), ("variance", running_var))
    for (part, declared), style in zip(parts, by_style, strict=True):
        if style:
            how.append(f"{part} as style {style} implies")
        else:
            how.append(f"{part} {'declared' if declared else 'inferred'}")
    if by_style[0] and by_style[0] == by_style[1]:
        how = [f"as style {by_style[0]} implies"]
    note = (
        f"running statistics: momentum {_MOMENTUM_MEANING[chosen[0]]}, running variance "
        f"{chosen[1]} ({', '.join(how)}; fits {scores[best]} of {len(tracked)} cases)"
    )
    return chosen, note


def _one_pass_everywhere(outcomes: Sequence[_Outcome]) -> None:
    """A large-offset forward that is not finite anywhere, from an implementation whose forward
    is finite on the ordinary cases: with few channels, the one-pass variance can come out
    negative in every channel. (An output that is NaN everywhere on every case names nothing.)"""
    forwards = [(o.case, o.quantities.get("forward(train)")) for o in outcomes]
    if not any(q and not c.large_offset and math.isfinite(q.error) for c, q in forwards):
        return
    for case, q in forwards:
        if q and q.failed and case.large_offset and _ALL_NONFINITE in q.text:
            q.otherwise = (q.mistakes, q.text)
            q.mistakes, q.text = _named("one_pass")


def _one_pass_only_at_large_offsets(outcomes: Sequence[_Outcome]) -> None:
    """The one-pass formula breaks only where the offset is large. If the forward also fails an
    ordinary case with no named mistake, a large-offset failure is most likely that unknown
    mistake showing (a variance off by a constant factor fits one-pass's wide error budget
    there), not one-pass. (An ordinary failure that is named, say eps outside the sqrt, is a
    second mistake and leaves the one-pass diagnosis standing.)"""
    forwards = [(o.case, o.quantities.get("forward(train)")) for o in outcomes]
    if not any(q and q.failed and not q.mistakes and not c.large_offset for c, q in forwards):
        return
    for case, q in forwards:
        if q and case.large_offset and q.mistakes == ("one_pass",):
            mistakes, text = q.otherwise or ((), _NO_FIT)
            q.mistakes = mistakes
            q.text = f"{text}; not the one-pass variance: ordinary cases fail too"


def check(
    adapter: Adapter,
    cases: Sequence[Case] = CASES,
    *,
    momentum: float = 0.1,
    momentum_convention: str | None = "auto",
    running_var: str | None = "auto",
) -> Report:
    """Run ``adapter`` on ``cases`` and compare with the reference.

    ``momentum`` is the value handed to the implementation. ``momentum_convention``
    (``"torch"``: momentum weighs the new batch; ``"keras"``: the old value) and
    ``running_var`` (``"unbiased"`` or ``"biased"``) are the conventions it declares; ``None``
    infers them (the convention that fits the most cases decides, and the report says which).
    ``"auto"`` (the default) takes the conventions the adapter's style implies (PyTorch's for
    the module and functional styles, which are defined as like torch.nn.BatchNorm and
    F.batch_norm) and infers them for the others.
    """
    implied = getattr(adapter, "conventions", None)
    style = adapter.style if implied else None
    # Which part the style decided (for the report's note): (momentum, variance).
    by_style = (style if momentum_convention == "auto" else None,
                style if running_var == "auto" else None)  # fmt: skip
    if momentum_convention == "auto":
        momentum_convention = implied[0] if implied else None
    if running_var == "auto":
        running_var = implied[1] if implied else None
    if momentum_convention not in (None, *MOMENTUM_CONVENTIONS):
        raise ValueError(
            f"momentum_convention must be one of {MOMENTUM_CONVENTIONS}, 'auto' or None, "
            f"got {momentum_convention!r}"
        )
    if running_var not in (None, *RUNNING_VARS):
        raise ValueError(
            f"running_var must be one of {RUNNING_VARS}, 'auto' or None, got {running_var!r}"
        )
    ref.check_momentum(momentum, "torch", "unbiased")
    if momentum is None or momentum in (0.0, 0.5, 1.0):
        raise ValueError(
            "momentum must be a number other than 0, 0.5 and 1 (at 0.5 the two momentum "
            "conventions coincide; at 0 and 1 one of them keeps the running statistics "
            f"unchanged, so a missing update would pass), got {momentum!r}"
        )
    outcomes = [_run_case(adapter, case, momentum) for case in cases]
    _one_pass_everywhere(outcomes)
    _one_pass_only_at_large_offsets(outcomes)
    chosen, running_note = _resolve_running(outcomes, momentum_convention, running_var, by_style)
    report = Report(f"style {adapter.style}: {adapter.signature}", [], [], chosen)
    if running_note:
        report.notes.append(running_note)
    if adapter.no_running is not None:
        report.notes.append(f"running statistics not checked: {adapter.no_running}")
    if adapter.no_eval is not None:
        report.notes.append(f"eval forward not checked: {adapter.no_eval}")
    skipped: dict[str, list[str]] = {}
    untracked = []
    for o in outcomes:
        for c in o.checks:
            if c.verdict == "skip":
                skipped.setdefault(c.diagnosis, []).append(c.case)
        if (
            adapter.no_running is None
            and not o.running
            and o.running_error is None
            and not any(c.verdict in ("skip", "ERROR") for c in o.checks)
        ):
            untracked.append(o.case.name)
        report.checks.extend(_rows(o, chosen))
    for reason, names in skipped.items():
        report.notes.append(f"skipped {len(names)} case(s), {reason}: {', '.join(names)}")
    if untracked:
        report.notes.append(
            "running statistics not checked (no running_mean/running_var "
            f"found) in {len(untracked)} case(s)"
        )
    return report


def _rows(o: _Outcome, chosen: tuple[str, str] | None) -> list[Check]:
    rows: dict[str, Check] = {}
    for name, q in o.quantities.items():
        verdict = "FAIL" if q.failed else "pass"
        rows[name] = Check(
            o.case.name,
            name,
            verdict,
            q.error,
            q.tol,
            q.text if q.failed else "",
            q.mistakes if q.failed else (),
        )
    if o.running and chosen is not None and o.running_error is None:
        errors = o.running[chosen]
        for index, name in enumerate(("running_mean", "running_var")):
            tol = tolerance(o.case, name)
            failed = errors[index] > tol
            forward_failed = o.quantity("forward(train)").failed
            keys, text = (
                _diagnose_running(o.running, chosen, index, tol, forward_failed)
                if failed
                else ((), "")
            )
            if failed and text.startswith(_NO_FIT):
                keys, text = _precision(o.case, name, errors[index]) or (keys, text)
            rows[name] = Check(
                o.case.name, name, "FAIL" if failed else "pass", errors[index], tol, text, keys
            )
    ordered = [rows[q] for q in QUANTITIES if q in rows]
    if o.running_error is not None:
        ordered.append(Check(o.case.name, "running", "ERROR", diagnosis=o.running_error))
    return ordered + o.checks
