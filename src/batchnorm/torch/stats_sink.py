"""Where a training batch's statistics go: the one switch behind every running-statistics policy.

A layer in training computes its batch's ``(mean, var, count)``; by default they are folded into
the running buffers at once (``functional.write_running_stats``: PyTorch's momentum convention,
unbiased running variance, non-finite channels kept). A *sink* takes them instead:

* ``DROP`` keeps nothing: a forward recomputed by activation checkpointing (``recomputing``).
* ``Collector`` keeps every call's ``(count, mean, M2)`` in float64 for an exact merge later
  (``reference.merge_stats``): gradient accumulation writes the merge once
  (``lifecycle.accumulate_stats``).

``stats_sink_for(module)`` says which applies to a call; ``deliver`` hands a module's batch
statistics to it, or writes and counts them (with the module's ``_write_batch_stats`` where a
variant has its own convention).
"""

from __future__ import annotations

from typing import Any

import torch

from .. import reference as ref

__all__ = ["DROP", "Collector", "deliver", "recomputing", "stats_sink_for", "write_for"]


def recomputing() -> bool:
    """True while autograd's engine is running a backward pass. A layer's forward then is
    activation checkpointing's recomputation (``torch.utils.checkpoint``, reentrant or not: both
    recompute inside the backward), which must normalise as the first forward did but must not
    count the batch a second time (PyTorch #96136)."""
    return torch._C._current_graph_task_id() != -1


class _Drop:
    """A sink that keeps nothing."""

    def __call__(self, mean: torch.Tensor, var: torch.Tensor, count: Any) -> None:
        return None

    def __repr__(self) -> str:
        return "DROP"


DROP = _Drop()


class Collector:
    """Keeps each call's statistics in float64: ``count`` values per channel, biased ``var``."""

    def __init__(self) -> None:
        self.counts: list[float] = []
        self.means: list[torch.Tensor] = []
        self.m2s: list[torch.Tensor] = []

    def __call__(self, mean: torch.Tensor, var: torch.Tensor, count: Any) -> None:
        count = float(count)
        mean64 = mean.detach().to(torch.float64)
        self.counts.append(count)
        self.means.append(mean64)
        self.m2s.append(var.detach().to(torch.float64) * count)

    def __len__(self) -> int:
        return len(self.counts)

    def merged(self) -> ref.BatchStats:
        """The exact statistics of all calls together, as one batch (Chan et al.). A channel
        that was not finite in any call stays non-finite, so the buffers' guard keeps it out."""
        device = self.means[0].device
        counts = torch.tensor(self.counts, dtype=torch.float64, device=device)
        return ref.merge_stats(counts, torch.stack(self.means), torch.stack(self.m2s))


def stats_sink_for(module: Any) -> Any:
    """The sink of this call of a training ``module``: ``None`` for the buffers themselves."""
    if recomputing():
        return DROP
    return getattr(module, "_stats_sink", None)


def write_for(module: Any) -> Any:
    """How ``module`` writes merged statistics into its buffers: a variant's own convention
    (``_write_batch_stats``) or PyTorch's (``functional.write_module_stats``)."""
    own = getattr(module, "_write_batch_stats", None)
    if own is not None:
        return own
    from .functional import write_module_stats

    return lambda mean, var, count: write_module_stats(module, mean, var, count)


def deliver(module: Any, mean: torch.Tensor, var: torch.Tensor, count: Any) -> None:
    """A training batch's statistics to ``module``'s sink, or into its buffers, counted."""
    sink = stats_sink_for(module)
    if sink is not None:
        sink(mean, var, count)
        return
    write_for(module)(mean, var, count)
    with torch.no_grad():
        module.num_batches_tracked.add_(1)
