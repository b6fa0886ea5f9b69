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
"""

from ..kernels import BackendUnavailable
from .convert import convert, revert
from .function import BatchNormFunction
from .functional import batch_norm, explain_backend
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .sync import SyncBatchNorm, convert_sync

__all__ = [
    "BackendUnavailable",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormFunction",
    "SyncBatchNorm",
    "batch_norm",
    "convert",
    "convert_sync",
    "explain_backend",
    "revert",
]
