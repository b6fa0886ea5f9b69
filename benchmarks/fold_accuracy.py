"""How accurate is a folded model? ``bt.fold`` against PyTorch's folding, in one run.

``python benchmarks/fold_accuracy.py [--out benchmarks/results]``: for five models written for
the purpose, in float32, bfloat16 and float16, the max |output - float64| of

* the unfolded model (its own rounding error: the floor any folding is judged against),
* ``bt.fold`` (float64 arithmetic, each parameter rounded once),
* ``torch.nn.utils.fusion`` (``fuse_conv_bn_eval`` / ``fuse_linear_bn_eval``) applied to every
  (layer, norm) module pair, in order, as ``torch.ao.quantization.fuse_modules`` does,
* ``torch.fx.experimental.optimization.fuse`` on the whole model.

The float64 reference is the *same* low-precision parameters run in float64, so every column
measures arithmetic only. "n/a": the tool folds no pair of that model. Prints a markdown table
and writes ``fold-accuracy-DATE.json``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform

import torch
import torch.fx.experimental.optimization as fx_opt
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import fusion

import batchnorm.torch as bt


def _trained(model: nn.Module, shape: tuple, seed: int) -> nn.Module:
    """Running statistics from data (PreciseBN), gamma and beta as after training."""
    g = torch.Generator().manual_seed(seed)
    bt.recompute_stats(model, [torch.randn(shape, generator=g) for _ in range(4)])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.uniform_(0.2, 2.0, generator=g)
                m.bias.normal_(0, 0.5, generator=g)
    return model.eval()


class ResNetShared(nn.Module):
    """A stem, then one 3x3 conv called on two branches with its own norm each (shared weights:
    a single Conv2d feeding two BatchNorm2d), a residual add and a 1x1 projection."""

    def __init__(self):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv, self.bn_a, self.bn_b = (
            nn.Conv2d(16, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.BatchNorm2d(16),
        )
        self.proj, self.proj_bn = nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        a, b = self.bn_a(self.conv(x)), self.bn_b(self.conv(x.flip(-1)))
        return self.proj_bn(self.proj(torch.relu(x + a + b)))

    pairs = [("stem", "stem_bn"), ("conv", "bn_a"), ("conv", "bn_b"), ("proj", "proj_bn")]


class MobileNetDepthwise(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, ReLU6."""

    def __init__(self, c: int = 16, expand: int = 4):
        super().__init__()
        h = c * expand
        self.expand, self.bn1 = nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h)
        self.dw, self.bn2 = nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h)
        self.project, self.bn3 = nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        y = F.relu6(self.bn1(self.expand(x)))
        y = F.relu6(self.bn2(self.dw(y)))
        return x + self.bn3(self.project(y))

    pairs = [("expand", "bn1"), ("dw", "bn2"), ("project", "bn3")]


class Decoder(nn.Module):
    """Two stride-2 ConvTranspose2d + BatchNorm2d + ReLU, then a 3x3 conv."""

    def __init__(self):
        super().__init__()
        self.up1, self.bn1 = nn.ConvTranspose2d(16, 16, 4, stride=2, padding=1), nn.BatchNorm2d(16)
        self.up2, self.bn2 = nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        return self.head(torch.relu(self.bn2(self.up2(torch.relu(self.bn1(self.up1(x)))))))

    pairs = [("up1", "bn1", True), ("up2", "bn2", True)]


class MLPNormFirst(nn.Module):
    """Input features normalised first (BN before Linear), then Linear + BN + ReLU + Linear."""

    def __init__(self):
        super().__init__()
        self.bn_in, self.fc1 = nn.BatchNorm1d(32), nn.Linear(32, 64)
        self.bn1, self.fc2 = nn.BatchNorm1d(64), nn.Linear(64, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn1(self.fc1(self.bn_in(x)))))

    pairs = [("fc1", "bn1")]


