"""Data-parallel training with our SyncBatchNorm on CPU (gloo).

    torchrun --nproc_per_node=2 -m batchnorm.examples.ddp [--steps 200] [--batch 64]

Trains a small CNN on scikit-learn's bundled 8x8 digits (no download), the batch split across
the processes, every BatchNorm2d converted to ``batchnorm.torch.SyncBatchNorm`` so each layer
normalises with the statistics of the *global* batch. Without torchrun it runs as one process.
Rank 0 prints the loss and the test accuracy.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from batchnorm.torch import BatchNorm2d, convert_sync


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32)[:, None]  # (1797, 1, 8, 8)
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return x[:1500], y[:1500], x[1500:], y[1500:]


def small_cnn() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1, bias=False),
        BatchNorm2d(16),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1, bias=False),
        BatchNorm2d(32),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(32 * 16, 10),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64, help="global batch size")
    parser.add_argument("--lr", type=float, default=0.1)
    args = parser.parse_args(argv)

    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    torch.manual_seed(0)  # same initial weights on every rank
    x_train, y_train, x_test, y_test = digits()
    model = convert_sync(small_cnn())
    net = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9)
    gen = torch.Generator().manual_seed(1)  # same batches on every rank; each takes a shard
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(y_train), (args.batch,), generator=gen)
        shard = idx[rank * args.batch // world : (rank + 1) * args.batch // world]
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x_train[shard]), y_train[shard])
        loss.backward()
        opt.step()
        if rank == 0 and (step % 50 == 0 or step == args.steps):
            print(f"step {step:4d}  loss {loss.item():.4f}", flush=True)
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    if rank == 0:
        elapsed = time.perf_counter() - start
        print(
            f"{world} process(es), {args.steps} steps in {elapsed:.1f}s; "
            f"test accuracy {accuracy:.3f} on {len(y_test)} held-out digits"
        )
    if distributed:
        dist.destroy_process_group()
    return 0 if np.isfinite(accuracy) else 1


if __name__ == "__main__":
    raise SystemExit(main())
