"""Backends: the same named stages as ``batchnorm.reference``, implemented fast, by name.

A backend implements the stage protocol :class:`Backend` (defined, with the compositions
``forward_train``/``backward_train``, in ``batchnorm.reference.stages``, whose docstring is the
contract): ``batch_stats``, ``elemt`` (optionally fused with a residual add and ReLU),
``forward_infer``, ``backward_reduce``, ``backward_elemt`` (with the moments-as-constants
switches), ``relu_backward``, and optionally fused ``forward_train``/``backward_train``. Inputs
arrive validated, with a non-negative channel axis. Statistics (``mean``, ``var``, ``invstd``)
are float32 for float32/float16/bfloat16 input and float64 for float64 input. Backends are
imported lazily, only when asked for, so importing ``batchnorm`` never imports numba or triton.

``backend="auto"`` picks the first available of ``AUTO_ORDER[device]``, skipping a backend for
inputs smaller than its ``auto_min_numel`` (where its launch cost exceeds the work); an
explicitly named backend that cannot run raises :class:`BackendUnavailable` with the reason.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..reference.stages import (
    Backend,
    BackwardOut,
    Elemt,
    ForwardOut,
    ReferenceStages,
    backward_train,
    compose_backward_train,
    compose_forward_train,
    forward_train,
)

__all__ = [
    "Backend",
    "BackendUnavailable",
    "BackwardOut",
    "Elemt",
    "ForwardOut",
    "ReferenceBackend",
    "REGISTRY",
    "AUTO_ORDER",
    "backward_train",
    "compose_backward_train",
    "compose_forward_train",
    "forward_train",
    "register",
    "get_backend",
    "select_backend",
    "available_backends",
]

Array = Any


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run on this input; the message says why."""


#: The array-API reference's stages: any device, any floating dtype; the correctness oracle.
ReferenceBackend = ReferenceStages


#: name -> "module:attribute" of a zero-argument factory or class; imported on first use.
REGISTRY: dict[str, str] = {
    "reference": "batchnorm.kernels:ReferenceBackend",
    "numba": "batchnorm.kernels.numba_cpu:NumbaBackend",
    "triton": "batchnorm.kernels.triton_gpu:TritonBackend",
}

#: Preference order of ``backend="auto"`` per device type.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("numba", "reference"),
    "cuda": ("triton", "reference"),
}

_instances: dict[str, Any] = {}
_import_errors: dict[str, str] = {}


def register(name: str, target: str, *, auto: dict[str, int] | None = None) -> None:
    """Register a backend ``"module:attr"`` under ``name``; ``auto`` maps device -> position."""
    REGISTRY[name] = target
    _instances.pop(name, None)
    _import_errors.pop(name, None)
    for device, position in (auto or {}).items():
        order = [n for n in AUTO_ORDER.get(device, ()) if n != name]
        order.insert(position, name)
        AUTO_ORDER[device] = tuple(order)


def _load(name: str) -> Any:
    if name not in REGISTRY:
        raise ValueError(f"unknown backend {name!r}; known: {sorted(REGISTRY)} or 'auto'")
    if name in _import_errors:
        raise BackendUnavailable(_import_errors[name])
    if name not in _instances:
        module_name, attr = REGISTRY[name].split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            # Remembered: "auto" asks on every call, and a failed import is slow to repeat.
            _import_errors[name] = f"backend {name!r} cannot be imported: {exc}"
            raise BackendUnavailable(_import_errors[name]) from exc
        _instances[name] = getattr(module, attr)()
    return _instances[name]


def _device_type(x: Array) -> str:
    device = getattr(x, "device", "cpu")
    return getattr(device, "type", str(device))


def get_backend(name: str, x: Array) -> Any:
    """The backend ``name`` for input ``x``; raises ``BackendUnavailable`` saying why not."""
    backend = _load(name)
    reason = backend.unavailable_reason(x)
    if reason is not None:
        raise BackendUnavailable(f"backend {name!r} cannot run on this input: {reason}")
    return backend


def select_backend(x: Array, backend: str = "auto") -> tuple[Any, list[str]]:
    """Resolve ``backend`` for ``x``. Returns ``(backend, notes)``; notes say why others lost."""
    if backend != "auto":
        return get_backend(backend, x), []
    notes: list[str] = []
    numel = _numel(x)
    for name in AUTO_ORDER.get(_device_type(x), ("reference",)):
        try:
            chosen = get_backend(name, x)
        except BackendUnavailable as exc:
            notes.append(str(exc))
            continue
        # A parallel kernel's launch cost exceeds the work on tiny inputs; only "auto" minds.
        smallest = getattr(chosen, "auto_min_numel", 0)
        if numel < smallest:
            notes.append(f"backend {name!r} is skipped by auto below {smallest} elements")
            continue
        return chosen, notes
    return _load("reference"), notes


def _numel(x: Array) -> int:
    size = getattr(x, "size", None)
    if isinstance(size, int):  # NumPy
        return size
    return int(x.numel()) if hasattr(x, "numel") else 0


def available_backends(x: Array) -> dict[str, str | None]:
    """name -> None if it can run on ``x``, else the reason it cannot."""
    result: dict[str, str | None] = {}
    for name in REGISTRY:
        try:
            get_backend(name, x)
            result[name] = None
        except BackendUnavailable as exc:
            result[name] = str(exc)
    return result