class Functional(nn.Module):
    """Batch norm through ``F.batch_norm`` on the module's own buffers."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 3, padding=1)
        self.register_buffer("mean", torch.zeros(16))
        self.register_buffer("var", torch.ones(16))
        self.gamma, self.beta = nn.Parameter(torch.ones(16)), nn.Parameter(torch.zeros(16))

    def forward(self, x):
        y = F.batch_norm(self.conv(x), self.mean, self.var, self.gamma, self.beta, False)
        return self.head(torch.relu(y))

    pairs: list = []


MODELS = {
    "ResNet-style, shared conv": (ResNetShared, (8, 3, 16, 16)),
    "MobileNet-style depthwise": (MobileNetDepthwise, (8, 16, 16, 16)),
    "ConvTranspose decoder": (Decoder, (8, 16, 8, 8)),
    "MLP, BN before Linear": (MLPNormFirst, (64, 32)),
    "F.batch_norm": (Functional, (8, 3, 16, 16)),
}


def _with_functional_stats(model: nn.Module, shape: tuple, seed: int) -> nn.Module:
    """Functional's norm is never called as a module: give it statistics of its input."""
    if isinstance(model, Functional):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            y = model.conv(torch.randn(shape, generator=g))
            model.mean.copy_(y.mean((0, 2, 3)))
            model.var.copy_(y.var((0, 2, 3)))
            model.gamma.uniform_(0.2, 2.0, generator=g)
            model.beta.normal_(0, 0.5, generator=g)
        return model.eval()
    return _trained(model, shape, seed)


def torch_fusion(model: nn.Module) -> nn.Module | None:
    """``torch.nn.utils.fusion`` on each declared (layer, norm) pair, in order; None if none."""
    if not model.pairs:
        return None
    model = copy.deepcopy(model)
    for layer_name, norm_name, *transpose in model.pairs:
        layer, norm = getattr(model, layer_name), getattr(model, norm_name)
        if isinstance(layer, nn.Linear):
            fused = fusion.fuse_linear_bn_eval(layer, norm)
        else:
            fused = fusion.fuse_conv_bn_eval(layer, norm, transpose=bool(transpose))
        setattr(model, layer_name, fused)
        setattr(model, norm_name, nn.Identity())
    return model


def _norm_calls(gm: torch.fx.GraphModule) -> int:
    modules = dict(gm.named_modules())
    return sum(
        node.op == "call_module"
        and isinstance(modules[node.target], nn.modules.batchnorm._BatchNorm)
        for node in gm.graph.nodes
    )


def fx_fuse(model: nn.Module) -> nn.Module | None:
    """``fx...optimization.fuse``; None when it folds no norm call of the graph."""
    fused = fx_opt.fuse(model)
    return fused if _norm_calls(fused) < _norm_calls(torch.fx.symbolic_trace(model)) else None


def _error(model: nn.Module | None, x: torch.Tensor, ref: torch.Tensor) -> float | None:
    if model is None:
        return None
    with torch.no_grad():
        return (model.eval()(x).double() - ref).abs().max().item()


def run() -> list[dict]:
    rows = []
    for i, (name, (make, shape)) in enumerate(MODELS.items()):
        torch.manual_seed(i)
        model32 = _with_functional_stats(make(), shape, seed=100 + i)
        x32 = torch.randn(shape, generator=torch.Generator().manual_seed(200 + i))
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            model, x = copy.deepcopy(model32).to(dtype), x32.to(dtype)
            with torch.no_grad():
                ref = copy.deepcopy(model).double()(x.double())
            folded, report = bt.fold(model, x)
            rows.append({
                "model": name,
                "dtype": str(dtype).replace("torch.", ""),
                "output_max": ref.abs().max().item(),
                "unfolded": _error(model, x, ref),
                "fold": _error(folded, x, ref),
                "fold_pairs": f"{len(report.folded)}/{len(report.pairs)}",
                "torch_fusion": _error(torch_fusion(model), x, ref),
                "fx_fuse": _error(fx_fuse(model), x, ref),
            })  # fmt: skip
            print(f"  {name} {dtype}: done", flush=True)
    return rows


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2g}"


def table(rows: list[dict]) -> str:
    lines = [
        "| model | dtype | max abs output | unfolded vs float64 | `bt.fold` (pairs) | "
        "`torch.nn.utils.fusion` | `fx...optimization.fuse` |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['output_max']:.2g} | {_fmt(r['unfolded'])} | "
            f"{_fmt(r['fold'])} ({r['fold_pairs']}) | {_fmt(r['torch_fusion'])} | "
            f"{_fmt(r['fx_fuse'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    rows = run()
    record = {
        "what": "max |output - float64 run of the same parameters|, eval mode",
        "torch": torch.__version__,
        "machine": platform.platform(),
        "date": datetime.date.today().isoformat(),
        "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"fold-accuracy-{record['date']}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(table(rows))
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
