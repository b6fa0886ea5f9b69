"""Cost of one BatchNorm2d call, ours against torch.nn, from a tiny layer to a large one.

``python benchmarks/layer_cost.py``: median milliseconds of a training step (forward, then
backward of the sum) and of an evaluation forward under no_grad, per layer and shape, all in
one process. The fixed Python cost of our layers shows at the small shapes; see docs/torch.md.
"""

import statistics
import time

import torch
from torch import nn

import batchnorm.torch as bt

SHAPES = [(8, 4, 4, 4), (16, 64, 8, 8), (32, 64, 16, 16), (32, 64, 32, 32), (32, 128, 56, 56)]


def median_ms(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def train_step(layer: nn.Module, x: torch.Tensor) -> None:
    layer.train()
    xi = x.detach().requires_grad_()
    layer(xi).sum().backward()


def eval_forward(layer: nn.Module, x: torch.Tensor) -> None:
    layer.eval()
    with torch.no_grad():
        layer(x)


def main() -> None:
    torch.manual_seed(0)
    print("shape, values: median ms of a training step / an eval forward")
    for shape in SHAPES:
        x = torch.randn(shape)
        channels, repeats = shape[1], 200 if x.numel() < 1e6 else 30
        layers = {
            "torch.nn": nn.BatchNorm2d(channels),
            "ours auto": bt.BatchNorm2d(channels),
            "ours numba": bt.BatchNorm2d(channels, backend="numba"),
        }
        cells = []
        for name, layer in layers.items():
            train = median_ms(lambda layer=layer, x=x: train_step(layer, x), repeats)
            infer = median_ms(lambda layer=layer, x=x: eval_forward(layer, x), repeats)
            cells.append(f"{name} {train:.3f} / {infer:.3f}")
        print(f"{shape}, {x.numel()}: " + ", ".join(cells))


if __name__ == "__main__":
    main()
