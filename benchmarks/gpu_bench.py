"""Run the GPU benchmark and keep its record: ``python benchmarks/gpu_bench.py [bench options]``.

Same as ``batchnorm bench --device cuda [options]`` (Triton against PyTorch eager and
``torch.compile``, fused BN+ReLU tails included), kept as
``benchmarks/results/gpu-<device name>-<date>[-n].json/.png`` with its summary line appended to
``benchmarks/results/log.csv``, like ``cpu_bench.py``. See ``docs/bench.md`` and
``docs/triton.md``.
"""

from __future__ import annotations

import re
import sys

import torch
from cpu_bench import keep

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a == "--device" or a.startswith("--device=") for a in argv):
        argv = ["--device", "cuda", *argv]
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no-gpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    sys.exit(keep(argv, f"gpu-{slug}", "gpu_bench.py"))
