"""Fold inference-mode batch norm into the convolution or linear layer next to it.

In eval a batch-norm layer is the per-channel affine map ``y = scale * x + shift`` (Algorithm 2,
line 11: ``scale = gamma / sqrt(running_var + eps)``, ``shift = beta - scale * running_mean``;
``batchnorm.reference.fold`` computes it, once, for every caller). An affine layer next to it
absorbs that map:

* neighbour **before** the norm (Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear): every output
  channel ``o`` of the layer is scaled, ``W'[o] = scale[o] * W[o]``, ``b' = scale * b + shift``;
  always exact.
* neighbour **after** the norm: every *input* channel ``i`` is scaled, ``W'[:, i] = W[:, i] *
  scale[i]``, and the shift becomes a bias, ``b' = b + sum_i,k W[:, i, k] * shift[i]``. Exact
  only where every output position sums over every kernel tap of real (normalised) input: a
  convolution without zero padding (reflect/replicate/circular padding copy normalised values,
  so they are fine), a 1x1 stride-1 transposed convolution, a Linear over (N, C) input.

The arithmetic runs in float64 and each new parameter is rounded once to its own dtype: folding
in bfloat16 would round ``scale``, then ``W * scale``, then the bias sum (PyTorch PR #145623:
0.12 error folded against 0.016 unfolded in bf16). This file holds the report, the layer types
and the per-layer arithmetic; ``fold_patterns.py`` finds the pairs (``torch.fx`` graph where
the model traces, Sequential adjacency where it does not).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch.utils._pytree import tree_leaves

from .. import reference as ref
from .frozen import FrozenBatchNorm
from .fused import BatchNormAddReLU2d, BatchNormReLU2d
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .sync import SyncBatchNorm
from .variants import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
)

__all__ = ["FoldPair", "FoldReport", "FoldResult", "fold", "norm_kind"]

nn = torch.nn
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
#: Exact types only: a subclass (quantised, LoRA, weight-normalised) may compute something else
#: with the same weight attribute, and folding into it would be silently wrong.
AFFINE_TYPES: tuple[type, ...] = (*_CONV, *_CONV_T, nn.Linear)

#: Norm classes whose eval forward is exactly ``scale * x + shift`` from their buffers, and what
#: follows the affine map inside the layer ("plain", or the fused ReLU / add + ReLU).
_NORM_KINDS: dict[type, str] = {
    **dict.fromkeys(
        (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, SyncBatchNorm), "plain"
    ),
    **dict.fromkeys((BatchNorm1d, BatchNorm2d, BatchNorm3d), "plain"),
    **dict.fromkeys((GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d), "plain"),
    **dict.fromkeys((BatchRenorm1d, BatchRenorm2d, BatchRenorm3d), "plain"),
    BatchNormReLU2d: "relu",
    BatchNormAddReLU2d: "add_relu",
}


def norm_kind(module: Any) -> str | None:
    """ "plain", "relu", "add_relu" for a batch-norm layer we can fold; "unknown" for another
    batch-norm class (its eval forward is not ours to assume); None for anything else."""
    kind = _NORM_KINDS.get(type(module))
    if kind is not None:
        return kind
    if isinstance(module, FrozenBatchNorm):  # every rank; fixed statistics in train() as well
        return "plain"
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return "unknown"
    return None


def unfoldable_reason(module: nn.Module) -> str | None:
    """Why this norm layer's eval forward is not a fixed affine map (None: it is)."""
    kind = norm_kind(module)
    if kind == "unknown":
        return f"{type(module).__name__} is not a batch-norm class this library knows"
    if (
        getattr(module, "running_mean", None) is None
        or getattr(module, "running_var", None) is None
    ):
        return "no running statistics (track_running_stats=False): it normalises with each batch"
    if isinstance(module.running_mean, nn.parameter.UninitializedBuffer):
        return "lazy layer not initialised yet: run a forward first"
    return None


def norm_affine(running_mean, running_var, weight, bias, eps) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(scale, shift)`` in float64 via ``reference.fold``."""
    as64 = [None if t is None else t.detach().to(torch.float64) for t in (weight, bias)]
    return ref.fold(
        running_mean.detach().to(torch.float64),
        running_var.detach().to(torch.float64),
        *as64,
        eps=float(eps),
    )


def module_affine(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return norm_affine(norm.running_mean, norm.running_var, norm.weight, norm.bias, norm.eps)


def out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def in_channels(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def _with_params(layer: nn.Module, weight64: torch.Tensor, bias64: torch.Tensor) -> nn.Module:
    """A copy of ``layer`` with these float64 values rounded once to the weight's dtype."""
    new = copy.deepcopy(layer)
    dtype, device = layer.weight.dtype, layer.weight.device
    grad = layer.weight.requires_grad
    new.weight = nn.Parameter(weight64.to(dtype=dtype, device=device), requires_grad=grad)
    # A bias-less layer gets one: the shift has to live somewhere.
    new.bias = nn.Parameter(bias64.to(dtype=dtype, device=device), requires_grad=grad)
    return new


