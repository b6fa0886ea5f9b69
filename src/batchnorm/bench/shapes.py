"""What is measured: shapes, their memory layout, which set they belong to, and the tensors.

A problem is ``(shape, layout)``. One vocabulary for layouts, CPU and GPU alike:

* ``"nchw"``: contiguous, channel axis 1 (any rank >= 3);
* ``"channels_last"``: the channel axis last in memory (torch ``channels_last`` for 4-D, the
  same strides for any rank >= 3; the NumPy reference gets NHWC data with ``axis=-1``);
* ``"nc"``: a 2-D (N, C) tensor, which has only one layout.

A bare shape stands for its default layout (``"nc"`` for 2-D, else ``"nchw"``).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "LAYOUTS",
    "DEFAULT_SHAPES",
    "QUICK_SHAPES",
    "REPRESENTATIVE_SHAPES",
    "GPU_SHAPES",
    "GPU_QUICK_SHAPES",
    "Problem",
    "kind_of",
    "make_problem",
    "normalize",
    "parse_shapes",
    "shape_str",
    "with_layouts",
]

LAYOUTS = ("nchw", "channels_last", "nc")
Spec = tuple[tuple[int, ...], str]

#: The CPU set the targets of issue 4 are stated for: two ResNet-50 stages, a large-spatial
#: channels-last tensor, and a wide 2-D one.
DEFAULT_SHAPES: list[Spec] = [
    ((32, 128, 56, 56), "nchw"),
    ((64, 256, 14, 14), "nchw"),
    ((16, 64, 112, 112), "channels_last"),
    ((4096, 1024), "nc"),
]
#: Tiny: a plumbing check in seconds, where fixed per-call costs dominate every timing.
QUICK_SHAPES: list[Spec] = [
    ((4, 16, 12, 12), "nchw"),
    ((4, 8, 10, 10), "channels_last"),
    ((128, 32), "nc"),
]
#: One real ResNet stage (batch 32, conv2_x), where the kernels' speed-up shows; a bare shape
#: (default layout), cheap enough for the report: about 25 MB of float32.
REPRESENTATIVE_SHAPES: list[tuple[int, ...]] = [(32, 64, 56, 56)]
#: ResNet-50 shapes at batch 256, a large-spatial one and a few-channel one (issue 7); each is
#: run in every layout of ``--layouts``.
GPU_SHAPES: list[tuple[int, ...]] = [
    (256, 64, 56, 56),
    (256, 256, 14, 14),
    (256, 2048, 7, 7),
    (64, 32, 128, 128),
    (20, 6, 65536),
]
GPU_QUICK_SHAPES: list[tuple[int, ...]] = [(4, 3, 6, 5), (6, 3, 16)]


def shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


def _default_layout(shape: Sequence[int]) -> str:
    return "nc" if len(shape) == 2 else "nchw"


def _check(shape: tuple[int, ...], layout: str) -> Spec:
    if len(shape) < 2 or any(not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"shape {shape} needs at least 2 positive integer dimensions")
    if layout not in LAYOUTS:
        raise ValueError(f"bad layout {layout!r} for shape {shape}: one of {', '.join(LAYOUTS)}")
    if (layout == "nc") != (len(shape) == 2):
        want = "nc" if len(shape) == 2 else "nchw or channels_last"
        raise ValueError(f"bad layout {layout!r} for {len(shape)}-D shape {shape}: want {want}")
    return shape, layout


def normalize(item: Sequence[Any]) -> Spec:
    """``(32, 64, 56, 56)`` or ``((32, 64, 56, 56), "channels_last")`` -> ``(shape, layout)``."""
    if len(item) == 2 and isinstance(item[1], str):
        return _check(tuple(item[0]), item[1])
    shape = tuple(item)
    return _check(shape, _default_layout(shape))


def parse_shapes(text: str) -> list[Spec]:
    """``"32x128x56x56,16x64x112x112:channels_last"`` -> problems (ValueError names the bad one)."""
    specs = []
    for item in text.split(","):
        spec, _, layout = item.strip().partition(":")
        try:
            shape = tuple(int(s) for s in spec.split("x"))
        except ValueError:
            raise ValueError(f"bad shape {spec!r} (want e.g. 32x128x56x56)") from None
        specs.append(_check(shape, layout or _default_layout(shape)))
    return specs


def shapes_arg(text: str) -> list[Spec]:
    """``parse_shapes`` for argparse: its message, as a usage error."""
    try:
        return parse_shapes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def with_layouts(specs: Iterable[Sequence[Any]], layouts: Sequence[str]) -> list[Spec]:
    """Every shape in every layout of ``layouts`` (2-D shapes once, as ``nc``)."""
    out: list[Spec] = []
    for item in specs:
        shape = normalize(item)[0]
        for layout in ("nc",) if len(shape) == 2 else layouts:
            spec = _check(shape, layout)
            if spec not in out:
                out.append(spec)
    return out


def kind_of(shape: Sequence[int], layout: str) -> str:
    """Which set a problem comes from, so that a reader can label it: ``quick`` (fixed costs
    dominate), ``representative`` (a real layer), ``default`` (the targets' set) or ``custom``."""
    spec = (tuple(shape), layout)
    if spec in QUICK_SHAPES or tuple(shape) in GPU_QUICK_SHAPES:
        return "quick"
    if spec in [normalize(s) for s in REPRESENTATIVE_SHAPES]:
        return "representative"
    if spec in DEFAULT_SHAPES or tuple(shape) in GPU_SHAPES:
        return "default"
    return "custom"


@dataclass
class Problem:
    """One problem's torch tensors on the device, with NumPy twins made on demand."""

    shape: tuple[int, ...]
    layout: str
    dtype: str
    device: str
    x: Any
    dy: Any
    weight: Any
    bias: Any
    running_mean: Any
    running_var: Any
    _extra: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return self.x.numel() * self.x.element_size()

    @property
    def residual(self) -> Any:
        """The fused BN+add+ReLU's second input, made only for the runs that time it."""
        if "residual" not in self._extra:
            self._extra["residual"] = _tensor(self.shape, self.layout, self.dtype, self.device, 2)
        return self._extra["residual"]

    def leaves(self, residual: bool = False) -> tuple[Any, ...]:
        """Fresh leaves requiring grad: (x, weight, bias[, residual])."""
        out = [self.x, self.weight, self.bias] + ([self.residual] if residual else [])
        return tuple(t.detach().requires_grad_() for t in out)

    def numpy(self) -> dict[str, Any]:
        """NumPy copies in NumPy's own convention: channels-last data with ``axis=-1``."""
        if "numpy" not in self._extra:
            import torch

            def conv(t: Any) -> Any:
                if self.layout == "channels_last":
                    t = t.movedim(1, -1).contiguous()
                return t.detach().cpu().numpy()

            params = ("weight", "bias", "running_mean", "running_var")
            self._extra["numpy"] = {
                "x": conv(self.x),
                "dy": conv(self.dy),
                "axis": -1 if self.layout == "channels_last" else 1,
                **{k: getattr(self, k).detach().to(torch.float32).cpu().numpy() for k in params},
            }
        return self._extra["numpy"]


def _tensor(shape: Sequence[int], layout: str, dtype: str, device: str, seed: int) -> Any:
    import torch

    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=gen).to(device=device, dtype=getattr(torch, dtype))
    if layout == "channels_last":  # torch's channels_last strides, for any rank
        t = t.movedim(1, -1).contiguous().movedim(-1, 1)
    return t


def make_problem(shape: Sequence[int], layout: str, dtype: str, device: str) -> Problem:
    import torch

    shape, layout = _check(tuple(shape), layout)
    gen = torch.Generator().manual_seed(3)
    pdt = torch.float64 if dtype == "float64" else torch.float32

    def vec(lo: float, hi: float) -> Any:
        t = torch.rand(shape[1], generator=gen) * (hi - lo) + lo
        return t.to(device=device, dtype=pdt)

    return Problem(
        shape, layout, dtype, device,
        x=_tensor(shape, layout, dtype, device, 0), dy=_tensor(shape, layout, dtype, device, 1),
        weight=vec(0.5, 1.5), bias=vec(-1, 1), running_mean=vec(-0.1, 0.1),
        running_var=vec(0.5, 1.5),
    )  # fmt: skip
