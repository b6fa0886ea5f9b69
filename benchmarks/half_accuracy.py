"""How accurate is a half-precision batch norm's gradient: PyTorch's kernel against ours.

``python benchmarks/half_accuracy.py [--device cuda] [--trials 30]``: for float16 and bfloat16,
contiguous and channels_last inputs, weight and bias in float32 or in the input's dtype,
``grad_input`` of ``torch.nn.BatchNorm2d`` in training (PyTorch's kernel on that device) and
of our layer on its stages
(``backend="triton"`` on CUDA, ``"auto"`` stages elsewhere, forced past PyTorch's kernel),
each against a float64 oracle computed on the CPU from the same rounded inputs. Two errors per
case, worst over ``--trials`` random inputs: relative to the largest gradient entry, and per
element (relative, with a floor of 1e-3 of the largest entry). docs/torch.md ("Accuracy in half
precision") quotes the CPU figures; ``native.py`` keeps channels_last half inputs off
PyTorch's kernel where that kernel is the less accurate one.
"""

from __future__ import annotations

import argparse

import torch

import batchnorm.torch as bt
from batchnorm._args import positive_int
from batchnorm.bench.timing import device_arg

SHAPES = [(2, 3, 4, 5), (8, 16, 14, 14)]


def errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    got, want = got.double().cpu(), want.double().cpu()
    scale = want.abs().max().clamp_min(1e-300)
    diff = (got - want).abs()
    return float(diff.max() / scale), float((diff / want.abs().clamp_min(1e-3 * scale)).max())


def grad_input(fn, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    leaf = x.detach().requires_grad_()
    (g,) = torch.autograd.grad(fn(leaf), leaf, dy)
    return g


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", type=device_arg, default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--trials", type=positive_int, default=30, help="random inputs per case")
    args = parser.parse_args()
    device = args.device
    stages = "triton" if device.type == "cuda" else "numba"
    gen = torch.Generator().manual_seed(0)
    print(f"{device} ({torch.__version__}); ours on {stages!r}; worst over {args.trials} inputs")
    print(
        "params   dtype     layout         shape           PyTorch: max/largest  per elem"
        " | ours: same"
    )
    for params in ("float32", "half"):
        for dtype in (torch.float16, torch.bfloat16):
            for layout in (torch.contiguous_format, torch.channels_last):
                for shape in SHAPES:
                    worst = measure(shape, dtype, layout, params, device, stages, gen, args.trials)
                    lay = "channels_last" if layout == torch.channels_last else "contiguous"
                    t, o = worst["torch"], worst["ours"]
                    print(
                        f"{params:8} {str(dtype)[6:]:9} {lay:14} {str(shape):15} {t[0]:.1e}"
                        f" {t[1]:9.1%}            | {o[0]:.1e} {o[1]:9.1%}"
                    )


def measure(shape, dtype, layout, params, device, stages, gen, trials) -> dict[str, list[float]]:
    """Worst errors over ``trials`` inputs of torch.nn's layer and ours, their weight and bias
    in float32 (mixed precision: with them ATen picks cuDNN on CUDA) or in the input's dtype
    (a model cast with ``.to(dtype)``: ATen's own half-precision kernel)."""
    param_dtype = torch.float32 if params == "float32" else dtype
    worst = {"torch": [0.0, 0.0], "ours": [0.0, 0.0]}
    for _ in range(trials):
        x = (torch.randn(shape, generator=gen) * 3 + 1).to(dtype)
        dy = torch.randn(shape, generator=gen).to(dtype)
        c = shape[1]
        ours = bt.BatchNorm2d(c, backend=stages).to(device, param_dtype)
        theirs = torch.nn.BatchNorm2d(c, track_running_stats=False).to(device, param_dtype)
        want = grad_input(
            lambda t: torch.batch_norm(t, None, None, None, None, True, 0.0, 1e-5, False),
            x.double(), dy.double(),
        )  # fmt: skip
        xd = x.to(device).contiguous(memory_format=layout)
        dyd = dy.to(device).contiguous(memory_format=layout)
        for name, layer in (("torch", theirs), ("ours", ours)):
            e = errors(grad_input(layer, xd, dyd), want)
            worst[name] = [max(a, b) for a, b in zip(worst[name], e, strict=True)]
    return worst


if __name__ == "__main__":
    main()
