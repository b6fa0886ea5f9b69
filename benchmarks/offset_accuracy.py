"""How far from zero mean can a float32 input be: PyTorch's CPU kernel against our stages.

``python benchmarks/offset_accuracy.py [--offset 1000]``: a unit-variance input centred at
``--offset``, rounded to float32, through ``backend="auto"`` (PyTorch's kernel at these sizes
and layouts, the values torch.nn computes) and through our stages (Numba from 65,536 values,
else the reference), in training; the maximum error of each output against float64 torch.nn
on the same rounded values. docs/torch.md ("Accuracy where PyTorch's kernel runs") quotes it.
"""

from __future__ import annotations

import argparse

import torch

import batchnorm.torch as bt

#: (shape, channels_last)
CASES = [((256, 16), False), ((131072, 16), False), ((32, 16, 8, 8), True),
         ((32, 16, 64, 64), True), ((32, 16, 64, 64), False)]  # fmt: skip


def output_error(x: torch.Tensor, backend: str) -> tuple[float, str]:
    cls, peer = (bt.BatchNorm1d, torch.nn.BatchNorm1d) if x.dim() == 2 else (
        bt.BatchNorm2d, torch.nn.BatchNorm2d)  # fmt: skip
    want = peer(x.shape[1]).double()(x.double())
    layer = cls(x.shape[1], backend=backend)
    got = layer(x)
    return (got.double() - want).abs().max().item(), layer.last_backend


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--offset", type=float, default=1e3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"max |y - y_float64| of a unit-variance float32 input centred at {args.offset:g}")
    for shape, channels_last in CASES:
        x = (torch.randn(*shape, dtype=torch.float64) + args.offset).float()
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ours = "numba" if x.numel() >= 65536 else "reference"
        cells = [f"{b} ({ran}) {e:.1e}" for b in ("auto", ours) for e, ran in [output_error(x, b)]]
        layout = " channels_last" if channels_last else ""
        print(f"{shape}{layout}: " + " | ".join(cells))


if __name__ == "__main__":
    main()
