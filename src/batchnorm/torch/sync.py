"""``SyncBatchNorm``: batch statistics of the *global* batch across torch.distributed processes.

The stages are the chosen backend's (``backend=``, "auto" by default: Numba on CPU, Triton on
GPU), with one collective between each pair (design.md)::

    forward   backend.batch_stats (local: count, mean, M2)  --all_gather-->  merge_stats (Chan
              et al., written once in the reference); backend.elemt with the global mean, invstd
    backward  backend.backward_reduce (local sum_dy, sum_dy_xhat)  --all_reduce-->
              backend.backward_elemt with the global sums and count

One all_gather of a packed ``[count, mean, M2]`` vector per forward and one all_reduce of
``[sum_dy, sum_dy_xhat]`` per backward. The merge is exact for uneven per-rank batches and for
ranks with no samples at all (their count is 0 and they contribute nothing). Every rank merges
the same gathered numbers in the same order, so every rank holds bitwise the same statistics and
running statistics. Works with gloo on CPU tensors (PyTorch's own SyncBatchNorm refuses CPU)
and with NCCL on CUDA tensors.

Weight and bias gradients are the *local* sums, as in ``torch.nn.SyncBatchNorm``: data-parallel
training (DDP) then all-reduces them with every other parameter gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from .. import reference as ref
from .._xp import compute_dtype
from ..kernels import select_backend
from .function import AXIS, memory_format_of
from .functional import check_call
from .masked import check_mask, compact, expand, in_layout_of, masked_path, real_count
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm, _check_backend_name
from .stats_sink import deliver

__all__ = ["SyncBatchNorm", "convert_sync"]


def _world(process_group: Any) -> tuple[int, int]:
    """``(rank, world_size)`` in ``process_group``; ``(0, 1)`` when not distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    group = process_group if process_group is not None else dist.group.WORLD
    return dist.get_rank(group), dist.get_world_size(group)


def _collective(what: str, process_group: Any, fn: Any, *args: Any) -> None:
    """Run a collective; turn a peer's crash or a timeout into an error that says so."""
    try:
        fn(*args, group=process_group)
    except Exception as exc:  # gloo/NCCL raise several types (RuntimeError, DistError, ...)
        rank, world = _world(process_group)
        raise RuntimeError(
            f"SyncBatchNorm: the {what} failed on rank {rank} of {world}; another rank may have "
            f"crashed, exited or stopped calling the collective (see the process group's "
            f"timeout): {exc}"
        ) from exc


def _gather_stats(
    x: torch.Tensor, process_group: Any, world: int, backend: Any, mask: Any = None
) -> ref.BatchStats:
    """Local (count, mean, M2) of ``x`` (of its real positions, with ``mask``) on ``backend``'s
    stages, merged over the ranks."""
    channels = x.shape[AXIS]
    cdt = compute_dtype(x.dtype, torch)
    count = x.numel() // channels if channels else 0
    if mask is not None:
        count = real_count(mask) if channels else 0
    if count > 0:
        local = backend.batch_stats(x, AXIS, **({} if mask is None else {"mask": mask}))
        mean, m2 = local.mean, local.var * count
    else:  # an empty shard still takes part in the collective, contributing nothing
        mean = m2 = torch.zeros(channels, dtype=cdt, device=x.device)
    merged = gather_merge(count, mean, m2, process_group, world)
    return ref.BatchStats(merged.count, merged.mean.to(cdt), merged.var.to(cdt))


def gather_merge(
    count: Any, mean: torch.Tensor, m2: torch.Tensor, process_group: Any, world: int
) -> ref.BatchStats:
    """Every rank's ``(count, mean, M2)`` packed into one vector, one all_gather, and the exact
    merge (Chan et al.) in the same order on every rank, so all hold bitwise the same result.
    Shared by SyncBatchNorm's forward and PreciseBN (``lifecycle.recompute_stats``)."""
    channels = mean.shape[0]
    # float64 on the wire and in the merge: the design's exact merge, whatever the compute dtype
    f64 = torch.float64
    count_part = torch.as_tensor(count, dtype=f64, device=mean.device).reshape(1)
    packed = torch.cat([count_part, mean.to(f64), m2.to(f64)])
    gathered = torch.empty((world, packed.numel()), dtype=f64, device=mean.device)
    _collective(
        "all_gather of batch statistics",
        process_group,
        dist.all_gather,
        list(gathered.unbind(0)),
        packed,
    )
    return ref.merge_stats(
        gathered[:, 0], gathered[:, 1 : 1 + channels], gathered[:, 1 + channels :]
    )


