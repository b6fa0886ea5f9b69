"""Run the CPU benchmark and keep its record: ``python benchmarks/cpu_bench.py [bench options]``.

Same as ``batchnorm bench --out benchmarks/results ...``, then copies the JSON and PNG to
``benchmarks/results/cpu-<date>[-<n>].json/.png``; see ``batchnorm.bench`` and ``docs/bench.md``.
"""

import datetime
import shutil
import sys
import tempfile
from pathlib import Path

from batchnorm.bench import main

if __name__ == "__main__":
    results = Path(__file__).resolve().parent / "results"
    with tempfile.TemporaryDirectory() as tmp:
        code = main(["--out", tmp, *sys.argv[1:]])
        if code:
            sys.exit(code)
        stem = f"cpu-{datetime.date.today().isoformat()}"
        n = 0
        while (results / f"{stem}{f'-{n}' if n else ''}.json").exists():
            n += 1
        stem = f"{stem}{f'-{n}' if n else ''}"
        for path in Path(tmp).iterdir():
            target = results / f"{stem}{path.suffix}"
            shutil.copy(path, target)
            print(f"kept {target}")
