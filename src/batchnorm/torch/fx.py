"""``torch.fx`` tracing of models that hold this library's layers.

``torch.fx.symbolic_trace`` keeps ``torch.nn`` layers as opaque ``call_module`` nodes and
traces into every other module. It would trace into our layers' ``forward``, whose validation
branches on the input (rank, size), and fail with "symbolically traced variables cannot be used
as inputs to control flow". :class:`Tracer` keeps them opaque too, so the traced graph calls
the module itself and train/eval, the backend and the buffers behave as before tracing.

``torch.fx.Proxy`` has no in-place operators: ``y += t`` traces as ``y = y + t``, a new node,
and the graph then leaves ``y`` unwritten for its later readers, a different function from the
model's. :class:`Tracer` records augmented assignments as the in-place ``operator.iadd`` (and
the rest), which the generated code runs as ``y += t``.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx

from .fused import _FusedBatchNorm2d
from .modules import _BatchNorm
from .sync import SyncBatchNorm

__all__ = ["Tracer", "symbolic_trace", "LEAF_TYPES", "in_place_between", "writes_in_place"]

#: Module types kept as single ``call_module`` nodes.
LEAF_TYPES: tuple[type, ...] = (_BatchNorm, _FusedBatchNorm2d, SyncBatchNorm)


class _Proxy(torch.fx.Proxy):
    """A proxy whose augmented assignments are recorded in place (module docstring)."""


def _in_place(name: str) -> Any:
    op = getattr(operator, name)

    def method(self: _Proxy, other: Any) -> Any:
        return self.tracer.create_proxy("call_function", op, (self, other), {})

    method.__name__ = f"__{name}__"
    return method


_IN_PLACE_NAMES = (
    "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "imatmul", "iand", "ior",
    "ixor", "ilshift", "irshift",
)  # fmt: skip
_IN_PLACE_OPERATORS = frozenset(getattr(operator, n) for n in _IN_PLACE_NAMES)

for _name in _IN_PLACE_NAMES:
    setattr(_Proxy, f"__{_name}__", _in_place(_name))


def writes_in_place(node: torch.fx.Node, modules: dict[str, Any]) -> bool:
    """Whether ``node`` may write one of its inputs in place: an augmented assignment, a
    method or function named with a trailing underscore (``add_``, ``torch.relu_``), or a
    module built with ``inplace=True``."""
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.target in _IN_PLACE_OPERATORS or (
            name.endswith("_") and not name.startswith("_")
        )
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    if node.op == "call_module":
        return bool(getattr(modules.get(node.target), "inplace", False))
    return False


def in_place_between(
    first: torch.fx.Node, last: torch.fx.Node, modules: dict[str, Any], allowed: tuple = ()
) -> str | None:
    """The name of a node strictly between ``first`` and ``last`` (graph order) that may write
    in place, other than ``allowed``; None if there is none. A rewrite that moves a read of a
    tensor from ``first`` to ``last`` would read what such a write left there."""
    node = first.next
    while node is not last and node.op != "root":
        if node not in allowed and writes_in_place(node, modules):
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
