"""The user implementations the conformance tests check, and how the tests load them.

The implementations are real files in ``fixtures/`` (linted, readable); a test that needs a
mutant reads one, replaces one exact line, and writes the result to ``tmp_path`` under a name
of its own, which the reports then quote (``impl.py, line 3``).
"""

from __future__ import annotations

from pathlib import Path

from batchnorm import testing as bt

FIXTURES = Path(__file__).parent / "fixtures"


def source(name: str) -> str:
    """The text of ``fixtures/<name>.py``."""
    return (FIXTURES / f"{name}.py").read_text()


def fixture(name: str) -> str:
    """The path of ``fixtures/<name>.py``, as ``batchnorm conform`` takes it."""
    return str(FIXTURES / f"{name}.py")


def mutant(tmp_path: Path, name: str, old: str, new: str, *, filename: str = "impl.py") -> str:
    """``fixtures/<name>.py`` with the exact text ``old`` replaced by ``new``, written to
    ``tmp_path/filename``; fails if ``old`` is not in it (the mutant would be the original)."""
    text = source(name)
    assert old in text, f"{old!r} is not in fixtures/{name}.py"
    return write(tmp_path, filename, text.replace(old, new))


def write(tmp_path: Path, filename: str, text: str) -> str:
    path = tmp_path / filename
    path.write_text(text)
    return str(path)


def course_adapter(path: str, **kwargs) -> bt.CourseStyle:
    forward, backward = bt.load_target(f"{path}:forward,backward")
    return bt.CourseStyle(forward, backward, **kwargs)


def failures_by_quantity(report: bt.Report) -> dict[str, list[bt.Check]]:
    out: dict[str, list[bt.Check]] = {}
    for c in report.failures:
        out.setdefault(c.quantity, []).append(c)
    return out
