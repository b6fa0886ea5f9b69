"""Drop-in ``BatchNorm1d/2d/3d``.

Each is a subclass of the ``torch.nn`` class of the same name that replaces only ``forward``,
so the constructor, parameters and buffers (``weight``, ``bias``, ``running_mean``,
``running_var``, ``num_batches_tracked``), initialisation, input-rank checks, ``state_dict``
loading (including old checkpoints without ``num_batches_tracked``) and ``repr`` are PyTorch's
own, and code that asks ``isinstance(m, torch.nn.BatchNorm2d)`` (weight-decay exclusion, init
loops, conv-bn fusion) keeps working. Added: ``backend``, ``through_mean``, ``through_var`` and
the ``last_backend`` attribute saying which backend the latest forward ran.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import kernels
from .functional import _batch_norm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


def _check_backend_name(backend: str) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend != "auto" and backend not in kernels.REGISTRY:
        known = sorted(kernels.REGISTRY)
        raise ValueError(f"unknown backend {backend!r}; known: {known} or 'auto'")
    return backend


class _BatchNorm(torch.nn.Module):
    """What the three ranks share: our keywords and PyTorch's ``_BatchNorm.forward`` semantics.

    Listed first among the bases, so its ``__init__``/``forward`` run and ``super()`` reaches the
    ``torch.nn.BatchNormNd`` that supplies everything else.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        backend: str = "auto",
        through_mean: bool = True,
        through_var: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.backend: str = _check_backend_name(backend)
        self.through_mean: bool = bool(through_mean)
        self.through_var: bool = bool(through_var)
        #: Name of the backend the latest forward ran (None before the first, or for an empty
        #: batch, which runs none).
        self.last_backend: str | None = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        # Without buffers there is nothing to normalise with in eval: use the batch, as PyTorch.
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        use_buffers = not self.training or self.track_running_stats
        counting = (
            self.training and self.track_running_stats and self.num_batches_tracked is not None
        )
        # Read only when needed: on a GPU, int() of a device tensor is a synchronisation.
        seen = int(self.num_batches_tracked) if counting and self.momentum is None else 0
        output, self.last_backend = _batch_norm(
            input,
            self.running_mean if use_buffers else None,
            self.running_var if use_buffers else None,
            self.weight,
            self.bias,
            use_batch,
            self.momentum,
            self.eps,
            backend=self.backend,
            through_mean=self.through_mean,
            through_var=self.through_var,
            num_batches_tracked=seen,
        )
        # Counted after the forward succeeded, so a rejected batch changes no buffer.
        if counting:
            self.num_batches_tracked.add_(1)
        return output

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.backend != "auto":
            text += f", backend={self.backend!r}"
        if not self.through_mean:
            text += ", through_mean=False"
        if not self.through_var:
            text += ", through_var=False"
        return text


class BatchNorm1d(_BatchNorm, torch.nn.BatchNorm1d):
    """Drop-in ``torch.nn.BatchNorm1d`` for (N, C) or (N, C, L) input, running our stages.

    Arguments as ``torch.nn.BatchNorm1d``, plus keyword-only ``backend`` ("auto", "reference",
    or a name in ``batchnorm.kernels.REGISTRY``) and ``through_mean``/``through_var`` (default
    True, the full gradient; False gives the moments-as-constants gradient).
    """


class BatchNorm2d(_BatchNorm, torch.nn.BatchNorm2d):
    """Drop-in ``torch.nn.BatchNorm2d`` for (N, C, H, W) input; arguments as ``BatchNorm1d``."""


class BatchNorm3d(_BatchNorm, torch.nn.BatchNorm3d):
    """Drop-in ``torch.nn.BatchNorm3d`` for (N, C, D, H, W) input; arguments as ``BatchNorm1d``."""
