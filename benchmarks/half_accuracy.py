"""How accurate is a half-precision batch norm's gradient: PyTorch's kernel against ours.

``python benchmarks/half_accuracy.py [--device cuda] [--trials 30]``: for float16 and bfloat16,
contiguous and channels_last inputs, the training forward and ``grad_input`` of
``torch.batch_norm`` (PyTorch's kernel on that device) and of our layer on its stages
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
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--trials", type=int, default=30)
    args = parser.parse_args()
    device = torch.device(args.device)
    stages = "triton" if device.type == "cuda" else "numba"
    gen = torch.Generator().manual_seed(0)
    print(f"{device} ({torch.__version__}); ours on {stages!r}; worst over {args.trials} inputs")
    print("dtype     layout         shape           PyTorch: max/largest  per elem | ours: same")
    for dtype in (torch.float16, torch.bfloat16):
        for layout in (torch.contiguous_format, torch.channels_last):
            for shape in SHAPES:
                worst = {"torch": [0.0, 0.0], "ours": [0.0, 0.0]}
                for _ in range(args.trials):
                    x = (torch.randn(shape, generator=gen) * 3 + 1).to(dtype)
                    dy = torch.randn(shape, generator=gen).to(dtype)
                    c = shape[1]
                    ours = bt.BatchNorm2d(c, backend=stages).to(device)
                    want = grad_input(
                        lambda t: torch.batch_norm(t, None, None, None, None, True, 0.0, 1e-5,
                                                   False),
                        x.double(), dy.double(),
                    )  # fmt: skip
                    xd = x.to(device).contiguous(memory_format=layout)
                    dyd = dy.to(device).contiguous(memory_format=layout)
                    theirs = grad_input(
                        lambda t: torch.batch_norm(
                            t, None, None, None, None, True, 0.0, 1e-5, device.type == "cuda"
                        ),
                        xd, dyd,
                    )  # fmt: skip
                    for name, g in (("torch", theirs), ("ours", grad_input(ours, xd, dyd))):
                        e = errors(g, want)
                        worst[name] = [max(a, b) for a, b in zip(worst[name], e, strict=True)]
                lay = "channels_last" if layout == torch.channels_last else "contiguous"
                t, o = worst["torch"], worst["ours"]
                print(
                    f"{str(dtype)[6:]:9} {lay:14} {str(shape):15} {t[0]:.1e} {t[1]:9.1%}"
                    f"            | {o[0]:.1e} {o[1]:9.1%}"
                )


if __name__ == "__main__":
    main()
