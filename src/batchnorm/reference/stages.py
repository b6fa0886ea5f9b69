"""The stage protocol: what every backend implements, and the compositions built on it.

Batch normalization is two per-channel reductions with elementwise maps between them. A
*backend* is an object with these methods (``batchnorm.kernels`` registers them by name; the
reference's own stages are :class:`ReferenceStages`)::

    batch_stats(x, axis, *, mask=None)                     -> BatchStats(count, mean, var)
    elemt(x, mean, invstd, gamma, beta, axis, *, residual=None, relu=False, mask=None)
                                                           -> Elemt(y, relu_mask)
    forward_infer(x, running_mean, running_var, gamma, beta, eps, axis)   -> y
    backward_reduce(dy, x, mean, invstd, axis, *, mask=None)  -> (sum_dy, sum_dy_xhat)
    backward_elemt(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, count, axis, *,
                   through_mean=True, through_var=True, mask=None)    -> dx
    relu_backward(dy, x, relu_mask, axis)                  -> dy where the ReLU passed, else 0
    unavailable_reason(x)                                  -> None, or why it cannot run on x

and optionally the fused compositions ``forward_train`` and ``backward_train`` with the
signatures of :func:`compose_forward_train` and :func:`compose_backward_train` (less the
first argument), and ``update_running(running_mean, running_var, mean, var, count, w) ->
bool``: ``reference.update_running_stats``'s values (momentum ``w``, PyTorch's convention,
unbiased, non-finite channels kept) written into the buffers in place without a host read, or
False with nothing written where it does not take them (the torch layers use it off the
CPU); :func:`forward_train` and :func:`backward_train` call a backend's own where it
has one, and compose its stages where it has not. ``merge_stats`` (the exact parallel merge) is
written once, in ``reference.stats``, and serves every backend.

Conventions every backend keeps:

* Inputs are validated by the caller (``reference.check_input`` and friends) and ``axis`` is
  already a non-negative channel axis. Outputs have x's kind (NumPy array or torch tensor),
  dtype and memory layout.
* Statistics and sums (``mean``, ``var``, ``invstd``, ``sum_dy``, ``sum_dy_xhat``) are in the
  compute dtype: float64 for float64 input, float32 for float32/float16/bfloat16. ``var`` is
  the biased batch variance; ``count`` is m, the values per channel (a Python int from
  ``batch_stats``; ``backward_elemt`` also takes the 0-d array ``merge_stats`` returns).
* ``relu_mask`` is the backend's own record of where the fused ReLU passed its input (the
  reference: a boolean array; the fast backends: 1 bit per element). Only the backend that
  wrote it reads it.
* Masked batch norm (padded sequences) is a keyword-only option, not a second protocol:
  ``batch_stats``, ``elemt``, ``backward_reduce`` and ``backward_elemt`` take ``mask=`` (boolean,
  x's shape without the channel axis, True = a real value; validated by the caller). The
  reductions then run over the real positions only and ``count`` is their number m (an int);
  ``elemt`` and ``backward_elemt`` write 0 at the padded positions. Whatever the padding holds
  (NaN, inf) never enters a sum or a real output: it is selected away, never multiplied by 0.
  The math is ``reference.masked``'s. A backend declares that it has the option with
  ``supports_mask = True`` (:func:`has_masked_stages`); one that does not is never called with
  ``mask=`` (the torch layers gather the real positions for it instead), and would raise a
  ``TypeError`` for the unexpected keyword, never answer wrongly. ``residual``/``relu`` and the
  fused compositions take no mask: :func:`forward_train` / :func:`backward_train` compose the
  stages when one is given.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

from .._xp import Array, namespace, values_per_channel
from .backward import backward_elemt, backward_reduce
from .forward import batch_norm_infer_unchecked, elemt
from .masked import (
    masked_backward_elemt,
    masked_backward_reduce,
    masked_batch_stats,
    masked_elemt,
)
from .stats import BatchStats, batch_stats, inverse_std

__all__ = [
    "Backend",
    "BackwardOut",
    "Elemt",
    "ForwardOut",
    "REFERENCE",
    "ReferenceStages",
    "backward_train",
    "compose_backward_train",
    "compose_forward_train",
    "forward_train",
    "has_masked_stages",
]


class Elemt(NamedTuple):
    """What the elementwise stage returns: ``y`` and, with ``relu=True``, the ReLU mask."""

    y: Array
    relu_mask: Any


class ForwardOut(NamedTuple):
    """A training forward: the output, the batch moments (var biased), invstd and ReLU mask."""

    y: Array
    mean: Array
    var: Array
    invstd: Array
    relu_mask: Any


class BackwardOut(NamedTuple):
    """A training backward: ``dgamma = sum_dy_xhat``, ``dbeta = sum_dy`` (compute dtype) and,
    when asked for, the gradient reaching the residual of a fused BN+add+ReLU."""

    dx: Array
    dgamma: Array
    dbeta: Array
    dresidual: Array | None


class Backend(Protocol):
    """The stages, by the names of ``batchnorm.reference``; see the module docstring."""

    name: str

    def unavailable_reason(self, x: Array) -> str | None: ...

    def batch_stats(self, x: Array, axis: int, *, mask: Array | None = None) -> BatchStats: ...

    def elemt(
        self,
        x: Array,
        mean: Array,
        invstd: Array,
        gamma: Array | None,
        beta: Array | None,
        axis: int,
        *,
        residual: Array | None = None,
        relu: bool = False,
        mask: Array | None = None,
    ) -> Elemt: ...

    def forward_infer(
        self,
        x: Array,
        running_mean: Array,
        running_var: Array,
        gamma: Array | None,
        beta: Array | None,
        eps: float,
        axis: int,
    ) -> Array: ...

    def backward_reduce(
        self, dy: Array, x: Array, mean: Array, invstd: Array, axis: int, *,
        mask: Array | None = None,
    ) -> tuple[Array, Array]: ...  # fmt: skip

    def backward_elemt(
        self,
        dy: Array,
        x: Array,
        mean: Array,
        invstd: Array,
        gamma: Array | None,
        sum_dy: Array | None,
        sum_dy_xhat: Array | None,
        count: Any,
        axis: int,
        *,
        through_mean: bool = True,
        through_var: bool = True,
        mask: Array | None = None,
    ) -> Array: ...

    def relu_backward(self, dy: Array, x: Array, relu_mask: Any, axis: int) -> Array: ...


def compose_forward_train(
    stages: Backend,
    x: Array,
    gamma: Array | None,
    beta: Array | None,
    eps: float,
    axis: int,
    *,
    residual: Array | None = None,
    relu: bool = False,
    mask: Array | None = None,
) -> ForwardOut:
    """Algorithm 1 from the stages: ``batch_stats`` -> ``inverse_std`` -> ``elemt``; with
    ``mask``, over the real positions only (the backend must have the option)."""
    if mask is None:
        stats = stages.batch_stats(x, axis)
        invstd = inverse_std(stats.var, eps)
        y, relu_mask = stages.elemt(
            x, stats.mean, invstd, gamma, beta, axis, residual=residual, relu=relu
        )
        return ForwardOut(y, stats.mean, stats.var, invstd, relu_mask)
    _no_fused_tail(residual is not None or relu)
    stats = stages.batch_stats(x, axis, mask=mask)
    invstd = inverse_std(stats.var, eps)
    y, _ = stages.elemt(x, stats.mean, invstd, gamma, beta, axis, mask=mask)
    return ForwardOut(y, stats.mean, stats.var, invstd, None)


def _no_fused_tail(fused: bool) -> None:
    if fused:
        raise ValueError("mask= does not combine with residual= or relu= (no fused masked tail)")


def compose_backward_train(
    stages: Backend,
    dy: Array,
    x: Array,
    mean: Array,
    invstd: Array,
    gamma: Array | None,
    axis: int,
    *,
    through_mean: bool = True,
    through_var: bool = True,
    relu_mask: Any = None,
    residual_grad: bool = False,
    mask: Array | None = None,
    count: Any = None,
) -> BackwardOut:
    """The compact backward from the stages: [``relu_backward``] -> ``backward_reduce`` ->
    ``backward_elemt``. With ``relu_mask`` the gradient first goes back through the fused ReLU;
    that masked gradient is also the residual's (``residual_grad``). With ``mask``, the sums
    run over the real positions and ``count`` (their number, from ``batch_stats``) is m."""
    if mask is not None:
        _no_fused_tail(relu_mask is not None or residual_grad)
        if count is None:
            raise ValueError("a masked backward needs count, the number of real positions")
        sum_dy, sum_dy_xhat = stages.backward_reduce(dy, x, mean, invstd, axis, mask=mask)
        dx = stages.backward_elemt(
            dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, count, axis,
            through_mean=through_mean, through_var=through_var, mask=mask,
        )  # fmt: skip
        return BackwardOut(dx, sum_dy_xhat, sum_dy, None)
    if relu_mask is not None:
        dy = stages.relu_backward(dy, x, relu_mask, axis)
    elif residual_grad:
        raise ValueError("residual_grad needs the relu_mask of the fused forward")
    sum_dy, sum_dy_xhat = stages.backward_reduce(dy, x, mean, invstd, axis)
    count = values_per_channel(tuple(x.shape), axis)
    dx = stages.backward_elemt(
        dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, count, axis,
        through_mean=through_mean, through_var=through_var,
    )  # fmt: skip
    return BackwardOut(dx, sum_dy_xhat, sum_dy, dy if residual_grad else None)


def has_masked_stages(stages: Any) -> bool:
    """Whether ``stages`` implements the ``mask=`` option of the stages (``supports_mask``)."""
    return getattr(stages, "supports_mask", False) is True


def forward_train(stages: Backend, *args: Any, **kwargs: Any) -> ForwardOut:
    """The backend's fused ``forward_train`` if it has one, else :func:`compose_forward_train`
    (always with ``mask``: the fused ones take none)."""
    fused = getattr(stages, "forward_train", None)
    if fused is None or kwargs.get("mask") is not None:
        return compose_forward_train(stages, *args, **kwargs)
    return fused(*args, **kwargs)


def backward_train(stages: Backend, *args: Any, **kwargs: Any) -> BackwardOut:
    """The backend's fused ``backward_train`` if it has one, else
    :func:`compose_backward_train` (always with ``mask``)."""
    fused = getattr(stages, "backward_train", None)
    if fused is None or kwargs.get("mask") is not None:
        return compose_backward_train(stages, *args, **kwargs)
    return fused(*args, **kwargs)


class ReferenceStages:
    """The reference's own stages as a backend: any array-API namespace, device and floating
    dtype; the oracle every other backend is checked against. No fused compositions: it is
    exactly :func:`compose_forward_train` / :func:`compose_backward_train` of its stages."""

    name = "reference"
    supports_mask = True

    def unavailable_reason(self, x: Array) -> str | None:
        return None

    def batch_stats(self, x, axis, *, mask=None):
        if mask is not None:
            return masked_batch_stats(x, mask, axis)
        return batch_stats(x, axis)

    def elemt(self, x, mean, invstd, gamma, beta, axis, *, residual=None, relu=False, mask=None):
        if mask is not None:
            _no_fused_tail(residual is not None or relu)
            return Elemt(masked_elemt(x, mask, mean, invstd, gamma, beta, axis), None)
        if residual is None and not relu:
            return Elemt(elemt(x, mean, invstd, gamma, beta, axis), None)
        # Fused tail in the compute dtype, rounded once to x's dtype.
        xp = namespace(x)
        z = elemt(x, mean, invstd, gamma, beta, axis, out_dtype=mean.dtype)
        if residual is not None:
            z = z + xp.astype(residual, z.dtype)
        relu_mask = None
        if relu:
            # "not z <= 0": NaN passes through, value and gradient, as in torch.relu
            relu_mask = ~(z <= 0)
            z = xp.where(relu_mask, z, xp.zeros_like(z))
        return Elemt(xp.astype(z, x.dtype), relu_mask)

    def forward_infer(self, x, running_mean, running_var, gamma, beta, eps, axis):
        return batch_norm_infer_unchecked(x, running_mean, running_var, gamma, beta, axis, eps)

    def backward_reduce(self, dy, x, mean, invstd, axis, *, mask=None):
        if mask is not None:
            return masked_backward_reduce(dy, x, mask, mean, invstd, axis)
        return backward_reduce(dy, x, mean, invstd, axis)

    def backward_elemt(
        self, dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, count, axis, *,
        through_mean=True, through_var=True, mask=None,
    ):  # fmt: skip
        if mask is not None:
            return masked_backward_elemt(
                dy, x, mask, mean, invstd, gamma, sum_dy, sum_dy_xhat, count, axis,
                through_mean=through_mean, through_var=through_var,
            )  # fmt: skip
        return backward_elemt(
            dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, count, axis,
            through_mean=through_mean, through_var=through_var,
        )  # fmt: skip

    def relu_backward(self, dy, x, relu_mask, axis):
        xp = namespace(dy)
        return xp.where(relu_mask, dy, xp.zeros_like(dy))


#: The reference's stages (what ``backend=None`` and ``"reference"`` mean everywhere).
REFERENCE = ReferenceStages()
