"""Adapters: run an implementation of a given *calling style* on one case, in the case's layout.

Each adapter opens a :class:`Session` per case (a module instance, a ``bn_param`` dict, running
buffers) and exposes the same four calls, taking and returning float64 NumPy arrays in the
case's layout: ``forward_train``, ``backward``, ``running`` and ``forward_eval``. Inside, it
converts to what the style expects (dtype, channel axis, framework) and back, and turns every
exception and every malformed return of the implementation into :class:`ImplementationError`
with a message that says what was wrong, so that the checker reports it and carries on.

One module per style (``course``, ``plain``: NumPy functions; ``module``, ``functional``:
PyTorch; ``flax`` (linen, nnx) and ``keras``: other frameworks, imported only when a style
is built; ``backend``: this library's kernels), with what a framework's styles share beside them
(``numpy_io``, ``torch_io``) and what all share in ``base``. :data:`STYLES` is the registry the
command line's ``--style`` reads. A framework is imported only when one of its sessions opens.
"""

from __future__ import annotations

from .backend import BackendStyle
from .base import (
    Adapter,
    ImplementationError,
    Session,
    Style,
    call_user,
    check_device,
    describe_exception,
)
from .course import CourseStyle
from .flax import FlaxLinenStyle, FlaxNnxStyle
from .functional import FunctionalStyle
from .keras import KerasStyle
from .module import ModuleStyle
from .plain import PlainStyle

__all__ = [
    "ImplementationError",
    "Session",
    "Adapter",
    "Style",
    "CourseStyle",
    "PlainStyle",
    "ModuleStyle",
    "FunctionalStyle",
    "BackendStyle",
    "FlaxLinenStyle",
    "FlaxNnxStyle",
    "KerasStyle",
    "STYLES",
    "call_user",
    "check_device",
    "describe_exception",
]

#: style name -> adapter class, as the CLI's ``--style`` names them. A new style is one entry
#: here (its class's ``style`` is the key; see docs/conformance.md, "How to add a calling style").
#: ``--backend`` builds :class:`BackendStyle` itself: it names a backend, not a file.
STYLES: dict[str, type] = {
    "course": CourseStyle,
    "plain": PlainStyle,
    "module": ModuleStyle,
    "functional": FunctionalStyle,
    "flax-linen": FlaxLinenStyle,
    "flax-nnx": FlaxNnxStyle,
    "keras": KerasStyle,
}
