"""Array-namespace and axis helpers shared by the reference and every backend.

Everything here works on any array-API array (NumPy, PyTorch and JAX through array-api-compat,
CuPy). The validation helpers raise *before* anything is computed, so callers that mutate state
(modules, running statistics) can validate first and mutate afterwards.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import array_api_compat

Array = Any

__all__ = [
    "Array",
    "namespace",
    "channel_axis",
    "reduce_axes",
    "per_channel",
    "values_per_channel",
    "compute_dtype",
    "check_floating",
    "check_channel_vector",
    "check_eps",
    "check_same_library",
    "check_same_shape",
    "to_channel_rows",
]


#: type -> its namespace: ``array_namespace`` inspects its arguments on every call, and a layer
#: asks a few times per call.
_BY_TYPE: dict[type, Any] = {}


def namespace(*arrays: Array) -> Any:
    """The array-API namespace of ``arrays`` (``None`` entries are ignored)."""
    present = [a for a in arrays if a is not None]
    kinds = {type(a) for a in present}
    if len(kinds) != 1:
        return array_api_compat.array_namespace(*present)
    (kind,) = kinds
    xp = _BY_TYPE.get(kind)
    if xp is None:
        xp = _BY_TYPE[kind] = array_api_compat.array_namespace(*present)
    return xp


def channel_axis(ndim: int, axis: int) -> int:
    """Normalise ``axis`` to a non-negative channel axis of an ``ndim``-dimensional input."""
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):  # np.int64 is one
        raise TypeError(f"axis must be an int, got {type(axis).__name__} {axis!r}")
    axis = int(axis)
    if ndim < 2:
        raise ValueError(
            f"batch norm needs an input of rank >= 2 (batch and channel axes), got rank {ndim}"
        )
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for an input of rank {ndim}")
    axis = axis % ndim
    if axis == 0:
        raise ValueError("axis 0 is the batch axis; the channel axis must be another axis")
    return axis


def reduce_axes(ndim: int, axis: int) -> tuple[int, ...]:
    """Every axis but the channel axis: the axes the moments are taken over."""
    return tuple(i for i in range(ndim) if i != axis)


def per_channel(v: Array, ndim: int, axis: int, xp: Any) -> Array:
    """Reshape a (C,) vector so that it broadcasts along ``axis`` of an ``ndim`` input."""
    shape = [1] * ndim
    shape[axis] = v.shape[0]
    return xp.reshape(v, tuple(shape))


def values_per_channel(shape: tuple[int, ...], axis: int) -> int:
    """m: how many values each channel's moments are taken over."""
    return math.prod([s for i, s in enumerate(shape) if i != axis])  # a list: dynamo traces it


def check_floating(x: Array, xp: Any, name: str = "input") -> None:
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(f"{name} must have a floating-point dtype, got {x.dtype}")


def compute_dtype(dtype: Any, xp: Any) -> Any:
    """The dtype arithmetic is done in: float64 stays float64, everything narrower uses float32."""
    if dtype == xp.float64:
        return xp.float64
    return xp.float32


def check_same_library(a: Array, x: Array, name: str) -> None:
    """``a`` is an array of ``x``'s library, else a TypeError naming both. (Otherwise the first
    operation that mixes them fails with the library's own error: NumPy x, torch gamma gave
    "'Tensor' object has no attribute 'astype'".)"""
    if namespace(a) is not namespace(x):
        raise TypeError(
            f"{name} is a {_kind(a)} but the input is a {_kind(x)}: pass arrays of one library"
        )


def _kind(a: Any) -> str:
    return f"{type(a).__module__.split('.')[0]}.{type(a).__qualname__}"


def check_channel_vector(v: Array | None, channels: int, name: str) -> None:
    """``v`` is None or a real floating vector of ``channels`` values."""
    if v is None:
        return
    if not hasattr(v, "shape"):
        raise TypeError(f"{name} must be an array of {channels} values, got {type(v).__name__}")
    if tuple(v.shape) != (channels,):
        raise ValueError(
            f"{name} must have shape ({channels},) to match the {channels} channels of the "
            f"input, got shape {tuple(v.shape)}"
        )
    check_floating(v, namespace(v), name)


def check_eps(eps: float, *, allow_zero: bool = False) -> float:
    if isinstance(eps, str | bytes | bool):  # float() would accept "1e-5"; arithmetic would not
        raise TypeError(f"eps must be a real number, got {eps!r}")
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise TypeError(f"eps must be a real number, got {eps!r}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"eps must be finite and {bound}, got {eps!r}")
    return value


def check_same_shape(a: Array, b: Array, name_a: str, name_b: str) -> None:
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(
            f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}; "
            "they must be equal"
        )


def to_channel_rows(x: Array, axis: int, xp: Any) -> Array:
    """View ``x`` as (C, m): one row per channel, the m values in C order of the other axes."""
    axis = channel_axis(x.ndim, axis)
    order = (axis,) + reduce_axes(x.ndim, axis)
    moved = xp.permute_dims(x, order)
    return xp.reshape(moved, (x.shape[axis], -1))
