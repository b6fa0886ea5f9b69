"""GPU benchmark: our Triton kernels against PyTorch eager and ``torch.compile``.

``run_gpu_bench(args) -> dict`` is what ``batchnorm bench --device cuda`` calls;
``benchmarks/gpu_bench.py`` and ``python -m batchnorm.bench_gpu`` run it standalone.

For every shape x layout (NCHW, channels-last) x dtype (float32, bfloat16) it times, per peer:

* plain batch norm: ``forward`` (training, under no_grad), ``backward`` (autograd.grad on a kept
  graph), ``fwd+bwd``, ``inference``;
* fused tails: ``relu fwd+bwd`` = relu(bn(x)), ``add_relu fwd+bwd`` = relu(bn(x) + residual),
  against PyTorch's unfused sequence of the same ops.

Peers: ``eager`` (``torch.nn.functional``: cuDNN or PyTorch's native kernels), ``compile``
(``torch.compile`` of the same functions), ``ours`` (``batchnorm.torch`` with
``backend="triton"`` and the fused functionals: what a user calls, autograd included) and
``ours-kernels`` (the backend's launchers alone, plain batch norm only: the glue's cost).

Timing: CUDA events around a loop of calls long enough to hide launch latency, median of the
repeats after warm-up. Per timing: ``GBps`` under the bytes model of ``docs/bench.md``
(per tensor of B bytes: forward 3B, backward 5B, fwd+bwd 8B, inference 2B; fused fwd+bwd 8B,
with the residual 10B: its read and its gradient's write; the 1-bit mask is not counted),
``x_copy_bw`` = GBps / the device's copy bandwidth measured in the same run (``dst.copy_(src)``
of 1 GiB), and ``speedup`` = eager's median / this median.

``--quick`` runs two tiny shapes, few repeats, no ``torch.compile``: on a CPU under
``TRITON_INTERPRET=1`` that checks the schema and plumbing, not speed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ._args import out_dir
from .reference.stages import backward_train, forward_train

__all__ = ["SCHEMA", "SHAPES", "build_parser", "main", "run_gpu_bench", "summarize"]

SCHEMA = "batchnorm-gpu-bench/1"
#: ResNet-50 shapes at batch 256, a large-spatial one, and a few-channel one.
SHAPES: list[tuple[int, ...]] = [
    (256, 64, 56, 56),
    (256, 256, 14, 14),
    (256, 2048, 7, 7),
    (64, 32, 128, 128),
    (20, 6, 65536),
]
FEW_CHANNELS = 16  #: shapes with at most this many channels count as "few-channel"
QUICK_SHAPES: list[tuple[int, ...]] = [(4, 3, 6, 5), (6, 3, 16)]
LAYOUTS = ("nchw", "channels_last")
DTYPES = ("float32", "bfloat16")
PEERS = ("eager", "compile", "ours", "ours-kernels")
BASELINE = "eager"
EPS = 1e-5
#: Bytes moved per byte of x when nothing stays in cache between passes.
MODEL_BYTES = {
    "forward": 3,
    "backward": 5,
    "fwd+bwd": 8,
    "inference": 2,
    "relu fwd+bwd": 8,
    "add_relu fwd+bwd": 10,
    "copy": 2,
}
OPS = tuple(op for op in MODEL_BYTES if op != "copy")
LARGE_BYTES = 64 * 2**20  #: tensors at least this big count as "large" for the bandwidth target
#: The targets of issue 7 (reported, never asserted).
TARGETS = {
    "ours fwd+bwd median x_copy_bw (large tensors)": 0.8,
    "ours fwd+bwd median speedup": 1.3,
    "ours fwd+bwd min speedup (few channels)": 3.0,
    "ours relu fwd+bwd median speedup": 1.5,
    "ours add_relu fwd+bwd median speedup": 1.5,
}


# ----------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="batchnorm bench --device cuda",
        description="Time batch norm and the fused BN+ReLU / BN+add+ReLU tails on a GPU: ours "
        "(Triton) vs PyTorch eager and torch.compile. Writes JSON to --out.",
    )
    p.add_argument("--quick", action="store_true", help="two tiny shapes; a plumbing check")
    p.add_argument(
        "--shapes",
        type=_parse_shapes,
        default=None,
        help="comma-separated, e.g. 256x64x56x56,20x6x65536 (default: the ResNet-like set)",
    )
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="nchw,channels_last")
    p.add_argument(
        "--dtypes", "--dtype", default=",".join(DTYPES), help="float32,bfloat16[,float16]"
    )
    p.add_argument("--peers", default=",".join(PEERS), help=f"subset of {','.join(PEERS)}")
    p.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    p.add_argument("--compile", action="store_true", help="(the default; for `batchnorm bench`)")
    p.add_argument("--repeats", type=int, default=None, help="timed samples (default 15)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3)")
    p.add_argument(
        "--tile-elems",
        type=int,
        default=None,
        help="override the kernels' elements per tile (power of two; tuning sweeps)",
    )
    p.add_argument(
        "--programs",
        type=int,
        default=None,
        help="override the reduction grid size aimed at (default 8 per SM)",
    )
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    p.add_argument("--out", type=out_dir, default=Path("benchmarks/results"), help="JSON directory")
    return p


def _parse_shapes(text: str) -> list[tuple[int, ...]]:
    shapes = []
    for item in text.split(","):
        try:
            shape = tuple(int(s) for s in item.strip().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"bad shape {item!r} (want e.g. 256x64x56x56)"
            ) from None
        if len(shape) < 2 or min(shape) < 1:
            raise argparse.ArgumentTypeError(f"shape {item!r} needs >= 2 positive dims")
        shapes.append(shape)
    return shapes


def _settings(args: Any) -> dict[str, Any]:
    """Fill what a caller's Namespace (e.g. ``batchnorm bench``'s) leaves out with defaults."""
    defaults = vars(build_parser().parse_args([]))
    given = {k: getattr(args, k) for k in defaults if getattr(args, k, None) is not None}
    s = {**defaults, **given}
    import torch

    quick = bool(s["quick"])
    device = s["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    peers = [p.strip() for p in str(s["peers"]).split(",") if p.strip()]
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        raise ValueError(f"unknown peers {unknown}; known: {list(PEERS)}")
    if quick or s["no_compile"]:
        peers = [p for p in peers if p != "compile"]
    dtypes = [d.strip() for d in str(s["dtypes"]).split(",") if d.strip()]
    for d in dtypes:
        if d not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype {d!r} is not one of float32, bfloat16, float16")
    layouts = [v.strip() for v in str(s["layouts"]).split(",") if v.strip()]
    for v in layouts:
        if v not in LAYOUTS:
            raise ValueError(f"layout {v!r} is not one of {LAYOUTS}")
    return {
        "quick": quick,
        "device": device,
        "shapes": [list(x) for x in (s["shapes"] or (QUICK_SHAPES if quick else SHAPES))],
        "layouts": layouts,
        "dtypes": dtypes,
        "peers": peers,
        "repeats": max(1, s["repeats"] if s["repeats"] is not None else (2 if quick else 15)),
        "warmup": max(0, s["warmup"] if s["warmup"] is not None else (1 if quick else 3)),
        "out": str(s["out"]),
        "tile_elems": s["tile_elems"],
        "programs": s["programs"],
        "eps": EPS,
        "baseline": BASELINE,
        "model_bytes": MODEL_BYTES,
    }


# ----------------------------------------------------------------------------- timing


class _Timer:
    """Median seconds per call: CUDA events around loops of calls, or perf_counter on CPU."""

    def __init__(self, device: str, repeats: int, warmup: int) -> None:
        self.cuda = device.startswith("cuda")
        self.repeats, self.warmup = repeats, warmup

    def __call__(self, fn: Callable[[], Any]) -> dict[str, float]:
        import torch

        for _ in range(self.warmup):
            fn()
        if not self.cuda:
            samples = []
            for _ in range(self.repeats):
                t0 = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t0)
            return _summary(samples, 1)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        once = start.elapsed_time(end) / 1e3
        # Enough calls per sample (>= 2 ms) that the CPU's launch work overlaps the GPU's.
        calls = max(1, min(200, math.ceil(2e-3 / max(once, 1e-6))))
        samples = []
        for _ in range(self.repeats):
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / calls)
        return _summary(samples, calls)


def _summary(samples: list[float], calls: int) -> dict[str, float]:
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "max_s": max(samples),
        "n": len(samples),
        "calls_per_sample": calls,
    }


def copy_bandwidth(device: str, timer: _Timer, nbytes: int) -> float:
    """GB/s of ``dst.copy_(src)``: one read and one write of ``nbytes``."""
    import torch

    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = timer(lambda: dst.copy_(src))["median_s"]
    return MODEL_BYTES["copy"] * src.numel() * 4 / seconds / 1e9


# ----------------------------------------------------------------------------- problems


def _make(shape: Sequence[int], layout: str, dtype: str, device: str, seed: int) -> Any:
    import torch

    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g).to(device=device, dtype=getattr(torch, dtype))
    if layout == "channels_last":  # channel axis last in memory, any rank
        t = t.movedim(1, -1).contiguous().movedim(-1, 1)
    return t


class _Problem:
    def __init__(self, shape: Sequence[int], layout: str, dtype: str, device: str) -> None:
        import torch

        self.shape, self.layout, self.dtype = tuple(shape), layout, dtype
        self.x = _make(shape, layout, dtype, device, 0)
        self.dy = _make(shape, layout, dtype, device, 1)
        self.residual = _make(shape, layout, dtype, device, 2)
        channels = shape[1]
        g = torch.Generator().manual_seed(3)

        def vec(lo: float, hi: float) -> Any:
            return (torch.rand(channels, generator=g) * (hi - lo) + lo).to(device)

        self.weight, self.bias = vec(0.5, 1.5), vec(-0.5, 0.5)
        self.running_mean, self.running_var = vec(-0.1, 0.1), vec(0.5, 1.5)

    @property
    def nbytes(self) -> int:
        return self.x.numel() * self.x.element_size()

    def leaves(self, residual: bool = False) -> tuple[Any, ...]:
        """Fresh leaves requiring grad: (x, weight, bias[, residual])."""
        out = [self.x, self.weight, self.bias] + ([self.residual] if residual else [])
        return tuple(t.detach().requires_grad_() for t in out)


def _functions(peer: str) -> dict[str, Callable[..., Any]]:
    """The four functions timed for a peer: train(x, w, b), infer(p, x), relu, add_relu."""
    import torch
    import torch.nn.functional as F

    if peer in ("eager", "compile"):

        def train(x, w, b):
            return F.batch_norm(x, None, None, w, b, True, 0.1, EPS)

        def infer(x, rm, rv, w, b):
            return F.batch_norm(x, rm, rv, w, b, False, 0.1, EPS)

        def relu(x, w, b):
            return F.relu(F.batch_norm(x, None, None, w, b, True, 0.1, EPS))

        def add_relu(x, r, w, b):
            return F.relu(F.batch_norm(x, None, None, w, b, True, 0.1, EPS) + r)

        fns = {"train": train, "infer": infer, "relu": relu, "add_relu": add_relu}
        if peer == "compile":
            fns = {k: torch.compile(f, dynamic=False) for k, f in fns.items()}
        return fns

    from .torch import batch_norm
    from .torch.fused import batch_norm_add_relu, batch_norm_relu

    return {
        "train": lambda x, w, b: batch_norm(x, None, None, w, b, True, backend="triton"),
        "infer": lambda x, rm, rv, w, b: batch_norm(x, rm, rv, w, b, False, backend="triton"),
        "relu": lambda x, w, b: batch_norm_relu(x, None, None, w, b, True, backend="triton"),
        "add_relu": lambda x, r, w, b: batch_norm_add_relu(
            x, r, None, None, w, b, True, backend="triton"
        ),
    }


def _ops(peer: str, p: _Problem) -> dict[str, Callable[[], Any]]:
    """op name -> a zero-argument call, for one peer on one problem."""
    import torch

    if peer == "ours-kernels":
        from .kernels import get_backend

        backend = get_backend("triton", p.x)
        saved = forward_train(backend, p.x, p.weight, p.bias, EPS, 1)

        def fwd_bwd() -> Any:
            _, mean, _, invstd, _ = forward_train(backend, p.x, p.weight, p.bias, EPS, 1)
            return backward_train(backend, p.dy, p.x, mean, invstd, p.weight, 1)

        return {
            "forward": lambda: forward_train(backend, p.x, p.weight, p.bias, EPS, 1),
            "backward": lambda: backward_train(backend, p.dy, p.x, saved[1], saved[3], p.weight, 1),
            "fwd+bwd": fwd_bwd,
            "inference": lambda: backend.forward_infer(
                p.x, p.running_mean, p.running_var, p.weight, p.bias, EPS, 1
            ),
        }

    if peer in ("ours",):
        from .kernels import get_backend

        get_backend("triton", p.x)  # raises BackendUnavailable with the reason
    f = _functions(peer)
    leaves, leaves_r = p.leaves(), p.leaves(residual=True)
    kept = f["train"](*leaves)  # a graph to run the backward alone on

    def no_grad(fn: Callable[[], Any]) -> Callable[[], Any]:
        def call() -> Any:
            with torch.no_grad():
                return fn()

        return call

    return {
        "forward": no_grad(lambda: f["train"](p.x, p.weight, p.bias)),
        "backward": lambda: torch.autograd.grad(kept, leaves, p.dy, retain_graph=True),
        "fwd+bwd": lambda: torch.autograd.grad(f["train"](*leaves), leaves, p.dy),
        "inference": no_grad(
            lambda: f["infer"](p.x, p.running_mean, p.running_var, p.weight, p.bias)
        ),
        "relu fwd+bwd": lambda: torch.autograd.grad(f["relu"](*leaves), leaves, p.dy),
        "add_relu fwd+bwd": lambda: torch.autograd.grad(
            f["add_relu"](leaves_r[0], leaves_r[3], leaves_r[1], leaves_r[2]), leaves_r, p.dy
        ),
    }


def _check(peer: str, p: _Problem) -> dict[str, float] | None:
    """Largest difference from eager, relative to eager's largest value (outputs and dx)."""
    import torch

    if peer not in ("ours", "compile"):
        return None
    ours, eager = _functions(peer), _functions("eager")
    out = {}
    for name, wants_residual in (("train", False), ("relu", False), ("add_relu", True)):
        results = []
        for f in (ours, eager):
            leaves = p.leaves(residual=wants_residual)
            args = (leaves[0], leaves[3], *leaves[1:3]) if wants_residual else leaves
            y = f[name](*args)
            (dx,) = torch.autograd.grad(y, leaves[:1], p.dy)
            results.append((y.detach().float(), dx.float()))
        for what, i in (("y", 0), ("dx", 1)):
            a, b = results[0][i], results[1][i]
            out[f"{name} {what}"] = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
    return out


