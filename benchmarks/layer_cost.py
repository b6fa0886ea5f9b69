"""Cost of one BatchNorm2d call, ours against torch.nn, from a tiny layer to a large one.

``python benchmarks/layer_cost.py [--threads N] [--device cuda]``: median milliseconds of a
training step (forward, then backward of a dense gradient) and of an evaluation forward under
no_grad, per layer and shape, all in one process, and each of ours as a ratio to torch.nn's (<
1.3: the target of issue 20): ``BatchNorm2d`` with ``backend="auto"`` and ``"numba"`` against
``nn.BatchNorm2d``, and the fused ``BatchNormReLU2d`` (auto) against ``nn.BatchNorm2d`` +
``nn.ReLU(inplace=True)``. The layers are timed interleaved, round after round, so that a load
change on a shared machine hits all of them alike. Which path ``auto`` ran is printed
(``last_backend``: "torch" is PyTorch's own kernel, see docs/torch.md, "Cost per call"). With
``--device cuda`` the explicit backend is ``"triton"`` instead of ``"numba"``, a larger shape is
added, and each call is timed up to the end of its GPU work (``torch.cuda.synchronize``): what a
user waits for.
"""

import argparse
import os
import statistics
import time

# Before numba or torch start their OpenMP pools: idle workers sleep instead of spinning
# (docs/torch.md, Limitations). An explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch import nn

import batchnorm.torch as bt
from batchnorm.bench.timing import device_arg, round_orders

SHAPES = [(8, 4, 4, 4), (16, 64, 8, 8), (32, 64, 16, 16), (32, 64, 32, 32), (32, 128, 56, 56)]
#: A GPU's launch cost hides the smaller shapes' work; this one (ResNet-50 conv2_x, batch 256)
#: takes it well past that.
GPU_SHAPES = [*SHAPES, (256, 64, 56, 56)]


def train_step(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> None:
    """Forward and backward with a dense output gradient, as inside a network. The gradient
    of ``.sum()`` is an expanded tensor with zero strides, which no layer of a network gets,
    and it changes the peer's time either way: one ``nn.BatchNorm2d`` training step (median
    of 100, no other layer timed) took 0.42 ms with ``.sum()``'s gradient against 0.62 ms with
    a dense one at (32, 512, 2, 2), and 1.31 against 0.77 ms at (32, 64, 16, 16)."""
    layer.train()
    xi = x.detach().requires_grad_()
    layer(xi).backward(dy)


def eval_forward(layer: nn.Module, x: torch.Tensor) -> None:
    layer.eval()
    with torch.no_grad():
        layer(x)


def _nothing() -> None:
    pass


def medians_ms(fns: dict, repeats: int, sync=_nothing) -> dict[str, float]:
    """Median ms of each function, timed in interleaved rounds after 5 warm-up rounds, so that
    a load change on the shared machine hits every layer alike (this needs the passive OpenMP
    wait policy set above: otherwise the Numba workers spinning after a call slowed the next
    torch.nn call up to 100x). Each round runs the layers in a balanced order
    (``batchnorm.bench.timing.round_orders``): the slot right after a given layer can cost
    more or less (the Numba workers awake or just asleep), and a fixed or rotating order
    would always give that slot to the same layer."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_, order in enumerate(round_orders(list(fns), repeats + 5)):
        for name in order:
            fn = fns[name]
            start = time.perf_counter()
            fn()
            sync()
            if round_ >= 5:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", type=device_arg, default="cpu", help="cpu or cuda[:N]")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    on_gpu = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if on_gpu else _nothing
    kernels = "triton" if on_gpu else "numba"
    torch.manual_seed(0)
    policy = os.environ["OMP_WAIT_POLICY"]
    where = torch.cuda.get_device_name(device) if on_gpu else f"threads {torch.get_num_threads()}"
    print(f"{where}, OMP_WAIT_POLICY {policy}, torch {torch.__version__}")
    print("median ms of a training step / an eval forward (ratio to torch.nn, paths run)")
    for shape in GPU_SHAPES if on_gpu else SHAPES:
        x, dy = torch.randn(shape, device=device), torch.randn(shape, device=device)
        channels, repeats = shape[1], 200 if x.numel() < 1e6 else 30
        layers = {
            "torch.nn": nn.BatchNorm2d(channels),
            "ours auto": bt.BatchNorm2d(channels),
            f"ours {kernels}": bt.BatchNorm2d(channels, backend=kernels),
            "torch.nn bn+relu": nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True)),
            "ours fused auto": bt.BatchNormReLU2d(channels),
        }
        layers = {k: m.to(device) for k, m in layers.items()}
        peer = {"ours fused auto": "torch.nn bn+relu"}
        train = medians_ms(
            {k: (lambda m=m, x=x, dy=dy: train_step(m, x, dy)) for k, m in layers.items()},
            repeats,
            sync,
        )
        paths_train = {k: getattr(m, "last_backend", None) for k, m in layers.items()}
        infer = medians_ms(
            {k: (lambda m=m, x=x: eval_forward(m, x)) for k, m in layers.items()}, repeats, sync
        )
        cells = []
        for name, layer in layers.items():
            cell = f"{name} {train[name]:.3f} / {infer[name]:.3f}"
            if name.startswith("ours"):
                base = peer.get(name, "torch.nn")
                ratio_t, ratio_e = train[name] / train[base], infer[name] / infer[base]
                path = f"{paths_train[name]} / {layer.last_backend}"
                cell += f" ({ratio_t:.2f}x / {ratio_e:.2f}x of {base}, {path})"
            cells.append(cell)
        print(f"{shape}, {x.numel()}: " + ", ".join(cells), flush=True)


if __name__ == "__main__":
    main()
