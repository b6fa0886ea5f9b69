"""The public compositions: Algorithm 1 and 2 and their gradients, on the stages of any backend.

Each validates every argument first (nothing runs on a bad call), then runs the named backend's
stages through ``stages.forward_train`` / ``stages.backward_train`` (its fused versions where
it has them). ``backend`` is ``None`` or ``"reference"`` (this package's own stages), a name
from ``batchnorm.kernels.REGISTRY`` (``"numba"``, ``"triton"``, ``"auto"``), or a backend
object; a named backend that cannot run on the input raises ``BackendUnavailable`` saying why.
"""

from __future__ import annotations

from typing import Any

from .._xp import Array, check_eps, compute_dtype, namespace, values_per_channel
from .backward import Grads, check_grad_output
from .forward import Saved, check_input
from .masked import check_mask, real_positions
from .stages import REFERENCE, Backend, backward_train, forward_train, has_masked_stages
from .stats import inverse_std

__all__ = ["backward", "backward_infer", "batch_norm_infer", "batch_norm_train", "resolve"]


def resolve(backend: Any, x: Array) -> Backend:
    """The stages ``backend`` names for input ``x`` (see the module docstring)."""
    if backend is None or backend == "reference":
        return REFERENCE
    if isinstance(backend, str):
        # Names live in the kernels' registry; looking one up is the reference's only reach
        # above itself, and needs no backend imported until it is asked for.
        from ..kernels import select_backend

        return select_backend(x, backend)[0]
    return backend


def batch_norm_train(
    x: Array,
    gamma: Array | None = None,
    beta: Array | None = None,
    *,
    axis: int = 1,
    eps: float = 1e-5,
    backend: Any = None,
    mask: Array | None = None,
) -> tuple[Array, Saved]:
    """Algorithm 1: normalise with the moments of this batch. Returns ``(y, saved)``.

    ``axis`` is the channel axis (1 for (N, C, ...), -1 for channels-last). ``gamma``/``beta``
    of shape (C,) are optional (no affine transform when omitted). ``backend`` picks whose
    stages run (default: the reference's). ``mask`` (boolean, x's shape without the channel
    axis, True = a real value): the statistics over the real positions only, 0 output at the
    padded ones (``reference.masked``), on any backend with masked stages.
    """
    if mask is not None:
        return _masked_train(x, gamma, beta, axis, eps, backend, mask)
    _, axis = check_input(x, axis, eps, training=True, gamma=gamma, beta=beta)
    stages = resolve(backend, x)
    out = forward_train(stages, x, gamma, beta, float(eps), axis)
    count = values_per_channel(tuple(x.shape), axis)
    saved = Saved(x, out.mean, out.var, out.invstd, gamma, axis, float(eps), count, stages)
    return out.y, saved


def batch_norm_infer(
    x: Array,
    running_mean: Array,
    running_var: Array,
    gamma: Array | None = None,
    beta: Array | None = None,
    *,
    axis: int = 1,
    eps: float = 1e-5,
    backend: Any = None,
) -> Array:
    """Algorithm 2: normalise with population (running) estimates instead of batch moments."""
    _, axis = check_input(
        x, axis, eps, training=False, gamma=gamma, beta=beta,
        running_mean=running_mean, running_var=running_var, need_running=True,
    )  # fmt: skip
    stages = resolve(backend, x)
    return stages.forward_infer(x, running_mean, running_var, gamma, beta, float(eps), axis)


def backward(
    dy: Array,
    saved: Saved,
    *,
    through_mean: bool = True,
    through_var: bool = True,
    backend: Any = None,
) -> Grads:
    """Gradient of the training forward: ``backward_reduce`` then ``backward_elemt`` (or the
    backend's fused ``backward_train``), on the stages that ran the forward unless ``backend``
    names others."""
    check_grad_output(dy, saved.x)
    if saved.mask is not None:
        return _masked_backward(dy, saved, through_mean, through_var)
    stages = saved.backend if backend is None and saved.backend is not None else None
    stages = stages or resolve(backend, saved.x)
    out = backward_train(
        stages, dy, saved.x, saved.mean, saved.invstd, saved.gamma, saved.axis,
        through_mean=through_mean, through_var=through_var,
    )  # fmt: skip
    return Grads(out.dx, out.dgamma, out.dbeta)


def backward_infer(
    dy: Array,
    x: Array,
    running_mean: Array,
    running_var: Array,
    gamma: Array | None = None,
    *,
    axis: int = 1,
    eps: float = 1e-5,
    backend: Any = None,
) -> Grads:
    """Gradient of the inference forward: moments are constants here, dx = gamma*invstd*dy."""
    xp, axis = check_input(
        x, axis, eps, training=False, gamma=gamma,
        running_mean=running_mean, running_var=running_var, need_running=True,
    )  # fmt: skip
    check_grad_output(dy, x)
    stages = resolve(backend, x)
    cdt = compute_dtype(x.dtype, xp)
    mean = xp.astype(running_mean, cdt)
    invstd = inverse_std(xp.astype(running_var, cdt), eps)
    out = backward_train(
        stages, dy, x, mean, invstd, gamma, axis, through_mean=False, through_var=False
    )
    return Grads(out.dx, out.dgamma, out.dbeta)


def _masked_train(x, gamma, beta, axis, eps, backend, mask) -> tuple[Array, Saved]:
    _, axis = check_input(x, axis, eps, training=False, gamma=gamma, beta=beta)
    check_eps(eps)
    check_mask(mask, x, axis)
    stages = resolve(backend, x)
    if not has_masked_stages(stages):
        raise ValueError(
            f"mask=: backend {getattr(stages, 'name', stages)!r} has no masked stages "
            "(supports_mask); batchnorm.torch's layers run it on masked input by gathering the "
            "real positions"
        )
    count = xp_count(mask)
    # Under jax.jit the count is traced and cannot be checked on the host: there, fewer than 2
    # real values give degenerate statistics (a variance of 0, or NaN for none) instead.
    if isinstance(count, int) and count < 2:
        raise ValueError(
            f"expected more than 1 real value per channel when training, got {count} "
            f"(mask of shape {tuple(mask.shape)})"
        )
    out = forward_train(stages, x, gamma, beta, float(eps), axis, mask=mask)
    saved = Saved(x, out.mean, out.var, out.invstd, gamma, axis, float(eps), count, stages, mask)
    return out.y, saved


def _masked_backward(dy, saved: Saved, through_mean: bool, through_var: bool) -> Grads:
    stages = saved.backend if saved.backend is not None else REFERENCE
    out = backward_train(
        stages, dy, saved.x, saved.mean, saved.invstd, saved.gamma, saved.axis,
        through_mean=through_mean, through_var=through_var, mask=saved.mask, count=saved.count,
    )  # fmt: skip
    return Grads(out.dx, out.dgamma, out.dbeta)


def xp_count(mask: Array) -> int | Array:
    """The number of real positions (True values) of a boolean mask; under ``jax.jit`` the
    traced count."""
    return real_positions(mask, namespace(mask))
