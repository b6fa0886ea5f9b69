"""Per-step overhead of SyncBatchNorm against local batch norm, on 2 CPU processes (gloo).

    .venv/bin/python benchmarks/sync_overhead.py [--shape 16,32,28,28] [--steps 30] [--out DIR]

Each of 2 processes (one thread each, torch and numba) runs forward + backward of one layer on
its own shard, alternating the layers step by step so machine noise hits them alike:
``torch.nn.BatchNorm2d`` and our ``BatchNorm2d`` (local statistics, no communication), and our
``SyncBatchNorm`` (one all_gather forward, one all_reduce backward) twice: on the reference's
stages (``backend="reference"``: what it always ran before the stage protocol) and with
``backend="auto"`` (the Numba stages on CPU). Prints median per-step times, the overhead over
local batch norm and the speed-up of the backend's stages, and writes JSON to
``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SYNC_BEFORE = "batchnorm SyncBatchNorm (reference stages)"
SYNC_AFTER = "batchnorm SyncBatchNorm (auto)"


def worker(rank, world, init, shape, steps, out):
    from batchnorm.torch import BatchNorm2d, SyncBatchNorm

    torch.set_num_threads(1)
    try:
        import numba

        numba.set_num_threads(1)  # one core per process, as torch
    except ImportError:
        pass
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    layers = {
        "torch.nn.BatchNorm2d": torch.nn.BatchNorm2d(shape[1]),
        "batchnorm BatchNorm2d (local)": BatchNorm2d(shape[1]),
        SYNC_BEFORE: SyncBatchNorm(shape[1], backend="reference"),
        SYNC_AFTER: SyncBatchNorm(shape[1]),
    }
    x = torch.randn(*shape, requires_grad=True)
    dy = torch.randn(*shape)
    times = {name: [] for name in layers}
    for step in range(steps + 3):
        for name, layer in layers.items():
            dist.barrier()
            start = time.perf_counter()
            layer(x).backward(dy)
            elapsed = time.perf_counter() - start
            if step >= 3:  # warm-up
                times[name].append(elapsed)
    if rank == 0:
        medians = {k: float(np.median(v)) for k, v in times.items()}
        ran = {k: getattr(layer, "last_backend", None) for k, layer in layers.items()}
        Path(out).write_text(json.dumps({"medians": medians, "backends": ran}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="16,32,28,28", help="per-process input shape")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default=str(Path(__file__).with_name("results")))
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "times.json"
        mp.spawn(worker, args=(2, Path(tmp) / "rdzv", shape, args.steps, result_file), nprocs=2)
        measured = json.loads(result_file.read_text())
    medians = measured["medians"]
    local = medians["batchnorm BatchNorm2d (local)"]
    report = {
        "benchmark": "sync_overhead",
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or ''} CPU, 2 processes, gloo",
        "torch": torch.__version__,
        "shape_per_process": shape,
        "steps": args.steps,
        "median_step_seconds": medians,
        "last_backend": measured["backends"],
        "sync_over_local": medians[SYNC_AFTER] / local,
        "sync_speedup_from_backend_stages": medians[SYNC_BEFORE] / medians[SYNC_AFTER],
    }
    for name, t in medians.items():
        ran = measured["backends"].get(name)
        label = f"{name} [{ran}]" if ran else name
        print(f"{label:<52} {t * 1e3:8.3f} ms/step   x{t / local:.2f} of local")
    print(
        "SyncBatchNorm on its backend's stages: "
        f"{report['sync_speedup_from_backend_stages']:.2f}x faster than on the reference's"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"sync-cpu-{report['date']}-stages.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
