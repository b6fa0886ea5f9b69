"""Where ``fold`` finds its pairs: the ``torch.fx`` graph, or Sequential adjacency.

The graph is the only place that shows everything a layer's output feeds, so it is tried
first, on the whole model. A model whose forward does not trace (data-dependent control flow)
usually has blocks that do (a ResNet's BasicBlock, a MobileNet's inverted residual): each child
is then tried on its own, and inside a ``torch.nn.Sequential`` that does not trace either, the
order of the children is the data flow, so adjacent (layer, norm) / (norm, layer) children pair
up. Norm layers found by neither are reported as skipped, with the reason.

Sharing: ``uses`` counts every call of a module in the graph, every ``get_attr`` of its
parameters, and every extra place it is registered in the model (uses we cannot see). A layer
with more than one use is folded into a copy ("cloned"), never edited.
"""

from __future__ import annotations

import operator
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from .._errors import describe_exception
from .fold import (
    AFFINE_TYPES,
    FoldPair,
    FoldReport,
    absorb_into_next,
    absorb_into_previous,
    in_channels,
    module_affine,
    next_exact_reason,
    norm_affine,
    norm_kind,
    out_channels,
    unfoldable_reason,
)
from .frozen import FrozenBatchNorm
from .fx import Tracer, in_place_between

#: our own frames are not the user's model: a trace error points past them
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

nn = torch.nn


class _FoldTracer(Tracer):
    """Keeps every norm layer (frozen and unknown classes too) as one ``call_module`` node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, FrozenBatchNorm) or norm_kind(m) is not None:
            return True
        return super().is_leaf_module(m, module_qualified_name)


@dataclass
class _Context:
    report: FoldReport
    ranks: dict[int, set[int]]
    registrations: Counter
    recompute_shared: bool
    untraced: list[str] = field(default_factory=list)


@dataclass
class _Site:
    """One batch norm in a graph: a norm module's call or an ``F.batch_norm`` call."""

    node: torch.fx.Node
    input: torch.fx.Node
    name: str
    kind: str
    channels: int
    affine: tuple[torch.Tensor, torch.Tensor] | None
    reason: str | None
    ranks: set[int] | None


def _attr(gm: nn.Module, target: str) -> Any:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _functional_site(gm: torch.fx.GraphModule, node: torch.fx.Node, prefix: str) -> _Site | None:
    if node.op != "call_function" or node.target is not F.batch_norm:
        return None
    bound = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True).kwargs
    name = f"{prefix}F.batch_norm[{node.name}]"
    stats = [bound.get(k) for k in ("running_mean", "running_var", "weight", "bias")]
    constant = all(
        s is None or (isinstance(s, torch.fx.Node) and s.op == "get_attr") for s in stats
    )
    reason = None
    if bound.get("training", False) is not False:
        reason = "called with training=True (or a traced flag): batch statistics, not an affine map"
    elif stats[0] is None or stats[1] is None or not constant:
        reason = "running statistics or affine are not attributes of the model"
    elif not isinstance(bound.get("eps", 1e-5), (int, float)):
        reason = "eps is not a constant"
    if reason is not None:
        return _Site(node, bound["input"], name, "plain", 0, None, reason, None)
    tensors = [None if s is None else _attr(gm, s.target) for s in stats]
    affine = norm_affine(*tensors, bound.get("eps", 1e-5))
    return _Site(node, bound["input"], name, "plain", affine[0].numel(), affine, None, None)


def _sites(gm: torch.fx.GraphModule, prefix: str, ctx: _Context) -> list[_Site]:
    sites = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            kind = norm_kind(module)
            if kind is None:
                continue
            reason = unfoldable_reason(module)
            affine = None if reason else module_affine(module)
            channels = 0 if affine is None else affine[0].numel()
            ranks = ctx.ranks.get(id(module))
            source = node.args[0] if node.args else node.kwargs.get("input")
            sites.append(
                _Site(node, source, prefix + node.target, kind, channels, affine, reason, ranks)
            )
        else:
            site = _functional_site(gm, node, prefix)
            if site is not None:
                sites.append(site)
    return sites