def _bias64(layer: nn.Module, n: int, device: torch.device) -> torch.Tensor:
    if layer.bias is None:
        return torch.zeros(n, dtype=torch.float64, device=device)
    return layer.bias.detach().to(torch.float64)


def _trailing(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """``t`` with singleton axes appended up to ``ndim`` axes, to broadcast over a kernel."""
    return t.reshape(*t.shape, *([1] * (ndim - t.ndim)))


def absorb_into_previous(layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> nn.Module:
    """``norm(layer(x))`` as one layer: scale the layer's output channels."""
    w = layer.weight.detach().to(torch.float64)
    scale, shift = scale.to(w.device), shift.to(w.device)
    n = out_channels(layer)
    if isinstance(layer, _CONV_T):
        # weight is (in, out/groups, *k): output channel o = g * out/groups + j sits at [g-th
        # block of rows, column j], so the scale is laid out as (groups, 1, out/groups).
        g = layer.groups
        blocks = w.reshape(g, w.shape[0] // g, *w.shape[1:])
        scaled = blocks * _trailing(scale.reshape(g, 1, n // g), blocks.ndim)
        w_new = scaled.reshape(w.shape)
    else:  # Conv and Linear: output channels on axis 0
        w_new = w * _trailing(scale, w.ndim)
    b_new = _bias64(layer, n, w.device) * scale + shift
    return _with_params(layer, w_new, b_new)


def absorb_into_next(layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> nn.Module:
    """``layer(norm(x))`` as one layer: scale the layer's input channels, shift into bias.
    Call ``next_exact_reason`` first: this is only the same function where that is None."""
    w = layer.weight.detach().to(torch.float64)
    scale, shift = scale.to(w.device), shift.to(w.device)
    n = out_channels(layer)
    if isinstance(layer, nn.Linear):
        return _with_params(layer, w * scale, _bias64(layer, n, w.device) + w @ shift)
    g = layer.groups
    if isinstance(layer, _CONV_T):
        # weight (in, out/groups, *k): input channel i is row i; its shift reaches the output
        # channels of its own group.
        w_new = w * _trailing(scale, w.ndim)
        per_group = (w * _trailing(shift, w.ndim)).reshape(g, w.shape[0] // g, *w.shape[1:])
        extra = per_group.sum(dim=[1, *range(3, per_group.ndim)]).reshape(n)
        return _with_params(layer, w_new, _bias64(layer, n, w.device) + extra)
    # Conv weight (out, in/groups, *k): output channel o reads input channels of group o // (out/g)
    in_pg, out_pg = w.shape[1], n // g
    per_out = lambda v: v.reshape(g, 1, in_pg).expand(g, out_pg, in_pg).reshape(n, in_pg)  # noqa: E731
    w_new = w * _trailing(per_out(scale), w.ndim)
    extra = (w * _trailing(per_out(shift), w.ndim)).sum(dim=list(range(1, w.ndim)))
    return _with_params(layer, w_new, _bias64(layer, n, w.device) + extra)


def next_exact_reason(layer: nn.Module, norm_input_ranks: set[int] | None) -> str | None:
    """Why folding a norm into the layer *after* it would not be exact (None: it is)."""
    name = type(layer).__name__
    if isinstance(layer, nn.Linear):
        if norm_input_ranks and norm_input_ranks != {2}:
            return (
                f"{name} acts on the last axis and the norm on axis 1 of {sorted(norm_input_ranks)}"
                "-d input: not the same channels"
            )
        return None
    if isinstance(layer, _CONV_T):
        if any(k != 1 for k in layer.kernel_size) or any(s != 1 for s in layer.stride):
            return (
                f"{name} with kernel {layer.kernel_size}, stride {layer.stride}: border and "
                "between-stride outputs get fewer taps, so the folded shift would be wrong there"
            )
        return None
    if layer.padding_mode == "zeros" and any(
        p != 0 for p in layer._reversed_padding_repeated_twice
    ):
        return (
            f"{name} pads with zeros ({layer.padding}): the border would see 0 instead of the "
            "norm's shift"
        )
    return None


@dataclass
class FoldPair:
    """One batch-norm site: ``action`` is "folded", "cloned" (folded into a copy of a layer
    that is used elsewhere too; the other uses keep the original) or "skipped"."""

    norm: str
    neighbour: str | None
    placement: str | None  # "before" (the neighbour runs first), "after", or None
    action: str
    reason: str


@dataclass
class FoldReport:
    """What ``fold`` did. ``deviation``: max |folded - original| over ``example_inputs`` in eval;
    ``original_error`` / ``folded_error``: each against the original run in float64;
    ``output_ulp``: the output's rounding unit, its dtype's eps times its largest magnitude
    (a float64 model's own error against float64 is 0, its fold's a few of these)."""

    pairs: list[FoldPair] = field(default_factory=list)
    discovery: str = "fx"
    trace_error: str | None = None
    deviation: float | None = None
    original_error: float | None = None
    folded_error: float | None = None
    output_ulp: float | None = None

    @property
    def folded(self) -> list[FoldPair]:
        return [p for p in self.pairs if p.action != "skipped"]

    @property
    def skipped(self) -> list[FoldPair]:
        return [p for p in self.pairs if p.action == "skipped"]

    def __str__(self) -> str:
        lines = [f"fold: {len(self.folded)} folded, {len(self.skipped)} skipped ({self.discovery})"]
        if self.trace_error:
            lines.append(f"  torch.fx could not trace the model: {self.trace_error}")
        for p in self.pairs:
            where = f" {p.placement} {p.neighbour}" if p.neighbour else ""
            lines.append(f"  {p.action:<8} {p.norm}{where}: {p.reason}")
        if self.deviation is not None:
            lines.append(
                f"  max |folded - original| = {self.deviation:.3g}; against float64: original "
                f"{self.original_error:.3g}, folded {self.folded_error:.3g}"
            )
        return "\n".join(lines)


class FoldResult(NamedTuple):
    model: nn.Module
    report: FoldReport


def _check_inputs(example_inputs: Any) -> tuple | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(
        "example_inputs must be a tensor or a tuple of positional arguments, got "
        f"{type(example_inputs).__name__}"
    )


def _leaves(output: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(
        ((x.double() - y.double()).abs().max().item() for x, y in zip(a, b, strict=True)),
        default=0.0,
    )


def _measure(original: nn.Module, folded: nn.Module, args: tuple, report: FoldReport) -> None:
    """The folded model against the original (both in eval) and both against float64."""
    base = copy.deepcopy(original).eval()  # eval() on a copy: the original keeps its mode
    exact = copy.deepcopy(original).double().eval()
    args64 = tuple(a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
    with torch.no_grad():
        out, out64, got = (
            _leaves(m(*a)) for m, a in ((base, args), (exact, args64), (folded, args))
        )
    report.deviation = _max_diff(got, out)
    report.original_error = _max_diff(out, out64)
    report.folded_error = _max_diff(got, out64)
    report.output_ulp = max(
        (torch.finfo(t.dtype).eps * t.double().abs().max().item() for t in out
         if t.is_floating_point() and t.numel()),
        default=0.0,
    )  # fmt: skip


def _input_ranks(model: nn.Module, args: tuple | None) -> dict[int, set[int]]:
    """id(module) -> ranks of its first input over one forward (empty without inputs)."""
    ranks: dict[int, set[int]] = {}
    if args is None:
        return ranks

    def hook(module: nn.Module, inputs: tuple) -> None:
        if inputs and torch.is_tensor(inputs[0]):
            ranks.setdefault(id(module), set()).add(inputs[0].ndim)

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in handles:
            h.remove()
    return ranks


def fold(
    model: nn.Module, example_inputs: Any = None, *, recompute_shared: bool = False
) -> FoldResult:
    """A new model, in eval mode, with every batch-norm layer that folds exactly folded into
    its neighbour, and a ``FoldReport``; ``model`` itself is not changed (not even its mode).

    * ``example_inputs``: a tensor or tuple of positional arguments; given, the report carries
      the measured deviation, and Linear pairs are checked to see (N, C) input.
    * A layer used more than once is folded into a copy for this use ("cloned"). A layer whose
      *output* also feeds something else is skipped, unless ``recompute_shared=True``: then it is
      copied for the norm's branch and runs twice.

    The new model is for inference: a folded norm no longer exists to normalise with batch
    statistics in ``train()``.
    """
    from .fold_patterns import fold_model  # the discovery needs the helpers above

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(recompute_shared, bool):
        raise TypeError(f"recompute_shared must be a bool, got {recompute_shared!r}")
    args = _check_inputs(example_inputs)
    work = copy.deepcopy(model).eval()
    report = FoldReport()
    ranks = _input_ranks(work, args)
    folded = fold_model(work, report, ranks=ranks, recompute_shared=recompute_shared).eval()
    if args is not None:
        _measure(model, folded, args, report)
    return FoldResult(folded, report)
