"""Swap ``torch.nn.BatchNorm1d/2d/3d`` for ours in a model, and back.

The new module takes over the old one's *tensors* (the same ``Parameter`` and buffer objects,
as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does), so device, dtype, values,
``requires_grad`` and an optimizer's references to the parameters are all preserved, and so is
the training mode. Only exact classes are swapped: subclasses of PyTorch's layers are left
alone, since they may override ``forward``.
"""

from __future__ import annotations

from typing import Any

import torch

from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, _check_backend_name, check_settings

__all__ = ["convert", "revert"]

_OURS: dict[type, type] = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}
_THEIRS: dict[type, type] = {ours: theirs for theirs, ours in _OURS.items()}


def convert(
    model: torch.nn.Module,
    *,
    backend: str = "auto",
    through_mean: bool = True,
    through_var: bool = True,
    fuse_activations: bool = False,
) -> torch.nn.Module:
    """``model`` with every ``torch.nn.BatchNorm1d/2d/3d`` replaced by ours (in place for
    children; a bare batch-norm ``model`` is returned as a new module).

    ``fuse_activations=True``: then each ``BatchNorm2d`` followed by a ReLU, an add and a ReLU,
    or a LeakyReLU becomes one fused module that saves less for the backward
    (``fuse.fuse_activations``): the model itself with its ``nn.Sequential`` pairs fused in
    place where those are all there is to fuse (or where it does not trace), else a new
    ``torch.fx.GraphModule`` sharing the model's tensors. What was fused (and why not,
    elsewhere) is logged on the ``batchnorm`` logger (``fuse.fuse_activations`` returns it as
    a report).
    """
    extras = {"backend": backend, "through_mean": through_mean, "through_var": through_var}
    _check_backend_name(backend)
    # Every layer's settings before the first swap: a refusal leaves the model as it was.
    for name, module in model.named_modules():
        if type(module) in _OURS:
            try:
                check_settings(module.eps, module.momentum)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{name or type(module).__name__}: {exc}") from None
    converted = _swap(model, _OURS, extras, {})
    if not fuse_activations:
        return converted
    from .fuse import fuse_activations as fuse
    from .fuse import logger

    fused, report = fuse(converted)
    (logger.info if report.traced else logger.warning)("convert: %s", report)
    return fused


def revert(model: torch.nn.Module) -> torch.nn.Module:
    """The inverse of ``convert``: every one of our ``BatchNorm1d/2d/3d`` back to PyTorch's."""
    return _swap(model, _THEIRS, {}, {})


def _swap(
    module: torch.nn.Module,
    mapping: dict[type, type],
    extras: dict[str, Any],
    done: dict[int, torch.nn.Module],
) -> torch.nn.Module:
    # ``done``: a module reachable by two names (shared) is rebuilt once, and stays shared.
    if id(module) in done:
        return done[id(module)]
    target = mapping.get(type(module))
    new = _rebuild(module, target, extras) if target is not None else module
    done[id(module)] = new
    # Not named_children(): it yields a shared child under its first name only.
    for name, child in list(new._modules.items()):
        if child is None:
            continue
        replacement = _swap(child, mapping, extras, done)
        if replacement is not child:
            setattr(new, name, replacement)
    return new


def _rebuild(old: torch.nn.Module, target: type, extras: dict[str, Any]) -> torch.nn.Module:
    # Built on the meta device: every tensor is replaced by the old module's own just below.
    new = target(
        old.num_features,
        old.eps,
        old.momentum,
        old.affine,
        old.track_running_stats,
        device="meta",
        **({"bias": False} if old.affine and old.bias is None else {}),
        **extras,
    )
    for name in ("weight", "bias"):
        setattr(new, name, getattr(old, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(new, name, getattr(old, name))
    new.train(old.training)
    if hasattr(old, "qconfig"):
        new.qconfig = old.qconfig
    return new
