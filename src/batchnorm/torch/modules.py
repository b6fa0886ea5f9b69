"""Drop-in ``BatchNorm1d/2d/3d``.

Each is a subclass of the ``torch.nn`` class of the same name that replaces only ``forward``,
so the constructor, parameters and buffers (``weight``, ``bias``, ``running_mean``,
``running_var``, ``num_batches_tracked``), initialisation, input-rank checks, ``state_dict``
loading (including old checkpoints without ``num_batches_tracked``) and ``repr`` are PyTorch's
own, and code that asks ``isinstance(m, torch.nn.BatchNorm2d)`` (weight-decay exclusion, init
loops, ``fuse_conv_bn_eval``) keeps working (code that looks up exact types does not: see
docs/torch.md, Limitations). Added: ``backend``, ``through_mean``, ``through_var`` and
the ``last_backend`` attribute saying which backend the latest forward ran.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import kernels
from .._xp import check_eps
from ..reference.running import check_momentum
from .functional import _batch_norm
from .native import module_forward as _native_forward
from .stats_sink import stats_sink_for

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


def _check_channels(module: Any, input: Any) -> None:
    """The layer's channel count against the input's, said of the layer (the vectors' own
    check would blame ``weight``). Without weight or buffers torch.nn takes any count."""
    features = getattr(module, "num_features", None)
    if features is None or not isinstance(input, torch.Tensor) or input.dim() < 2:
        return
    has_vectors = module.weight is not None or module.running_mean is not None
    if has_vectors and input.shape[1] != features:
        raise ValueError(
            f"{type(module).__name__}({features}) got an input with {input.shape[1]} channels "
            f"(shape {tuple(input.shape)}): the channel axis 1 must have num_features values"
        )


def check_settings(eps: Any, momentum: Any) -> None:
    """What a layer can be built with: eps finite and >= 0 (0 only serves evaluation: training
    refuses it at the call), momentum in [0, 1] or None. torch.nn accepts anything here and
    fails, or computes nonsense, later; we say so at construction, and again at each call
    (the attributes may be set in between)."""
    check_eps(eps, allow_zero=True)
    check_momentum(momentum, "torch", "unbiased")


def _check_backend_name(backend: str) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend != "auto" and backend not in kernels.REGISTRY:
        known = sorted(kernels.REGISTRY)
        raise ValueError(f"unknown backend {backend!r}; known: {known} or 'auto'")
    return backend


def forward_with_buffers(
    module: Any,
    input: torch.Tensor,
    batch_norm: Callable[..., tuple[torch.Tensor, str | None]],
    **options: Any,
) -> torch.Tensor:
    """PyTorch's ``_BatchNorm.forward`` around ``batch_norm`` (``functional._batch_norm`` or one
    with its arguments), for any module with ``torch.nn``'s batch-norm attributes, a ``backend``
    and a ``last_backend``; ``options`` are passed on as keywords.

    Chooses batch or running statistics and the buffers ``batch_norm`` may update, passes the
    batches seen so far (for ``momentum=None``), records the backend it ran, and counts the batch
    in ``num_batches_tracked``.
    """
    module._check_input_dim(input)
    _check_channels(module, input)
    # Without buffers there is nothing to normalise with in eval: use the batch, as PyTorch.
    use_batch = module.training or (module.running_mean is None and module.running_var is None)
    use_buffers = not module.training or module.track_running_stats
    counting = (
        module.training and module.track_running_stats and module.num_batches_tracked is not None
    )
    if module.momentum is None and module.training and not counting:
        # PyTorch's factor is then 0: the running statistics stay as they are.
        use_buffers = use_buffers and not module.track_running_stats
    # Accumulation or a checkpoint's recomputation takes the statistics instead of the buffers
    # and counts the batch itself (or not at all).
    sink = stats_sink_for(module) if counting or (module.training and use_buffers) else None
    counting = counting and sink is None
    # Read only when needed: on a GPU, int() of a device tensor is a synchronisation.
    seen = int(module.num_batches_tracked) if counting and module.momentum is None else 0
    output, ran = batch_norm(
        input,
        module.running_mean if use_buffers else None,
        module.running_var if use_buffers else None,
        module.weight,
        module.bias,
        use_batch,
        module.momentum,
        module.eps,
        backend=module.backend,
        num_batches_tracked=seen,
        stats_sink=sink,
        **options,
    )
    if module.last_backend != ran:  # nn.Module.__setattr__ costs more than the comparison
        module.last_backend = ran
    # Counted after the forward succeeded, so a rejected batch changes no buffer.
    if counting:
        module.num_batches_tracked.add_(1)
    return output


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
        bias: bool = True,
        backend: str = "auto",
        through_mean: bool = True,
        through_var: bool = True,
    ) -> None:
        # torch.nn's ``bias`` keyword (an affine layer without a shift), passed only when off so
        # that a PyTorch without it still builds the default layer.
        extra = {} if bias else {"bias": False}
        check_settings(eps, momentum)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **extra
        )
        self.backend: str = _check_backend_name(backend)
        self.through_mean: bool = bool(through_mean)
        self.through_var: bool = bool(through_var)
        #: Name of the backend the latest forward ran (None before the first, or for an empty
        #: batch, which runs none).
        self.last_backend: str | None = None

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask`` (optional, boolean, the input's shape without the channel axis, True = a
        real value): batch norm over the real positions only, 0 at the padded ones.

        With ``backend="auto"`` a small enough call runs PyTorch's own kernel where its
        semantics are ours (``native.py``; ``last_backend`` is then ``"torch"``)."""
        if mask is None and self.backend == "auto":
            output = _native_forward(self, input)
            if output is not None:
                return output
        return forward_with_buffers(
            self,
            input,
            _batch_norm,
            through_mean=self.through_mean,
            through_var=self.through_var,
            mask=mask,
        )

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
