"""``torch.fx`` tracing of models that hold this library's layers.

``torch.fx.symbolic_trace`` keeps ``torch.nn`` layers as opaque ``call_module`` nodes and
traces into every other module. It would trace into our layers' ``forward``, whose validation
branches on the input (rank, size), and fail with "symbolically traced variables cannot be used
as inputs to control flow". :class:`Tracer` keeps them opaque too, so the traced graph calls
the module itself and train/eval, the backend and the buffers behave as before tracing.

``torch.fx.Proxy`` has no in-place operators: ``y += t`` traces as ``y = y + t``, a new node,
and the graph then leaves ``y`` unwritten for its later readers, a different function from the
model's; ``x[i] = v`` does not trace at all. :class:`Tracer` records augmented assignments as
the in-place ``operator.iadd`` (and the rest) and item assignment as ``operator.setitem``, which
the generated code runs as ``y += t`` and ``x[i] = v``.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx

from .fused import _FusedBatchNorm2d
from .modules import _BatchNorm
from .sync import SyncBatchNorm

__all__ = ["Tracer", "symbolic_trace", "LEAF_TYPES", "in_place_between"]

#: Module types kept as single ``call_module`` nodes.
LEAF_TYPES: tuple[type, ...] = (_BatchNorm, _FusedBatchNorm2d, SyncBatchNorm)


class _Proxy(torch.fx.Proxy):
    """A proxy whose augmented assignments are recorded in place (module docstring)."""


def _in_place(name: str) -> Any:
    op = getattr(operator, name)

    def method(self: _Proxy, *args: Any) -> Any:
        return self.tracer.create_proxy("call_function", op, (self, *args), {})

    method.__name__ = f"__{name}__"
    return method


_IN_PLACE_NAMES = (
    "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "imatmul", "iand", "ior",
    "ixor", "ilshift", "irshift",
)  # fmt: skip
_IN_PLACE_OPERATORS = frozenset(getattr(operator, n) for n in (*_IN_PLACE_NAMES, "setitem"))

# ``setitem`` too: ``x[i] = v`` (and ``x[i] += v``) trace instead of failing.
for _name in (*_IN_PLACE_NAMES, "setitem"):
    setattr(_Proxy, f"__{_name}__", _in_place(_name))


#: Methods and functions whose result may share memory with their first argument.
_VIEW_METHODS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "transpose", "permute", "t", "narrow", "select",
    "expand", "expand_as", "unsqueeze", "squeeze", "flatten", "unflatten", "chunk", "split",
    "unbind", "movedim", "swapaxes", "diagonal", "unfold", "as_strided", "detach", "contiguous",
    "to", "type", "type_as", "float", "double", "half", "bfloat16", "__getitem__",
})  # fmt: skip
_VIEW_FUNCTIONS = frozenset({
    operator.getitem, torch.reshape, torch.flatten, torch.transpose, torch.permute,
    torch.narrow, torch.select, torch.squeeze, torch.unsqueeze, torch.chunk, torch.split,
    torch.unbind, torch.movedim, torch.t, torch.detach, torch.diagonal,
})  # fmt: skip


def _written(node: torch.fx.Node, modules: dict[str, Any]) -> Any:
    """The tensor ``node`` writes in place (an augmented assignment, a method or function named
    with a trailing underscore, an ``inplace=True`` module: their first argument; ``out=``),
    or None."""
    if "out" in node.kwargs:
        return node.kwargs["out"]
    first = node.args[0] if node.args else None
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        in_place = node.target in _IN_PLACE_OPERATORS or (
            name.endswith("_") and not name.startswith("_")
        )
        return first if in_place else None
    if node.op == "call_method":
        return first if node.target.endswith("_") and not node.target.startswith("_") else None
    if node.op == "call_module" and getattr(modules.get(node.target), "inplace", False):
        return first
    return None


def _base(value: Any, modules: dict[str, Any]) -> Any:
    """The node whose memory ``value`` may share: back through views and in-place writes."""
    while isinstance(value, torch.fx.Node) and value.args:
        aliasing = (
            (value.op == "call_method" and value.target in _VIEW_METHODS)
            or (value.op == "call_function" and value.target in _VIEW_FUNCTIONS)
            or _written(value, modules) is value.args[0]
        )
        if not aliasing or not isinstance(value.args[0], torch.fx.Node):
            break
        value = value.args[0]
    return value


def in_place_between(
    first: torch.fx.Node,
    last: torch.fx.Node,
    reads: tuple,
    modules: dict[str, Any],
    allowed: tuple = (),
) -> str | None:
    """The name of a node strictly between ``first`` and ``last`` (graph order), other than
    ``allowed``, that writes in place a tensor sharing memory with one of ``reads``; None if
    there is none. A rewrite that moves those reads from ``first`` to ``last`` would read
    what such a write left there."""
    bases = {_base(r, modules) for r in reads if isinstance(r, torch.fx.Node)}
    node = first.next
    while node is not last and node.op != "root":
        target = None if node in allowed else _written(node, modules)
        if target is not None and _base(target, modules) in bases:
            return node.name
        node = node.next
    return None


class Tracer(torch.fx.Tracer):
    """``torch.fx.Tracer`` that treats this library's batch-norm layers as leaves and records
    augmented assignments in place."""

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, LEAF_TYPES) or super().is_leaf_module(m, module_qualified_name)

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return _Proxy(node, self)


def symbolic_trace(root: torch.nn.Module, concrete_args: dict[str, Any] | None = None):
    """``torch.fx.symbolic_trace`` with :class:`Tracer`: a ``torch.fx.GraphModule``."""
    tracer = Tracer()
    graph = tracer.trace(root, concrete_args)
    name = root.__class__.__name__ if isinstance(root, torch.nn.Module) else root.__name__
    return torch.fx.GraphModule(tracer.root, graph, name)
