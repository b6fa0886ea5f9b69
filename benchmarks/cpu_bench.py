"""Run the CPU benchmark and keep its record: ``python benchmarks/cpu_bench.py [bench options]``.

Same as ``batchnorm bench [options]``, then keeps the JSON and PNG as
``benchmarks/results/cpu-<date>[-<n>].json/.png`` and appends the run's summary line to
``benchmarks/results/log.csv``. The results folder keeps one reference run per machine kind
(the one the docs quote): delete a kept JSON/PNG once it is not quoted; its line stays in the
log. See ``docs/bench.md``.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from batchnorm.bench import append_log, log_row, main

RESULTS = Path(__file__).resolve().parent / "results"


def keep(argv: list[str], prefix: str, script: str) -> int:
    """Run ``batchnorm bench argv`` into a temporary folder; keep it as ``prefix-<date>[-n]``."""
    with tempfile.TemporaryDirectory() as tmp:
        code = main(["--out", tmp, *argv])
        if code:
            return code
        stem = f"{prefix}-{datetime.date.today().isoformat()}"
        n = 0
        while (RESULTS / f"{stem}{f'-{n}' if n else ''}.json").exists():
            n += 1
        stem = f"{stem}{f'-{n}' if n else ''}"
        for path in Path(tmp).iterdir():
            target = RESULTS / f"{stem}{path.suffix}"
            if path.suffix == ".json":
                # The command that was run, not the temporary --out it used.
                record = json.loads(path.read_text())
                thp = os.environ.get("THP_MEM_ALLOC_ENABLE")
                env = f"THP_MEM_ALLOC_ENABLE={thp} " if thp else ""
                record["command"] = f"{env}python benchmarks/{script} {' '.join(argv)}".strip()
                target.write_text(json.dumps(record, indent=1) + "\n")
                append_log(RESULTS / "log.csv", log_row(record, source=target.name))
            else:
                shutil.copy(path, target)
            print(f"kept {target}")
    print(f"appended to {RESULTS / 'log.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(keep(sys.argv[1:], "cpu", "cpu_bench.py"))