# ----------------------------------------------------------------------------- running


def run_gpu_bench(args: Any) -> dict[str, Any]:
    """Run the benchmark; returns the JSON-able record.

    ``args``: an ``argparse.Namespace`` from :func:`build_parser` (attributes it lacks take their
    defaults) or a list of command-line strings.
    """
    import torch

    if isinstance(args, (list, tuple)):
        args = build_parser().parse_args(list(args))
    settings = _settings(args)
    device = settings["device"]
    if any(p == "compile" for p in settings["peers"]):
        _raise_recompile_limits()
    timer = _Timer(device, settings["repeats"], settings["warmup"])
    copy_bytes = 2**20 if settings["quick"] or not device.startswith("cuda") else 2**30
    record: dict[str, Any] = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": _device_name(device),
        "machine": _machine(device),
        "settings": settings,
        "copy_GBps": copy_bandwidth(device, timer, copy_bytes),
        "results": [],
    }
    from .kernels import triton_gpu

    with triton_gpu.tuning(tile_elems=settings["tile_elems"], programs=settings["programs"]):
        for shape in settings["shapes"]:
            for layout in settings["layouts"]:
                for dtype in settings["dtypes"]:
                    record["results"].append(_run_problem(shape, layout, dtype, settings, timer))
                    if device.startswith("cuda"):
                        torch.cuda.empty_cache()
    record["summary"] = summarize(record)
    return record


