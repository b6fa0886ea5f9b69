"""Run the GPU benchmark: ``python benchmarks/gpu_bench.py [--quick] [--no-compile] ...``.

Writes ``benchmarks/results/gpu-bench-<device>-<time>.json``; see ``batchnorm.bench_gpu`` and
``docs/triton.md``. Same as ``python -m batchnorm.bench_gpu``.
"""

import sys

from batchnorm.bench_gpu import main

if __name__ == "__main__":
    sys.exit(main())
