"""``batchnorm report --out DIR [--quick] [--seed S] [--budget SECONDS]``: run every stage,
write ``DIR/index.html``.

Each stage writes its records under ``DIR/<stage>/``; the page is built from those records
only, with figures as relative files, so ``DIR`` can be copied or served as it is. A failed
stage is shown on the page and makes the exit status 1; the others still run.

The package:

* ``stages``: ``STAGES``, the one table of stages (name, title, runner, template, and
  optionally a context function), and the runners of verify, bench, explain and the
  experiments;
* ``runner``: runs a table's stages (failures and time budget recorded per stage), the CLI;
* ``sections``: records -> each section template's context (numbers, never words);
* ``render``: the Jinja2 environment, one section, the page;
* ``templates/``: ``page.html.j2``, ``style.css.j2``, ``cards.html.j2``, ``section.html.j2``
  (every section's frame), ``macros.html.j2`` (table, figure) and ``sections/<stage>.html.j2``
  (each section's prose, figures and tables).

To add a section (say, batch norm across frameworks):

1. a runner ``run(out: Path, options: Options)`` that writes ``out/records.json`` (and any
   figures and CSV files beside it), e.g. in the experiment's own module;
2. one row in ``STAGES``: ``Stage("frameworks", "Batch norm across frameworks", run,
   "frameworks.html.j2")``;
3. one template ``templates/sections/frameworks.html.j2`` that extends ``section.html.j2`` and
   reads ``records``.

Nothing else: the runner, ``--skip``, the navigation, the status and the record links follow
from the row. A section that needs numbers derived from its records adds a context function in
``sections`` as the row's fifth field.
"""

from __future__ import annotations

from .render import render_html, render_section
from .runner import build_report, main, run_stage
from .stages import (
    FRAMEWORK_CASES,
    FRAMEWORK_CASES_QUICK,
    FRAMEWORK_ENTRIES_QUICK,
    STAGES,
    Options,
    Skipped,
    Stage,
    names,
    run_bench,
    run_frameworks,
)

__all__ = [
    "STAGES",
    "Options",
    "Skipped",
    "Stage",
    "build_report",
    "main",
    "names",
    "render_html",
    "render_section",
    "run_bench",
    "run_frameworks",
    "FRAMEWORK_CASES",
    "FRAMEWORK_CASES_QUICK",
    "FRAMEWORK_ENTRIES_QUICK",
    "run_stage",
]