def _run_problem(shape, layout, dtype, settings, timer) -> dict[str, Any]:
    p = _Problem(shape, layout, dtype, settings["device"])
    entry: dict[str, Any] = {
        "shape": list(shape),
        "layout": layout,
        "dtype": dtype,
        "bytes": p.nbytes,
        "skipped": {},
        "max_rel_diff_vs_eager": {},
        "timings": [],
    }
    for peer in settings["peers"]:
        try:
            ops = _ops(peer, p)
            diff = _check(peer, p)
        except Exception as exc:  # a peer that cannot run here is recorded, not fatal
            entry["skipped"][peer] = f"{type(exc).__name__}: {exc}"
            continue
        if diff is not None:
            entry["max_rel_diff_vs_eager"][peer] = diff
        for op, fn in ops.items():
            try:
                entry["timings"].append({"peer": peer, "op": op, **timer(fn)})
            except Exception as exc:
                entry["skipped"][f"{peer} {op}"] = f"{type(exc).__name__}: {exc}"
    return entry


def summarize(record: dict[str, Any]) -> dict[str, Any]:
    """Per-timing GB/s, fraction of copy bandwidth and speed-up; per peer/op medians; targets."""
    copy = record["copy_GBps"]
    cells: dict[tuple[str, str], dict[str, list[float]]] = {}
    few, large = [], []
    for entry in record["results"]:
        base = {t["op"]: t["median_s"] for t in entry["timings"] if t["peer"] == BASELINE}
        for t in entry["timings"]:
            t["GBps"] = MODEL_BYTES[t["op"]] * entry["bytes"] / t["median_s"] / 1e9
            t["x_copy_bw"] = t["GBps"] / copy
            t["speedup"] = base[t["op"]] / t["median_s"] if t["op"] in base else None
            cell = cells.setdefault((t["peer"], t["op"]), {"speedup": [], "x_copy_bw": []})
            if t["speedup"] is not None:
                cell["speedup"].append(t["speedup"])
            cell["x_copy_bw"].append(t["x_copy_bw"])
            if t["peer"] == "ours" and t["op"] == "fwd+bwd":
                if entry["shape"][1] <= FEW_CHANNELS and t["speedup"] is not None:
                    few.append(t["speedup"])
                if entry["bytes"] >= LARGE_BYTES:
                    large.append(t["x_copy_bw"])
    per_peer: dict[str, Any] = {}
    for (peer, op), cell in sorted(cells.items()):
        per_peer.setdefault(peer, {})[op] = {
            "median_speedup": _median(cell["speedup"]),
            "min_speedup": min(cell["speedup"]) if cell["speedup"] else None,
            "median_x_copy_bw": _median(cell["x_copy_bw"]),
        }
    ours = per_peer.get("ours", {})
    values = {
        "ours fwd+bwd median x_copy_bw (large tensors)": _median(large),
        "ours fwd+bwd median speedup": ours.get("fwd+bwd", {}).get("median_speedup"),
        "ours fwd+bwd min speedup (few channels)": min(few) if few else None,
        "ours relu fwd+bwd median speedup": ours.get("relu fwd+bwd", {}).get("median_speedup"),
        "ours add_relu fwd+bwd median speedup": ours.get("add_relu fwd+bwd", {}).get(
            "median_speedup"
        ),
    }
    on_gpu = record["settings"]["device"].startswith("cuda") and not record["settings"]["quick"]
    targets = {
        name: {
            "target": target,
            "value": values[name],
            # A CPU (interpreter) or --quick run says nothing about the GPU targets.
            "met": None if values[name] is None or not on_gpu else values[name] >= target,
        }
        for name, target in TARGETS.items()
    }
    return {"per_peer": per_peer, "targets": targets}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _raise_recompile_limits() -> None:
    """Every shape x layout x dtype is its own graph: let dynamo keep them all compiled."""
    import torch._dynamo

    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 1024)


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()})"


