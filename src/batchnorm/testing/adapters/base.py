"""What every calling style shares: the session and adapter interfaces, a base class with the
defaults, and the conversions that turn what an implementation returns into float64 arrays (or
into an :class:`ImplementationError` saying what was wrong).

A style module (``course.py``, ``module.py``, ...) holds one adapter class and its session;
``adapters/__init__.py`` registers it in :data:`STYLES`. See docs/conformance.md, "How to add a
calling style".
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from ..._errors import describe_exception as _describe
from ..cases import Case, CaseData

#: Frames in here are the suite's; frames elsewhere (batchnorm.torch too) are the code tested.
#: The whole of ``batchnorm/testing``: the checker's frames are the suite's as much as these.
_SUITE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ImplementationError(Exception):
    """The implementation under test raised, or returned what its style does not allow."""


def describe_exception(exc: BaseException) -> str:
    """``"NameError: name 'x' is not defined (impl.py, line 3, in bn_backward)"``: the location
    is the innermost frame outside this suite and outside installed libraries, the code under
    test."""
    return _describe(exc, library_dirs=(_SUITE_DIR,))


def call_user(stage: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call the implementation; any exception becomes an ImplementationError naming ``stage``."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        raise ImplementationError(f"{stage} raised {describe_exception(exc)}") from exc


def returned(stage: str, value: Any, names: tuple[str, ...]) -> tuple[Any, ...]:
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


def as_float64(stage: str, name: str, value: Any) -> np.ndarray:
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


def vector(stage: str, name: str, value: Any, channels: int) -> np.ndarray:
    """A per-channel vector; shapes like (1, C) are accepted (NumPy broadcasting leaves them)."""
    arr = as_float64(stage, name, value)
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
    """What :func:`~batchnorm.testing.check` needs of an adapter.

    An adapter may also have ``conventions``, the ``(momentum convention, running variance)``
    its style implies (the module and functional styles: PyTorch's), which ``check`` uses when
    they are not declared; without it they are inferred. :class:`Style` gives the defaults.
    """

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


#: Why the styles that cannot take a mask skip the masked cases.
NO_MASK_STYLE = "masked cases: this style has no mask argument (module and functional do)"


def takes_mask(fn: Any) -> bool:
    """Whether ``fn`` accepts a ``mask=`` keyword (by name, or through ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some builtins)
        return False
    return any(
        (p.name == "mask" and p.kind != p.POSITIONAL_ONLY) or p.kind == p.VAR_KEYWORD
        for p in params
    )


class Style:
    """The base of the registered styles: defaults for the optional attributes, and how
    ``batchnorm conform PATH:NAME[,NAME] --style NAME`` builds the adapter.

    A subclass sets ``style`` (its ``--style`` name, the key in :data:`STYLES`), ``signature``
    (in ``__init__``, for the report header), ``grad_order`` (the names its backward returns,
    in order) and ``target_counts``/``target_names`` (how many objects the command line names,
    and what they are, for the usage error), and implements ``from_target`` and ``session``,
    and ``unsupported`` where some cases cannot be expressed.
    """

    style: str
    signature: str
    grad_order: str
    no_running: str | None = None
    no_eval: str | None = None
    #: (momentum convention, running variance) the style implies; None: inferred
    conventions: tuple[str, str] | None = None
    #: how many objects ``PATH:NAME[,NAME]`` may name, and what they are
    target_counts: tuple[int, ...] = (1,)
    target_names: str = "one function"

    @classmethod
    def from_target(cls, objects: Sequence[Any], *, layout: str, device: str) -> Style:
        """The adapter for the objects the command line loaded (their number is checked)."""
        raise NotImplementedError(f"style {cls.style!r} cannot be built from the command line")

    def unsupported(self, case: Case) -> str | None:
        return None

    def session(self, data: CaseData, momentum: float) -> Session:
        raise NotImplementedError
