"""One rank of a multi-process SyncBatchNorm test; run by test_sync.py, results to an .npz file.

usage: worker.py MODE RANK WORLD INIT_FILE OUT_FILE [options as key=value]
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from batchnorm.torch import BatchNorm2d, SyncBatchNorm, convert_sync

CHANNELS = 3


def global_batch(sizes, dtype, seed=0, channels=CHANNELS, hw=(4, 5)):
    """Every rank builds the same global batch and takes its own slice."""
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x = torch.randn(n, channels, *hw, generator=g, dtype=torch.float64) * 2 + 0.5
    dy = torch.randn(n, channels, *hw, generator=g, dtype=torch.float64)
    return x.to(dtype), dy.to(dtype)


def shape_options(opts):
    """``channels=C`` and ``hw=H,W`` (defaults: CHANNELS and 4,5)."""
    channels = int(opts.get("channels", CHANNELS))
    hw = tuple(int(v) for v in opts.get("hw", "4,5").split(","))
    return channels, hw


def small_cnn(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
    ).to(dtype)


def run_bn(rank, world, opts, out):
    sizes = [int(s) for s in opts["sizes"].split(",")]
    dtype = getattr(torch, opts.get("dtype", "float64"))
    channels_last = opts.get("channels_last") == "1"
    channels, hw = shape_options(opts)
    bn = SyncBatchNorm(channels, momentum=0.3, backend=opts.get("backend", "auto")).to(dtype)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, channels))
        bn.bias.copy_(torch.linspace(-1, 1, channels))
    results = {}
    for step in range(2):
        x_all, dy_all = global_batch(sizes, dtype, step, channels, hw)
        start = sum(sizes[:rank])
        x = x_all[start : start + sizes[rank]].clone()
        dy = dy_all[start : start + sizes[rank]]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        bn.zero_grad()
        y = bn(x)
        (y * dy).sum().backward()
        results[f"y{step}"] = y.detach().double().numpy()
        results[f"dx{step}"] = x.grad.double().numpy()
        results[f"dweight{step}"] = bn.weight.grad.double().numpy()
        results[f"dbias{step}"] = bn.bias.grad.double().numpy()
        results[f"channels_last{step}"] = np.array(
            y.is_contiguous(memory_format=torch.channels_last)
        )
        results[f"backend{step}"] = np.array(bn.last_backend)
    results["running_mean"] = bn.running_mean.double().numpy()
    results["running_var"] = bn.running_var.double().numpy()
    results["num_batches_tracked"] = bn.num_batches_tracked.numpy()
    np.savez(out, **results)


def precise_model():
    """Our BatchNorm2d, torch.nn's and our SyncBatchNorm, for PreciseBN across ranks."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(CHANNELS, 4, 3),
        BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        SyncBatchNorm(4),
    ).double()


def precise_batches(counts):
    """Every rank builds the same list of batches; rank r takes the r-th run of counts[r]."""
    g = torch.Generator().manual_seed(7)
    batches = [
        torch.randn(3 + i % 3, CHANNELS, 6, 6, generator=g, dtype=torch.float64) * 2 + 1
        for i in range(sum(counts))
    ]
    starts = [sum(counts[:r]) for r in range(len(counts))]
    return batches, [batches[s : s + c] for s, c in zip(starts, counts, strict=True)]


def run_precise(rank, world, opts, out):
    from batchnorm.torch.lifecycle import recompute_stats

    counts = [int(c) for c in opts["batches"].split(",")]
    model = precise_model()
    _, shards = precise_batches(counts)
    summary = recompute_stats(model, shards[rank], estimator=opts.get("estimator", "population"))
    state = {k: v.double().numpy() for k, v in model.state_dict().items() if "running" in k}
    np.savez(out, count=np.array(summary["1"].count), **state)


def masked_batch(rank):
    """Rank r's (N, C, L) batch and its mask; the ranks' masks differ (one rank pads more)."""
    g = torch.Generator().manual_seed(11 + rank)
    x = torch.randn(3, CHANNELS, 8, generator=g, dtype=torch.float64) * 2 + rank
    lengths = torch.tensor([8, 3, 5]) if rank == 0 else torch.tensor([2, 0, 6])
    mask = torch.arange(8)[None, :] < lengths[:, None]
    return x.masked_fill(~mask[:, None, :], float("nan")), mask


