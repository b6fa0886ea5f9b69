"""``batch_norm``: ``torch.nn.functional.batch_norm`` with our stages, backends and switches.

Order of work, so that a bad call changes nothing: validate every argument (the reference's
``check_input``, momentum, the running-statistics pair), pick the backend, run the autograd
``Function``, and only then write the new running statistics into the buffers, in place.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import reference as ref
from .._xp import check_eps, per_channel
from ..kernels import BackendUnavailable, select_backend
from .function import AXIS, apply_batch_norm
from .masked import MaskedBatchNormFunction, check_mask, compact, expand, masked_path, real_count
from .native import NATIVE, host_read_is_cheap, keep_finite, native_batch_norm, why_not_native

__all__ = ["batch_norm", "explain_backend", "BackendUnavailable"]


def explain_backend(
    input: torch.Tensor,
    backend: str = "auto",
    *,
    training: bool = True,
    through_mean: bool = True,
    through_var: bool = True,
    mask: torch.Tensor | None = None,
) -> str:
    """What ``backend`` runs for ``input`` in a layer's forward (``training`` or evaluation,
    with these switches), and why the others were passed over; with ``mask``, also which
    masked path the layers run (``masked.masked_path``): the backend's native masked stages, or
    the gather of the real positions (compaction).

    ``"torch (...)"``: ``"auto"`` hands the call to PyTorch's own kernel, where its semantics are
    ours and it is faster (``native.py``); otherwise the stage backend, e.g. ``"numba"`` or
    ``"reference (backend 'numba' is skipped by auto below 65536 elements)"``.
    Raises ``BackendUnavailable`` if an explicitly named backend cannot run on ``input``.
    """
    if backend == "auto" and mask is None:  # PyTorch's kernel has no mask
        reason = why_not_native(input, training, through_mean=through_mean, through_var=through_var)
        if reason is None:
            mode = "training" if training else "evaluation"
            return (
                f"{NATIVE} (PyTorch's own batch_norm: {input.numel()} values in {mode} on "
                f"{input.device.type}, where it is faster than our stages and computes the same; "
                "non-finite batches are still kept out of the running statistics)"
            )
    chosen, notes = select_backend(input, backend)
    if backend == "auto" and mask is None:
        notes = [*notes, f"not PyTorch's kernel: {reason}"]
    text = chosen.name if not notes else f"{chosen.name} ({'; '.join(notes)})"
    if mask is None:
        return text
    path = masked_path(chosen, input, real_count(check_mask(mask, input)))
    if path == "native":
        return f"{text}; masked: native (the backend's masked stages)"
    return f"{text}; masked: compaction (real positions gathered, plain stages, scattered back)"


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    backend: str = "auto",
    through_mean: bool = True,
    through_var: bool = True,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Batch normalization over the channel axis 1 of an (N, C, *) input.

    Same arguments and semantics as ``torch.nn.functional.batch_norm``: in training the batch
    statistics normalise ``input`` and, when ``running_mean``/``running_var`` are given, those
    buffers are updated in place (momentum weights the new batch; the running variance is the
    unbiased estimate). In eval the running statistics normalise. Differences, all additions:

    * ``backend``: ``"auto"`` (the best available for this device and dtype, see
      ``explain_backend``), ``"reference"``, or another name from ``batchnorm.kernels.REGISTRY``;
      a named backend that cannot run raises ``BackendUnavailable``.
    * ``through_mean=False`` / ``through_var=False``: the moments-as-constants gradients of
      ``batchnorm.reference.backward_elemt`` (training only; the forward is unchanged).
    * ``mask``: a boolean tensor of the input's shape without the channel axis (True = a real
      value): statistics, running statistics and gradients over the real positions only, 0
      written at the padded ones (``masked.py``).
    * A batch whose statistics are not finite leaves those channels' running statistics
      untouched (PyTorch writes the NaN/inf into them), with a warning on the CPU; silently
      off the CPU and under ``torch.compile``, where the warning's host read would stall the
      GPU or break the graph.
    * Bad arguments raise ``ValueError``/``TypeError`` naming the bad shape or value, before any
      buffer changes. ``momentum=None`` (cumulative average) is for the modules, which count
      batches; here it raises ``ValueError``.
    """
    check_functional_momentum(momentum)
    output, _ = _batch_norm(
        input,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        momentum,
        eps,
        backend=backend,
        through_mean=through_mean,
        through_var=through_var,
        mask=mask,
    )
    return output


