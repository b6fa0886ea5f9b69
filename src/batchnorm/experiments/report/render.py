"""The page from the records: one Jinja2 template per section inside ``page.html.j2``.

Templates live in ``templates/`` (package data) and autoescape every value, so a data set's
name or an exception message cannot break the page; prose with markup is written in the
templates themselves. ``fmt`` formats a number with a Python format spec, ``–`` for none.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from . import sections
from .stages import STAGES, Stage

#: What the page links under each section as its records.
RECORD_SUFFIXES = (".json", ".csv", ".txt", ".dot", ".svg")


def fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def environment(out: Path) -> jinja2.Environment:
    """An environment whose ``written(path)`` says whether ``out/path`` is a file."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("batchnorm.experiments.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,  # a misspelt name fails the render, not the reader
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["fmt"] = fmt
    env.globals["written"] = lambda relative: (out / relative).is_file()
    return env


def _record_files(out: Path, stage: str) -> list[str]:
    directory = out / stage
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if p.suffix in RECORD_SUFFIXES)


def render_section(
    stage: Stage, out: str | Path, status: dict[str, Any], env: jinja2.Environment | None = None
) -> Markup:
    """One section: its state, its template on its records, the links to its records."""
    out = Path(out)
    env = env or environment(out)
    context = (stage.context or sections.records(stage.name))(out)
    entry = status["stages"].get(stage.name, {})
    html = env.get_template(f"sections/{stage.template}").render(
        **context,
        stage=stage.name,
        title=stage.title,
        entry=entry,
        files=_record_files(out, stage.name),
    )
    return Markup(html)


def render_html(out: str | Path, status: dict[str, Any], stages: Sequence[Stage] = STAGES) -> str:
    out = Path(out)
    env = environment(out)
    return env.get_template("page.html.j2").render(
        status=status,
        options=status["options"],
        stages=stages,
        sections=[render_section(stage, out, status, env) for stage in stages],
        cards=sections.cards(out),
        failed=[k for k, v in status["stages"].items() if v["state"] == "failed"],
    )
