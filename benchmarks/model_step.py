"""A whole model's training step: torch.nn, ``convert`` and ``convert(fuse_activations=True)``.

``python benchmarks/model_step.py [--quick] [--out FILE]``: ResNet-18- and ResNet-50-style
networks (written below: no torchvision, no download), on CPU, batch 16 and 32, float32 and
bfloat16, input 3 x SIZE x SIZE (64 by default; ``--size``). For each configuration, in one
process and on the same weights and batch:

* the median time of a training step (forward, cross-entropy, backward, SGD update) after
  warm-up, per variant, and its ratio to torch.nn's (> 1: faster than torch.nn);
* the bytes of tensors saved for backward, counting each storage once
  (``torch.autograd.graph.saved_tensors_hooks``);
* the share of the step spent in batch norm (and in ReLU) according to ``torch.profiler``:
  the batch-norm modules' forward (a ``record_function`` range around each) plus their
  backward nodes (autograd node names with "BatchNorm"); with fused activations the ReLU
  is inside the fused module.

Also, once: the saved-tensor bytes of one BN+ReLU (and BN+LeakyReLU) pair, torch.nn against
the fused module, the figure docs/torch.md quotes. ``--quick`` (a one-block-per-stage ResNet,
batch 4, 32 x 32, float32, 1 repeat) is the smoke run the tests use. ``--threads N`` sets
torch's threads (the committed results used 1 on a 2-core machine shared with other jobs: with
2, the load made PyTorch's threads wait on each other and single steps 10-100x slower).
Variants are timed interleaved, round after round, so that a load change on a shared machine
hits all of them alike; the script sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment has
one (recorded in the JSON), since otherwise the Numba kernels' OpenMP workers keep spinning
after each call and slow PyTorch's own ops that follow (a torch.nn step measured 4-6x slower
right after a converted model's step).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os

# Before numba or torch start their OpenMP pools: idle workers sleep instead of spinning
# (docs/torch.md, Limitations). An explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import batchnorm.torch as bt

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


def variants(model: nn.Module) -> dict[str, nn.Module]:
    """torch.nn, convert, convert + fused activations: three copies with equal weights."""
    out = {"torch.nn": model, "convert": bt.convert(copy.deepcopy(model))}
    out["convert+fused"] = bt.convert(copy.deepcopy(model), fuse_activations=True)
    return out


def step_fn(model: nn.Module, x: torch.Tensor, target: torch.Tensor):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x).float(), target)
        loss.backward()
        optimizer.step()

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


def _is_bn(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def profile_shares(model: nn.Module, step) -> dict[str, float]:
    """Shares of one profiled step in batch norm and in ReLU (forward ranges + backward nodes)."""
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
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            step()
            total_us = (time.perf_counter() - start) * 1e6
    finally:
        for h in handles:
            h.remove()
    bn_us = relu_us = 0.0
    for event in prof.key_averages():
        name = event.key
        if name == "bench::bn" or ("BatchNorm" in name and "Backward" in name):
            bn_us += event.cpu_time_total
        elif name == "bench::relu" or name in ("ReluBackward0", "ThresholdBackward0"):
            relu_us += event.cpu_time_total
    return {"bn_share": bn_us / total_us, "relu_share": relu_us / total_us}


def _is_relu(module: nn.Module) -> bool:
    return isinstance(module, nn.ReLU | nn.LeakyReLU)


def measure(name: str, batch: int, dtype: torch.dtype, size: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = MODELS[name]().to(dtype)
    models = variants(model)
    x = torch.randn(batch, 3, size, size, dtype=dtype)
    target = torch.randint(0, 100, (batch,))
    steps = {k: step_fn(m, x, target) for k, m in models.items()}
    for step in steps.values():  # warm-up: JIT compilation, allocator, first-call caches
        step(), step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):  # interleaved rounds
        for k, step in steps.items():
            start = time.perf_counter()
            step()
            times[k].append(time.perf_counter() - start)
    result = {
        "model": name,
        "batch": batch,
        "dtype": str(dtype).replace("torch.", ""),
        "size": size,
    }
    base = statistics.median(times["torch.nn"])
    for k, m in models.items():
        med = statistics.median(times[k])
        loss = lambda m=m: nn.functional.cross_entropy(m(x).float(), target)  # noqa: E731
        result[k] = {
            "step_ms": med * 1e3,
            "speed_vs_torch_nn": base / med,
            "saved_bytes": saved_bytes(loss),
            **profile_shares(m, steps[k]),
        }
    for k in ("convert", "convert+fused"):
        result[k]["saved_vs_torch_nn"] = (
            result[k]["saved_bytes"] / result["torch.nn"]["saved_bytes"]
        )
    return result


def pair_bytes(dtype: torch.dtype, shape: tuple[int, ...] = (16, 64, 28, 28)) -> dict:
    """Saved bytes of one BN+activation pair on an input of ``shape``, torch.nn vs fused."""
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    out = {}
    pairs = {
        "bn+relu": (
            nn.Sequential(nn.BatchNorm2d(shape[1]), nn.ReLU()),
            bt.BatchNormReLU2d(shape[1]),
        ),
        "bn+leaky_relu": (
            nn.Sequential(nn.BatchNorm2d(shape[1]), nn.LeakyReLU(0.01)),
            bt.BatchNormLeakyReLU2d(shape[1], negative_slope=0.01),
        ),
    }
    for name, (theirs, ours) in pairs.items():
        theirs, ours = theirs.to(dtype), ours.to(dtype)
        a, b = saved_bytes(lambda m=theirs: m(x)), saved_bytes(lambda m=ours: m(x))
        out[name] = {"torch.nn": a, "fused": b, "ratio": b / a}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: a tiny ResNet, batch 4")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    pair_shape = (16, 64, 28, 28)
    if args.quick:
        configs = [("tiny", 4, torch.float32)]
        size, repeats, pair_shape = 32, 1, (2, 8, 4, 4)
    else:
        configs = [
            (name, batch, dtype)
            for name in ("resnet18", "resnet50")
            for dtype in (torch.float32, torch.bfloat16)
            for batch in (16, 32)
        ]
        size, repeats = args.size, args.repeats
    record = {
        "benchmark": "model_step",
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "torch": torch.__version__,
        "input": f"3x{size}x{size}",
        "repeats": repeats,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "pairs": {
            str(d).replace("torch.", ""): pair_bytes(d, pair_shape)
            for d in (torch.float32, torch.bfloat16)
        },
        "results": [],
    }
    print(f"input 3x{size}x{size}, {repeats} timed steps per variant (median)")
    for name, batch, dtype in configs:
        r = measure(name, batch, dtype, size, repeats)
        record["results"].append(r)
        cells = [
            f"{k} {r[k]['step_ms']:.0f} ms x{r[k]['speed_vs_torch_nn']:.2f} "
            f"saved {r[k]['saved_bytes'] / 2**20:.0f} MiB bn {100 * r[k]['bn_share']:.1f}%"
            for k in ("torch.nn", "convert", "convert+fused")
        ]
        print(f"{name} batch {batch} {r['dtype']}: " + " | ".join(cells), flush=True)
    for d, pairs in record["pairs"].items():
        for k, v in pairs.items():
            print(f"pair {k} {d}: fused saves {v['ratio']:.3f}x torch.nn's bytes")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
