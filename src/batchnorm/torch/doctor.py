"""``doctor(model, batches=None)``: what is wrong with a trained model's batch norm, and the fix.

Per batch-norm layer (any class ``fold`` knows, frozen ones included), findings with a severity
("warning" or "severe"; ``severe`` makes ``batchnorm doctor`` exit 1) and the function or option
of this library that addresses it. Without ``batches`` only the state is examined; with them the
model is also run, always on copies (the model itself is never changed):

* ``non_finite``: NaN/inf in the running statistics.
* ``near_zero_var``: running variance at or below eps, so eps alone sets the scale and any
  input deviation is amplified by ``|gamma| / sqrt(var + eps)`` at inference.
* ``dead_channels``: gamma exactly 0: the channel outputs the constant beta.
* ``buffer_dtype``: running statistics stored in float16/bfloat16 (``model.half()``).
* ``frozen_but_moving``: weight and bias frozen (``requires_grad=False``) while the running
  statistics still update in ``train()`` (PyTorch #86590).
* ``stale_stats`` (batches): running statistics against the exact population statistics of the
  activations over ``batches``, computed by ``recompute_stats`` (PreciseBN) on a copy.
* ``train_eval_gap`` (batches): the layer's output with batch statistics against running ones.
* ``small_batch`` (batches): batches too small to normalise with.
* ``fold_error`` (batches): folding changes the outputs by more than the model's own rounding.

``DoctorReport.fold`` has the ``fold`` report: every foldable pair, or why not.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .fold import FoldReport, fold, norm_kind
from .frozen import FrozenBatchNorm
from .lifecycle import recompute_stats

__all__ = ["DoctorReport", "Finding", "doctor"]

# Thresholds. Healthy trained layers sit far from all of them: running statistics after an EMA
# with momentum 0.1 are within a few hundredths of a standard deviation of the population ones,
# and the per-layer train/eval gap of a batch of 32 is about 1/sqrt(32 * spatial). Where the
# data holds few values per channel (a BatchNorm1d on (N, C): 32 values a batch) sampling
# noise alone reaches them, so each is raised to a few times that noise (``_noise``): a
# healthy layer (running statistics the exact population ones) drew stale_stats and
# train_eval_gap warnings at the CLI's default 8 batches of 32 before.
#: Mean shift in population standard deviations (``LayerStats.mean_shift``).
STALE_MEAN = (0.1, 0.5)  # (warning, severe)
#: Variance ratio, max(old/new, new/old) (``LayerStats.var_ratio``).
STALE_VAR = (1.25, 2.0)
#: RMS of (train-mode output - eval-mode output) over RMS of the eval-mode output.
GAP = (0.1, 0.5)
#: Amplification |gamma| / sqrt(var + eps) of a near-zero-variance channel that makes it severe:
#: 100x turns an input offset of 1% of a unit into a full unit of output.
AMPLIFICATION_SEVERE = 100.0
#: Samples per batch below which batch statistics are too noisy to train with (Ioffe 2017 and
#: Wu & He 2018 see the accuracy fall from about 8 down); below 2 values per channel, training
#: cannot normalise at all.
SMALL_BATCH = 4
#: Folding error more than this many times the model's own error against float64 is a finding.
FOLD_FACTOR = 8.0

_FIX_STATS = "bt.recompute_stats(model, loader) (PreciseBN) on training data, with weights fixed"


@dataclass
class Finding:
    layer: str
    check: str
    severity: str  # "warning" or "severe"
    message: str
    fix: str


@dataclass
class DoctorReport:
    layers: list[str]
    findings: list[Finding] = field(default_factory=list)
    fold: FoldReport | None = None

    @property
    def severe(self) -> bool:
        return any(f.severity == "severe" for f in self.findings)

    def checks(self) -> set[str]:
        return {f.check for f in self.findings}

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "severe": self.severe,
            "findings": [asdict(f) for f in self.findings],
            "fold": None if self.fold is None else asdict(self.fold),
        }

    def __str__(self) -> str:
        n_severe = sum(f.severity == "severe" for f in self.findings)
        lines = [
            f"batchnorm doctor: {len(self.layers)} batch-norm layer(s), "
            f"{len(self.findings)} finding(s), {n_severe} severe"
        ]
        for f in self.findings:
            lines.append(f"  {f.severity.upper():<8} {f.layer}  [{f.check}] {f.message}")
            lines.append(f"           fix: {f.fix}")
        if self.fold is not None:
            lines.append(str(self.fold))
        return "\n".join(lines)


def _norms(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [
        (name or type(model).__name__, m)
        for name, m in model.named_modules()
        if norm_kind(m) is not None and getattr(m, "running_var", None) is not None
    ]


def _static(name: str, layer: torch.nn.Module) -> list[Finding]:
    found = []
    mean, var = layer.running_mean.detach(), layer.running_var.detach()
    weight = getattr(layer, "weight", None)
    gamma = None if weight is None else weight.detach().double()
    if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
        bad = int((~torch.isfinite(mean) | ~torch.isfinite(var)).sum())
        found.append(Finding(name, "non_finite", "severe",
            f"{bad} channel(s) with NaN/inf running statistics: every output is NaN/inf there",
            _FIX_STATS + "; a non-finite training batch no longer reaches our layers' buffers",
        ))  # fmt: skip
    var64 = var.double()
    tiny = torch.isfinite(var64) & (var64 <= layer.eps)
    if gamma is not None:
        tiny &= gamma != 0  # a dead channel amplifies nothing; it has its own finding
    if tiny.any():
        amp = torch.rsqrt(var64 + layer.eps) * (1.0 if gamma is None else gamma.abs())
        worst = float(amp[tiny].max())
        severity = "severe" if worst >= AMPLIFICATION_SEVERE else "warning"
        found.append(Finding(name, "near_zero_var", severity,
            f"{int(tiny.sum())} channel(s) with running_var <= eps={layer.eps:g}: an input "
            f"offset is multiplied by up to {worst:.3g} at inference",
            "check the channels are not constant in the data (dead inputs); " + _FIX_STATS
            + "; or a larger eps",
        ))  # fmt: skip
    if gamma is not None and (gamma == 0).any():
        found.append(Finding(name, "dead_channels", "warning",
            f"{int((gamma == 0).sum())} of {gamma.numel()} channel(s) have gamma = 0: they output "
            "the constant beta",
            "prune them, or check what drove gamma to 0 (weight decay on batch-norm weights)",
        ))  # fmt: skip
    if mean.dtype not in (torch.float32, torch.float64) or var.dtype != mean.dtype:
        found.append(Finding(name, "buffer_dtype", "warning",
            f"running statistics stored as {mean.dtype}/{var.dtype}: each momentum update is "
            "rounded to 8 (bfloat16) or 11 (float16) bits and float16 overflows above 65504",
            "keep batch norm in float32: layer.float() after model.half(), or torch.autocast",
        ))  # fmt: skip
    params = [p for p in layer.parameters(recurse=False)]
    moving = layer.track_running_stats if hasattr(layer, "track_running_stats") else False
    if params and not any(p.requires_grad for p in params) and moving:
        found.append(Finding(name, "frozen_but_moving", "warning",
            "weight and bias are frozen (requires_grad=False) but train() still updates the "
            "running statistics",
            "bt.freeze(model): FrozenBatchNorm keeps them fixed whatever train() says",
        ))  # fmt: skip
    return found


def _batch_list(batches: Any, num_batches: int | None) -> list[Any] | None:
    if batches is None:
        return None
    if isinstance(batches, torch.Tensor):
        return [batches]
    if isinstance(batches, (str, bytes)) or not isinstance(batches, Iterable):
        raise TypeError(
            f"batches must be a tensor or an iterable of batches, got {type(batches).__name__}"
        )
    got = list(itertools.islice(batches, num_batches))
    if not got:
        raise ValueError("batches yielded no batch")
    return got


def _inputs(batch: Any) -> tuple[tuple, dict]:
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return (batch[0],), {}
    if isinstance(batch, dict):
        return (), dict(batch)
    raise TypeError(
        f"a batch must be a tensor, a (input, target) tuple or a dict, got {type(batch).__name__}"
    )


def _noise(values: int, channels: int) -> float:
    """Standard error of a per-channel mean over ``values`` values (in standard deviations),
    times the expected largest of ``channels`` such errors, sqrt(2 ln(2C))."""
    return math.sqrt(2.0 * math.log(2.0 * max(channels, 1)) / max(values, 1))


def _stale(model: torch.nn.Module, batches: list, names: set[str]) -> list[Finding]:
    work = copy.deepcopy(model)
    channels = {n: int(m.running_mean.numel()) for n, m in work.named_modules() if n in names}
    stats = recompute_stats(work, batches)
    found = []
    for name, s in stats.items():
        if name not in names or s.count == 0:
            continue
        shift, ratio = s.mean_shift, s.var_ratio
        # Twice the sampling noise of the data's own estimate: a mean's error is noise, a
        # variance's relative error sqrt(2) times it.
        noise = 2.0 * _noise(s.count, channels.get(name, 1))
        mean_at = [max(t, noise * k) for t, k in zip(STALE_MEAN, (1, 2), strict=True)]
        var_at = [
            max(t, 1 + math.sqrt(2) * noise * k) for t, k in zip(STALE_VAR, (1, 2), strict=True)
        ]
        severity = None
        if shift > mean_at[1] or ratio > var_at[1] or not math.isfinite(shift + ratio):
            severity = "severe"
        elif shift > mean_at[0] or ratio > var_at[0]:
            severity = "warning"
        if severity:
            found.append(Finding(name, "stale_stats", severity,
                f"running statistics off the exact ones over the data: mean by {shift:.3g} std, "
                f"variance by a factor {ratio:.3g}",
                _FIX_STATS,
            ))  # fmt: skip
    return found


def _keep(seen: dict, name: str) -> Any:
    def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
        seen.setdefault(name, (args[0], output))  # the first call of a layer used twice

    return hook


def _capture(model: torch.nn.Module, layers: list, batch: Any, training: bool) -> dict:
    """Each layer's (input, output) on ``batch``; batch norms in ``training`` mode, the rest in
    eval (no dropout). Runs on a copy: a train-mode forward writes running statistics."""
    work = copy.deepcopy(model).eval()
    seen: dict[str, tuple] = {}
    mods = dict(work.named_modules())
    handles = []
    for name, _ in layers:
        layer = mods.get(name, work)
        layer.train(training)
        handles.append(layer.register_forward_hook(_keep(seen, name)))
    args, kwargs = _inputs(batch)
    with torch.no_grad():
        work(*args, **kwargs)
    for h in handles:
        h.remove()
    return seen


def _gaps(model: torch.nn.Module, layers: list, batch: Any) -> list[Finding]:
    live = [(n, m) for n, m in layers if not isinstance(m, FrozenBatchNorm)]
    eval_out, train_out = _capture(model, live, batch, False), _capture(model, live, batch, True)
    found = []
    for name, _ in live:
        if name not in eval_out or name not in train_out:
            continue
        y_eval, y_train = eval_out[name][1].double(), train_out[name][1].double()
        gap = float(
            (y_train - y_eval).pow(2).mean().sqrt() / y_eval.pow(2).mean().sqrt().clamp_min(1e-30)
        )
        # A batch of m values per channel normalises with a mean off by 1/sqrt(m) and a scale
        # off by 1/sqrt(2m) even with exact running statistics: a gap of sqrt(1.5/m).
        per_channel = y_eval.numel() // max(y_eval.shape[1], 1) if y_eval.dim() > 1 else 1
        noise = math.sqrt(1.5 / max(per_channel, 1))
        warn_at, severe_at = max(GAP[0], 3 * noise), max(GAP[1], 6 * noise)
        severity = "severe" if gap > severe_at else "warning" if gap > warn_at else None
        if severity:
            found.append(Finding(name, "train_eval_gap", severity,
                f"output with batch statistics differs from eval by {gap:.3g} (relative RMS)",
                _FIX_STATS + "; with small batches, bt.BatchRenorm2d or bt.SyncBatchNorm",
            ))  # fmt: skip
    return found


def _small(model: torch.nn.Module, layers: list, batches: list) -> list[Finding]:
    sizes = [_inputs(b)[0][0].shape[0] for b in batches if _inputs(b)[0]]
    if not sizes or min(sizes) > SMALL_BATCH:
        return []
    smallest = batches[sizes.index(min(sizes))]
    seen = _capture(model, layers, smallest, False).values()
    per_channel = [x.numel() // max(x.shape[1], 1) for x, _ in seen]
    severe = any(m < 2 for m in per_channel)
    return [Finding(type(model).__name__, "small_batch", "severe" if severe else "warning",
        f"batches of {min(sizes)} sample(s)"
        + (": a layer sees 1 value per channel, training cannot normalise it" if severe else
           ": batch statistics that noisy hurt training and drift from the running ones"),
        "larger per-device batches, bt.SyncBatchNorm across devices, bt.BatchRenorm2d, or "
        "bt.freeze(model) for fine-tuning",
    )]  # fmt: skip


def _fold_findings(model: torch.nn.Module, batch: Any, report: DoctorReport) -> None:
    args, kwargs = _inputs(batch) if batch is not None else ((), {})
    report.fold = fold(model, args if args and not kwargs else None).report
    dev, own = report.fold.deviation, report.fold.original_error
    if dev is None:
        return
    broken = not math.isfinite(dev) and math.isfinite(own)  # e.g. a folded weight overflowed
    # A float64 model's own error against float64 is 0: a few of its rounding units then.
    own = max(own, 4 * (report.fold.output_ulp or 0.0))
    if broken or dev > FOLD_FACTOR * own and dev > 0:
        severity = "severe" if broken else "warning"
        report.findings.append(Finding(type(model).__name__, "fold_error", severity,
            f"fold changes the outputs by {dev:.3g}, the model's own error against float64 is "
            f"{own:.3g}",
            "fold a float32 copy (bt.fold(model.float())), or keep the listed layers unfolded",
        ))  # fmt: skip


def doctor(
    model: torch.nn.Module, batches: Any = None, *, num_batches: int | None = 8
) -> DoctorReport:
    """Examine every batch-norm layer of ``model``; a ``DoctorReport``. ``batches``: a tensor,
    or an iterable of tensors / (input, target) tuples / dicts of keyword arguments (at most
    ``num_batches`` are used; None: all). ``model`` is not changed."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches <= 0
    ):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    data = _batch_list(batches, num_batches)
    layers = _norms(model)
    report = DoctorReport([name for name, _ in layers])
    for name, layer in layers:
        report.findings += _static(name, layer)
    if data is not None and layers:
        names = {n for n, m in layers if not isinstance(m, FrozenBatchNorm)}
        report.findings += _small(model, layers, data)
        for check, run in (
            ("stale_stats", lambda: _stale(model, data, names) if names else []),
            ("train_eval_gap", lambda: _gaps(model, layers, data[0])),
        ):
            try:  # train-mode passes refuse what eval accepts (1 value per channel, CPU sync)
                report.findings += run()
            except (RuntimeError, ValueError) as exc:
                report.findings.append(Finding(type(model).__name__, check, "warning",
                    f"not measured: the train-mode pass raised {type(exc).__name__}: {exc}",
                    "give batches the model can train on (more than 1 value per channel)",
                ))  # fmt: skip
    _fold_findings(model, None if data is None else data[0], report)
    return report
