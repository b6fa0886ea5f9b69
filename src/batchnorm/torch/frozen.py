"""Frozen batch norm: the running statistics as constants, whatever ``model.train()`` says.

    y = (x - running_mean) / sqrt(running_var + eps) * weight + bias

is the eval-mode batch norm of this library (``batch_norm(..., training=False)``: a backend's
``elemt`` stage, with the derived backward), so gradients reach the input, and the affine when
``trainable_affine=True``, while no buffer can move: the forward never asks for batch
statistics, so ``train()``/``eval()`` only flip a flag nobody reads. Why a layer and not
``requires_grad_(False)`` + ``eval()``: the running statistics are not parameters (no gradient
stops them), and the next ``model.train()`` switches an eval'd layer back to batch statistics
(PyTorch #86590, #66073). torchvision's ``FrozenBatchNorm2d`` does the same for 4-d input only.

* ``FrozenBatchNorm1d/2d/3d``: the input-rank checks of ``torch.nn.BatchNorm1d/2d/3d``;
  ``FrozenBatchNorm``: any rank >= 2 (what a ``SyncBatchNorm`` becomes, having no rank).
* Buffers and state-dict keys are ``torch.nn.BatchNorm2d``'s (``weight``, ``bias``,
  ``running_mean``, ``running_var``, ``num_batches_tracked``), so state dicts load strictly both
  ways; a torchvision-style dict without ``num_batches_tracked`` loads too.
* ``freeze(model)`` / ``unfreeze(model)`` swap every batch-norm layer of a model, in place.

These classes deliberately do not derive from ``torch.nn.modules.batchnorm._BatchNorm``: code
that finds batch-norm layers by that base (``convert_sync``, ``accumulate_stats``,
``recompute_stats``, ``torch.optim.swa_utils.update_bn``) would otherwise write into the
statistics this module exists to keep fixed.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

from .._xp import check_eps
from .functional import _batch_norm
from .fused import BatchNormAddReLU2d, BatchNormReLU2d
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, _check_backend_name
from .sync import SyncBatchNorm

__all__ = [
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "freeze",
    "unfreeze",
]

_TorchBatchNorm = torch.nn.modules.batchnorm._BatchNorm
_SYNC = (torch.nn.SyncBatchNorm, SyncBatchNorm)
_FUSED = (BatchNormReLU2d, BatchNormAddReLU2d)


class FrozenBatchNorm(torch.nn.Module):
    """Batch norm with fixed running statistics, for (N, C, *) input of any rank >= 2.

    ``FrozenBatchNorm(num_features, eps=1e-5, *, trainable_affine=False, backend="auto",
    device=None, dtype=None)``. The statistics start as mean 0, variance 1, weight 1, bias 0
    (load a state dict or use ``from_batch_norm``). ``weight``/``bias`` are ``Parameter``s when
    ``trainable_affine`` and buffers otherwise (not in ``parameters()``, no gradient); the
    state-dict keys are the same either way. ``num_batches_tracked`` is kept as loaded, never
    counted, so the state dict stays loadable into ``torch.nn.BatchNormNd`` with
    ``strict=True``. ``last_backend`` names the backend of the latest forward (None before the
    first and for an empty batch).
    """

    #: Input ranks accepted (None: any >= 2) and how to say so in the error.
    _ranks: tuple[int, ...] | None = None
    _expected = "at least 2D"
    #: What ``unfreeze`` turns this class into, and a ``from_batch_norm`` source it refuses.
    _unfrozen: type = SyncBatchNorm
    _rank_class: type | None = None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        *,
        trainable_affine: bool = False,
        backend: str = "auto",
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral):
            raise TypeError(f"num_features must be an int, got {num_features!r}")
        if num_features <= 0:
            raise ValueError(f"num_features must be > 0, got {num_features!r}")
        if not isinstance(trainable_affine, bool):
            raise TypeError(f"trainable_affine must be a bool, got {trainable_affine!r}")
        # eps = 0 is legal: as in eval, the running variance is divided by, not a batch's.
        eps = check_eps(eps, allow_zero=True)
        backend = _check_backend_name(backend)
        super().__init__()
        self.num_features = int(num_features)
        self.eps = eps
        self.trainable_affine = trainable_affine
        self.backend = backend
        self.last_backend: str | None = None
        #: Kept for ``unfreeze`` only (the frozen forward has no use for them).
        self.momentum: float | None = 0.1
        self.process_group: Any = None
        factory = {"device": device, "dtype": dtype}
        self._set_tensors(
            torch.ones(num_features, **factory),
            torch.zeros(num_features, **factory),
            torch.zeros(num_features, **factory),
            torch.ones(num_features, **factory),
            torch.tensor(0, dtype=torch.long, device=device),
        )

    def _set_tensors(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        num_batches_tracked: torch.Tensor,
    ) -> None:
        # All removed, then registered in torch.nn.BatchNorm's order, so that the state dicts
        # list the same keys in the same order (a re-registered name would keep its old place).
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            self._parameters.pop(name, None)
            self._buffers.pop(name, None)
        for name, value in (("weight", weight), ("bias", bias)):
            if self.trainable_affine:
                self.register_parameter(name, torch.nn.Parameter(value))
            else:
                self.register_buffer(name, value)
        self.register_buffer("running_mean", running_mean)
        self.register_buffer("running_var", running_var)
        self.register_buffer("num_batches_tracked", num_batches_tracked)

    @classmethod
    def from_batch_norm(
        cls, bn: torch.nn.Module, *, trainable_affine: bool = False
    ) -> FrozenBatchNorm:
        """A frozen copy of the batch-norm layer ``bn`` (torch.nn's, ours, either
        SyncBatchNorm): its running statistics, weight, bias, ``num_batches_tracked``, eps and
        backend, copied (not shared: ``bn`` may go on training) on their own device and dtype.
        An ``affine=False`` layer gives weight 1 and bias 0. ``bn`` must have running statistics
        (``track_running_stats=True``); a fused BN+ReLU layer is refused (the ReLU would be lost).
        """
        _check_freezable(bn, type(bn).__name__)
        if cls._rank_class is not None and not isinstance(bn, cls._rank_class):
            raise TypeError(
                f"{cls.__name__}.from_batch_norm takes a {cls._rank_class.__name__}, got "
                f"{type(bn).__name__}; freeze() picks the matching frozen class"
            )
        if not isinstance(trainable_affine, bool):
            raise TypeError(f"trainable_affine must be a bool, got {trainable_affine!r}")
        frozen = cls(
            bn.num_features,
            bn.eps,
            trainable_affine=trainable_affine,
            backend=getattr(bn, "backend", "auto"),
            device="meta",  # every tensor is replaced just below
        )
        stats = bn.running_mean

        def copied(t: torch.Tensor | None, fill: float) -> torch.Tensor:
            if t is None:  # affine=False (or bias=False): the identity affine, like the stats
                return torch.full_like(stats, fill)
            return t.detach().clone()

        nbt = bn.num_batches_tracked
        frozen._set_tensors(
            copied(bn.weight, 1.0),
            copied(bn.bias, 0.0),
            stats.detach().clone(),
            bn.running_var.detach().clone(),
            torch.tensor(0, device=stats.device) if nbt is None else nbt.detach().clone(),
        )
        frozen.momentum = bn.momentum
        frozen.process_group = getattr(bn, "process_group", None)
        frozen.train(bn.training)
        return frozen

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        rank = input.dim()
        if (rank < 2) if self._ranks is None else (rank not in self._ranks):
            raise ValueError(
                f"{type(self).__name__}: expected {self._expected} input (got {rank}D input)"
            )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        # training=False whatever self.training says: that is the whole point of the layer.
        output, self.last_backend = _batch_norm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            False,
            None,
            self.eps,
            backend=self.backend,
            through_mean=True,
            through_var=True,
        )
        return output

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # torchvision's FrozenBatchNorm2d (and pre-1.0 BatchNorm checkpoints) have no
        # num_batches_tracked: keep ours rather than report it missing. Not written into the
        # caller's dict: a copy, so loading does not change what the caller passed.
        key = prefix + "num_batches_tracked"
        if key not in state_dict:
            state_dict = dict(state_dict)
            state_dict[key] = self.num_batches_tracked
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        text = f"{self.num_features}, eps={self.eps}"
        if self.trainable_affine:
            text += ", trainable_affine=True"
        if self.backend != "auto":
            text += f", backend={self.backend!r}"
        return text


class FrozenBatchNorm1d(FrozenBatchNorm):
    """``FrozenBatchNorm`` for (N, C) or (N, C, L) input, as ``torch.nn.BatchNorm1d``."""

    _ranks = (2, 3)
    _expected = "2D or 3D"
    _unfrozen = BatchNorm1d
    _rank_class = torch.nn.BatchNorm1d


class FrozenBatchNorm2d(FrozenBatchNorm):
    """``FrozenBatchNorm`` for (N, C, H, W) input, as ``torch.nn.BatchNorm2d``."""

    _ranks = (4,)
    _expected = "4D"
    _unfrozen = BatchNorm2d
    _rank_class = torch.nn.BatchNorm2d


class FrozenBatchNorm3d(FrozenBatchNorm):
    """``FrozenBatchNorm`` for (N, C, D, H, W) input, as ``torch.nn.BatchNorm3d``."""

    _ranks = (5,)
    _expected = "5D"
    _unfrozen = BatchNorm3d
    _rank_class = torch.nn.BatchNorm3d


def _frozen_class(layer: torch.nn.Module) -> type[FrozenBatchNorm] | None:
    """The frozen class for a batch-norm ``layer``; None for anything else."""
    for cls in (FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d):
        if isinstance(layer, cls._rank_class):
            return cls
    if isinstance(layer, _SYNC):
        return FrozenBatchNorm
    return None


def _check_freezable(layer: torch.nn.Module, name: str) -> None:
    """Raise for a layer ``freeze`` must not (or cannot) turn into a frozen one."""
    if isinstance(layer, _FUSED):
        raise TypeError(
            f"{name} is a {type(layer).__name__}: a frozen batch norm would drop its ReLU; "
            "replace it by a BatchNorm2d followed by torch.nn.ReLU before freezing"
        )
    if not isinstance(layer, _TorchBatchNorm):
        raise TypeError(f"{name} is a {type(layer).__name__}, not a batch-norm layer")
    if torch.nn.parameter.is_lazy(layer.running_mean):
        # A Lazy* layer becomes torch.nn.BatchNormNd at its first forward, shapes known.
        raise ValueError(f"{name} ({type(layer).__name__}) is uninitialized: run a forward first")
    if _frozen_class(layer) is None:
        # An unknown _BatchNorm subclass may compute anything in its forward (as the fused
        # layers do); freezing it as plain batch norm could silently change the model.
        raise TypeError(
            f"{name} is a {type(layer).__name__}, which derives from none of "
            "torch.nn.BatchNorm1d/2d/3d or a SyncBatchNorm; freeze() cannot tell what its "
            "eval forward computes"
        )
    if layer.running_mean is None or layer.running_var is None:
        raise ValueError(
            f"{name} ({type(layer).__name__}) has track_running_stats=False: it has no running "
            "statistics to freeze"
        )


def freeze(model: torch.nn.Module, *, trainable_affine: bool = False) -> torch.nn.Module:
    """Replace, IN PLACE, every batch-norm layer of ``model`` by a frozen copy of it.

    ``torch.nn.BatchNorm1d/2d/3d`` and their subclasses (ours included) become
    ``FrozenBatchNorm1d/2d/3d``; ``torch.nn.SyncBatchNorm`` and ours become the rank-agnostic
    ``FrozenBatchNorm``. The statistics, weight and bias are copied (``from_batch_norm``), so
    with ``trainable_affine=True`` the new weight/bias are new ``Parameter``s: build the
    optimizer after freezing. Frozen layers already there are left alone; a layer shared under
    two names is frozen once and stays shared. Returns ``model``, or the new layer when
    ``model`` is itself a batch norm.

    Refused, before anything changes: a fused ``BatchNormReLU2d``/``BatchNormAddReLU2d``
    (``TypeError``: the ReLU would be lost), another subclass of PyTorch's ``_BatchNorm`` whose
    forward is unknown (``TypeError``), a layer with ``track_running_stats=False`` or lazy
    uninitialised buffers (``ValueError``).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(trainable_affine, bool):
        raise TypeError(f"trainable_affine must be a bool, got {trainable_affine!r}")
    # Every layer is checked before the first swap, so that a refusal leaves the model as it was.
    for name, layer in model.named_modules():
        if isinstance(layer, (_TorchBatchNorm, *_FUSED)):
            _check_freezable(layer, repr(name) if name else "the model")

    def build(layer: torch.nn.Module) -> torch.nn.Module | None:
        cls = _frozen_class(layer) if isinstance(layer, _TorchBatchNorm) else None
        if cls is None:
            return None
        return cls.from_batch_norm(layer, trainable_affine=trainable_affine)

    return _swap(model, build, {})


