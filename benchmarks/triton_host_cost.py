"""Host time of one ``BatchNorm2d(backend="triton")`` call: our Python, and Triton's launches.

``python benchmarks/triton_host_cost.py [--device cuda] [--repeats N] [--json PATH] [--quick]``

On a GPU the Triton layer's cost at small sizes is the host's (docs/triton.md, "Benchmark"),
so this times only the host: median microseconds from the call to its return, the device
queue emptied before each call (``torch.cuda.synchronize``), of a training step (forward,
backward of a dense gradient) and of an evaluation forward under ``no_grad``. Three variants
in interleaved rounds (``bench.timing.round_orders``):

* ``triton``: our layer as a user runs it;
* ``triton, kernels stubbed``: the same with every Triton kernel replaced by a no-op (nothing
  is computed; the outputs are uninitialized memory): what is left is our glue, the
  autograd Function and the ATen ops around the kernels. ``triton`` minus this is Triton's
  own launch cost;
* ``torch.nn``: ``nn.BatchNorm2d``, the peer, whose host time on a GPU is its launches.

Without a GPU (``--device cpu``, Triton's interpreter) only the stubbed variant is timed, on
CPU tensors, with the code path a GPU takes (``native.host_read_is_cheap`` answers False, so
the running statistics go to the backend's one-launch update as they would on a GPU). That
measures our glue on this host, not a GPU's: compare runs on the same machine. torch.nn's
time is printed for scale only, since on the CPU it includes the work itself.

Per step, counted in a separate untimed pass: the Triton launches, the ATen ops dispatched
(``TorchDispatchMode``) and the host reads among them (``aten._local_scalar_dense`` and the
like), all of which cost host time on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

if not torch.cuda.is_available():  # before triton's first import: its interpreter, on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import batchnorm.torch as bt  # noqa: E402
from batchnorm._args import positive_int  # noqa: E402
from batchnorm.bench.timing import device_arg, round_orders  # noqa: E402

SHAPES = [(8, 4, 4, 4), (16, 64, 8, 8), (32, 64, 16, 16), (32, 256, 14, 14)]
HOST_READS = ("aten._local_scalar_dense", "aten.is_nonzero", "aten.item", "aten.equal")


class _StubKernel:
    """Stands in for a ``triton.jit`` function: ``kernel[grid](*args)`` counts and returns."""

    launches = 0

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        return self._launch

    @classmethod
    def _launch(cls, *args: Any, **kwargs: Any) -> None:
        cls.launches += 1


@contextlib.contextmanager
def stubbed_kernels() -> Iterator[None]:
    """Every Triton kernel of the backend a no-op that counts its launches."""
    from batchnorm.kernels.triton_gpu import launchers, runtime

    real = runtime._kernels()
    stubs = types.SimpleNamespace(
        **{name: _StubKernel() for name in dir(real) if name.endswith("_kernel")}
    )
    saved = launchers._kernels
    launchers._kernels = lambda: stubs
    try:
        yield
    finally:
        launchers._kernels = saved


@contextlib.contextmanager
def gpu_code_path() -> Iterator[None]:
    """On CPU tensors, the branches a GPU takes: no host read of the running statistics."""
    from batchnorm.torch import functional, native

    saved = functional.host_read_is_cheap, native.host_read_is_cheap
    functional.host_read_is_cheap = native.host_read_is_cheap = lambda t: False
    try:
        yield
    finally:
        functional.host_read_is_cheap, native.host_read_is_cheap = saved


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def train_step(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> None:
    layer.train()
    layer(x.detach().requires_grad_()).backward(dy)


def eval_forward(layer: nn.Module, x: torch.Tensor) -> None:
    layer.eval()
    with torch.no_grad():
        layer(x)


def counts(fn: Callable[[], None], stubbed: bool) -> dict[str, int]:
    """Triton launches, ATen ops and host reads of one call of ``fn``."""
    _StubKernel.launches = 0
    with _OpCounter() as counter:
        fn()
    reads = sum(op in HOST_READS for op in counter.ops)
    out = {"aten_ops": len(counter.ops), "host_reads": reads}
    if stubbed:
        out["triton_launches"] = _StubKernel.launches
    return out


def host_medians_us(
    variants: dict[str, tuple[Callable[[], None], Any]], repeats: int, sync: Callable[[], None]
) -> dict[str, float]:
    """Median host microseconds per call; ``variants`` maps a name to (call, context factory)."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_, order in enumerate(round_orders(list(variants), repeats + 5)):
        for name in order:
            fn, context = variants[name]
            with context():
                sync()
                start = time.perf_counter()
                fn()
                elapsed = time.perf_counter() - start
                sync()
            if round_ >= 5:
                times[name].append(elapsed)
    return {name: statistics.median(t) * 1e6 for name, t in times.items()}