def _batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    *,
    backend: str,
    through_mean: bool,
    through_var: bool,
    num_batches_tracked: int = 0,
    stats_sink: Any = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, str | None]:
    """``batch_norm`` plus the modules' needs: returns ``(output, name of the backend used)``.

    ``num_batches_tracked`` (batches seen before this one) serves ``momentum=None``;
    ``stats_sink`` receives the batch statistics instead of the buffers (see ``lifecycle``).
    """
    if mask is not None:
        check_mask(mask, input)
        chosen, _ = select_backend(input, backend)
        count = real_count(mask)
        if masked_path(chosen, input, count) == "native":
            return _masked_batch_norm(
                input, running_mean, running_var, weight, bias, training, momentum, eps,
                chosen, through_mean, through_var, num_batches_tracked, stats_sink, mask, count,
            )  # fmt: skip
        # The fallback: the real positions, as a batch of their own (masked.py).
        real = compact(input, mask)
        output, name = _batch_norm(
            real, running_mean, running_var, weight, bias, training, momentum, eps,
            backend=backend, through_mean=through_mean, through_var=through_var,
            num_batches_tracked=num_batches_tracked, stats_sink=stats_sink,
        )  # fmt: skip
        return expand(output, mask, input), name
    update = check_call(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if input.numel() == 0:
        return _empty_batch(input, weight, bias), None

    if backend == "auto" and (
        why_not_native(
            input,
            bool(training),
            through_mean=through_mean,
            through_var=through_var,
            stats_sink=stats_sink,
        )
        is None  # fmt: skip
    ):
        output = native_batch_norm(
            input, weight, bias, running_mean, running_var, bool(training), momentum,
            float(eps), num_batches_tracked,
        )  # fmt: skip
        if output is not None:
            return output, NATIVE
    chosen, _ = select_backend(input, backend)
    output, mean, var, _ = apply_batch_norm(
        input,
        weight,
        bias,
        running_mean,
        running_var,
        bool(training),
        float(eps),
        chosen,
        bool(through_mean),
        bool(through_var),
    )
    if update:
        write_batch_stats(
            input, running_mean, running_var, mean, var, momentum, num_batches_tracked,
            stats_sink=stats_sink, backend=chosen,
        )  # fmt: skip
    return output, chosen.name


def _masked_batch_norm(
    input, running_mean, running_var, weight, bias, training, momentum, eps, chosen,
    through_mean, through_var, num_batches_tracked, stats_sink, mask, count,
) -> tuple[torch.Tensor, str]:  # fmt: skip
    """``_batch_norm`` over the real positions on ``chosen``'s masked stages; ``count`` is m."""
    update = check_call(
        input, running_mean, running_var, weight, bias, training, momentum, eps, global_batch=True
    )
    if training and count < 2:
        raise ValueError(
            f"expected more than 1 value per channel when training, got {count} real "
            f"value(s) per channel (mask of shape {tuple(mask.shape)})"
        )
    args = (input, weight, bias, running_mean, running_var, bool(training), float(eps), chosen,
            bool(through_mean), bool(through_var), mask, count)  # fmt: skip
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, weight, bias)
    )
    run = MaskedBatchNormFunction.apply if grad else MaskedBatchNormFunction.forward
    output, mean, var, _ = run(*args)
    if update:
        if stats_sink is not None:
            stats_sink(mean, var, count)
        else:
            write_running_stats(
                running_mean, running_var, mean, var, count, momentum, num_batches_tracked
            )
    return output, chosen.name


def check_functional_momentum(momentum: Any) -> None:
    """The functional forms have no batch count, so no cumulative average."""
    if momentum is None:
        raise ValueError(
            "momentum=None (cumulative average) needs the number of batches seen; use the "
            "BatchNorm modules, which track it in num_batches_tracked, or pass a float"
        )


