"""The result of a run: one :class:`Check` row per case and quantity, in a :class:`Report`.

The text the report prints is in ``formatting.py``; the methods here only hand over to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import formatting


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
        """One line: PASS or FAIL with the counts."""
        return formatting.summary(self)

    def table(self, *, verbose: bool = False) -> str:
        """The report as a text table; passing cases collapse to one row unless ``verbose``."""
        return formatting.table(self, verbose=verbose)

    def diagnoses(self) -> str:
        """Each distinct diagnosis of a failure, with the cases and quantities it covers."""
        return formatting.diagnoses(self)

    def format(self, *, verbose: bool = False) -> str:
        """Header, notes, table, diagnoses and summary, as ``batchnorm conform`` prints them."""
        return formatting.format_report(self, verbose=verbose)
