"""A whole model's training step: torch.nn, ``convert`` and ``convert(fuse_activations=True)``.

``python benchmarks/model_step.py [--quick] [--device cuda] [--compile [BACKEND]] [--models
resnet18,resnet50] [--dtypes float32,bfloat16] [--batches 16,32] [--out FILE]``: ResNet-18- and
ResNet-50-style networks (written below: no torchvision, no download), on CPU (or the
``--device`` given), batch 16 and 32, float32 and
bfloat16, input 3 x SIZE x SIZE for each SIZE of ``--sizes`` (64 and 112 by default; 112 is
the input of the measurement issue 20 started from). For each configuration, in one process
and on the same weights and batch:

* the time of a training step (forward, cross-entropy, backward, SGD update) per variant over
  ``--repeats`` rounds (15); every round runs each variant once, in a balanced order
  (``batchnorm.bench.timing.round_orders``: all six orders of the three variants in each
  block of six rounds). Speed is torch.nn's time over the variant's (> 1: faster than torch.nn): the
  median of the per-round ratios with their quartiles, the median's distribution-free 95%
  interval (order statistics) with a verdict (``faster`` or ``slower`` where the interval
  excludes 1.0, else ``within noise``), and the ratio of the two fastest steps. On this
  2-core machine a step varies by several percent from round to round, as much as batch
  norm's whole share of it, so a single ratio of medians says little;
* the bytes of tensors saved for backward, counting each storage once
  (``torch.autograd.graph.saved_tensors_hooks``);
* the share of the step spent in batch norm (and in ReLU) according to ``torch.profiler``
  (one profiled step): the batch-norm modules' forward (a ``record_function`` range around
  each) plus their backward nodes (autograd node names with "BatchNorm"); with fused
  activations the ReLU is inside the fused module. On a GPU the share is of the host's time
  (launching), and ``bn_device_share`` adds the share of the GPU's kernel time, from the
  kernels the profiler puts under those ranges and nodes;
* which path each variant's batch-norm layers ran (``paths``: ``last_backend`` counted).

On a GPU every step ends with ``torch.cuda.synchronize``: a step's time is until its last
kernel has finished, what a training loop that reads its loss waits for.

Also, once: the saved-tensor bytes of one BN+ReLU (and BN+LeakyReLU) pair, torch.nn against
the fused module, the figure docs/torch.md quotes. ``--compile`` times the three variants each
through ``torch.compile`` (inductor unless another backend is named; the warm-up steps
compile), where a converted model's layers all run PyTorch's kernel in one graph
(docs/torch.md, Limitations); saved bytes and the profile are then left out. ``--quick`` (a
one-block-per-stage ResNet, batch 4, 32 x 32, float32, 2 rounds) is the smoke run the tests
use. ``--threads N`` sets
torch's threads. The script sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment has one
(recorded in the JSON): otherwise the OpenMP workers of Numba and of PyTorch (two runtimes in
one process) spin after each call against each other's next call (docs/torch.md,
Limitations).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import logging
import math
import os

# Before numba or torch start their OpenMP pools: idle workers sleep instead of spinning
# (docs/torch.md, Limitations). An explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

import batchnorm.torch as bt
from batchnorm.bench.timing import device_arg, round_orders

# --------------------------------------------------------------------------------- the models


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(inplanes, planes, stride, self.expansion)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inplanes, planes, stride, self.expansion)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _downsample(inplanes: int, planes: int, stride: int, expansion: int) -> nn.Module | None:
    if stride == 1 and inplanes == planes * expansion:
        return None
    return nn.Sequential(
        nn.Conv2d(inplanes, planes * expansion, 1, stride, bias=False),
        nn.BatchNorm2d(planes * expansion),
    )


class ResNet(nn.Module):
    """torchvision's ResNet layout: a 7x7 stem, max-pool, four stages, global pool, linear."""

    def __init__(self, block: type, layers: list[int], classes: int = 100) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        stages, inplanes = [], 64
        for i, (planes, count) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            blocks = []
            for j in range(count):
                blocks.append(block(inplanes, planes, 2 if i > 0 and j == 0 else 1))
                inplanes = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(inplanes, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


MODELS = {
    "tiny": lambda: ResNet(BasicBlock, [1, 1, 1, 1]),  # --quick only
    "resnet18": lambda: ResNet(BasicBlock, [2, 2, 2, 2]),
    "resnet50": lambda: ResNet(Bottleneck, [3, 4, 6, 3]),
}

# ------------------------------------------------------------------------------ measurements

CPU = torch.device("cpu")


def variants(model: nn.Module) -> dict[str, nn.Module]:
    """torch.nn, convert, convert + fused activations: three copies with equal weights."""
    out = {"torch.nn": model, "convert": bt.convert(copy.deepcopy(model))}
    out["convert+fused"] = bt.convert(copy.deepcopy(model), fuse_activations=True)
    return out


def step_fn(model: nn.Module, x: torch.Tensor, target: torch.Tensor):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    on_gpu = x.is_cuda

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x).float(), target)
        loss.backward()
        optimizer.step()
        if on_gpu:
            torch.cuda.synchronize(x.device)

    return step


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves while ``fn`` builds its graph, each storage once."""
    storages: dict[tuple[int, str], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[(storage.data_ptr(), str(t.device))] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def paths_ran(model: nn.Module) -> dict[str, int]:
    """How many batch-norm modules ran each path in their last call (``last_backend``: "torch"
    for PyTorch's kernel, else our backend's name; torch.nn's own modules count as "torch.nn").
    Which path ``auto`` took decides most of a variant's time."""
    ran: dict[str, int] = {}
    for module in model.modules():
        if _is_bn(module):
            path = getattr(module, "last_backend", "torch.nn") or "not run"
            ran[path] = ran.get(path, 0) + 1
    return dict(sorted(ran.items()))


def _is_bn(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def profiled_part(name: str) -> str | None:
    """``bn`` or ``relu`` for a profiler event that is one of their forward ranges or backward
    nodes, else None. The engine's ``autograd::engine::evaluate_function: <node>`` wraps each
    node and is left out: counting both counted every backward twice (as this script did
    until 2026-12-04)."""
    if name == "bench::bn" or ("BatchNorm" in name and "Backward" in name):
        return None if name.startswith("autograd::engine::") else "bn"
    if name in (
        "bench::relu", "ReluBackward0", "ThresholdBackward0", "LeakyReluBackward0",
        "LeakyReluBackward1",
    ):  # fmt: skip
        return "relu"
    return None


def profile_shares(model: nn.Module, step, steps: int = 3, gpu: bool = False) -> dict[str, float]:
    """Shares of ``steps`` profiled steps in batch norm and in ReLU (forward ranges + backward
    nodes), and their milliseconds per step together: the part of the step the variants
    change, measured apart from the convolutions' noise (the profiler's own overhead included,
    which weighs more on Python-heavy layers). With ``gpu``, also batch norm's share of the
    kernels' time and its (and ReLU's) kernel milliseconds per step."""
    handles = []

    def label(name):
        def pre(module, args):
            module._bench_range = torch.profiler.record_function(name)
            module._bench_range.__enter__()

        def post(module, args, output):
            module._bench_range.__exit__(None, None, None)

        return pre, post

    for module in model.modules():
        name = "bench::bn" if _is_bn(module) else "bench::relu" if _is_relu(module) else None
        if name:
            pre, post = label(name)
            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    activities = [torch.profiler.ProfilerActivity.CPU]
    if gpu:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    try:
        with torch.profiler.profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                step()
            total_us = (time.perf_counter() - start) * 1e6
    finally:
        for h in handles:
            h.remove()
    spent = {"bn": 0.0, "relu": 0.0, None: 0.0}
    for event in prof.key_averages():
        spent[profiled_part(event.key)] += event.cpu_time_total
    bn_us, relu_us = spent["bn"], spent["relu"]
    shares = {
        "bn_share": bn_us / total_us,
        "relu_share": relu_us / total_us,
        "bn_relu_ms": (bn_us + relu_us) / steps / 1e3,
        "profiled_step_ms": total_us / steps / 1e3,
    }
    if gpu:
        shares.update(_kernel_shares(prof.events(), steps))
    return shares


def _kernel_shares(events, steps: int) -> dict[str, float]:
    """The GPU side, from the host-side events alone: each kernel is attached to the op that
    launched it, so the ops' self device times add up to every kernel once, and a range's or a
    backward node's device time is that of the kernels launched inside it. (Summing every
    event, kernels and the GPU-side copies of our ranges included, counted each kernel twice
    and the ranges' gaps too: benchmarks/results/gpu-session-h200-2026-12-04.md.)"""
    from torch.autograd import DeviceType

    kernels = {"bn": 0.0, "relu": 0.0, None: 0.0}
    all_us = 0.0
    for event in events:
        if event.device_type != DeviceType.CPU:
            continue
        all_us += event.self_device_time_total
        part = profiled_part(event.name)
        if part is not None:
            kernels[part] += event.device_time_total
    return {
        "bn_device_share": kernels["bn"] / all_us if all_us else 0.0,
        "bn_relu_device_ms": (kernels["bn"] + kernels["relu"]) / steps / 1e3,
        "kernels_ms": all_us / steps / 1e3,
    }


def _is_relu(module: nn.Module) -> bool:
    return isinstance(module, nn.ReLU | nn.LeakyReLU)


def timed_rounds(steps: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds per step of each variant, ``rounds`` rounds after two warm-up steps each
    (JIT compilation, allocator, first-call caches). Every round runs every variant once,
    in a balanced order (``round_orders``), so that neither a load change on the
    shared machine nor the order favours one."""
    for step in steps.values():
        step(), step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for order in round_orders(list(steps), rounds):
        for k in order:
            start = time.perf_counter()
            steps[k]()
            times[k].append(time.perf_counter() - start)
    return times


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median of ``values``' population: the k-th
    smallest and k-th largest value, with the largest k whose coverage, from the binomial
    distribution of how many values fall below the median (p = 1/2), is at least
    ``confidence`` (Conover, Practical Nonparametric Statistics, 3rd ed., sec. 3.2). Too few
    values for that (fewer than 6 at 95%): the smallest and the largest."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("median_interval needs at least one value")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    k = 1
    # Coverage of [x_(j), x_(n+1-j)] is 1 - 2 P(B <= j - 1), B ~ Binomial(n, 1/2).
    below = 1  # 2**n * P(B <= j - 1), built up one term at a time
    for j in range(2, n // 2 + 1):
        below += math.comb(n, j - 1)
        if 1 - 2 * below / 2**n < confidence:
            break
        k = j
    return ordered[k - 1], ordered[n - k]


#: Fewer rounds than this give no 95% interval (the extremes cover less: 93.75% of 5).
MIN_ROUNDS = 6


def verdict(low: float, high: float, rounds: int = MIN_ROUNDS) -> str:
    """``faster`` or ``slower`` than torch.nn where the median ratio's 95% interval excludes
    1, ``within noise`` where it does not, ``too few rounds`` where there is no such interval."""
    if rounds < MIN_ROUNDS:
        return "too few rounds"
    return "faster" if low > 1 else "slower" if high < 1 else "within noise"


def speed_figures(base: list[float], mine: list[float]) -> dict[str, Any]:
    """torch.nn's time over this variant's, > 1 when faster: the median and quartiles of the
    per-round ratios (each round's steps ran seconds apart, so slow drifts of the machine
    cancel), the median's 95% interval and what it says, and the ratio of the fastest steps
    (a step is only ever slowed by other load)."""
    ratios = sorted(b / m for b, m in zip(base, mine, strict=True))
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    low, high = median_interval(ratios)
    return {
        "speed_vs_torch_nn": statistics.median(ratios),
        "speed_q1": quartiles[0],
        "speed_q3": quartiles[2],
        "speed_ci95": [low, high],
        "verdict": verdict(low, high, len(ratios)),
        "speed_fastest_vs_fastest": min(base) / min(mine),
    }


def measure(
    name: str,
    batch: int,
    dtype: torch.dtype,
    size: int,
    repeats: int,
    device: torch.device = CPU,
    compiled: str | None = None,
) -> dict:
    torch.manual_seed(0)
    model = MODELS[name]().to(device, dtype)
    models = variants(model)
    x = torch.randn(batch, 3, size, size, dtype=dtype, device=device)
    target = torch.randint(0, 100, (batch,), device=device)
    # Compiled, each variant's first (warm-up) steps include its compilation. Dynamo's caches
    # are emptied first: the code objects (ResNet.forward, the layers') are shared by every
    # configuration, and past its recompile limit (8) Dynamo silently runs them eagerly.
    if compiled:
        from torch._dynamo.utils import counters

        torch.compiler.reset()
        counters.clear()  # reset() leaves them: graph breaks would add up over configurations
    run = {k: torch.compile(m, backend=compiled) if compiled else m for k, m in models.items()}
    steps = {k: step_fn(m, x, target) for k, m in run.items()}
    times = timed_rounds(steps, repeats)
    result = {
        "model": name,
        "batch": batch,
        "dtype": str(dtype).replace("torch.", ""),
        "size": size,
    }
    for k, m in models.items():
        loss = lambda m=m: nn.functional.cross_entropy(m(x).float(), target)  # noqa: E731
        result[k] = {
            "step_ms": statistics.median(times[k]) * 1e3,
            "fastest_step_ms": min(times[k]) * 1e3,
            **speed_figures(times["torch.nn"], times[k]),
            "paths": paths_ran(m),
        }
        if not compiled:  # of the eager model: what a compiled graph saves is inductor's choice
            result[k]["saved_bytes"] = saved_bytes(loss)
            result[k].update(profile_shares(m, steps[k], gpu=device.type == "cuda"))
    if compiled:
        from torch._dynamo.utils import counters

        result["graph_breaks"] = sum(counters["graph_break"].values())
        return result
    for k in ("convert", "convert+fused"):
        result[k]["saved_vs_torch_nn"] = (
            result[k]["saved_bytes"] / result["torch.nn"]["saved_bytes"]
        )
    return result


def pair_bytes(
    dtype: torch.dtype,
    shape: tuple[int, ...] = (16, 64, 28, 28),
    device: torch.device = CPU,
) -> dict:
    """Saved bytes of one BN+activation pair on an input of ``shape``: torch.nn, the fused
    module on its fused kernels (the backend named: the memory the fusion itself saves), and
    the fused module with ``backend="auto"``, which below ``native.NATIVE_BELOW`` runs
    PyTorch's kernel and the activation and so keeps what torch.nn keeps."""
    if device.type == "cuda":
        kernels = "triton"
    else:
        kernels = "numba" if importlib.util.find_spec("numba") else "reference"
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    out = {}
    pairs = {
        "bn+relu": (
            nn.Sequential(nn.BatchNorm2d(shape[1]), nn.ReLU()),
            bt.BatchNormReLU2d(shape[1], backend=kernels),
            bt.BatchNormReLU2d(shape[1]),
        ),
        "bn+leaky_relu": (
            nn.Sequential(nn.BatchNorm2d(shape[1]), nn.LeakyReLU(0.01)),
            bt.BatchNormLeakyReLU2d(shape[1], negative_slope=0.01, backend=kernels),
            bt.BatchNormLeakyReLU2d(shape[1], negative_slope=0.01),
        ),
    }
    for name, modules in pairs.items():
        theirs, fused, auto = (m.to(device, dtype) for m in modules)
        a, b, c = (saved_bytes(lambda m=m: m(x)) for m in (theirs, fused, auto))
        out[name] = {
            "torch.nn": a,
            "fused": b,
            "ratio": b / a,
            "kernels": kernels,
            "auto": c,
            "auto_ratio": c / a,
            "auto_ran": auto.last_backend,
        }
    return out


def write(record: dict, out: Path | None) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1) + "\n")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _eager_cells(figures: dict) -> str:
    return (
        f"saved {figures['saved_bytes'] / 2**20:.0f} MiB bn {100 * figures['bn_share']:.1f}% "
        f"bn+relu {figures['bn_relu_ms']:.1f} ms "
    )


def _choices(text: str, known: dict, option: str) -> list[str]:
    chosen = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in known]
    if unknown or not chosen:
        raise SystemExit(f"{option}: unknown {unknown or text!r}; known: {', '.join(known)}")
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: a tiny ResNet, batch 4")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", type=device_arg, default="cpu", help="cpu or cuda[:N]")
    parser.add_argument(
        "--sizes",
        default="64,112",
        help="input heights (= widths), comma-separated (112: the issue's own measurement)",
    )
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds per configuration")
    parser.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        default=None,
        metavar="BACKEND",
        help="time torch.compile'd variants (backend: inductor unless named); no saved bytes "
        "or profile then",
    )
    parser.add_argument("--models", default="resnet18,resnet50", help="comma-separated")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated")
    parser.add_argument("--batches", default="16,32", help="comma-separated")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    pair_shape = (16, 64, 28, 28)
    if args.quick:
        configs = [("tiny", 4, torch.float32, 32)]
        sizes, repeats, pair_shape = [32], 2, (2, 8, 4, 4)
    else:
        sizes = [int(v) for v in args.sizes.split(",")]
        names = _choices(args.models, MODELS, "--models")
        dtypes = [getattr(torch, d) for d in _choices(args.dtypes, DTYPES, "--dtypes")]
        configs = [
            (name, batch, dtype, size)
            for size in sizes
            for name in names
            for dtype in dtypes
            for batch in (int(b) for b in args.batches.split(","))
        ]
        repeats = args.repeats
    record = {
        "benchmark": "model_step",
        "machine": platform.processor() or platform.machine(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "torch": torch.__version__,
        "inputs": [f"3x{size}x{size}" for size in sizes],
        "repeats": repeats,
        "compiled": args.compile,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "pairs": {
            str(d).replace("torch.", ""): pair_bytes(d, pair_shape, device)
            for d in (torch.float32, torch.bfloat16)
        },
        "results": [],
    }
    print(
        f"{repeats} rounds per configuration; speed = torch.nn's time / the variant's, "
        "median of the rounds' ratios (its 95% interval: faster, slower or within noise)"
    )
    for name, batch, dtype, size in tqdm(configs, desc="configurations", disable=args.quick):
        r = measure(name, batch, dtype, size, repeats, device, compiled=args.compile)
        record["results"].append(r)
        cells = [
            f"{k} {r[k]['step_ms']:.0f} ms x{r[k]['speed_vs_torch_nn']:.3f} "
            f"(95% {r[k]['speed_ci95'][0]:.3f}-{r[k]['speed_ci95'][1]:.3f}: {r[k]['verdict']}) "
            + ("" if args.compile else _eager_cells(r[k]))
            + "ran "
            + ",".join(f"{path}:{n}" for path, n in r[k]["paths"].items())
            for k in ("torch.nn", "convert", "convert+fused")
        ]
        breaks = f" ({r['graph_breaks']} graph breaks)" if args.compile else ""
        tqdm.write(f"{name} {size}px batch {batch} {r['dtype']}{breaks}: " + " | ".join(cells))
        write(record, args.out)  # after each configuration: a run cut short keeps what it measured
    for d, pairs in record["pairs"].items():
        for k, v in pairs.items():
            print(
                f"pair {k} {d}: fused kernels ({v['kernels']}) save {v['ratio']:.3f}x torch.nn's "
                f"bytes; auto ({v['auto_ran']}) {v['auto_ratio']:.3f}x"
            )
    write(record, args.out)


if __name__ == "__main__":
    main()
