"""Running statistics across the training lifecycle: gradient accumulation and PreciseBN.

Both are policies of one mechanism (``stats_sink``): the batch statistics a layer computes in
training are merged exactly in float64 (``reference.merge_stats``, Chan et al.) and reach the
buffers through ``reference.update_running_stats`` only, so the conventions (PyTorch's momentum,
unbiased running variance) and the guard against non-finite batches are the same everywhere.

* ``accumulate_stats(model)``: k micro-batch forwards normalise with their own statistics as
  usual; on leaving the block each layer makes ONE update with the statistics of all k together,
  what one forward of the concatenated batch would have written (PyTorch #46516).
* ``recompute_stats(model, batches)``: PreciseBN (Wu & Johnson 2021, section 3): with the
  weights fixed, set every layer's running statistics to the exact statistics of the
  activations it sees over ``batches``, pooled over calls and, under torch.distributed, ranks.

Checkpoint recomputation needs no call: our layers never count a recomputed forward.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import numbers
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .. import reference as ref
from ..kernels import select_backend
from .function import AXIS
from .stats_sink import Collector, write_for
from .sync import _world, gather_merge

__all__ = ["LayerStats", "accumulate_stats", "recompute_stats"]

_BatchNormBase = torch.nn.modules.batchnorm._BatchNorm


def _with_buffers(model: torch.nn.Module) -> list[tuple[str, Any]]:
    """``(name, layer)`` of every batch-norm layer that keeps running statistics."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [
        (name or type(model).__name__, layer)
        for name, layer in model.named_modules()
        if isinstance(layer, _BatchNormBase) and layer.running_mean is not None
    ]


@contextlib.contextmanager
def accumulate_stats(model: torch.nn.Module) -> Iterator[None]:
    """Around k micro-batch forwards: one running-statistics update per layer, on exit, with
    the exact statistics of all k micro-batches (``num_batches_tracked`` + 1), as one forward of
    the concatenated batch would have written. Each forward still normalises with its own
    micro-batch. A layer called several times counts every call; one not called is unchanged.
    If the block raises, no buffer changes.

    Only this library's layers route their statistics (``convert(model)`` first): a
    ``torch.nn`` batch norm would update on every micro-batch, so it is refused, as is nesting.
    """
    layers = _with_buffers(model)
    if not layers:
        raise ValueError("model has no batch-norm layer with running statistics to accumulate")
    foreign = [name for name, layer in layers if not hasattr(layer, "last_backend")]
    if foreign:
        raise TypeError(
            f"accumulate_stats needs batchnorm.torch layers; these are not: {foreign[:5]} "
            "(batchnorm.torch.convert(model) swaps torch.nn's in place)"
        )
    nested = [name for name, layer in layers if getattr(layer, "_stats_sink", None) is not None]
    if nested:
        raise ValueError(f"layers {nested[:5]} are already inside accumulate_stats")
    collectors = {name: Collector() for name, _ in layers}
    for name, layer in layers:
        layer._stats_sink = collectors[name]
    try:
        yield
    finally:
        for _, layer in layers:
            layer._stats_sink = None
    for name, layer in layers:
        collected = collectors[name]
        if not len(collected):
            continue
        merged = collected.merged()
        write_for(layer)(merged.mean, merged.var, int(merged.count))
        with torch.no_grad():
            layer.num_batches_tracked.add_(1)


@dataclass(frozen=True)
class LayerStats:
    """What ``recompute_stats`` did to one layer: ``calls`` forwards of ``count`` values per
    channel in all; how far the old running statistics were from the new ones: the largest
    mean shift in new standard deviations, ``max |old - new| / sqrt(new_var + eps)``, and the
    largest variance ratio, ``max(old / new, new / old)``."""

    calls: int
    count: int
    mean_shift: float
    var_ratio: float


