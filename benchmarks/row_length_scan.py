"""Nanoseconds per element of each Numba stage by row length: where LLVM's vectorisation drops.

``python benchmarks/row_length_scan.py [--dtype float32] [--threads 1] [--values 1048576]``:
for each row length (values per (n, c), "inner"), an input of about ``--values`` values
shaped (N, 64, inner), and the median time of ``NumbaBackend``'s batch statistics, training
forward (plain and with the fused ReLU), the fused ReLU's backward through its mask, and the
fused training backward, divided by the number of values. A stage whose figure jumps at some
row lengths runs scalar code there (docs/kernels.md, "The fused ReLU's mask": rows of 128-319
values took 20x longer in the ReLU backward until that loop was rewritten). Rows shorter than
``ROWS_MIN_INNER`` (128) run the cols layout.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numba
import torch

from batchnorm.kernels.numba_cpu.backend import NumbaBackend

INNER = [16, 64, 100, 128, 160, 196, 256, 300, 392, 512, 784, 1024, 3136]


def median_ms(fn, repeats: int) -> float:
    fn()  # compile, or load from the cache
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def stages(b: NumbaBackend, x: torch.Tensor, dy: torch.Tensor) -> dict:
    out = b.forward_train(x, None, None, 1e-5, 1, relu=True)
    return {
        "stats": lambda: b.batch_stats(x, 1),
        "forward": lambda: b.forward_train(x, None, None, 1e-5, 1),
        "forward_relu": lambda: b.forward_train(x, None, None, 1e-5, 1, relu=True),
        "relu_backward": lambda: b.relu_backward(dy, x, out.relu_mask, 1),
        "backward": lambda: b.backward_train(dy, x, out.mean, out.invstd, None, 1),
    }


def scan(dtype: torch.dtype, values: int, inner: list[int], repeats: int) -> list[dict]:
    b = NumbaBackend()
    rows = []
    for n_inner in inner:
        channels = 64
        batch = max(1, values // (channels * n_inner))
        x = torch.randn(batch, channels, n_inner).to(dtype)
        dy = torch.randn(x.shape).to(dtype)
        per_value = {
            k: median_ms(f, repeats) * 1e6 / x.numel() for k, f in stages(b, x, dy).items()
        }
        rows.append({"inner": n_inner, "values": x.numel(), **per_value})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"]
    )
    parser.add_argument("--threads", type=int, default=1, help="numba.set_num_threads")
    parser.add_argument("--values", type=int, default=1 << 20, help="values per input, about")
    parser.add_argument("--inner", default=",".join(map(str, INNER)), help="row lengths")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    numba.set_num_threads(args.threads)
    inner = [int(v) for v in args.inner.split(",")]
    rows = scan(getattr(torch, args.dtype), args.values, inner, args.repeats)
    names = [k for k in rows[0] if k not in ("inner", "values")]
    print(f"{args.dtype}, {args.threads} Numba thread(s), ns per value (median of {args.repeats})")
    print(f"{'inner':>6} " + " ".join(f"{k:>14}" for k in names))
    for r in rows:
        print(f"{r['inner']:>6} " + " ".join(f"{r[k]:>14.2f}" for k in names))


if __name__ == "__main__":
    main()