class _SyncBatchNormFunction(torch.autograd.Function):
    """``y, mean, var, count = apply(x, weight, bias, eps, process_group, world, backend,
    mask)``; with a ``mask`` (native masked stages) every stage runs over the real positions."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, process_group, world, backend, mask=None):
        stats = _gather_stats(x, process_group, world, backend, mask)
        option = {} if mask is None else {"mask": mask}
        if x.device.type == "cpu" and float(stats.count) < 2:
            # Checked on CPU only: on a GPU reading the count would stall the stream.
            raise ValueError(
                "expected more than 1 value per channel when training, got "
                f"{int(stats.count)} value(s) per channel over all {world} ranks"
            )
        invstd = ref.inverse_std(stats.var, eps)
        y, _ = backend.elemt(x, stats.mean, invstd, weight, bias, AXIS, **option)
        ctx.save_for_backward(x, weight, stats.mean, invstd, stats.count)
        ctx.process_group, ctx.backend, ctx.option = process_group, backend, option
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(stats.mean, stats.var, stats.count)
        y = (
            in_layout_of(y, x)
            if mask is not None
            else y.contiguous(memory_format=memory_format_of(x))
        )
        return y, stats.mean, stats.var, stats.count

    @staticmethod
    @once_differentiable  # no double backward through the collectives: a clear error instead
    def backward(ctx, dy, _dmean, _dvar, _dcount):
        x, weight, mean, invstd, count = ctx.saved_tensors
        backend = ctx.backend
        sum_dy, sum_dy_xhat = backend.backward_reduce(dy, x, mean, invstd, AXIS, **ctx.option)
        channels = sum_dy.numel()
        combined = torch.cat([sum_dy, sum_dy_xhat])
        _collective(
            "all_reduce of [sum_dy, sum_dy_xhat]", ctx.process_group, dist.all_reduce, combined
        )
        # The global count: a Python int on CPU; on a GPU the 0-d tensor (no host sync).
        count = int(count) if count.device.type == "cpu" else count
        dx = backend.backward_elemt(
            dy, x, mean, invstd, weight, combined[:channels], combined[channels:], count, AXIS,
            **ctx.option,
        )  # fmt: skip
        if ctx.option:
            dx = in_layout_of(dx, x)
        else:
            dx = dx.contiguous(memory_format=memory_format_of(x))
        dweight = None if weight is None else sum_dy_xhat.to(weight.dtype)
        dbias = None if ctx.bias_dtype is None else sum_dy.to(ctx.bias_dtype)
        return dx, dweight, dbias, None, None, None, None, None


class SyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """Drop-in ``torch.nn.SyncBatchNorm`` that also runs on CPU tensors (gloo).

    It derives from PyTorch's common batch-norm base, not from ``torch.nn.SyncBatchNorm``:
    DistributedDataParallel refuses instances of that class on CPU ("SyncBatchNorm layers only
    work with GPU modules"), which is the point of this one. Parameters, buffers and state-dict
    keys are the same, so checkpoints move between the two.

    Same constructor as ``torch.nn.SyncBatchNorm`` (``process_group`` included) plus
    keyword-only ``backend`` (whose stages run, synchronised or not; ``last_backend`` says which
    ran). In eval mode, outside torch.distributed and
    with a world size of 1 the module is exactly our ``BatchNorm`` and communicates nothing.
    Any input rank >= 2 is accepted, as in PyTorch.

    On the first synchronised forward, the ranks compare their channel counts (one small extra
    all_gather, once per module) and all raise ``ValueError`` listing them if they differ.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group
        self.backend = _check_backend_name(backend)
        # What the local path (our BatchNorm's forward) reads.
        self.through_mean = self.through_var = True
        self.last_backend: str | None = None
        #: True: normalise with this rank's batch alone (PreciseBN sets it while it pools
        #: statistics, so that ranks with fewer batches never wait in a collective).
        self.local_batch = False
        self._channels_checked = False

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask`` as for ``BatchNorm1d``: each rank's real positions only, the ranks weighted
        by their counts of real values (the exact merge does that by itself)."""
        self._check_input_dim(input)
        if mask is not None:
            check_mask(mask, input)
        rank, world = _world(self.process_group)
        # world < 1: this rank is not in process_group; like torch.nn.SyncBatchNorm, it then
        # normalises with its own batch.
        if not self.training or world <= 1 or self.local_batch:
            return _BatchNorm.forward(self, input, mask=mask)
        if mask is not None and masked_path(select_backend(input, self.backend)[0]) != "native":
            # The fallback: this rank's real positions as a batch of their own.
            return expand(self.forward(compact(input, mask)), mask, input)
        # Validate everything before any collective or buffer change; m > 1 is checked on the
        # global count, after the gather.
        running = self.running_mean if self.track_running_stats else None
        tracking = check_call(
            input, running, self.running_var if running is not None else None, self.weight,
            self.bias, True, self.momentum, self.eps, global_batch=True,
        )  # fmt: skip
        chosen, _ = select_backend(input, self.backend)
        if not self._channels_checked:
            self._check_channels(input.shape[AXIS], rank, world)
        output, mean, var, count = _SyncBatchNormFunction.apply(
            input, self.weight, self.bias, float(self.eps), self.process_group, world, chosen,
            mask,
        )  # fmt: skip
        self.last_backend = chosen.name
        if tracking:  # not now under accumulation or a checkpoint's recomputation
            deliver(self, mean, var, int(count) if input.device.type == "cpu" else count)
        return output

    def _check_channels(self, channels: int, rank: int, world: int) -> None:
        mine = torch.tensor([channels], dtype=torch.int64, device=self._device())
        every = [torch.empty_like(mine) for _ in range(world)]
        _collective("channel-count check", self.process_group, dist.all_gather, every, mine)
        counts = [int(c) for c in every]
        if len(set(counts)) > 1:
            raise ValueError(
                f"SyncBatchNorm: the ranks disagree on the number of channels (rank -> C: "
                f"{dict(enumerate(counts))}); this is rank {rank}"
            )
        self._channels_checked = True

    def _device(self) -> torch.device:
        for t in (self.weight, self.running_mean):
            if t is not None:
                return t.device
        return torch.device("cpu")


def convert_sync(module: torch.nn.Module, process_group: Any = None) -> torch.nn.Module:
    """Replace every batch-norm layer (PyTorch's or ours) by our ``SyncBatchNorm``.

    Parameters, buffers, training mode, device and dtype are kept (the state is moved, not
    copied). Returns ``module`` itself, or the new layer when ``module`` is a batch norm.
    """
    # Checked over the whole model first, so that a refusal leaves it unconverted.
    for name, layer in module.named_modules():
        if _computes_more(layer):
            # A plain SyncBatchNorm in its place would drop its activation, virtual batches or
            # correction, and change what the model computes.
            raise ValueError(
                f"{name or 'the module'} ({type(layer).__name__}) is not a plain batch norm and "
                "has no synchronised version; convert_sync before "
                "convert(fuse_activations=True), or keep the layer local"
            )
        if not (getattr(layer, "through_mean", True) and getattr(layer, "through_var", True)):
            # Dropping the switches would silently change the gradient the layer trains with.
            raise ValueError(
                f"{name or 'the module'} ({type(layer).__name__}) has through_mean="
                f"{layer.through_mean}, through_var={layer.through_var}; SyncBatchNorm "
                "computes the full gradient only"
            )
    return _convert_sync(module, process_group)


def _computes_more(layer: torch.nn.Module) -> bool:
    """One of this library's batch-norm layers that is more than a batch norm (fused, Ghost,
    Renorm). A user's subclass of torch.nn's is converted, as torch.nn's conversion does; the
    frozen layers are not batch-norm modules to it and stay as they are."""
    return (
        isinstance(layer, torch.nn.modules.batchnorm._BatchNorm)
        and type(layer).__module__.startswith("batchnorm.torch")
        and type(layer) not in (BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm)
    )


def _convert_sync(module: torch.nn.Module, process_group: Any) -> torch.nn.Module:
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, SyncBatchNorm
    ):
        backend = getattr(module, "backend", "auto")
        sync = SyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group,
            backend=backend,
        )
        if module.affine:
            with torch.no_grad():
                sync.weight = module.weight
                sync.bias = module.bias
        sync.running_mean = module.running_mean
        sync.running_var = module.running_var
        sync.num_batches_tracked = module.num_batches_tracked
        sync.train(module.training)
        if hasattr(module, "qconfig"):
            sync.qconfig = module.qconfig
        return sync
    for name, child in module.named_children():
        module.add_module(name, _convert_sync(child, process_group))
    return module