def _check_limit(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int or None, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return int(value)


def _device_of(model: torch.nn.Module) -> torch.device | None:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return None


def _call(model: torch.nn.Module, batch: Any, device: torch.device | None) -> int:
    """Run ``model`` on one batch: a tensor, a tuple/list whose first item is the input (what a
    DataLoader of (input, target) yields), or a dict of keyword arguments. Returns its size."""
    move = (lambda t: t.to(device)) if device is not None else (lambda t: t)  # noqa: E731
    if isinstance(batch, torch.Tensor):
        model(move(batch))
        return batch.shape[0]
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        model(move(batch[0]))
        return batch[0].shape[0]
    if isinstance(batch, dict):
        kwargs = {k: move(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        model(**kwargs)
        first = next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        return 0 if first is None else first.shape[0]
    raise TypeError(
        "each batch must be a tensor, a tuple/list starting with the input tensor, or a dict "
        f"of keyword arguments; got {type(batch).__name__}"
    )


def _pool_hook(collector: Collector, backend: str) -> Any:
    def hook(layer: Any, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor) or x.numel() == 0:
            return
        stats = select_backend(x, backend)[0].batch_stats(x, AXIS)
        collector(stats.mean, stats.var, stats.count)

    return hook


def recompute_stats(
    model: torch.nn.Module,
    batches: Iterable[Any],
    *,
    num_samples: int | None = None,
    num_batches: int | None = None,
    estimator: str = "population",
    progress: bool | None = None,
) -> dict[str, LayerStats]:
    """PreciseBN: set every batch-norm layer's running statistics to exact statistics of the
    activations it sees over ``batches``, with the weights fixed. Edits ``model`` in place.

    * ``batches``: an iterable of tensors, of tuples/lists starting with the input (a
      DataLoader of (input, target)), or of dicts of keyword arguments; tensors are moved to
      the model's device. It may be shorter than the limits.
    * ``num_samples`` / ``num_batches``: stop once that many samples (first dimension; the
      last batch is used whole) or batches are used, whichever comes first; by default all of
      ``batches``. No batch is taken from ``batches`` beyond those used.
    * ``estimator="population"`` (default): the pooled mean and unbiased variance of all the
      activations, as if they were one batch (merged exactly in float64). ``"average"``:
      Algorithm 2 of Ioffe & Szegedy, the average of the per-batch means and of the per-batch
      unbiased variances.

    During the pass the batch-norm layers normalise with each batch's own statistics (as in
    training), every other module runs in eval mode (no dropout), and no gradient is taken;
    every module's mode is restored afterwards, and ``num_batches_tracked`` is unchanged. A layer
    called several times per forward pools all its calls. Under an initialised process group the
    statistics are merged over the ranks (count-weighted; uneven and empty ranks are exact), so
    every rank ends with the same buffers; every rank must call this, and our SyncBatchNorm
    normalises each rank's batches alone meanwhile (PyTorch's own SyncBatchNorm would need the
    same number of batches on every rank). A channel whose pooled statistics are not finite
    keeps its old values (with a warning). Returns ``{layer name: LayerStats}``.
    """
    num_samples = _check_limit(num_samples, "num_samples")
    num_batches = _check_limit(num_batches, "num_batches")
    if estimator not in ("population", "average"):
        raise ValueError(f"estimator must be 'population' or 'average', got {estimator!r}")
    if isinstance(batches, (torch.Tensor, str, bytes)) or not isinstance(batches, Iterable):
        raise TypeError(
            f"batches must be an iterable of batches (e.g. a DataLoader), got "
            f"{type(batches).__name__}"
        )
    layers = _with_buffers(model)
    if not layers:
        raise ValueError("model has no batch-norm layer with running statistics to recompute")

    busy = [name for name, layer in layers if getattr(layer, "_stats_sink", None) is not None]
    if busy:
        raise ValueError(f"layers {busy[:5]} are inside accumulate_stats: recompute after it")
    collectors = {name: Collector() for name, _ in layers}
    modes = {module: module.training for module in model.modules()}
    saved = {name: _buffers(layer) for name, layer in layers}
    # Our layers hand their statistics (of the real positions, under a mask) to a sink; for
    # torch.nn's, a hook computes them from the layer's input.
    ours = [(name, layer) for name, layer in layers if hasattr(layer, "last_backend")]
    handles = [
        layer.register_forward_pre_hook(
            _pool_hook(collectors[name], getattr(layer, "backend", "auto")), with_kwargs=True
        )
        for name, layer in layers
        if not hasattr(layer, "last_backend")
    ]
    local = [layer for _, layer in layers if hasattr(layer, "local_batch")]
    seen_batches = seen_samples = 0
    bar = None
    try:
        model.eval()
        for _, layer in layers:
            layer.train()
        for layer in local:
            layer.local_batch = True
        for name, layer in ours:
            layer._stats_sink = collectors[name]
        bar = _progress(batches, num_batches, progress)
        device = _device_of(model)
        with torch.no_grad():
            for batch in bar if bar is not None else batches:
                seen_samples += _call(model, batch, device)
                seen_batches += 1
                # Checked after each batch, so that no batch is taken from the caller's
                # iterator that is not used.
                if num_batches is not None and seen_batches >= num_batches:
                    break
                if num_samples is not None and seen_samples >= num_samples:
                    break
    finally:
        if bar is not None:
            bar.close()
        for handle in handles:
            handle.remove()
        for layer in local:
            layer.local_batch = False
        for _, layer in ours:
            layer._stats_sink = None
        for module, training in modes.items():
            module.training = training
        # torch.nn's layers wrote their buffers in the pass: put the old ones back first.
        for name, layer in layers:
            _restore(layer, saved[name])
    _, world = _world(None)
    if seen_batches == 0 and world == 1:
        raise ValueError("batches yielded no batch: nothing to recompute the statistics from")
    summary = {
        name: _set_pooled(layer, collectors[name], estimator, world, saved[name])
        for name, layer in layers
    }
    if all(stats.count == 0 for stats in summary.values()):
        raise ValueError(
            "no batch-norm layer saw a value in batches (on any rank): buffers left unchanged"
        )
    return summary


def _buffers(layer: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    tracked = layer.num_batches_tracked
    return (
        layer.running_mean.clone(),
        layer.running_var.clone(),
        None if tracked is None else tracked.clone(),
    )


def _restore(layer: Any, buffers: tuple) -> None:
    mean, var, tracked = buffers
    with torch.no_grad():
        layer.running_mean.copy_(mean)
        layer.running_var.copy_(var)
        if tracked is not None:
            layer.num_batches_tracked.copy_(tracked)


def _set_pooled(
    layer: Any, collected: Collector, estimator: str, world: int, old: tuple
) -> LayerStats:
    """Pool the layer's calls (and ranks), then set its buffers through
    ``update_running_stats`` with momentum 1: the new values are the pooled ones, with its
    conventions (unbiased variance) and its guard (non-finite channels kept, warned about)."""
    channels, device = layer.running_mean.shape[0], layer.running_mean.device
    zeros = torch.zeros(channels, dtype=torch.float64, device=device)
    calls = len(collected)
    if estimator == "population":
        local = collected.merged() if calls else ref.BatchStats(0.0, zeros, zeros)
        pooled = local
        if world > 1:
            pooled = gather_merge(local.count, local.mean, local.m2, None, world)
        count = int(pooled.count)
        mean, var, variance = pooled.mean, pooled.var, "unbiased"
    else:  # Algorithm 2: averages over batches of the batch mean and unbiased variance
        counts = torch.tensor(collected.counts, dtype=torch.float64, device=device)
        sums = torch.zeros(2 * channels + 2, dtype=torch.float64, device=device)
        if calls:
            unbiased = torch.stack(collected.m2s) / (counts - 1).clamp(min=1)[:, None]
            sums[0], sums[1] = calls, counts.sum()
            sums[2 : 2 + channels] = torch.stack(collected.means).sum(0)
            sums[2 + channels :] = unbiased.sum(0)
        if world > 1:
            dist.all_reduce(sums)
        batches, count = sums[0].clamp(min=1), int(sums[1])
        mean = sums[2 : 2 + channels] / batches
        var, variance = sums[2 + channels :] / batches, "biased"  # already unbiased
    if count == 0:  # the layer saw nothing (anywhere): leave it as it was
        return LayerStats(calls, 0, 0.0, 1.0)
    if variance == "unbiased" and count < 2:
        raise ValueError(
            f"a layer saw {count} value per channel in all; the unbiased variance needs 2"
        )
    new = ref.update_running_stats(
        layer.running_mean, layer.running_var, 0, mean, var, count, momentum=1.0,
        variance=variance,
    )  # fmt: skip
    with torch.no_grad():
        layer.running_mean.copy_(new.running_mean)
        layer.running_var.copy_(new.running_var)
    old_mean, old_var = (t.to(torch.float64) for t in old[:2])
    new_var = layer.running_var.to(torch.float64)
    shift = (old_mean - layer.running_mean.to(torch.float64)).abs() / (new_var + layer.eps).sqrt()
    ratio = torch.maximum(old_var / new_var, new_var / old_var)
    return LayerStats(calls, count, _largest(shift), _largest(ratio))


def _largest(values: torch.Tensor) -> float:
    finite = values[torch.isfinite(values)]
    return float(finite.max()) if finite.numel() else math.inf


def _progress(batches: Iterable[Any], num_batches: int | None, progress: bool | None) -> Any:
    """A tqdm bar over ``batches`` (``progress=None``: on a terminal only), or None where none is
    wanted or tqdm is missing. Only a bar this function made is closed afterwards: the caller's
    own iterator is left as it is."""
    if progress is False:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    total = num_batches
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)
    return tqdm(batches, total=total, desc="PreciseBN", disable=None if progress is None else False)