def _machine(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    from .kernels import triton_gpu

    info["triton_interpreter"] = triton_gpu.is_interpreter()
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = {
            "name": props.name,
            "sms": props.multi_processor_count,
            "memory_GiB": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
        }
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


# ----------------------------------------------------------------------------- output


def format_table(record: dict[str, Any]) -> str:
    lines = [f"{record['device']}: copy bandwidth {record['copy_GBps']:.1f} GB/s"]
    for entry in record["results"]:
        shape = "x".join(map(str, entry["shape"]))
        lines.append(
            f"{shape} {entry['layout']} {entry['dtype']} ({entry['bytes'] / 2**20:.0f} MiB)"
        )
        lines.append(f"  {'op':<18}{'peer':<14}{'ms':>9}{'GB/s':>9}{'x copy':>8}{'speed-up':>10}")
        for t in sorted(
            entry["timings"], key=lambda t: (OPS.index(t["op"]), PEERS.index(t["peer"]))
        ):
            speedup = "" if t["speedup"] is None else f"{t['speedup']:.2f}x"
            lines.append(
                f"  {t['op']:<18}{t['peer']:<14}{t['median_s'] * 1e3:>9.3f}{t['GBps']:>9.0f}"
                f"{t['x_copy_bw']:>8.2f}{speedup:>10}"
            )
        for peer, diffs in entry["max_rel_diff_vs_eager"].items():
            worst = max(diffs.values())
            lines.append(f"  {peer}: largest relative difference from eager {worst:.1e}")
        for peer, reason in entry["skipped"].items():
            lines.append(f"  {peer}: skipped ({reason})")
    lines.append("targets (issue 7):")
    for name, cell in record["summary"]["targets"].items():
        value = "n/a" if cell["value"] is None else f"{cell['value']:.2f}"
        state = {True: "met", False: "NOT met", None: "n/a"}[cell["met"]]
        lines.append(f"  {name:<48}{value:>7} (target >= {cell['target']}): {state}")
    return "\n".join(lines)


def write_record(record: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", record["device"].lower()).strip("-")
    stamp = record["created"][:19].replace(":", "").replace("-", "")
    quick = "-quick" if record["settings"]["quick"] else ""
    path = out / f"gpu-bench-{slug}{quick}-{stamp}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        record = run_gpu_bench(args)
    except ValueError as exc:
        print(f"batchnorm bench: {exc}", file=sys.stderr)
        return 2
    print(format_table(record))
    print(f"wrote {write_record(record, Path(record['settings']['out']))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