def unfreeze(model: torch.nn.Module) -> torch.nn.Module:
    """Replace, IN PLACE, every frozen layer of ``model`` by a trainable batch norm.

    ``FrozenBatchNorm1d/2d/3d`` become ``batchnorm.torch.BatchNorm1d/2d/3d``; the rank-agnostic
    ``FrozenBatchNorm`` becomes ``batchnorm.torch.SyncBatchNorm``, our layer that accepts any
    rank >= 2 and, outside torch.distributed (or in eval), is exactly our plain batch norm, while
    under DDP it synchronises again, as the SyncBatchNorm it was frozen from did (with the same
    ``process_group``). The new layer takes over the frozen one's tensors (weight and bias as
    ``Parameter``s, the same objects if they already were), its eps, backend, the momentum of
    the layer it was frozen from (0.1 if built directly) and the training mode of the frozen
    layer, which ``model.train()``/``eval()`` kept in step with the model. Returns ``model``, or
    the new layer when ``model`` is itself frozen.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")

    def build(layer: torch.nn.Module) -> torch.nn.Module | None:
        return _unfrozen(layer) if isinstance(layer, FrozenBatchNorm) else None

    return _swap(model, build, {})


def _unfrozen(frozen: FrozenBatchNorm) -> torch.nn.Module:
    cls = frozen._unfrozen
    extra = {"process_group": frozen.process_group} if cls is SyncBatchNorm else {}
    layer = cls(
        frozen.num_features,
        frozen.eps,
        frozen.momentum,
        device="meta",  # every tensor is replaced just below
        backend=frozen.backend,
        **extra,
    )
    for name in ("weight", "bias"):
        value = getattr(frozen, name)
        if not isinstance(value, torch.nn.Parameter):
            value = torch.nn.Parameter(value)  # shares the buffer's storage
        setattr(layer, name, value)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(layer, name, getattr(frozen, name))
    layer.train(frozen.training)
    return layer


def _swap(module: torch.nn.Module, build: Any, done: dict[int, torch.nn.Module]) -> torch.nn.Module:
    # ``done``: a module reachable under two names is replaced once and stays shared.
    if id(module) in done:
        return done[id(module)]
    new = build(module)
    if new is None:
        new = module
    done[id(module)] = new
    # Not named_children(): it yields a shared child under its first name only.
    for name, child in list(new._modules.items()):
        if child is None:
            continue
        replacement = _swap(child, build, done)
        if replacement is not child:
            setattr(new, name, replacement)
    return new
