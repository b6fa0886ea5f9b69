"""``convert(model, fuse_activations=True)``: each batch norm followed by its activation becomes
one fused module that saves less for the backward (``fused.py``, ``fused_leaky.py``).

Patterns (the batch norm a ``BatchNorm2d`` of ours, used at one place, its output used once):

    BN -> ReLU                 -> BatchNormReLU2d          (Conv-BN-ReLU: the conv stays)
    BN -> add(., other) -> ReLU -> BatchNormAddReLU2d      (a ResNet block's tail)
    BN -> LeakyReLU(slope)     -> BatchNormLeakyReLU2d     (In-Place ABN: only the output kept)

ReLU / LeakyReLU as modules, ``torch.relu``, ``F.relu``, ``F.leaky_relu``, ``.relu()``; the add
as ``+``, ``+=``, ``torch.add`` or ``.add``. Where the model traces with ``torch.fx`` (our
:class:`~batchnorm.torch.fx.Tracer`), the graph is rewritten and a new ``torch.fx.GraphModule``
is returned that shares every parameter and buffer with the model, unless everything the graph
fused is a consecutive BN, activation pair of an ``nn.Sequential``: then those pairs are fused
in place and the model itself comes back, of its own class (a Sequential stays indexable, a
user's class keeps its methods). Where it does not trace, only those Sequential pairs are
fused, in place, and the report says why tracing failed. The report (:class:`FusionReport`)
lists what was fused and what was not; ``convert`` logs it on the ``batchnorm`` logger.

A fused module takes over the batch norm's tensors (``from_batch_norm``), so optimizers and
state dicts keep working; a layer with a moments switch off is not fused (the fused layers have
no switches), nor a batch norm or activation with hooks of its own (the fused module would not
run them), nor a pair inside a Sequential subclass with a ``forward`` of its own, nor a batch
norm called with more than its input (``mask=``), nor an add that writes into the residual in
place, nor a BN + add + ReLU with an in-place write between the norm and the ReLU (the fused
module runs at the ReLU and would read the written tensors). The residual
of a BN+add+ReLU is checked at run time: an add that broadcasts (a shape or dtype other than
the batch norm's) runs unfused, with the same result.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.fx
from torch import nn

from .functional import _batch_norm
from .fused import BatchNormAddReLU2d, BatchNormReLU2d
from .fused_leaky import BatchNormLeakyReLU2d
from .fx import in_place_between, symbolic_trace
from .modules import BatchNorm2d, forward_with_buffers

__all__ = ["FusionReport", "fuse_activations"]

logger = logging.getLogger("batchnorm")


@dataclass
class FusionReport:
    """What ``fuse_activations`` did: ``fused`` (batch-norm name, pattern), ``skipped`` (name,
    why), ``traced`` (torch.fx traced the model), ``note`` (why it did not trace) and
    ``in_place`` (the model itself came back, its Sequential pairs fused)."""

    fused: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    traced: bool = False
    note: str | None = None
    in_place: bool = False

    def __str__(self) -> str:
        if self.in_place:
            how = "nn.Sequential children, in place: all the torch.fx graph found"
        elif self.traced:
            how = "torch.fx graph"
        else:
            how = f"nn.Sequential children only ({self.note})"
        lines = [f"fused {len(self.fused)} batch norm(s) with their activation ({how})"]
        lines += [f"  {name}: {pattern}" for name, pattern in self.fused]
        lines += [f"  not fused {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


class _GuardedAddReLU(BatchNormAddReLU2d):
    """``BatchNormAddReLU2d`` that runs unfused where the add broadcasts (fx cannot know)."""

    def forward(self, input: torch.Tensor, residual: Any) -> torch.Tensor:
        if (
            isinstance(residual, torch.Tensor)
            and isinstance(input, torch.Tensor)
            and residual.shape == input.shape
            and residual.dtype == input.dtype
        ):
            return self._run(input, residual)
        output = forward_with_buffers(self, input, _batch_norm, through_mean=True, through_var=True)
        return torch.relu(output + residual)


def _hooked(module: nn.Module) -> bool:
    """Whether ``module`` has hooks of its own, which a fused module would not run."""
    return any(
        getattr(module, name, None)
        for name in (
            "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"
        )
    )  # fmt: skip


def _fusable(bn: nn.Module) -> str | None:
    if type(bn) is not BatchNorm2d:
        return f"{type(bn).__name__} is not our BatchNorm2d"
    if not (bn.through_mean and bn.through_var):
        return "a moments switch is off (the fused layers have none)"
    if _hooked(bn):
        return "it has hooks (the fused module would not run them)"
    return None


def _fused_module(bn: BatchNorm2d, pattern: str, slope: float | None) -> nn.Module:
    if pattern == "relu":
        return BatchNormReLU2d.from_batch_norm(bn, backend=bn.backend)
    if pattern == "add+relu":
        return _GuardedAddReLU.from_batch_norm(bn, backend=bn.backend)
    return BatchNormLeakyReLU2d.from_batch_norm(bn, backend=bn.backend, negative_slope=slope)


def _activation(node: torch.fx.Node, modules: dict[str, nn.Module]) -> tuple[str, Any] | None:
    """("relu", None) or ("leaky_relu", slope) if ``node`` applies that activation to its
    first argument alone, else None."""
    if node.op == "call_module":
        module = modules.get(node.target)
        if _hooked(module):
            return None
        if type(module) is nn.ReLU:
            return "relu", None
        if type(module) is nn.LeakyReLU and module.negative_slope > 0:
            return "leaky_relu", float(module.negative_slope)
        return None
    if node.op == "call_function" and node.target in (torch.relu, torch.relu_, nn.functional.relu):
        return "relu", None
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return "relu", None
    if node.op == "call_function" and node.target is nn.functional.leaky_relu:
        slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
        if isinstance(slope, float | int) and slope > 0:
            return "leaky_relu", float(slope)
    return None


def _residual(node: torch.fx.Node, bn_node: torch.fx.Node) -> torch.fx.Node | None:
    """The other operand if ``node`` is ``bn_node + other`` (any spelling), else None. An
    in-place add counts only where it writes into the batch norm's output (``out += identity``),
    which nothing else reads; one that writes into the other operand (``identity += bn(x)``)
    does not: the fused module would leave that tensor unwritten for its later readers."""
    if node.op == "call_function" and node.target in (operator.add, torch.add):
        in_place = False
    elif node.op == "call_function" and node.target is operator.iadd:
        in_place = True
    elif node.op == "call_method" and node.target in ("add", "add_"):
        in_place = node.target == "add_"
    else:
        return None
    operands = node.args
    if node.kwargs or len(operands) != 2 or bn_node not in operands:
        return None
    if in_place and operands[0] is not bn_node:
        return None
    other = operands[1] if operands[0] is bn_node else operands[0]
    return other if isinstance(other, torch.fx.Node) and other is not bn_node else None


def _writes_into_residual(node: torch.fx.Node, bn_node: torch.fx.Node) -> bool:
    in_place = (node.op == "call_function" and node.target is operator.iadd) or (
        node.op == "call_method" and node.target == "add_"
    )
    return in_place and len(node.args) == 2 and node.args[1] is bn_node


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _fuse_graph(gm: torch.fx.GraphModule, report: FusionReport) -> dict[str, tuple]:
    """Rewrite ``gm``'s graph (module docstring). Returns, for each BN + activation fused
    where the activation was a module called at that one place only, (its name, slope): what
    ``fuse_activations`` compares with the Sequential pairs."""
    taken: dict[str, tuple] = {}
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), BatchNorm2d):
            continue
        bn = modules[node.target]
        why = _fusable(bn)
        if why is None and calls[node.target] > 1:
            why = "the module is called at more than one place"
        if why is None and len(node.users) != 1:
            why = "its output is used more than once"
        if why is None and (len(node.args) != 1 or node.kwargs):
            why = "it is called with more than its input (a mask= or a keyword argument)"
        if why is not None:
            report.skipped.append((node.target, why))
            continue
        user = next(iter(node.users))
        if user.op == "call_module" and _hooked(modules[user.target]):
            report.skipped.append((node.target, "its activation has hooks (not run if fused)"))
            continue
        found = _activation(user, modules)
        if found is not None:
            pattern, slope = found
            if user.op == "call_module" and calls[user.target] == 1:
                taken[node.target] = (user.target, slope)
            _set_submodule(gm, node.target, _fused_module(bn, pattern, slope))
            user.replace_all_uses_with(node)
            gm.graph.erase_node(user)
            report.fused.append((node.target, f"BN + {pattern}"))
            continue
        other = _residual(user, node)
        act = next(iter(user.users)) if other is not None and len(user.users) == 1 else None
        if act is not None and _activation(act, modules) == ("relu", None):
            # The fused module runs where the ReLU was, reading the batch norm's input and the
            # residual there: a write in place between the two would change what it reads.
            writer = in_place_between(node, act, (node.args[0], other), modules, allowed=(user,))
            if writer is not None:
                report.skipped.append((node.target, f"{writer} writes in place before the ReLU"))
                continue
            _set_submodule(gm, node.target, _fused_module(bn, "add+relu", None))
            with gm.graph.inserting_before(act):
                fused = gm.graph.call_module(node.target, (node.args[0], other))
            act.replace_all_uses_with(fused)
            for dead in (act, user, node):
                gm.graph.erase_node(dead)
            report.fused.append((node.target, "BN + add + relu"))
            continue
        if _writes_into_residual(user, node):
            why = "the add writes into the other operand in place (fused, it would not)"
        else:
            why = "no ReLU / add+ReLU / LeakyReLU follows it"
        report.skipped.append((node.target, why))
    gm.graph.lint()
    gm.recompile()
    # The activations the fused modules took over are dead now (stateless: no state_dict key
    # goes); a traced GraphModule holds only the submodules its graph used, so nothing else can.
    gm.delete_all_unused_submodules()
    return taken


class _Pair(NamedTuple):
    """A consecutive BN -> ReLU / LeakyReLU pair of an ``nn.Sequential`` that can fuse."""

    seq: nn.Sequential
    bn_key: str
    act_key: str
    name: str  # the batch norm's qualified name
    act_name: str
    pattern: str
    slope: float | None


def _sequential_pairs(model: nn.Module, report: FusionReport) -> list[_Pair]:
    """Every pair of the ``nn.Sequential`` modules of ``model`` that can fuse; the others go
    to ``report.skipped``. Nothing is changed."""
    pairs = []
    for prefix, seq in model.named_modules():
        # A subclass with a forward of its own may use its children in any order.
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue
        keys = list(seq._modules)
        for first, second in zip(keys, keys[1:], strict=False):
            bn, act = seq._modules[first], seq._modules[second]
            if not isinstance(bn, BatchNorm2d):
                continue
            pattern = slope = None
            if type(act) is nn.ReLU:
                pattern = "relu"
            elif type(act) is nn.LeakyReLU and act.negative_slope > 0:
                pattern, slope = "leaky_relu", float(act.negative_slope)
            name, act_name = (f"{prefix}.{k}" if prefix else k for k in (first, second))
            why = _fusable(bn) or (None if pattern else "no ReLU / LeakyReLU follows it")
            if why is None and _hooked(act):
                why = "its activation has hooks (the fused module would not run them)"
            if why is not None:
                report.skipped.append((name, why))
                continue
            pairs.append(_Pair(seq, first, second, name, act_name, pattern, slope))
    return pairs


def _fuse_sequential(pairs: list[_Pair]) -> list[tuple[str, str]]:
    """Fuse ``pairs`` in place; returns what ``FusionReport.fused`` lists for them."""
    for p in pairs:
        p.seq._modules[p.bn_key] = _fused_module(p.seq._modules[p.bn_key], p.pattern, p.slope)
        p.seq._modules[p.act_key] = nn.Identity()
    return [(p.name, f"BN + {p.pattern}") for p in pairs]


def fuse_activations(model: nn.Module) -> tuple[nn.Module, FusionReport]:
    """Fuse each of our ``BatchNorm2d`` in ``model`` with the activation after it (module
    docstring). Returns ``(model, report)``: ``model`` itself, its class and methods kept,
    with its ``nn.Sequential`` pairs fused in place, where those are all the traced graph
    fuses (or where it does not trace); else a new ``GraphModule``."""
    report = FusionReport()
    try:
        gm = symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 (any tracing failure means: the fallback)
        report.note = f"torch.fx could not trace it: {type(exc).__name__}: {exc}"
        report.fused += _fuse_sequential(_sequential_pairs(model, report))
        return model, report
    report.traced = True
    taken = _fuse_graph(gm, report)
    if not report.fused:
        return model, report  # nothing to fuse: the model as it was
    pairs = _sequential_pairs(model, FusionReport())
    same = len(pairs) == len(report.fused) and all(
        taken.get(p.name) == (p.act_name, p.slope) for p in pairs
    )
    if same:
        # Every fusion of the graph is a Sequential pair whose activation module the graph
        # called there and nowhere else (and each BN once, its output going to the activation
        # alone): fusing them in place is the same model, and the user keeps an object of
        # their own class (indexing, attributes, methods) instead of a GraphModule.
        _fuse_sequential(pairs)
        report.in_place = True
        return model, report
    gm.train(model.training)
    return gm, report