def _uses(gm: torch.fx.GraphModule, module: nn.Module, ctx: _Context) -> int:
    calls = 0
    for node in gm.graph.nodes:
        if node.op == "call_module" and gm.get_submodule(node.target) is module:
            calls += 1
        elif node.op == "get_attr" and "." in node.target:
            owner = gm.get_submodule(node.target.rsplit(".", 1)[0])
            calls += owner is module
    return calls + ctx.registrations[id(module)] - 1


def _put(gm: torch.fx.GraphModule, node: torch.fx.Node, new: nn.Module, clone: bool) -> None:
    """``new`` in place of the module ``node`` calls: at the same name, or as a copy."""
    if not clone:
        parent, _, leaf = node.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, leaf, new)
        return
    k = 0
    while True:
        target = f"{node.target}_folded{k}"
        try:
            gm.get_submodule(target)
        except AttributeError:
            break
        k += 1
    gm.add_submodule(target, new)
    node.target = target


def _previous_reason(layer: nn.Module, site: _Site, ranks: set[int] | None) -> str | None:
    if out_channels(layer) != site.channels:
        return f"{type(layer).__name__} has {out_channels(layer)} outputs, the norm {site.channels}"
    if isinstance(layer, nn.Linear) and ranks and ranks != {2}:
        return "the Linear's output is (N, ..., C): the norm's channel axis 1 is another axis"
    return None


def _note(layer: nn.Module, ranks: set[int] | None) -> str:
    if isinstance(layer, nn.Linear) and not ranks:
        return " (assumed (N, C) input: pass example_inputs to check)"
    return ""