def check_call(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    *,
    global_batch: bool = False,
) -> bool:
    """Validate a ``batch_norm`` call completely, before any work or state change.

    Returns whether the running statistics are to be updated. Shared with the other layers
    built on this one (SyncBatchNorm, the fused layers), so every entry point rejects the same
    inputs. ``global_batch``: the batch is spread over ranks, so more than one value per
    channel is for the caller to check on the global count (eps > 0 is still required).
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            "running_mean and running_var must both be given or both be None, got "
            f"running_mean={_describe(running_mean)}, running_var={_describe(running_var)}"
        )
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var must be given when training=False")
    # An empty batch is legal in PyTorch (it returns an empty output); only m = 1 is an error.
    if training and global_batch:
        check_eps(eps)
    ref.check_input(
        input,
        AXIS,
        eps,
        training=bool(training) and input.numel() > 0 and not global_batch,
        gamma=weight,
        beta=bias,
        running_mean=running_mean,
        running_var=running_var,
    )
    update = bool(training) and running_mean is not None
    if update:
        ref.check_momentum(momentum, "torch", "unbiased")
    return update


def write_running_stats(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    count: int,
    momentum: float | None,
    num_batches_tracked: int = 0,
    *,
    backend: Any = None,
) -> None:
    """Fold one batch's ``mean`` and biased ``var`` (over ``count`` values per channel) into the
    buffers, in place: ``reference.update_running_stats`` decides the values (PyTorch's momentum
    convention, unbiased running variance, non-finite channels kept; on the CPU with a
    warning, elsewhere silently: the warning needs a host read, which would stall a GPU).

    Off the CPU, a ``backend`` (the one whose stages computed ``mean`` and ``var``) with the
    optional stage ``update_running`` (Triton: one kernel launch) writes the buffers itself
    where it takes them; otherwise a dozen torch ops do, with no host read either.
    """
    # SyncBatchNorm's global count on a GPU is a 0-d tensor there, never read on the host (a
    # count of 1 gives an infinite variance estimate, and the channels keep their values).
    count_on_device = isinstance(count, torch.Tensor) and not host_read_is_cheap(count)
    if count_on_device or (count >= 2 and int(num_batches_tracked) >= 0):
        w = 1.0 / (int(num_batches_tracked) + 1) if momentum is None else float(momentum)
        on_device = not host_read_is_cheap(running_mean)
        one_launch = getattr(backend, "update_running", None) if on_device else None
        if one_launch is not None and not count_on_device:
            with torch.no_grad():
                if one_launch(running_mean, running_var, mean, var, count, w):
                    return
        # The usual case in a few torch ops: ``update_running_stats``'s arithmetic, the same
        # expressions in the same order (a test holds the two equal bit for bit).
        with torch.no_grad():
            new_mean = (1.0 - w) * running_mean + w * mean.to(running_mean.dtype)
            new_var = (1.0 - w) * running_var + w * (var * (count / (count - 1))).to(
                running_var.dtype
            )
            if on_device:
                # No host read: it would make the host wait for the device at every layer's
                # training step. The reference's per-channel rule runs on the device, without
                # the warning (which needs that read).
                keep_finite(running_mean, running_var, new_mean, new_var, running_mean, running_var)
                return
            # On CPU the finiteness test is read once for all channels: dot(new_mean, new_var)
            # is finite exactly when both are (a NaN or infinity survives every product and
            # sum; a finite overflow only sends the call on to the general path). A new value
            # is non-finite whenever the batch statistic behind it is (w * inf, w * NaN), so
            # this covers those too. Measured: 0.18 -> 0.04 ms per training call of a small
            # layer. A non-finite batch goes on to the reference, which warns.
            if new_mean.dtype == new_var.dtype and math.isfinite(torch.dot(new_mean, new_var)):
                running_mean.copy_(new_mean)
                running_var.copy_(new_var)
                return
    new = ref.update_running_stats(
        running_mean, running_var, num_batches_tracked, mean, var, count, momentum=momentum
    )
    with torch.no_grad():
        running_mean.copy_(new.running_mean)
        running_var.copy_(new.running_var)


def write_module_stats(module: Any, mean: torch.Tensor, var: torch.Tensor, count: Any) -> None:
    """``write_running_stats`` into a batch-norm module's own buffers, with its momentum and, for
    ``momentum=None``, the batches it has counted so far."""
    seen = int(module.num_batches_tracked) if module.momentum is None else 0
    write_running_stats(
        module.running_mean, module.running_var, mean, var, count, module.momentum, seen
    )


def write_batch_stats(
    input: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    momentum: float | None,
    num_batches_tracked: int = 0,
    *,
    stats_sink: Any = None,
    backend: Any = None,
) -> None:
    """``write_running_stats`` for the ``mean`` and ``var`` of the whole local batch ``input``
    (computed by ``backend``), or, where a ``stats_sink`` is given (``lifecycle``: accumulation,
    PreciseBN, checkpoint recomputation), those statistics handed to it and the buffers left
    alone."""
    count = input.numel() // input.shape[AXIS]
    if stats_sink is not None:
        stats_sink(mean, var, count)
        return
    write_running_stats(
        running_mean, running_var, mean, var, count, momentum, num_batches_tracked,
        backend=backend,
    )  # fmt: skip


def _empty_batch(
    input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """PyTorch's answer to an empty batch: an empty output still connected to weight and bias,
    so their gradients are zeros rather than None."""
    output = input.clone()
    if weight is not None:
        output = output * per_channel(weight, input.dim(), AXIS, torch)
    if bias is not None:
        output = output + per_channel(bias, input.dim(), AXIS, torch)
    return output.to(input.dtype)


def _describe(v: torch.Tensor | None) -> str:
    return "None" if v is None else f"tensor of shape {tuple(v.shape)}"
