"""PyTorch's own kernel where our semantics are identical: the fixed cost of a small layer.

Our stages pay a fixed Python cost per call (validation, backend resolution, the autograd
Function, the running-statistics update through the array-API reference): about 0.5 ms per
training step, against 0.1 ms for ``torch.nn.BatchNorm2d``, whatever the size. Below a size
measured per device (``NATIVE_BELOW``), ``backend="auto"`` therefore runs ``torch.batch_norm``
(ATen's native kernel, C++ end to end, differentiable twice, with forward-mode AD) where that
computes exactly what our layer promises:

* training with the full gradient (both moments switches on), or evaluation with running
  statistics; no statistics sink (accumulation, PreciseBN; a checkpoint's recomputation runs
  the kernel again on copies of the running statistics, see ``_recompute``),
  no torch.func transform;
* float32 or float64, or float16/bfloat16 (on CPU only contiguous: for channels_last half
  inputs PyTorch's CPU ``grad_input`` is less accurate than ours, docs/torch.md; on CUDA our
  Triton layer costs 3-4x PyTorch's time per call, and a half-precision channels_last input is
  the usual mixed-precision case);
* a valid call: m >= 2 and eps > 0 in training, eps >= 0 in evaluation, momentum in [0, 1] or
  None. Everything else (a wrong channel count, mixed dtypes PyTorch refuses) raises inside
  ATen before it writes anything, and is then handed to our path, which raises our error.

The guarantee that a non-finite batch never enters the running statistics is kept with one
copy and, on CPU, one host read: ATen updates a copy of the buffers (two clones; off the
CPU one multi-tensor launch), and ``dot(new_mean, new_var)`` is finite exactly when both
vectors are (a NaN or infinity survives every product and sum; a finite overflow only sends a
call to the slow branch needlessly). When it is finite the copy is written to the buffers;
when not, our own update (``functional.write_batch_stats``: finite channels written, the
others kept, with the warning) runs on statistics recomputed by the reference. Off the CPU
the same per-channel rule runs on the device without a host read and without the warning
(``keep_finite``).

Under ``torch.compile`` the size limits do not apply and the CPU takes the device path too:
PyTorch's kernel traces into the compiled graph, and our stages (an autograd Function with a
custom ``jvp``, which Dynamo does not trace) or a host read would break it at every layer. A
converted ResNet-18 (64x64, batch 16, CPU, inductor) with its stem on the Numba stages trained
at 0.93x compiled torch.nn's speed.

``module.last_backend`` is then ``"torch"``; ``explain_backend(x, training=...)`` says why
(``why_not_native``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import reference as ref
from ..kernels.numba_cpu.tuning import ROWS_MIN_INNER  # pure Python: no numba import

__all__ = [
    "NATIVE",
    "NATIVE_BELOW",
    "NATIVE_BELOW_LONG_ROWS",
    "host_read_is_cheap",
    "keep_finite",
    "module_forward",
    "native_batch_norm",
    "why_not_native",
]

#: The name recorded in ``last_backend`` when PyTorch's kernel ran.
NATIVE = "torch"

#: device type -> (training, evaluation): ``backend="auto"`` runs PyTorch's kernel on inputs
#: with fewer values than this. Measured on the 2-core machine (2026-12-04). Layer alone
#: (benchmarks/layer_cost.py): in training our Numba stages win from (32, 64, 16, 16) =
#: 524,288 values (0.77 ms against torch.nn's 1.85 ms); in evaluation PyTorch's kernel is
#: faster up to 2,097,152 values and 7.6x slower at 12,845,056 (its fresh output's page
#: faults). Inside a whole model the training crossover moves up: between convolutions Numba's
#: threads wake from sleep at every stage (OMP_WAIT_POLICY=PASSIVE, needed so that they do not
#: spin against PyTorch's), and a ResNet-50 step at 64x64, batch 16, was 0.95x (float32) and
#: 0.91x (bfloat16) of torch.nn's speed with the limit at 262,144 against 0.99x and 1.02x at
#: 4,194,304 (same run, 2 threads; limits swept in one process).
#: On CUDA (an H200, torch 2.11, Triton 3.6; benchmarks/results/gpu-session-h200-2026-12-04.md)
#: our Triton path lost at every size measured (run 1): a training step took 3.1-4.2x
#: torch.nn's time from 512 to 12,845,056 values and 1.05x at 51,380,224; an evaluation
#: forward 2.75-4.33x and 1.70x; a ResNet step after ``convert`` ran at 0.23-0.28x torch.nn's
#: speed. The layer's cost there is the host's (Python, and a dozen small ATen ops for the
#: running statistics), not the kernels'. So CUDA runs PyTorch's kernel at any size (run 3, on
#: a slower host: evaluation 0.96-1.05x torch.nn's time; training 1.5-1.6x below 13 million
#: values, the guard's extra launches, since cut from 12 to 6; ResNets at 64x64 0.59-0.73x
#: torch.nn's speed).
NATIVE_BELOW: dict[str, tuple[int, int]] = {
    "cpu": (4_194_304, 4_194_304),
    "cuda": (2**62, 2**62),
}

#: device type -> training limit for float32/float64 inputs whose contiguous runs per (n, c)
#: are long (a contiguous (N, C, *) input with at least ``ROWS_MIN_INNER`` values per channel
#: per sample: the Numba "rows" kernels), where our stages win sooner. Measured with a
#: convolution between calls (as in a model), training step, torch.nn's time over ours on
#: ``backend="numba"``: (32, 128, 16, 16) 1.31x, (16, 64, 32, 32) 1.24x, (32, 256, 16, 16)
#: 1.43x, (16, 64, 56, 56) 2.10x; with short runs ("cols" kernels) PyTorch's kernel still
#: wins: (32, 512, 8, 8) 0.99x, (32, 1024, 4, 4) 0.67x (2026-12-04, 2 threads, after our
#: per-call cost fell from 1.34 to 0.73 ms at (32, 128, 8, 8)). Not for 16-bit inputs:
#: PyTorch's bfloat16 kernel is 5x faster than its float32 one here and beats our stages up to
#: a few million values ((32, 128, 16, 16) 0.77x, (32, 64, 32, 32) 0.69x, (16, 64, 56, 56)
#: 0.81x; (32, 256, 28, 28), above the general limit, 1.14x); with the lower limit applied to
#: them, the bfloat16 ResNets' batch-norm time rose (README, "Performance").
NATIVE_BELOW_LONG_ROWS: dict[str, int] = {"cpu": 1_048_576}

_FULL = (torch.float32, torch.float64)
_HALF = (torch.float16, torch.bfloat16)

# Bound once: each is called on every small layer's forward.
_functorch_active = torch._C._are_functorch_transforms_active
_graph_task_id = torch._C._current_graph_task_id
_compiling = torch.compiler.is_compiling


def why_not_native(
    input: Any,
    training: bool,
    *,
    through_mean: bool = True,
    through_var: bool = True,
    stats_sink: Any = None,
) -> str | None:
    """None when ``backend="auto"`` runs PyTorch's kernel on ``input``, else the reason not
    (validation of the other arguments is the caller's, as for the stage backends)."""
    if not isinstance(input, torch.Tensor):
        return "the input is not a torch.Tensor"
    device = input.device.type
    limits = NATIVE_BELOW.get(device)
    if limits is None:
        return f"auto does not use PyTorch's kernel on {device} (no size limit measured there)"
    dtype = input.dtype
    if dtype not in _FULL and not (dtype in _HALF and (input.is_contiguous() or not input.is_cpu)):
        if dtype in _HALF:
            return f"PyTorch's kernel is not used for a non-contiguous {dtype} input on cpu"
        return f"PyTorch's kernel is not used for a {dtype} input"
    limit = _training_limit(input, limits[0]) if training else limits[1]
    if input.numel() >= limit and not _compiling():
        mode = "training" if training else "evaluation"
        general = limits[0] if training else limits[1]
        runs = "" if limit == general else " with long contiguous runs per channel"
        return f"our stages are faster from {limit} values in {mode} on {device}{runs}"
    if training and not (through_mean and through_var):
        return "the moments switches are ours alone"
    if stats_sink is not None:
        return "the statistics go to a sink (accumulation, PreciseBN or recomputation)"
    if torch._C._are_functorch_transforms_active():
        return "a torch.func transform is active"
    return None


def _training_limit(input: torch.Tensor, limit: int) -> int:
    """The training limit for ``input``: lower for long contiguous runs per (n, c)."""
    rows_limit = NATIVE_BELOW_LONG_ROWS.get(input.device.type)
    if rows_limit is None or rows_limit >= limit or input.dim() < 3 or input.dtype not in _FULL:
        return limit
    if math.prod(input.shape[2:]) >= ROWS_MIN_INNER and input.is_contiguous():
        return rows_limit
    return limit


def native_batch_norm(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    num_batches_tracked: int = 0,
) -> torch.Tensor | None:
    """``torch.batch_norm`` with our running-statistics guarantees, or None (and nothing
    written) if ATen refused the call; the caller then runs our path, which raises our error.

    ``momentum=None``: the cumulative average, with ``num_batches_tracked`` batches seen before
    this one. The arguments are validated by the caller (eps, momentum, m >= 2).
    """
    cudnn = input.is_cuda and torch.backends.cudnn.enabled
    if not training or running_mean is None:
        try:
            return torch.batch_norm(
                input, weight, bias, running_mean, running_var, training, 0.0, eps, cudnn
            )
        except RuntimeError:
            return None
    factor = 1.0 / (num_batches_tracked + 1) if momentum is None else momentum
    # ATen updates a copy of the buffers, which its node saves for the backward; the buffers
    # are written after the test, so no saved tensor changes under a training graph
    # (torch.export runs its program through autograd and checks that).
    new_mean, new_var = _scratch_copy(running_mean, running_var)
    try:
        output = torch.batch_norm(input, weight, bias, new_mean, new_var, True, factor, eps, cudnn)
    except RuntimeError:
        return None
    mean_out, var_out = _unversioned(running_mean, running_var)
    if not host_read_is_cheap(running_mean):
        # No host read of the new values: it would stall the host until the GPU is done, at
        # every layer. The same per-channel rule as ``reference.update_running_stats``, on
        # the device, without its warning (which needs that read).
        keep_finite(mean_out, var_out, new_mean, new_var, running_mean, running_var)
    elif math.isfinite(torch.dot(new_mean, new_var)):
        torch._foreach_copy_((mean_out, var_out), (new_mean, new_var))
    else:
        # Rare: a non-finite batch (or buffers already poisoned). Our own update decides.
        from .function import AXIS
        from .functional import write_batch_stats

        stats = ref.batch_stats(input.detach(), AXIS)
        write_batch_stats(
            input, mean_out, var_out, stats.mean, stats.var, momentum,
            num_batches_tracked,
        )  # fmt: skip
    return output


def _unversioned(
    running_mean: torch.Tensor, running_var: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The buffers to write through: ``.data``, which shares their memory but not their
    version counter, as ATen's own in-place update of the running statistics does not count
    as a change either. An evaluation graph saved them for its backward; after a training
    step torch.nn's backward runs (with the new values), and so must ours. torch.export lifts
    a ``.data`` alias to a constant and refuses the program, so there the buffers themselves
    (its functional graph keeps the saved values apart from the write anyway)."""
    if torch.compiler.is_exporting():
        return running_mean, running_var
    return running_mean.data, running_var.data


def _scratch_copy(
    running_mean: torch.Tensor, running_var: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two tensors of their own (views, say two slices of one ``cat``, cost ATen's saved-tensor
    handling about 8 us more per training step on CPU, measured forward and backward). On
    the CPU two clones; elsewhere one multi-tensor launch, ``x * 1`` being ``x`` exactly."""
    if running_mean.is_cpu:
        return running_mean.clone(), running_var.clone()
    new_mean, new_var = torch._foreach_mul((running_mean, running_var), 1.0)
    return new_mean, new_var


def host_read_is_cheap(t: torch.Tensor) -> bool:
    """Whether the host may read a value of ``t`` at every layer's call: on the CPU, outside
    ``torch.compile``. On a GPU the read waits until every kernel queued so far has run, and
    the host stops queueing the next layer's work meanwhile; under ``torch.compile`` it would
    break the graph in two at every layer."""
    return t.is_cpu and not _compiling()


def keep_finite(
    mean_out: torch.Tensor,
    var_out: torch.Tensor,
    new_mean: torch.Tensor,
    new_var: torch.Tensor,
    old_mean: torch.Tensor,
    old_var: torch.Tensor,
) -> None:
    """Write ``new_mean``/``new_var`` into ``mean_out``/``var_out`` (which may be the same
    tensors) where both are finite, ``old_mean``/``old_var`` in the other channels: the rule
    of ``reference.update_running_stats`` on the device, without a host read and so without
    its warning. A new value is non-finite exactly where the batch statistic behind it is
    (w * inf and w * NaN are, for w = 0 too) or the update overflowed."""
    # x * 0 is 0 exactly when x is finite (inf * 0 and NaN * 0 are NaN), and a sum of such
    # terms is 0 exactly when all are: three kernels for both vectors (the two products in one
    # launch, PyTorch's multi-tensor kernel on CUDA), where isfinite launches four per vector.
    # Each launch costs the host more than the GPU's work on C values.
    zero_mean, zero_var = torch._foreach_mul([new_mean, new_var], 0.0)
    finite = (zero_mean + zero_var) == 0
    torch.where(finite, new_mean, old_mean, out=mean_out)
    torch.where(finite, new_var, old_var, out=var_out)


def module_forward(module: Any, input: Any) -> torch.Tensor | None:
    """The forward of one of our ``BatchNorm1d/2d/3d`` (``backend="auto"``, no mask) on
    PyTorch's kernel, or None where ``why_not_native`` or a cheap validity check says no, or
    ATen refused: the caller then runs ``modules.forward_with_buffers`` (which validates
    completely and raises our errors). Nothing is written before that decision.

    This runs once per layer per step, cache-cold between two large kernels, where every Python
    operation costs several times its tight-loop time: it reads as few as it can. The
    parameters and buffers come from the module's own dicts (``nn.Module.__getattr__``, a
    Python call per attribute, took 0.7 us each even in a tight loop, against 0.04 us);
    where one is not there (a parametrization or ``weight_norm`` has replaced it), our path
    reads it through ``getattr``.
    """
    if not isinstance(input, torch.Tensor):
        return None
    device = "cpu" if input.is_cpu else input.device.type
    limits = NATIVE_BELOW.get(device)
    if limits is None:
        return None
    dtype = input.dtype
    if dtype not in _FULL and not (dtype in _HALF and (input.is_contiguous() or device != "cpu")):
        return None
    module._check_input_dim(input)
    eps = module.eps
    if type(eps) is not float or not eps < math.inf:  # noqa: E721 (bool, str, NaN: our path)
        return None
    numel = input.numel()
    training = module.training
    if (
        # Under torch.compile any size: our stages would break the graph (module docstring).
        (numel >= (limits[0] if training else limits[1]) and not _compiling())
        # The lower limit for long rows: checked only where it can matter.
        or (
            training
            and numel >= NATIVE_BELOW_LONG_ROWS.get(device, 0)
            and not _compiling()
            and numel >= _training_limit(input, limits[0])
        )
        or _functorch_active()
    ):
        return None
    params, buffers = module._parameters, module._buffers
    try:
        weight, bias = params["weight"], params["bias"]
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        tracked = buffers["num_batches_tracked"]
    except KeyError:
        return None
    if not training and running_mean is not None and running_var is not None:
        if eps < 0:
            return None
        output = native_batch_norm(input, weight, bias, running_mean, running_var, False, 0.0, eps)
        if output is not None:
            _record(module)
        return output
    # Batch statistics: training, or evaluation without running statistics (as torch.nn).
    if (
        not (module.through_mean and module.through_var)
        or eps <= 0
        or numel < 2 * input.shape[1]  # m >= 2 (a channel-count mismatch is ATen's to refuse)
    ):
        return None
    momentum, seen = module.momentum, 0
    update = training and module.track_running_stats
    if update:
        # stats_sink_for(module), without nn.Module.__getattr__'s miss (an exception) per call.
        sink = module.__dict__.get("_stats_sink")
        if tracked is None or sink is not None or running_mean is None or running_var is None:
            return None
        if not (momentum is None or (type(momentum) is float and 0.0 <= momentum <= 1.0)):  # noqa: E721
            return None
        # stats_sink.recomputing(): a checkpoint's recomputation. Under torch.compile the
        # question cannot be traced (a graph break), and compiled checkpointing recomputes
        # inside its own graph, as for torch.nn.
        if not _compiling() and _graph_task_id() != -1:
            return _recompute(module, input, weight, bias, running_mean, running_var, eps)
        seen = int(tracked) if momentum is None else 0
    else:
        running_mean = running_var = None
    output = native_batch_norm(
        input, weight, bias, running_mean, running_var, True, momentum, eps, seen
    )
    if output is None:
        return None
    if update:
        tracked.add_(1)
    _record(module)
    return output


def _recompute(
    module: Any,
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
) -> torch.Tensor | None:
    """A checkpoint's recomputation of a call that ran here: the same kernel on the same
    arguments, so that it saves for the backward exactly what the first forward saved
    (non-reentrant checkpointing checks that), with copies of the running statistics for
    ATen to update and drop: the batch was counted once already (PyTorch #96136)."""
    try:
        output = torch.batch_norm(
            input, weight, bias, running_mean.clone(), running_var.clone(), True, 0.0, eps,
            input.is_cuda and torch.backends.cudnn.enabled,
        )  # fmt: skip
    except RuntimeError:
        return None
    _record(module)
    return output


def _record(module: Any) -> None:
    # Read first: nn.Module.__setattr__ (which looks through parameters, buffers and modules)
    # costs more than the rest of a small evaluation forward's checks.
    if module.last_backend != NATIVE:
        module.last_backend = NATIVE
