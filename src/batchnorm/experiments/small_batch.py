"""Small batches: batch norm, Batch Renorm, Ghost batch norm and GroupNorm against the size of
the batches the statistics come from; and what padding does to plain batch norm.

``accuracy``: a small 1-D CNN (as in ``precise``) on MNIST-1D or digits, trained on the same
number of samples at each per-batch size ``b``: plain batch norm and Batch Renorm on batches of
``b``; Ghost batch norm on batches of ``ghost_batch`` samples cut into virtual batches of ``b``;
``torch.nn.GroupNorm`` (4 groups), which does not depend on the batch, as the baseline. Test
accuracy in eval mode, several seeds. The papers' claims: batch norm degrades at small batches
(Wu & He 2018, Figure 1: ImageNet error grows quickly below 8 per GPU); Batch Renorm recovers
much of it (Ioffe 2017, micro-batches of 4); ghost batches of a few samples inside a large
batch help generalisation (Hoffer et al. 2017). The record says what this run shows.

``padding``: a batch of sequences with fixed real values padded with 0 .. ``max_pad`` zeros:
the largest change of plain batch norm's output at the real positions against no padding, and
the masked form's (0 by construction).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .common import Timer, mean_and_spread, resolve_settings, write_records

__all__ = ["run", "DEFAULTS", "QUICK", "padding_drift"]

DEFAULTS = {"sizes": (2, 4, 8, 16, 32, 64), "seeds": 3, "samples": 6000, "ghost_batch": 64}
QUICK = {"sizes": (2, 8, 32), "seeds": 2, "samples": 1500, "ghost_batch": 64}
NORMS = {
    "bn": "batch norm",
    "renorm": "Batch Renorm",
    "ghost": "Ghost batch norm",
    "group": "GroupNorm (no batch)",
}


def _norm(kind: str, channels: int, size: int, backend: str) -> Any:
    import torch

    from ..torch import BatchNorm1d, BatchRenorm1d, GhostBatchNorm1d

    if kind == "bn":
        return BatchNorm1d(channels, backend=backend)
    if kind == "renorm":
        return BatchRenorm1d(channels, r_max=3.0, d_max=5.0, warmup=50, r_max_at=300,
                             d_max_at=200, momentum=0.01, backend=backend)  # fmt: skip
    if kind == "ghost":
        return GhostBatchNorm1d(channels, size, backend=backend)
    return torch.nn.GroupNorm(4, channels)


def _cnn(kind: str, length: int, classes: int, size: int, backend: str) -> Any:
    from torch import nn

    return nn.Sequential(
        nn.Unflatten(1, (1, length)),
        nn.Conv1d(1, 16, 5, padding=2),
        _norm(kind, 16, size, backend),
        nn.ReLU(),
        nn.Conv1d(16, 32, 5, padding=2, stride=2),
        _norm(kind, 32, size, backend),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(4),
        nn.Flatten(),
        nn.Linear(128, classes),
    )


def _train(kind: str, size: int, tensors: dict[str, Any], settings: dict[str, Any], *,
           seed: int, lr: float, backend: str) -> float:  # fmt: skip
    import torch

    from .models import batches

    torch.manual_seed(seed)
    x, y = tensors["x_train"], tensors["y_train"]
    model = _cnn(kind, x.shape[1], int(y.max()) + 1, size, backend)
    batch = settings["ghost_batch"] if kind == "ghost" else size
    optimizer = torch.optim.SGD(model.parameters(), lr=lr * batch / 32, momentum=0.9)
    stream = batches(x.shape[0], batch, np.random.default_rng(seed))
    model.train()
    for _ in range(max(1, settings["samples"] // batch)):
        index = torch.as_tensor(next(stream))
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x[index]), y[index]).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = model(tensors["x_test"])
    return float((logits.argmax(1) == tensors["y_test"]).double().mean())


def padding_drift(max_pad: int = 64, step: int = 8, seed: int = 0) -> list[dict[str, Any]]:
    """Largest |output - output without padding| at the real positions, plain and masked."""
    import torch

    from ..torch import BatchNorm1d

    g = torch.Generator().manual_seed(seed)
    real = torch.randn(4, 8, 24, generator=g, dtype=torch.float64) * 2 + 1
    lengths = torch.tensor([24, 17, 9, 20])
    base_mask = torch.arange(24)[None, :] < lengths[:, None]
    real = real * base_mask[:, None, :]
    rows = []
    reference = {}
    for pad in range(0, max_pad + 1, step):
        x = torch.cat([real, torch.zeros(4, 8, pad, dtype=torch.float64)], 2)
        mask = torch.cat([base_mask, torch.zeros(4, pad, dtype=torch.bool)], 1)
        outputs = {
            "plain": BatchNorm1d(8).double()(x)[..., :24],
            "masked": BatchNorm1d(8).double()(x, mask=mask)[..., :24],
        }
        row = {"padding": pad}
        for name, y in outputs.items():
            reference.setdefault(name, y)
            drift = (y - reference[name]).transpose(1, 2)[base_mask].abs().max()
            row[f"{name}_drift"] = float(drift.detach())
        rows.append(row)
    return rows


def run(
    out: str | Path,
    *,
    data: str = "mnist1d",
    seed: int = 0,
    seeds: int | None = None,
    lr: float = 0.1,
    quick: bool = False,
    backend: str = "auto",
    progress: bool = True,
    plot: bool = True,
) -> dict[str, Any]:
    from .common import progress as bar
    from .models import load_tensors

    settings = resolve_settings(DEFAULTS, QUICK, quick=quick, steps=None, seeds=seeds)
    dataset, tensors = load_tensors(data)
    jobs = [(k, s, seed + i) for k in NORMS for s in settings["sizes"]
            for i in range(settings["seeds"])]  # fmt: skip
    accuracy: dict[str, dict[int, list[float]]] = {k: {} for k in NORMS}
    with Timer() as timer:
        for kind, size, run_seed in bar(jobs, total=len(jobs), desc="small-batch",
                                        enabled=progress):  # fmt: skip
            value = _train(kind, size, tensors, settings, seed=run_seed, lr=lr, backend=backend)
            accuracy[kind].setdefault(size, []).append(value)
        drift = padding_drift()
    sizes = list(settings["sizes"])
    curves = {k: mean_and_spread([[accuracy[k][s][i] for s in sizes]
                                  for i in range(settings["seeds"])]) for k in NORMS}  # fmt: skip
    smallest, largest = sizes[0], sizes[-1]
    mean = {k: {s: float(np.mean(accuracy[k][s])) for s in sizes} for k in NORMS}
    summary = {
        "bn_drop": mean["bn"][largest] - mean["bn"][smallest],
        "renorm_minus_bn_at_smallest": mean["renorm"][smallest] - mean["bn"][smallest],
        "ghost_minus_bn_at_smallest": mean["ghost"][smallest] - mean["bn"][smallest],
        "group_minus_bn_at_smallest": mean["group"][smallest] - mean["bn"][smallest],
        "accuracy": {k: {str(s): v for s, v in m.items()} for k, m in mean.items()},
        "max_plain_padding_drift": max(r["plain_drift"] for r in drift),
        "max_masked_padding_drift": max(r["masked_drift"] for r in drift),
        "seconds": timer.seconds,
    }
    record = {
        "experiment": "small-batch",
        "data": dataset.name,
        "settings": {**settings, "sizes": sizes, "lr": lr, "backend": backend, "seed": seed},
        "sizes": sizes,
        "curves": curves,
        "padding": drift,
        "summary": summary,
    }
    rows = [{"norm": k, "batch": s, "seed_index": i, "test_accuracy": a}
            for k in NORMS for s in sizes for i, a in enumerate(accuracy[k][s])]  # fmt: skip
    write_records(out, record, {"small_batch.csv": rows, "padding.csv": drift})
    if plot:
        from .plots import plot_small_batch

        plot_small_batch(out)
    return record
