"""PyTorch integration: drop-in modules, the functional API and the autograd ``Function``.

Importing this sub-package imports torch (``import batchnorm`` alone does not).

* ``batch_norm``: ``torch.nn.functional.batch_norm`` plus ``backend`` and the
  ``through_mean``/``through_var`` switches.
* ``BatchNorm1d/2d/3d``: drop-in subclasses of the ``torch.nn`` layers.
* ``convert(model)`` / ``revert(model)``: swap PyTorch's layers for ours and back.
* ``BatchNormFunction``: the autograd Function running a backend's stages and the derived
  backward (double-differentiable).
* ``SyncBatchNorm`` / ``convert_sync``: batch statistics across torch.distributed ranks.
* ``explain_backend(x, backend="auto")``: which backend would run on ``x`` and why.
* ``BatchNormReLU2d`` / ``BatchNormAddReLU2d``, ``batch_norm_relu`` / ``batch_norm_add_relu``:
  batch norm fused with the ReLU (and residual add) after it (``fused.py``);
  ``BatchNormLeakyReLU2d`` / ``batch_norm_leaky_relu``: with a LeakyReLU, keeping only the
  output for the backward (In-Place ABN, ``fused_leaky.py``).
* ``convert(model, fuse_activations=True)`` / ``fuse_activations(model)``: those fusions
  applied to a model, by torch.fx or in ``nn.Sequential`` (``fuse.py``).
* ``accumulate_stats(model)``, ``recompute_stats(model, batches)`` (PreciseBN): running
  statistics under gradient accumulation and recomputed exactly (``lifecycle.py``); a
  forward recomputed by activation checkpointing never counts its batch (``stats_sink.py``).
* ``FrozenBatchNorm1d/2d/3d``, ``FrozenBatchNorm`` (any rank), ``freeze(model)`` /
  ``unfreeze(model)``: running statistics fixed through ``model.train()`` (``frozen.py``).
* ``GhostBatchNorm1d/2d/3d``, ``BatchRenorm1d/2d/3d``: small-batch variants on the same
  stages (``variants.py``).
* ``fold(model, example_inputs=None)``: a new model with batch norm folded into the
  neighbouring Conv/ConvTranspose/Linear, and a report (``fold.py``, ``fold_patterns.py``);
  ``doctor(model, batches=None)``: findings on a trained model's batch norm (``doctor.py``).
* ``symbolic_trace`` / ``Tracer``: ``torch.fx`` tracing that keeps these layers as leaves, as
  ``torch.fx`` does for ``torch.nn``'s own (``fx.py``).
"""

from ..kernels import BackendUnavailable
from .convert import convert, revert
from .doctor import DoctorReport, Finding, doctor
from .fold import FoldPair, FoldReport, FoldResult, fold
from .frozen import (
    FrozenBatchNorm,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    freeze,
    unfreeze,
)
from .function import BatchNormFunction
from .functional import batch_norm, explain_backend
from .fuse import FusionReport, fuse_activations
from .fused import BatchNormAddReLU2d, BatchNormReLU2d, batch_norm_add_relu, batch_norm_relu
from .fused_leaky import BatchNormLeakyReLU2d, batch_norm_leaky_relu
from .fx import Tracer, symbolic_trace
from .lifecycle import LayerStats, accumulate_stats, recompute_stats
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .sync import SyncBatchNorm, convert_sync
from .variants import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
)

__all__ = [
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "BackendUnavailable",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAddReLU2d",
    "BatchNormFunction",
    "BatchNormLeakyReLU2d",
    "FusionReport",
    "BatchNormReLU2d",
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "SyncBatchNorm",
    "DoctorReport",
    "Finding",
    "FoldPair",
    "FoldReport",
    "FoldResult",
    "doctor",
    "fold",
    "LayerStats",
    "Tracer",
    "accumulate_stats",
    "batch_norm",
    "batch_norm_add_relu",
    "batch_norm_leaky_relu",
    "fuse_activations",
    "batch_norm_relu",
    "convert",
    "convert_sync",
    "explain_backend",
    "freeze",
    "recompute_stats",
    "revert",
    "symbolic_trace",
    "unfreeze",
]
