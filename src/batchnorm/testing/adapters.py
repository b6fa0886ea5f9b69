"""Adapters: run an implementation of a given *style* on one case, in the case's layout.

Each adapter opens a :class:`Session` per case (a module instance, a ``bn_param`` dict, running
buffers) and exposes the same four calls, taking and returning float64 NumPy arrays in the
case's layout: ``forward_train``, ``backward``, ``running`` and ``forward_eval``. Inside, it
converts to what the style expects (dtype, channel axis, framework) and back, and turns every
exception and every malformed return of the implementation into :class:`ImplementationError`
with a message that says what was wrong, so that the checker reports it and carries on.

PyTorch is imported only by the PyTorch adapters, when a session is opened.
"""

from __future__ import annotations

import functools
import inspect
import os
import sysconfig
import traceback
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from .cases import Case, CaseData

__all__ = [
    "ImplementationError",
    "Session",
    "Adapter",
    "CourseStyle",
    "PlainStyle",
    "ModuleStyle",
    "FunctionalStyle",
    "BackendStyle",
    "STYLES",
]

#: Frames in here are the suite's; frames elsewhere (batchnorm.torch too) are the code tested.
_SUITE_DIR = os.path.dirname(os.path.abspath(__file__))


class ImplementationError(Exception):
    """The implementation under test raised, or returned what its style does not allow."""


#: The standard library's frames (importlib, ...) are not the code under test either.
_STDLIB_DIR = os.path.abspath(sysconfig.get_paths()["stdlib"]) + os.sep