def _erase(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    """Erase a norm node, and the get_attr nodes of an F.batch_norm call left unused."""
    inputs = node.all_input_nodes  # erase_node clears the arguments
    gm.graph.erase_node(node)
    for arg in inputs:
        if arg.op == "get_attr" and not arg.users:
            gm.graph.erase_node(arg)


def _drop_site(gm: torch.fx.GraphModule, site: _Site, source: torch.fx.Node) -> None:
    """Replace the norm node by what is left of it once its affine map is folded away."""
    graph, node = gm.graph, site.node
    if site.kind == "plain":
        node.replace_all_uses_with(source)
    else:
        with graph.inserting_before(node):
            x = source
            if site.kind == "add_relu":
                residual = node.args[1] if len(node.args) > 1 else node.kwargs["residual"]
                x = graph.call_function(operator.add, (source, residual))
            node.replace_all_uses_with(graph.call_function(torch.relu, (x,)))
    _erase(gm, node)


def _fold_previous(gm: torch.fx.GraphModule, site: _Site, ctx: _Context, prefix: str) -> str | None:
    """Fold into the layer before; None if done, else why not."""
    producer = site.input
    if not (isinstance(producer, torch.fx.Node) and producer.op == "call_module"):
        return "no Conv/ConvTranspose/Linear before it"
    layer = gm.get_submodule(producer.target)
    if type(layer) not in AFFINE_TYPES:
        return f"{type(layer).__name__} before it is not a Conv/ConvTranspose/Linear"
    ranks = site.ranks or ctx.ranks.get(id(layer))
    reason = _previous_reason(layer, site, ranks)
    if reason:
        return reason
    new = absorb_into_previous(layer, *site.affine)
    others = [u.name for u in producer.users if u is not site.node]
    name = prefix + producer.target
    if others and not ctx.recompute_shared:
        return (
            f"the output of {name} also feeds {', '.join(others)}: folding would change them "
            "(recompute_shared=True folds into a copy that runs twice)"
        )
    action, why = "folded", f"{type(layer).__name__} before it absorbs scale and shift"
    uses = _uses(gm, layer, ctx)
    writer = None
    if others:
        reads = (*producer.args, *producer.kwargs.values())
        writer = in_place_between(producer, site.node, reads, dict(gm.named_modules()))
    if writer is not None:  # the copy would run at the norm, reading the layer's input there
        return f"{writer} writes in place between {name} and the norm"
    if others:
        with gm.graph.inserting_before(site.node):
            producer = gm.graph.call_module(producer.target, producer.args, producer.kwargs)
        action, why = "cloned", f"its output also feeds {', '.join(others)}: folded into a copy"
    elif uses > 1:
        action, why = "cloned", f"{name} has {uses} uses: folded into a copy, the rest keep it"
    _put(gm, producer, new, clone=action == "cloned")
    why += _note(layer, ranks)
    ctx.report.pairs.append(FoldPair(site.name, name, "before", action, why))
    _drop_site(gm, site, producer)
    return None


def _fold_next(gm: torch.fx.GraphModule, site: _Site, ctx: _Context, prefix: str) -> str | None:
    """Fold into every layer after the norm (all its users); None if done, else why not."""
    if site.kind != "plain":
        return "the ReLU inside the layer follows the affine map: only a layer before can absorb it"
    users = list(site.node.users)
    if not users:
        return "its output is not used"
    plan = []
    for user in users:
        layer = gm.get_submodule(user.target) if user.op == "call_module" else None
        if type(layer) not in AFFINE_TYPES:
            return f"its output feeds {user.name}, not a Conv/ConvTranspose/Linear"
        if user.args[:1] != (site.node,) or user.all_input_nodes != [site.node]:
            return f"{user.target} reads the norm's output other than as its input"
        if in_channels(layer) != site.channels:
            return f"{user.target} has {in_channels(layer)} inputs, the norm {site.channels}"
        # The folded layer reads the norm's input where the layer was: not after a write.
        writer = in_place_between(site.node, user, (site.input,), dict(gm.named_modules()))
        if writer is not None:
            return f"{writer} writes in place between the norm and {user.target}"
        ranks = site.ranks or ctx.ranks.get(id(layer))
        reason = next_exact_reason(layer, ranks)
        if reason:
            return reason
        plan.append((user, layer, ranks, prefix + user.target))
    for user, layer, ranks, name in plan:
        clone = _uses(gm, layer, ctx) > 1
        _put(gm, user, absorb_into_next(layer, *site.affine), clone=clone)
        user.args = (site.input, *user.args[1:])
        action = "cloned" if clone else "folded"
        why = f"{type(layer).__name__} after it absorbs scale and shift (exact: no zero padding)"
        if clone:
            why += "; the layer has other uses: folded into a copy"
        why += _note(layer, ranks)
        ctx.report.pairs.append(FoldPair(site.name, name, "after", action, why))
    _erase(gm, site.node)
    return None


def fold_graph(gm: torch.fx.GraphModule, prefix: str, ctx: _Context) -> bool:
    """Fold every site of the graph it can; True if anything changed."""
    sites = _sites(gm, prefix, ctx)
    before = len(ctx.report.folded)
    pending = []
    for site in sites:  # neighbour before first: it is exact wherever it exists
        if site.reason:
            ctx.report.pairs.append(FoldPair(site.name, None, None, "skipped", site.reason))
            continue
        why = _fold_previous(gm, site, ctx, prefix)
        if why is not None:
            pending.append((site, why))
    for site, why_not_before in pending:
        why_not_after = _fold_next(gm, site, ctx, prefix)
        if why_not_after is not None:
            reason = f"before: {why_not_before}; after: {why_not_after}"
            ctx.report.pairs.append(FoldPair(site.name, None, None, "skipped", reason))
    changed = len(ctx.report.folded) > before
    if changed:
        gm.delete_all_unused_submodules()
        gm.graph.lint()
        gm.recompile()
    return changed


def _is_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _fold_sequential(seq: nn.Sequential, prefix: str, ctx: _Context) -> None:
    """Adjacent children of a Sequential: the output of one is the input of the next only."""
    names = list(seq._modules)
    later = []
    for i, name in enumerate(names):
        norm = seq._modules[name]
        kind = norm_kind(norm)
        if kind is None or any(p.norm == prefix + name for p in ctx.report.pairs):
            continue
        reason = unfoldable_reason(norm)
        if reason:
            ctx.report.pairs.append(FoldPair(prefix + name, None, None, "skipped", reason))
            continue
        affine = module_affine(norm)
        ranks = ctx.ranks.get(id(norm))
        site = _Site(None, None, prefix + name, kind, affine[0].numel(), affine, None, ranks)
        prev = seq._modules[names[i - 1]] if i > 0 else None
        why = "no Conv/ConvTranspose/Linear before it"
        if type(prev) in AFFINE_TYPES:
            why = _previous_reason(prev, site, ranks or ctx.ranks.get(id(prev)))
        if why is None and kind != "add_relu":
            shared = ctx.registrations[id(prev)] > 1
            seq._modules[names[i - 1]] = absorb_into_previous(prev, *affine)
            seq._modules[name] = nn.ReLU() if kind == "relu" else nn.Identity()
            action = "cloned" if shared else "folded"
            text = f"{type(prev).__name__} before it absorbs scale and shift (Sequential)"
            text += "; registered elsewhere too: folded into a copy" if shared else ""
            text += _note(prev, ranks)
            ctx.report.pairs.append(
                FoldPair(prefix + name, prefix + names[i - 1], "before", action, text)
            )
            continue
        later.append((i, name, site, why))
    for i, name, site, why_before in later:
        nxt = seq._modules[names[i + 1]] if i + 1 < len(names) else None
        why = "no Conv/ConvTranspose/Linear after it"
        if site.kind != "plain":
            why = "the ReLU inside the layer follows the affine map"
        elif type(nxt) in AFFINE_TYPES:
            why = None if in_channels(nxt) == site.channels else "channel counts differ"
            why = why or next_exact_reason(nxt, site.ranks)
        if why is None:
            shared = ctx.registrations[id(nxt)] > 1
            seq._modules[names[i + 1]] = absorb_into_next(nxt, *site.affine)
            seq._modules[name] = nn.Identity()
            text = f"{type(nxt).__name__} after it absorbs scale and shift (Sequential)"
            text += _note(nxt, site.ranks)
            action = "cloned" if shared else "folded"
            ctx.report.pairs.append(
                FoldPair(site.name, prefix + names[i + 1], "after", action, text)
            )
        else:
            reason = f"before: {why_before}; after: {why}"
            ctx.report.pairs.append(FoldPair(site.name, None, None, "skipped", reason))


def _fold_module(module: nn.Module, prefix: str, ctx: _Context, top: bool) -> nn.Module:
    if type(module) in AFFINE_TYPES or norm_kind(module) is not None:
        return module  # a leaf: its pairs are found by its parent
    try:
        gm = torch.fx.GraphModule(module, _FoldTracer().trace(module), type(module).__name__)
    except Exception as exc:  # any failure to trace means: look inside instead
        if top:
            ctx.report.discovery = "modules"
            ctx.report.trace_error = describe_exception(exc, library_dirs=(_PACKAGE_DIR,))
        ctx.untraced.append(prefix.rstrip(".") or type(module).__name__)
        for name, child in list(module.named_children()):
            new = _fold_module(child, f"{prefix}{name}.", ctx, top=False)
            if new is not child:
                setattr(module, name, new)
        if _is_sequential(module):
            _fold_sequential(module, prefix, ctx)
        return module
    return gm if fold_graph(gm, prefix, ctx) else module


def fold_model(
    work: nn.Module, report: FoldReport, *, ranks: dict[int, set[int]], recompute_shared: bool
) -> nn.Module:
    """Fold ``work`` (a copy the caller owns) and fill ``report``; the folded module."""
    registrations = Counter(id(m) for _, m in work.named_modules(remove_duplicate=False))
    norms = [name for name, m in work.named_modules() if norm_kind(m) is not None]
    ctx = _Context(report, ranks, registrations, recompute_shared)
    folded = _fold_module(work, "", ctx, top=True)
    seen = {p.norm for p in report.pairs}
    for name in norms:
        if name in seen:
            continue
        if ctx.untraced:
            reason = (
                f"inside a module whose forward does not trace ({', '.join(ctx.untraced)}) and "
                "not next to a Conv/Linear in a Sequential"
            )
        else:
            reason = "never called by the traced forward"
        report.pairs.append(FoldPair(name, None, None, "skipped", reason))
    return folded