def _stub_context(on_gpu: bool) -> Callable[[], Any]:
    if on_gpu:
        return stubbed_kernels

    @contextlib.contextmanager
    def both() -> Iterator[None]:
        with stubbed_kernels(), gpu_code_path():
            yield

    return both


def measure(shape: tuple[int, ...], device: torch.device, repeats: int) -> dict[str, Any]:
    on_gpu = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if on_gpu else (lambda: None)
    x, dy = torch.randn(shape, device=device), torch.randn(shape, device=device)
    layers = {
        "torch.nn": nn.BatchNorm2d(shape[1]).to(device),
        "triton": bt.BatchNorm2d(shape[1], backend="triton").to(device),
    }
    stub = _stub_context(on_gpu)
    plain = contextlib.nullcontext
    row: dict[str, Any] = {"shape": list(shape), "values": x.numel()}
    for mode, call in (("train", train_step), ("eval", eval_forward)):
        args = (x, dy) if mode == "train" else (x,)
        ours, peer = layers["triton"], layers["torch.nn"]
        variants = {
            "triton, kernels stubbed": (lambda m=ours, a=args, c=call: c(m, *a), stub),
            "torch.nn": (lambda m=peer, a=args, c=call: c(m, *a), plain),
        }
        if on_gpu:
            variants["triton"] = (lambda m=ours, a=args, c=call: c(m, *a), plain)
        row[mode] = {"host_us": host_medians_us(variants, repeats, sync)}
        with stub():
            row[mode]["per_call"] = counts(lambda m=ours, a=args, c=call: c(m, *a), True)
        row[mode]["torch.nn_per_call"] = counts(lambda m=peer, a=args, c=call: c(m, *a), False)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", type=device_arg, default=None, help="cpu or cuda[:N]")
    parser.add_argument("--repeats", type=positive_int, default=200)
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--quick", action="store_true", help="one tiny shape, 3 rounds (a test)")
    args = parser.parse_args()
    shapes, repeats = ([(4, 3, 2, 2)], 3) if args.quick else (SHAPES, args.repeats)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    where = torch.cuda.get_device_name(device) if on_gpu else "CPU (kernels stubbed only)"
    print(f"{where}, torch {torch.__version__}; median host us per call")
    rows = []
    for shape in shapes:
        row = measure(shape, device, repeats)
        rows.append(row)
        for mode in ("train", "eval"):
            us, per = row[mode]["host_us"], row[mode]["per_call"]
            cells = [f"{name} {t:.0f}" for name, t in us.items()]
            print(
                f"{tuple(shape)} {mode}: " + ", ".join(cells)
                + f" | ours per call: {per['triton_launches']} launches, {per['aten_ops']} ATen "
                f"ops, {per['host_reads']} host reads; torch.nn: "
                f"{row[mode]['torch.nn_per_call']['aten_ops']} ATen ops",
                flush=True,
            )  # fmt: skip
    if args.json:
        meta = {"device": where, "torch": torch.__version__, "repeats": repeats}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