def run_masked(rank, world, opts, out):
    """``layout=nlc``: the (N, L, C) form; ``path=compaction``: the backend made to look as if
    it had no masked stages. ``native`` records whether a stage was called with ``mask=``."""
    from batchnorm.kernels import select_backend

    bn = SyncBatchNorm(CHANNELS, backend=opts.get("backend", "auto")).double()
    x, mask = masked_batch(rank)
    stages, called = select_backend(x, bn.backend)[0], []
    if opts.get("path") == "compaction":
        stages.supports_mask = False
    for name in ("batch_stats", "backward_reduce"):
        original = getattr(stages, name)

        def spy(*args, _original=original, **kwargs):
            called.append(kwargs.get("mask") is not None)
            return _original(*args, **kwargs)

        setattr(stages, name, spy)
    x.requires_grad_(True)
    nlc = opts.get("layout") == "nlc"
    y = bn(x.transpose(1, 2).contiguous().transpose(1, 2) if nlc else x, mask=mask)
    (y.nan_to_num() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    np.savez(
        out, y=y.detach().numpy(), dx=x.grad.numpy(), running_mean=bn.running_mean.numpy(),
        running_var=bn.running_var.numpy(), dweight=bn.weight.grad.numpy(),
        native=np.array(any(called)), nlc_layout=np.array(y.transpose(1, 2).is_contiguous()),
    )  # fmt: skip


def run_accumulate(rank, world, opts, out):
    """SyncBatchNorm inside accumulate_stats: two micro-batches per rank, one update."""
    from batchnorm.torch import accumulate_stats

    bn = SyncBatchNorm(CHANNELS, backend=opts.get("backend", "auto")).double()
    x_all, _ = global_batch([4] * (2 * world), torch.float64)
    with accumulate_stats(bn):
        for micro in range(2):
            start = (2 * rank + micro) * 4
            bn(x_all[start : start + 4])
    np.savez(
        out, running_mean=bn.running_mean.numpy(), running_var=bn.running_var.numpy(),
        num_batches_tracked=bn.num_batches_tracked.numpy(),
    )  # fmt: skip


def run_ddp(rank, world, opts, out):
    steps, n = int(opts.get("steps", 20)), int(opts.get("n", 12))
    model = convert_sync(small_cnn(torch.float64))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64)
        target = torch.randint(0, 3, (n,), generator=g)
        shard = slice(rank * n // world, (rank + 1) * n // world)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(ddp(x[shard]), target[shard])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    state = {k: v.double().numpy() for k, v in model.state_dict().items()}
    np.savez(out, losses=np.array(losses), **{f"state.{k}": v for k, v in state.items()})


def run_die(rank, world, opts, out):
    if rank == 1:
        os._exit(3)  # a rank that disappears without a word
    bn = SyncBatchNorm(CHANNELS)
    start = time.monotonic()
    try:
        bn(torch.randn(4, CHANNELS, 2, 2))
        message = "no error"
    except Exception as exc:  # the test reads the type and message
        message = f"{type(exc).__name__}: {exc}"
    np.savez(out, message=np.array(message), elapsed=np.array(time.monotonic() - start))


def run_mismatch(rank, world, opts, out):
    bn = SyncBatchNorm(CHANNELS + rank)
    try:
        bn(torch.randn(4, CHANNELS + rank, 2, 2))
        message = "no error"
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}"
    np.savez(out, message=np.array(message))


def run_edges(rank, world, opts, out):
    """eps = 0 refused on every rank; a rank outside process_group normalises alone."""
    bn = SyncBatchNorm(CHANNELS, eps=0.0)
    try:
        bn(torch.randn(4, CHANNELS, 2, 2))
        eps_message = "no error"
    except Exception as exc:
        eps_message = f"{type(exc).__name__}: {exc}"
    group = dist.new_group([0])  # every rank must create it; only rank 0 is a member
    torch.manual_seed(rank)
    x = torch.randn(4, CHANNELS, 2, 2, dtype=torch.float64)
    alone = SyncBatchNorm(CHANNELS, process_group=group).double()
    local = BatchNorm2d(CHANNELS).double()
    y, want = alone(x), local(x)
    np.savez(
        out,
        eps_message=np.array(eps_message),
        gap=np.array(float((y - want).abs().max())),
        running_gap=np.array(float((alone.running_var - local.running_var).abs().max())),
        unchanged=np.array(bool(torch.all(bn.running_var == 1))),
    )


def main(argv):
    mode, rank, world, init_file, out = argv[:5]
    opts = dict(a.split("=", 1) for a in argv[5:])
    rank, world = int(rank), int(world)
    timeout = timedelta(seconds=float(opts.get("timeout", 60)))
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timeout
    )
    modes = {"bn": run_bn, "ddp": run_ddp, "die": run_die, "mismatch": run_mismatch}
    modes["edges"] = run_edges
    modes["precise"] = run_precise
    modes["masked"] = run_masked
    modes["accumulate"] = run_accumulate
    modes[mode](rank, world, opts, out)
    if mode != "die":
        dist.barrier()
        dist.destroy_process_group()
    else:
        os._exit(0)  # the group is broken; skip the teardown handshake


if __name__ == "__main__":
    main(sys.argv[1:])