def describe_exception(exc: BaseException) -> str:
    """``"NameError: name 'x' is not defined (impl.py, line 3, in bn_backward)"``.

    The location is the innermost frame outside this suite and outside installed libraries:
    the code under test.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{text.splitlines()[0]}"
    own = [
        f
        for f in frames
        if not os.path.abspath(f.filename).startswith((_SUITE_DIR, _STDLIB_DIR))
        and "site-packages" not in f.filename
        and "<frozen" not in f.filename
    ]
    if own:  # none when the call itself failed (a wrong signature): no line to point at
        frame = own[-1]
        text += f" ({os.path.basename(frame.filename)}, line {frame.lineno}, in {frame.name})"
    return text


def call_user(stage: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call the implementation; any exception becomes an ImplementationError naming ``stage``."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        raise ImplementationError(f"{stage} raised {describe_exception(exc)}") from exc


def _returned(stage: str, value: Any, names: tuple[str, ...]) -> tuple[Any, ...]:
    """Unpack a tuple return of exactly ``len(names)`` values, or say what came back."""
    if not isinstance(value, (tuple, list)):
        raise ImplementationError(
            f"{stage} returned a single {type(value).__name__}, expected "
            f"{len(names)} values ({', '.join(names)})"
        )
    if len(value) != len(names):
        raise ImplementationError(
            f"{stage} returned {len(value)} values, expected {len(names)} ({', '.join(names)})"
        )
    return tuple(value)


def check_device(device: str) -> str:
    """``device`` if torch can put a tensor there; a ValueError saying why not otherwise (before
    any case runs, so that a typo is a usage error, not a failure of every case)."""
    import torch

    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise ValueError(f"device {device!r} is not usable here: {exc}") from None
    return device


def _as_float64(stage: str, name: str, value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu()
        if not value.is_floating_point():
            raise ImplementationError(f"{stage}: {name} has dtype {value.dtype}, not floating")
        # A copy: a float64 tensor's .numpy() would share memory with buffers updated later.
        return value.double().numpy().copy()
    if value is None:
        raise ImplementationError(f"{stage}: {name} is None, expected an array")
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError):  # e.g. a ragged nest of lists
        arr = None
    if arr is None or arr.dtype.kind not in "biufc":  # objects, strings, dates
        kind = type(value).__name__
        raise ImplementationError(f"{stage}: {name} is a {kind}, not a numeric array")
    if arr.dtype.kind != "f":
        # Integers would be compared as if they were results and fail with no diagnosis;
        # complex numbers would lose their imaginary part silently.
        raise ImplementationError(f"{stage}: {name} has dtype {arr.dtype}, not real floating")
    return np.array(arr, dtype=np.float64)


def _vector(stage: str, name: str, value: Any, channels: int) -> np.ndarray:
    """A per-channel vector; shapes like (1, C) are accepted (NumPy broadcasting leaves them)."""
    arr = _as_float64(stage, name, value)
    if arr.size != channels or (arr.ndim > 1 and max(arr.shape) != arr.size):
        raise ImplementationError(f"{stage}: {name} has shape {arr.shape}, expected ({channels},)")
    return arr.reshape(channels)


class Session(Protocol):
    """One case, one implementation instance. Arrays are float64, in the case's layout."""

    def forward_train(self, x: np.ndarray) -> np.ndarray: ...

    def backward(self, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """``(dx, dgamma, dbeta)`` of the last ``forward_train``; ``None`` where not defined."""

    def running(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Current ``(running_mean, running_var)``, ``None`` if the style keeps none."""

    def forward_eval(self, x: np.ndarray) -> np.ndarray: ...


class Adapter(Protocol):
    style: str
    #: how the implementation is called, for the report header
    signature: str
    #: why running statistics are not checked (``None``: they are)
    no_running: str | None
    #: why the eval forward is not checked (``None``: it is)
    no_eval: str | None
    #: the names the backward returns, in order (for the "swapped" diagnosis)
    grad_order: str

    def unsupported(self, case: Case) -> str | None:
        """Why this style cannot express ``case`` (``None`` if it can)."""

    def session(self, data: CaseData, momentum: float) -> Session: ...


# --------------------------------------------------------------------------- NumPy styles

_NUMPY_DTYPES = {"float16": np.float16, "float32": np.float32, "float64": np.float64}


class _Layout:
    """How a NumPy-style function sees a case: ``rows`` (m, C) or ``native`` (N, C, ...)."""

    def __init__(self, case: Case, layout: str) -> None:
        self.case, self.layout = case, layout
        self.dtype = _NUMPY_DTYPES[case.dtype]
        self.moved_shape = tuple(
            np.moveaxis(
                np.empty(case.shape), case.channel_axis, -1 if layout == "rows" else 1
            ).shape
        )
        self.shape = (case.m, case.channels) if layout == "rows" else self.moved_shape

    def present(self, arr: np.ndarray) -> np.ndarray:
        a = arr.astype(self.dtype)
        if self.layout == "rows":
            return np.ascontiguousarray(np.moveaxis(a, self.case.channel_axis, -1)).reshape(
                self.shape
            )
        # A view: for channels-last cases the implementation gets a non-contiguous array.
        return np.moveaxis(a, self.case.channel_axis, 1)

    def restore(self, stage: str, name: str, value: Any) -> np.ndarray:
        arr = _as_float64(stage, name, value)
        if arr.shape != self.shape:
            raise ImplementationError(
                f"{stage}: {name} has shape {arr.shape}, expected {self.shape} (the input's)"
            )
        if self.layout == "rows":
            return np.moveaxis(arr.reshape(self.moved_shape), -1, self.case.channel_axis)
        return np.moveaxis(arr, 1, self.case.channel_axis)


def _numpy_unsupported(case: Case, layout: str) -> str | None:
    if case.dtype not in _NUMPY_DTYPES:
        return f"NumPy has no {case.dtype}"
    if case.mask:
        return _NO_MASK_STYLE
    return None


#: Why the styles that cannot take a mask skip the masked cases.
_NO_MASK_STYLE = "masked cases: this style has no mask argument (module and functional do)"


def _takes_mask(fn: Any) -> bool:
    """Whether ``fn`` accepts a ``mask=`` keyword (by name, or through ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some builtins)
        return False
    return any(
        (p.name == "mask" and p.kind != p.POSITIONAL_ONLY) or p.kind == p.VAR_KEYWORD
        for p in params
    )


class _NumpySession:
    def __init__(self, data: CaseData, layout: str) -> None:
        self.case = data.case
        self.layout = _Layout(data.case, layout)
        c, dt = self.case.channels, self.layout.dtype
        self.gamma = np.ones(c, dt) if data.gamma is None else data.gamma.astype(dt)
        self.beta = np.zeros(c, dt) if data.beta is None else data.beta.astype(dt)
        self.cache: Any = None

    def grads(self, stage: str, dx: Any, dgamma: Any, dbeta: Any):
        c = self.case.channels
        return (
            self.layout.restore(stage, "dx", dx),
            _vector(stage, "dgamma", dgamma, c),
            _vector(stage, "dbeta", dbeta, c),
        )


class CourseStyle:
    """``forward(x, gamma, beta, bn_param) -> (out, cache)``, ``backward(dout, cache) ->
    (dx, dgamma, dbeta)``: the course-assignment style (cs231n).

    ``bn_param`` holds ``mode`` ('train'/'test'), ``eps``, ``momentum``, ``running_mean`` and
    ``running_var``; the forward stores the updated running statistics back into it.
    ``layout="rows"`` gives every case to the functions as an (m, C) matrix (channels last);
    ``layout="native"`` as (N, C, ...) arrays (the spatial variant).
    """

    style = "course"
    grad_order = "(dx, dgamma, dbeta)"
    no_running = None
    no_eval = None

    def __init__(
        self, forward: Callable[..., Any], backward: Callable[..., Any], layout: str = "rows"
    ) -> None:
        if layout not in ("rows", "native"):
            raise ValueError(f"layout must be 'rows' or 'native', got {layout!r}")
        self.forward, self.backward, self.layout = forward, backward, layout
        self.signature = (
            f"forward(x, gamma, beta, bn_param) -> (out, cache); "
            f"backward(dout, cache) -> (dx, dgamma, dbeta); layout {layout}"
        )

    def unsupported(self, case: Case) -> str | None:
        return _numpy_unsupported(case, self.layout)

    def session(self, data: CaseData, momentum: float) -> Session:
        return _CourseSession(self, data, momentum)


class _CourseSession(_NumpySession):
    def __init__(self, style: CourseStyle, data: CaseData, momentum: float) -> None:
        super().__init__(data, style.layout)
        self.style = style
        dt = self.layout.dtype
        self.bn_param: dict[str, Any] = {
            "mode": "train",
            "eps": self.case.eps,
            "momentum": momentum,
            "running_mean": data.running_mean.astype(dt),
            "running_var": data.running_var.astype(dt),
        }

    def _forward(self, stage: str, x: np.ndarray) -> np.ndarray:
        value = call_user(
            stage,
            self.style.forward,
            self.layout.present(x),
            self.gamma.copy(),
            self.beta.copy(),
            self.bn_param,
        )
        out, cache = _returned(stage, value, ("out", "cache"))
        self.cache = cache
        return self.layout.restore(stage, "out", out)

    def forward_train(self, x: np.ndarray) -> np.ndarray:
        self.bn_param["mode"] = "train"
        return self._forward("forward (mode 'train')", x)

    def backward(self, dy: np.ndarray):
        value = call_user("backward", self.style.backward, self.layout.present(dy), self.cache)
        return self.grads("backward", *_returned("backward", value, ("dx", "dgamma", "dbeta")))

    def running(self) -> tuple[np.ndarray, np.ndarray]:
        stats = []
        for key in ("running_mean", "running_var"):
            if key not in self.bn_param:
                raise ImplementationError(f"bn_param has no {key!r} after forward")
            stats.append(
                _vector("forward", f"bn_param[{key!r}]", self.bn_param[key], self.case.channels)
            )
        return stats[0], stats[1]

    def forward_eval(self, x: np.ndarray) -> np.ndarray:
        self.bn_param["mode"] = "test"
        return self._forward("forward (mode 'test')", x)


class PlainStyle:
    """``forward(X, gamma, beta, eps) -> (out, cache)``, ``backward(dout, cache) ->
    (dX, dbeta, dgamma)`` (note the order): the blog-post style of ``seeds/001``.

    No running statistics and no eval mode, so only the training forward and the backward are
    checked. ``layout`` as for :class:`CourseStyle`.
    """

    style = "plain"
    grad_order = "(dX, dbeta, dgamma)"
    no_running = "the plain style keeps no running statistics"
    no_eval = "the plain style has no eval mode"

    def __init__(
        self, forward: Callable[..., Any], backward: Callable[..., Any], layout: str = "rows"
    ) -> None:
        if layout not in ("rows", "native"):
            raise ValueError(f"layout must be 'rows' or 'native', got {layout!r}")
        self.forward, self.backward, self.layout = forward, backward, layout
        self.signature = (
            f"forward(X, gamma, beta, eps) -> (out, cache); "
            f"backward(dout, cache) -> (dX, dbeta, dgamma); layout {layout}"
        )

    def unsupported(self, case: Case) -> str | None:
        return _numpy_unsupported(case, self.layout)

    def session(self, data: CaseData, momentum: float) -> Session:
        return _PlainSession(self, data)


class _PlainSession(_NumpySession):
    def __init__(self, style: PlainStyle, data: CaseData) -> None:
        super().__init__(data, style.layout)
        self.style = style

    def forward_train(self, x: np.ndarray) -> np.ndarray:
        value = call_user(
            "forward",
            self.style.forward,
            self.layout.present(x),
            self.gamma.copy(),
            self.beta.copy(),
            self.case.eps,
        )
        out, self.cache = _returned("forward", value, ("out", "cache"))
        return self.layout.restore("forward", "out", out)

    def backward(self, dy: np.ndarray):
        value = call_user("backward", self.style.backward, self.layout.present(dy), self.cache)
        dx, dbeta, dgamma = _returned("backward", value, ("dX", "dbeta", "dgamma"))
        return self.grads("backward", dx, dgamma, dbeta)

    def running(self) -> None:
        return None

    def forward_eval(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - no_eval is set
        raise ImplementationError("the plain style has no eval mode")


# --------------------------------------------------------------------------- PyTorch styles


def _torch() -> Any:
    import torch

    return torch


class _TorchIO:
    """Tensors in the case's dtype on ``device``; the channel axis is moved to 1 by a view."""

    def __init__(self, case: Case, device: str) -> None:
        torch = _torch()
        self.torch, self.case, self.device = torch, case, device
        self.dtype = getattr(torch, case.dtype)

    def tensor(self, arr: np.ndarray, requires_grad: bool = False) -> Any:
        t = self.torch.tensor(arr, dtype=self.dtype, device=self.device)
        return t.requires_grad_(requires_grad)

    def channels_first(self, t: Any) -> Any:
        return t.movedim(self.case.channel_axis, 1)

    def output(self, stage: str, name: str, value: Any) -> np.ndarray:
        if not isinstance(value, self.torch.Tensor):
            raise ImplementationError(
                f"{stage} returned a {type(value).__name__}, expected a tensor ({name})"
            )
        if value.dtype != self.dtype:
            raise ImplementationError(
                f"{stage}: {name} has dtype {value.dtype}, expected {self.dtype} (the input's)"
            )
        expected = tuple(self.channels_first(self.torch.empty(self.case.shape)).shape)
        if tuple(value.shape) != expected:
            raise ImplementationError(
                f"{stage}: {name} has shape {tuple(value.shape)}, expected {expected}"
            )
        return _as_float64(stage, name, value.movedim(1, self.case.channel_axis))

    def mask_kwargs(self, data: CaseData) -> dict[str, Any]:
        """``{"mask": (N, L) bool tensor}`` for a masked case, else ``{}``."""
        if data.mask is None:
            return {}
        return {"mask": self.torch.tensor(data.mask, dtype=self.torch.bool, device=self.device)}

    def vector(self, stage: str, name: str, value: Any) -> np.ndarray:
        if value is None:
            raise ImplementationError(f"{stage}: {name} is None (no gradient reached it)")
        return _vector(stage, name, value, self.case.channels)


class ModuleStyle:
    """A ``torch.nn.Module`` class built like ``torch.nn.BatchNorm*``:
    ``cls(num_features, eps=..., momentum=..., affine=False)`` (``affine`` only when off),
    with ``weight``/``bias`` parameters and ``running_mean``/``running_var`` buffers.

    ``classes`` is one class for every rank, or three, for rank 2-3, 4 and 5 inputs (like
    ``BatchNorm1d, BatchNorm2d, BatchNorm3d``). Channels-last cases are given as a permuted,
    non-contiguous (N, C, ...) view.
    """

    style = "module"
    #: Like torch.nn.BatchNorm / F.batch_norm: PyTorch's running-statistics conventions.
    conventions = ("torch", "unbiased")
    grad_order = "(weight.grad, bias.grad)"
    no_running = None
    no_eval = None

    def __init__(self, classes: Any | Sequence[Any], device: str = "cpu") -> None:
        classes = list(classes) if isinstance(classes, (list, tuple)) else [classes]
        if len(classes) not in (1, 3):
            raise ValueError(
                f"give one module class, or three (for rank 2-3, 4, 5); got {len(classes)}"
            )
        self.classes, self.device = classes, check_device(device)
        names = ", ".join(getattr(c, "__name__", repr(c)) for c in classes)
        self.signature = f"{names}(num_features, eps=, momentum=[, affine=False]) on {device}"

    def unsupported(self, case: Case) -> str | None:
        cls = self.cls_for(case)
        if case.mask and not _takes_mask(getattr(cls, "forward", None)):
            name = getattr(cls, "__name__", "module")
            return f"masked cases: {name}.forward has no mask parameter"
        return None

    def cls_for(self, case: Case) -> Any:
        if len(self.classes) == 1:
            return self.classes[0]
        return self.classes[max(len(case.shape) - 3, 0)]

    def session(self, data: CaseData, momentum: float) -> Session:
        return _ModuleSession(self, data, momentum)


class _ModuleSession:
    def __init__(self, style: ModuleStyle, data: CaseData, momentum: float) -> None:
        self.case = case = data.case
        self.io = io = _TorchIO(case, style.device)
        torch = io.torch
        kwargs: dict[str, Any] = {"eps": case.eps, "momentum": momentum}
        if not case.affine:
            kwargs["affine"] = False
        cls = style.cls_for(case)
        name = getattr(cls, "__name__", "module")
        self.module = call_user(f"{name}({case.channels}, ...)", cls, case.channels, **kwargs)
        if not hasattr(self.module, "to"):
            raise ImplementationError(f"{name} is not a torch.nn.Module (it has no .to())")
        self.module = (
            call_user("module.to", self.module.to, device=style.device, dtype=io.dtype)
            or self.module
        )
        self.params: dict[str, Any] = {}
        with torch.no_grad():
            if case.affine:
                for attr, value in (("weight", data.gamma), ("bias", data.beta)):
                    param = getattr(self.module, attr, None)
                    if not isinstance(param, torch.Tensor):
                        raise ImplementationError(
                            f"{name} has no tensor attribute {attr!r} (affine=True)"
                        )
                    param.copy_(io.tensor(value))
                    self.params[attr] = param
            self.has_running = all(
                isinstance(getattr(self.module, a, None), torch.Tensor)
                for a in ("running_mean", "running_var")
            )
            if self.has_running:
                self.module.running_mean.copy_(io.tensor(data.running_mean))
                self.module.running_var.copy_(io.tensor(data.running_var))
        self.x: Any = None
        self.y: Any = None
        #: a masked case's mask, handed to every forward as ``mask=``
        self.kwargs = io.mask_kwargs(data)

    def forward_train(self, x: np.ndarray) -> np.ndarray:
        call_user("module.train", self.module.train)
        for param in self.params.values():
            param.grad = None
        self.x = self.io.tensor(x, requires_grad=True)
        self.y = call_user("forward", self.module, self.io.channels_first(self.x), **self.kwargs)
        return self.io.output("forward", "output", self.y)

    def backward(self, dy: np.ndarray):
        if not getattr(self.y, "requires_grad", False):
            raise ImplementationError("the output does not require grad: no autograd graph")
        dyt = self.io.channels_first(self.io.tensor(dy))
        call_user("backward", self.y.backward, dyt)
        if self.x.grad is None:
            raise ImplementationError("backward: no gradient reached the input")
        dx = self.io.output("backward", "dx", self.x.grad.movedim(self.case.channel_axis, 1))
        if not self.case.affine:
            return dx, None, None
        return (
            dx,
            self.io.vector("backward", "weight.grad", self.params["weight"].grad),
            self.io.vector("backward", "bias.grad", self.params["bias"].grad),
        )

    def running(self) -> tuple[np.ndarray, np.ndarray] | None:
        if not self.has_running:
            return None
        return (
            self.io.vector("module", "running_mean", self.module.running_mean),
            self.io.vector("module", "running_var", self.module.running_var),
        )

    def forward_eval(self, x: np.ndarray) -> np.ndarray:
        call_user("module.eval", self.module.eval)
        with self.io.torch.no_grad():
            y = call_user(
                "forward (eval)",
                self.module,
                self.io.channels_first(self.io.tensor(x)),
                **self.kwargs,
            )
        return self.io.output("forward (eval)", "output", y)


class FunctionalStyle:
    """``fn(input, running_mean, running_var, weight=None, bias=None, training=False,
    momentum=0.1, eps=1e-5)`` like ``torch.nn.functional.batch_norm``: updates the running
    tensors in place when training; gradients by autograd."""

    style = "functional"
    #: Like torch.nn.BatchNorm / F.batch_norm: PyTorch's running-statistics conventions.
    conventions = ("torch", "unbiased")
    grad_order = "(grad weight, grad bias)"
    no_running = None
    no_eval = None

    def __init__(self, fn: Callable[..., Any], device: str = "cpu") -> None:
        self.fn, self.device = fn, check_device(device)
        name = getattr(fn, "__name__", "fn")
        self.signature = (
            f"{name}(input, running_mean, running_var, weight=, bias=, training=, "
            f"momentum=, eps=) on {device}"
        )

    def unsupported(self, case: Case) -> str | None:
        if case.mask and not _takes_mask(self.fn):
            return f"masked cases: {getattr(self.fn, '__name__', 'fn')} has no mask parameter"
        return None

    def session(self, data: CaseData, momentum: float) -> Session:
        return _FunctionalSession(self, data, momentum)


class _FunctionalSession:
    def __init__(self, style: FunctionalStyle, data: CaseData, momentum: float) -> None:
        self.style, self.case, self.momentum = style, data.case, momentum
        self.io = io = _TorchIO(data.case, style.device)
        self.running_mean = io.tensor(data.running_mean)
        self.running_var = io.tensor(data.running_var)
        self.weight = self.bias = None
        if data.case.affine:
            self.weight = io.tensor(data.gamma, requires_grad=True)
            self.bias = io.tensor(data.beta, requires_grad=True)
        self.kwargs = io.mask_kwargs(data)

    def _call(self, stage: str, x: Any, training: bool) -> Any:
        return call_user(
            stage,
            self.style.fn,
            self.io.channels_first(x),
            self.running_mean,
            self.running_var,
            weight=self.weight,
            bias=self.bias,
            training=training,
            momentum=self.momentum,
            eps=self.case.eps,
            **self.kwargs,
        )

    def forward_train(self, x: np.ndarray) -> np.ndarray:
        self.x = self.io.tensor(x, requires_grad=True)
        self.y = self._call("forward (training=True)", self.x, True)
        return self.io.output("forward", "output", self.y)

    def backward(self, dy: np.ndarray):
        torch = self.io.torch
        if not getattr(self.y, "requires_grad", False):
            raise ImplementationError("the output does not require grad: no autograd graph")
        inputs = [self.x] + ([self.weight, self.bias] if self.case.affine else [])
        dyt = self.io.channels_first(self.io.tensor(dy))
        grads = call_user("backward", torch.autograd.grad, self.y, inputs, dyt, allow_unused=True)
        if grads[0] is None:
            raise ImplementationError("backward: no gradient reached the input")
        dx = self.io.output("backward", "dx", grads[0].movedim(self.case.channel_axis, 1))
        if not self.case.affine:
            return dx, None, None
        return (
            dx,
            self.io.vector("backward", "grad weight", grads[1]),
            self.io.vector("backward", "grad bias", grads[2]),
        )

    def running(self) -> tuple[np.ndarray, np.ndarray]:
        return (
            self.io.vector("running", "running_mean", self.running_mean),
            self.io.vector("running", "running_var", self.running_var),
        )

    def forward_eval(self, x: np.ndarray) -> np.ndarray:
        with self.io.torch.no_grad():
            y = self._call("forward (training=False)", self.io.tensor(x), False)
        return self.io.output("forward (eval)", "output", y)


class BackendStyle:
    """A backend of ``batchnorm.kernels.REGISTRY``, called through its stage protocol on torch
    tensors: ``forward_train`` and ``backward_train`` (its fused ones, or its stages composed)
    and ``forward_infer``.

    Backends keep no running statistics (the modules do, with ``reference.update_running_stats``),
    so those are not checked here; the eval forward uses the case's running statistics.
    """

    style = "backend"
    grad_order = "(dx, dweight, dbias)"
    no_running = "backends keep no running statistics (batchnorm.torch does)"
    no_eval = None

    def __init__(self, name: str, device: str = "cpu") -> None:
        from ..kernels import REGISTRY

        if name != "auto" and name not in REGISTRY:
            known = ", ".join(sorted(REGISTRY))
            raise ValueError(f"unknown backend {name!r}; known: {known}, auto")
        self.name, self.device = name, check_device(device)
        what = "whichever backend auto picks per case" if name == "auto" else f"backend {name!r}"
        self.signature = f"batchnorm.kernels {what} on {device}"

    def unsupported(self, case: Case) -> str | None:
        from ..kernels import BackendUnavailable, select_backend

        if case.mask:
            return (
                "masked cases: the stage protocol takes no mask (batchnorm.torch gathers the "
                "real positions; check it with --style module or functional)"
            )
        try:
            select_backend(_TorchIO(case, self.device).tensor(np.zeros(case.shape)), self.name)
        except BackendUnavailable as exc:
            return str(exc)
        return None

    def session(self, data: CaseData, momentum: float) -> Session:
        return _BackendSession(self, data)


class _BackendSession:
    def __init__(self, style: BackendStyle, data: CaseData) -> None:
        from ..kernels import select_backend

        self.case, self.data = data.case, data
        self.io = io = _TorchIO(data.case, style.device)
        # "auto" resolves per case, as batchnorm.torch does for each input.
        self.backend = select_backend(io.tensor(data.xs[0]), style.name)[0]
        self.weight = None if data.gamma is None else io.tensor(data.gamma)
        self.bias = None if data.beta is None else io.tensor(data.beta)

    def forward_train(self, x: np.ndarray) -> np.ndarray:
        self.x = self.io.tensor(x)
        from ..reference.stages import forward_train

        value = call_user(
            "forward_train",
            functools.partial(forward_train, self.backend),
            self.x,
            self.weight,
            self.bias,
            self.case.eps,
            self.case.channel_axis,
        )
        y, self.mean, _var, self.invstd, _ = _returned(
            "forward_train", value, ("y", "mean", "var", "invstd", "relu_mask")
        )
        return _as_float64("forward_train", "y", y)

    def backward(self, dy: np.ndarray):
        from ..reference.stages import backward_train

        value = call_user(
            "backward_train",
            functools.partial(backward_train, self.backend),
            self.io.tensor(dy),
            self.x,
            self.mean,
            self.invstd,
            self.weight,
            self.case.channel_axis,
        )
        dx, dweight, dbias, _ = _returned(
            "backward_train", value, ("dx", "dweight", "dbias", "dresidual")
        )
        dx = _as_float64("backward_train", "dx", dx)
        if dx.shape != self.case.shape:
            raise ImplementationError(
                f"backward_train: dx has shape {dx.shape}, expected {self.case.shape}"
            )
        if not self.case.affine:
            return dx, None, None
        return (
            dx,
            self.io.vector("backward_train", "dweight", dweight),
            self.io.vector("backward_train", "dbias", dbias),
        )

    def running(self) -> None:
        return None

    def forward_eval(self, x: np.ndarray) -> np.ndarray:
        value = call_user(
            "forward_infer",
            self.backend.forward_infer,
            self.io.tensor(x),
            self.io.tensor(self.data.running_mean),
            self.io.tensor(self.data.running_var),
            self.weight,
            self.bias,
            self.case.eps,
            self.case.channel_axis,
        )
        return _as_float64("forward_infer", "y", value)


#: style name -> adapter class, as the CLI's ``--style`` names them.
STYLES: dict[str, type] = {
    "course": CourseStyle,
    "plain": PlainStyle,
    "module": ModuleStyle,
    "functional": FunctionalStyle,
}

# Other frameworks' styles live in modules of their own (they import their framework only when
# a style is built); registered here so that --style and STYLES know them.
from .style_flax import FlaxLinenStyle, FlaxNnxStyle  # noqa: E402
from .style_keras import KerasStyle  # noqa: E402

STYLES.update({"flax-linen": FlaxLinenStyle, "flax-nnx": FlaxNnxStyle, "keras": KerasStyle})
