"""The machine a record was taken on: one description for CPU and GPU runs.

What changes a timing is recorded beside it: library versions and thread counts, cache sizes,
the load average before and after (the machines are shared), the allocator settings that move
PyTorch's CPU times a lot (docs/bench.md), and on CUDA the device, its SM count and the
CUDA/cuDNN versions.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

__all__ = ["describe", "finish", "label"]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _caches_and_memory() -> dict[str, Any]:
    """Per-core cache sizes and total memory, where Linux says (empty elsewhere)."""
    info: dict[str, Any] = {}
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for index in sorted(base.glob("index*")):
            level = (index / "level").read_text().strip()
            if (index / "type").read_text().strip() != "Instruction":
                info[f"L{level}_cache"] = (index / "size").read_text().strip()
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as fh:
            info["memory_GB"] = round(int(fh.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return info


def _loadavg() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _gpu(device: str) -> dict[str, Any]:
    import torch

    props = torch.cuda.get_device_properties(torch.device(device))
    return {
        "gpu": {
            "name": props.name,
            "sms": props.multi_processor_count,
            "memory_GiB": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
        },
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }


def describe(device: str) -> dict[str, Any]:
    """Everything above, at the start of a run (``finish`` adds the end's load and threads)."""
    import numpy as np
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        **_caches_and_memory(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        # PyTorch's CPU allocator asks for huge pages only with this set; where page faults are
        # expensive it changes the torch peer's times a lot (docs/bench.md).
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        # Read by OpenMP when torch loads it; `batchnorm bench` sets PASSIVE unless it is set.
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        # The numba backend's output pool (docs/kernels.md); "0" turns it off.
        "BATCHNORM_NUMBA_POOL_MB": os.environ.get("BATCHNORM_NUMBA_POOL_MB"),
        "loadavg_start": _loadavg(),
    }
    try:
        import numba

        info["numba"], info["numba_threads"] = numba.__version__, numba.get_num_threads()
    except ImportError:
        info["numba"] = None
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["triton_interpreter"] = os.environ.get("TRITON_INTERPRET") == "1"
    if device.startswith("cuda"):
        info.update(_gpu(device))
    return info


def finish(info: dict[str, Any]) -> None:
    """The end of the run: load average and torch threads (a peer may have changed them)."""
    import torch

    info["torch_threads_end"] = torch.get_num_threads()
    info["loadavg_end"] = _loadavg()


def label(info: dict[str, Any]) -> str:
    """A short name for tables, charts and the log: the GPU, else the CPU and its cores."""
    gpu = info.get("gpu")
    if isinstance(gpu, dict):
        return gpu.get("name", "gpu")
    if isinstance(gpu, str):  # schema 1 records
        return gpu
    return f"{info.get('cpu', '?')} ({info.get('cpu_count', '?')} cores)"
