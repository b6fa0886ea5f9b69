"""``batchnorm bench``: time our kernels against PyTorch, in one process, on this machine.

For every shape it times four operations (``forward`` = training forward, ``backward`` = its
backward given the saved statistics, ``fwd+bwd``, ``inference``) for every *peer* that can run
on the chosen device, together with plain copies of the same tensor, interleaving the peers
round by round so that drift in machine load hits them alike. It reports the median of the
timed repeats (after warm-up) and, per timing:

* ``speedup``: PyTorch eager's median / this median (same shape, same run);
* ``x_copy``: this median / the median of ``dst.copy_(x)`` (one read + one write of x);
* ``x_clone``: this median / the median of ``x.clone()`` (the same plus a fresh output, whose
  first touch costs page faults: what every out-of-place op pays);
* ``x_limit``: this median / the bandwidth limit of the operation, from the bytes model of
  ``docs/bench.md`` (per tensor of B bytes: inference 2B, forward 3B, backward 5B, fwd+bwd 8B,
  a copy 2B; less when a channel stays in cache, so x_limit < 1 is possible).

Peers are entries of ``PEERS``: a fast backend of ``batchnorm.kernels`` is one
``BackendPeer(name, devices)`` line; PyTorch eager, ``torch.compile`` (``--compile``) and the
NumPy reference are the others. Results go to ``OUT/bench-<device>.json`` and a PNG chart.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._args import non_negative_int, out_dir, positive_int
from .reference.stages import backward_train, forward_train

__all__ = ["main", "PEERS", "Peer", "BackendPeer", "DEFAULT_SHAPES", "QUICK_SHAPES", "run"]

SCHEMA = "batchnorm-bench/1"
OPS = ("forward", "backward", "fwd+bwd", "inference")
#: Bytes moved per byte of the input, if nothing stays in cache between passes.
MODEL_BYTES = {"forward": 3, "backward": 5, "fwd+bwd": 8, "inference": 2, "copy": 2}
#: (shape, layout): layout "nchw" (contiguous, channel axis 1), "nhwc" (channels-last memory,
#: torch channels_last / NumPy axis=-1), "nc" (2-D).
DEFAULT_SHAPES: list[tuple[tuple[int, ...], str]] = [
    ((32, 128, 56, 56), "nchw"),
    ((64, 256, 14, 14), "nchw"),
    ((16, 64, 112, 112), "nhwc"),
    ((4096, 1024), "nc"),
]
QUICK_SHAPES: list[tuple[tuple[int, ...], str]] = [
    ((4, 16, 12, 12), "nchw"),
    ((4, 8, 10, 10), "nhwc"),
    ((128, 32), "nc"),
]
REPRESENTATIVE_SHAPES: list[tuple[tuple[int, ...], str]] = [((32, 64, 56, 56), "nchw")]
#: The targets of issue 4 (reported, never asserted).
TARGETS = {
    "fwd+bwd median speedup": 3.0,
    "fwd+bwd min speedup": 1.5,
    "fwd+bwd median x_copy": 3.5,
    "inference median speedup": 1.5,
}
EPS = 1e-5


# -------------------------------------------------------------------------------------------
# problems and peers
# -------------------------------------------------------------------------------------------


@dataclass
class Problem:
    """One shape's tensors on the device (torch), plus NumPy twins made on demand."""

    shape: tuple[int, ...]
    layout: str
    dtype: str
    device: str
    x: Any
    dy: Any
    weight: Any
    bias: Any
    running_mean: Any
    running_var: Any
    _numpy: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return self.x.numel() * self.x.element_size()

    def numpy(self) -> dict[str, Any]:
        """NumPy copies in NumPy's own convention: channels-last data with ``axis=-1``."""
        if not self._numpy:
            import torch

            def conv(t):
                if self.layout == "nhwc":
                    t = t.movedim(1, -1).contiguous()
                return t.detach().cpu().numpy()

            self._numpy.update(
                x=conv(self.x),
                dy=conv(self.dy),
                axis=-1 if self.layout == "nhwc" else 1,
                **{
                    k: getattr(self, k).detach().to(torch.float32).cpu().numpy()
                    for k in ("weight", "bias", "running_mean", "running_var")
                },
            )
        return self._numpy


def make_problem(shape: Sequence[int], layout: str, dtype: str, device: str, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    tdt = getattr(torch, dtype)
    channels = shape[1]

    def data(*s):
        return torch.randn(*s, generator=gen).to(device=device, dtype=tdt)

    x, dy = data(*shape), data(*shape)
    if layout == "nhwc":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
    pdt = torch.float64 if dtype == "float64" else torch.float32

    def vec(lo, hi):
        return (torch.rand(channels, generator=gen) * (hi - lo) + lo).to(device=device, dtype=pdt)

    return Problem(
        tuple(shape), layout, dtype, device, x, dy,
        weight=vec(0.5, 1.5), bias=vec(-1, 1), running_mean=vec(-0.1, 0.1),
        running_var=vec(0.5, 1.5),
    )  # fmt: skip


@dataclass
class Op:
    """A timed call ``run(state)``; ``prepare()`` (untimed, before every call) makes ``state``."""

    run: Callable[[Any], Any]
    prepare: Callable[[], Any] | None = None
    max_repeats: int | None = None


class Unavailable(Exception):
    """A peer cannot run this problem; the message says why (it is recorded, not fatal)."""


class Peer:
    name: str = "?"
    devices: tuple[str, ...] = ("cpu",)
    #: Off unless asked for (slow to set up).
    optional: bool = False

    def ops(self, problem: Problem) -> dict[str, Op]:
        raise NotImplementedError

    def first_call(self, problem: Problem) -> dict[str, Any] | None:
        """Compile/load cost of the first call, measured before any warm-up (or None)."""
        return None


class BackendPeer(Peer):
    """A ``batchnorm.kernels`` backend called through the Backend protocol on torch tensors
    (what ``batchnorm.torch`` calls inside its autograd Function)."""

    def __init__(self, backend: str, devices: tuple[str, ...]) -> None:
        self.name = backend
        self.devices = devices
        self._first_done = False

    def _backend(self, problem: Problem) -> Any:
        from .kernels import BackendUnavailable, get_backend

        try:
            return get_backend(self.name, problem.x)
        except BackendUnavailable as exc:
            raise Unavailable(str(exc)) from exc

    def first_call(self, problem: Problem) -> dict[str, Any] | None:
        # A second run in the same process finds the kernels compiled: say so, not "None".
        warm = self._first_done
        self._first_done = True
        t0 = time.perf_counter()
        backend = self._backend(problem)
        t_import = time.perf_counter() - t0
        p = problem
        t0 = time.perf_counter()
        _, mean, _, invstd, _ = forward_train(backend, p.x, p.weight, p.bias, EPS, 1)
        backward_train(backend, p.dy, p.x, mean, invstd, p.weight, 1)
        backend.forward_infer(p.x, p.running_mean, p.running_var, p.weight, p.bias, EPS, 1)
        _sync(p.device)
        info: dict[str, Any] = {
            "import_s": t_import,
            "first_calls_s": time.perf_counter() - t0,
            "shape": list(p.shape),
            "layout": p.layout,
            "warm_in_process": warm,
        }
        info.update(_jit_cache_report(self.name))
        return info

    def ops(self, problem: Problem) -> dict[str, Op]:
        backend = self._backend(problem)
        p = problem
        saved = forward_train(backend, p.x, p.weight, p.bias, EPS, 1)

        def forward(_):
            return forward_train(backend, p.x, p.weight, p.bias, EPS, 1)

        def backward(_):
            return backward_train(backend, p.dy, p.x, saved[1], saved[3], p.weight, 1)

        def fwd_bwd(_):
            _, mean, _, invstd, _ = forward_train(backend, p.x, p.weight, p.bias, EPS, 1)
            return backward_train(backend, p.dy, p.x, mean, invstd, p.weight, 1)

        def inference(_):
            return backend.forward_infer(
                p.x, p.running_mean, p.running_var, p.weight, p.bias, EPS, 1
            )

        return {
            "forward": Op(forward),
            "backward": Op(backward),
            "fwd+bwd": Op(fwd_bwd),
            "inference": Op(inference),
        }


class TorchPeer(Peer):
    """PyTorch eager: ``torch.nn.functional.batch_norm`` and autograd's backward."""

    name = "torch"
    devices = ("cpu", "cuda")

    def _functions(self, problem: Problem):
        import torch.nn.functional as F

        def train(x, w, b):
            return F.batch_norm(x, None, None, w, b, True, 0.1, EPS)

        def infer(x, rm, rv, w, b):
            return F.batch_norm(x, rm, rv, w, b, False, 0.1, EPS)

        return train, infer

    def ops(self, problem: Problem) -> dict[str, Op]:
        import torch

        p = problem
        train, infer = self._functions(p)
        x = p.x.detach().requires_grad_()
        w = p.weight.detach().requires_grad_()
        b = p.bias.detach().requires_grad_()
        inputs = (x, w, b)

        def forward(_):
            with torch.no_grad():
                return train(p.x, p.weight, p.bias)

        def graph():
            return train(x, w, b)

        def backward(y):
            return torch.autograd.grad(y, inputs, p.dy)

        def fwd_bwd(_):
            return torch.autograd.grad(train(x, w, b), inputs, p.dy)

        def inference(_):
            with torch.no_grad():
                return infer(p.x, p.running_mean, p.running_var, p.weight, p.bias)

        return {
            "forward": Op(forward),
            "backward": Op(backward, prepare=graph),
            "fwd+bwd": Op(fwd_bwd),
            "inference": Op(inference),
        }


class TorchCompilePeer(TorchPeer):
    """``torch.compile`` of the same functions (inductor); compiling takes a while."""

    name = "torch.compile"
    optional = True

    def _functions(self, problem: Problem):
        import torch

        train, infer = super()._functions(problem)
        return torch.compile(train, dynamic=False), torch.compile(infer, dynamic=False)

    def first_call(self, problem: Problem) -> dict[str, Any] | None:
        return None


class NumpyReferencePeer(Peer):
    """``batchnorm.reference`` on NumPy arrays: the readable oracle, not a competitor."""

    name = "numpy"
    devices = ("cpu",)

    def ops(self, problem: Problem) -> dict[str, Op]:
        from . import reference as ref

        if problem.dtype not in ("float32", "float64"):
            raise Unavailable(f"NumPy has no {problem.dtype}")
        a = problem.numpy()
        axis = a["axis"]
        saved = ref.batch_norm_train(a["x"], a["weight"], a["bias"], axis=axis, eps=EPS)[1]

        def forward(_):
            return ref.batch_norm_train(a["x"], a["weight"], a["bias"], axis=axis, eps=EPS)

        def backward(_):
            return ref.backward(a["dy"], saved)

        def fwd_bwd(_):
            _, s = ref.batch_norm_train(a["x"], a["weight"], a["bias"], axis=axis, eps=EPS)
            return ref.backward(a["dy"], s)

        def inference(_):
            return ref.batch_norm_infer(
                a["x"], a["running_mean"], a["running_var"], a["weight"], a["bias"],
                axis=axis, eps=EPS,
            )  # fmt: skip

        # Slow by design: a few repeats are enough to place it.
        cap = 3
        return {
            "forward": Op(forward, max_repeats=cap),
            "backward": Op(backward, max_repeats=cap),
            "fwd+bwd": Op(fwd_bwd, max_repeats=cap),
            "inference": Op(inference, max_repeats=cap),
        }


#: Every peer, in report order. A new fast backend is one more ``BackendPeer`` line. (With
#: ``--device cuda``, ``batchnorm.bench_gpu`` runs instead when installed: CUDA-event timing and
#: the fused BN+ReLU tails; these generic peers are the fallback.)
PEERS: list[Peer] = [
    BackendPeer("numba", devices=("cpu",)),
    BackendPeer("triton", devices=("cuda",)),
    TorchPeer(),
    TorchCompilePeer(),
    NumpyReferencePeer(),
]
BASELINE = "torch"


# -------------------------------------------------------------------------------------------
# timing
# -------------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def copy_ops(problem: Problem) -> dict[str, Op]:
    """Plain copies of x: the machine's bandwidth, measured beside the peers."""
    import numpy as np
    import torch

    p = problem
    dst = torch.empty_like(p.x)
    ops = {
        "copy": Op(lambda _: dst.copy_(p.x)),
        "clone": Op(lambda _: p.x.clone()),
    }
    if p.device == "cpu" and p.dtype in ("float32", "float64"):
        src = p.x.numpy()
        out = np.empty_like(src)
        ops["numpy copyto"] = Op(lambda _: np.copyto(out, src))
    return ops


def _time_interleaved(
    ops: dict[tuple[str, str], Op], repeats: int, warmup: int, device: str, tick: Callable
) -> dict[tuple[str, str], list[float]]:
    for op in ops.values():
        for _ in range(warmup):
            op.run(op.prepare() if op.prepare else None)
    _sync(device)
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in ops}
    keys = list(ops)
    for r in range(repeats):
        # Rotate the order every round so no peer always runs right after the same one.
        shift = r % len(keys)
        for key in keys[shift:] + keys[:shift]:
            op = ops[key]
            if op.max_repeats is not None and len(samples[key]) >= op.max_repeats:
                continue
            state = op.prepare() if op.prepare else None
            _sync(device)
            t0 = time.perf_counter()
            op.run(state)
            _sync(device)
            samples[key].append(time.perf_counter() - t0)
            del state
        tick()
    return samples


def _summary(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {
        "median_s": statistics.median(values),
        "min_s": min(values),
        "q1_s": q[0],
        "q3_s": q[2],
        "n": len(values),
    }


def _jit_cache_report(backend: str) -> dict[str, Any]:
    """For numba: how many kernel signatures came from the disk cache vs were compiled."""
    if backend != "numba":
        return {}
    from .kernels.numba_cpu.compiled import _k

    hits = misses = 0
    for value in vars(_k()).values():
        stats = getattr(value, "stats", None)
        if stats is not None and hasattr(stats, "cache_hits"):
            hits += sum(stats.cache_hits.values())
            misses += sum(stats.cache_misses.values())
    return {"jit_cache_hits": hits, "jit_cache_misses": misses}


def _caches_and_memory() -> dict[str, Any]:
    """Per-core cache sizes and total memory, where Linux says (empty elsewhere)."""
    info: dict[str, Any] = {}
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for index in sorted(base.glob("index*")):
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            if kind != "Instruction":
                info[f"L{level}_cache"] = (index / "size").read_text().strip()
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as fh:
            kib = int(fh.readline().split()[1])
        info["memory_GB"] = round(kib / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return info


def _machine(device: str) -> dict[str, Any]:
    import numpy as np
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        # PyTorch's CPU allocator asks for huge pages only with this set; where page faults are
        # expensive it changes the eager peer's times a lot (docs/bench.md).
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        # The numba backend's output pool (docs/kernels.md); "0" turns it off.
        "BATCHNORM_NUMBA_POOL_MB": os.environ.get("BATCHNORM_NUMBA_POOL_MB"),
    }
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        info["cpu"] = platform.processor()
    info.update(_caches_and_memory())
    try:
        info["loadavg_start"] = list(os.getloadavg())
    except OSError:
        pass
    try:
        import numba

        info["numba"] = numba.__version__
        info["numba_threads"] = numba.get_num_threads()
    except ImportError:
        info["numba"] = None
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run(
    shapes: Sequence[tuple[tuple[int, ...], str]],
    *,
    dtype: str = "float32",
    device: str = "cpu",
    repeats: int = 15,
    warmup: int = 3,
    peers: Sequence[str] | None = None,
    compile: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Time every peer on every shape; return the JSON-able record (see ``docs/bench.md``)."""
    import torch

    chosen = [
        peer
        for peer in PEERS
        if device.split(":")[0] in peer.devices
        and (peers is None or peer.name in peers)
        and (not peer.optional or compile or (peers is not None and peer.name in peers))
    ]
    record: dict[str, Any] = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(device),
        "settings": {
            "dtype": dtype, "device": device, "repeats": repeats, "warmup": warmup,
            "peers": [p.name for p in chosen], "baseline": BASELINE, "eps": EPS,
            "model_bytes": MODEL_BYTES, "copy_reference": "copy",
        },
        "first_call": {},
        "results": [],
    }  # fmt: skip
    bar = _progress(len(shapes) * repeats, progress)
    try:
        for shape, layout in shapes:
            gc.collect()
            problem = make_problem(shape, layout, dtype, device)
            entry: dict[str, Any] = {
                "shape": list(shape),
                "layout": layout,
                "dtype": dtype,
                "bytes": problem.nbytes,
                "skipped": {},
            }
            ops: dict[tuple[str, str], Op] = {
                ("copy", name): op for name, op in copy_ops(problem).items()
            }
            for peer in chosen:
                bar.set_description(f"{peer.name} {_shape_str(shape)} setup")
                try:
                    if peer.name not in record["first_call"]:  # the first problem of this run
                        first = peer.first_call(problem)
                        if first is not None:
                            record["first_call"][peer.name] = first
                    for op_name, op in peer.ops(problem).items():
                        ops[(peer.name, op_name)] = op
                except Unavailable as exc:
                    entry["skipped"][peer.name] = str(exc)
            bar.set_description(f"{_shape_str(shape)} {layout}")
            samples = _time_interleaved(ops, repeats, warmup, device, lambda: bar.update(1))
            entry["copy"] = {
                name: _summary(samples[("copy", name)])
                for name in ("copy", "clone", "numpy copyto")
                if ("copy", name) in samples
            }
            copy_s = entry["copy"]["copy"]["median_s"]
            clone_s = entry["copy"]["clone"]["median_s"]
            entry["copy"]["bandwidth_GBps"] = MODEL_BYTES["copy"] * problem.nbytes / copy_s / 1e9
            timings = []
            for (peer_name, op_name), values in samples.items():
                if peer_name == "copy":
                    continue
                timings.append({"peer": peer_name, "op": op_name, **_summary(values)})
            base = {t["op"]: t["median_s"] for t in timings if t["peer"] == BASELINE}
            for t in timings:
                t["speedup"] = base[t["op"]] / t["median_s"] if t["op"] in base else None
                t["x_copy"] = t["median_s"] / copy_s
                t["x_clone"] = t["median_s"] / clone_s
                t["x_limit"] = t["x_copy"] * MODEL_BYTES["copy"] / MODEL_BYTES[t["op"]]
            entry["timings"] = timings
            record["results"].append(entry)
            del problem, ops, samples
    finally:
        bar.close()
    record["summary"] = summarize(record)
    record["machine"]["torch_threads_end"] = torch.get_num_threads()
    try:
        record["machine"]["loadavg_end"] = list(os.getloadavg())
    except OSError:
        pass
    return record


def summarize(record: dict[str, Any]) -> dict[str, Any]:
    """Per peer and op, across shapes: median/min speed-up and median x_copy; target check."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for entry in record["results"]:
        for t in entry["timings"]:
            cell = table.setdefault(t["peer"], {}).setdefault(
                t["op"], {"speedups": [], "x_copy": [], "x_clone": [], "x_limit": []}
            )
            if t["speedup"] is not None:
                cell["speedups"].append(t["speedup"])
            cell["x_copy"].append(t["x_copy"])
            cell["x_clone"].append(t["x_clone"])
            cell["x_limit"].append(t["x_limit"])
    summary: dict[str, Any] = {}
    for peer, ops in table.items():
        summary[peer] = {}
        for op, cell in ops.items():
            summary[peer][op] = {
                "median_speedup": _median(cell["speedups"]),
                "min_speedup": min(cell["speedups"]) if cell["speedups"] else None,
                "median_x_copy": _median(cell["x_copy"]),
                "median_x_clone": _median(cell["x_clone"]),
                "median_x_limit": _median(cell["x_limit"]),
            }
    fast = next((p for p in ("numba", "triton") if p in summary), None)
    if fast is not None:
        fb, inf = summary[fast].get("fwd+bwd", {}), summary[fast].get("inference", {})
        values = {
            "fwd+bwd median speedup": fb.get("median_speedup"),
            "fwd+bwd min speedup": fb.get("min_speedup"),
            "fwd+bwd median x_copy": fb.get("median_x_copy"),
            "inference median speedup": inf.get("median_speedup"),
        }
        summary["targets"] = {
            "peer": fast,
            **{
                name: {
                    "target": target,
                    "value": values[name],
                    "met": None
                    if values[name] is None
                    else (values[name] <= target if "x_copy" in name else values[name] >= target),
                }
                for name, target in TARGETS.items()
            },
        }
    return summary


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# -------------------------------------------------------------------------------------------
# output: table, JSON, chart
# -------------------------------------------------------------------------------------------


def _shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_description(self, desc: str) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, file=sys.stderr, unit="round", leave=False)


def format_table(record: dict[str, Any]) -> str:
    lines = []
    for entry in record["results"]:
        copy = entry["copy"]
        lines.append(
            f"{_shape_str(entry['shape'])} {entry['layout']} {entry['dtype']}: "
            f"copy {copy['copy']['median_s'] * 1e3:.2f} ms "
            f"({copy['bandwidth_GBps']:.1f} GB/s), clone {copy['clone']['median_s'] * 1e3:.2f} ms"
        )
        lines.append(
            f"  {'peer':<14}{'op':<11}{'median ms':>10}{'min ms':>9}{'speed-up':>10}"
            f"{'x copy':>8}{'x clone':>8}{'x limit':>8}"
        )
        for t in sorted(entry["timings"], key=lambda t: (OPS.index(t["op"]), t["peer"])):
            speedup = "" if t["speedup"] is None else f"{t['speedup']:.2f}x"
            lines.append(
                f"  {t['peer']:<14}{t['op']:<11}{t['median_s'] * 1e3:>10.2f}"
                f"{t['min_s'] * 1e3:>9.2f}{speedup:>10}"
                f"{t['x_copy']:>8.2f}{t['x_clone']:>8.2f}{t['x_limit']:>8.2f}"
            )
        for name, reason in entry["skipped"].items():
            lines.append(f"  {name}: skipped ({reason})")
    targets = record["summary"].get("targets")
    if targets:
        ran = {(tuple(e["shape"]), e["layout"]) for e in record["results"]}
        default = {(tuple(shape), layout) for shape, layout in DEFAULT_SHAPES}
        note = "" if ran == default else " (set for the default shapes; indicative only here)"
        lines.append(f"targets ({targets['peer']}, across shapes){note}:")
        for name, cell in targets.items():
            if name == "peer":
                continue
            value = "n/a" if cell["value"] is None else f"{cell['value']:.2f}"
            sign = "<=" if "x_copy" in name else ">="
            state = {True: "met", False: "NOT met", None: "n/a"}[cell["met"]]
            lines.append(f"  {name:<26} {value:>6} (target {sign} {cell['target']}): {state}")
    for peer, info in record["first_call"].items():
        cache = ""
        if "jit_cache_hits" in info:
            hits, misses = info["jit_cache_hits"], info["jit_cache_misses"]
            cache = f"; JIT cache: {hits} loaded, {misses} compiled"
        lines.append(
            f"first calls of {peer}: {info['first_calls_s']:.2f} s "
            f"(import {info['import_s']:.2f} s{cache})"
        )
    return "\n".join(lines)


def plot(record: dict[str, Any], path: Path) -> Path | None:
    """Two panels: speed-up over PyTorch eager, and time as a multiple of the copy time."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        return None
    entries = record["results"]
    peers = [p for p in record["settings"]["peers"] if any(
        t["peer"] == p for e in entries for t in e["timings"])]  # fmt: skip
    labels = [f"{_shape_str(e['shape'])}\n{e['layout']}" for e in entries]
    fig, axes = plt.subplots(2, len(OPS), figsize=(4.8 * len(OPS), 8.0), squeeze=False)
    width = 0.8 / max(len(peers), 1)
    for col, op in enumerate(OPS):
        for row, metric in enumerate(("speedup", "x_copy")):
            ax = axes[row][col]
            shown = []
            for i, peer in enumerate(peers):
                values = []
                for e in entries:
                    cell = next(
                        (t for t in e["timings"] if t["peer"] == peer and t["op"] == op), None
                    )
                    values.append(math.nan if cell is None or cell[metric] is None
                                  else cell[metric])  # fmt: skip
                xs = [j + (i - (len(peers) - 1) / 2) * width for j in range(len(entries))]
                bars = ax.bar(xs, values, width, label=peer)
                # The value on each bar: a log axis spanning less than a decade has few ticks.
                ax.bar_label(bars, fmt="%.2g", fontsize=7, padding=1)
                shown += [v for v in values if math.isfinite(v) and v > 0]
            ax.set_yscale("log")
            if shown:  # room above the tallest bar for its label
                ax.set_ylim(min(min(shown), 1.0) / 1.6, max(max(shown), 1.0) * 1.8)
            ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
            ax.tick_params(axis="y", which="both", labelsize=9)
            ax.set_xticks(range(len(entries)))
            ax.set_xticklabels(labels, fontsize=8)
            if metric == "speedup":
                ax.axhline(1.0, color="black", lw=0.8)
                ax.set_title(f"{op}: speed-up over PyTorch eager", fontsize=10)
                ax.set_ylabel("speed-up (x, log scale)", fontsize=9)
            else:
                ax.axhline(MODEL_BYTES[op] / MODEL_BYTES["copy"], color="black", lw=0.8, ls="--")
                ax.set_title(f"{op}: time / copy time (-- bytes model)", fontsize=10)
                ax.set_ylabel("time / copy time (log scale)", fontsize=9)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper right", ncol=len(peers), fontsize=9)
    m = record["machine"]
    fig.suptitle(
        f"batchnorm bench, {record['settings']['device']} {record['settings']['dtype']}: "
        f"{m.get('cpu', '')} ({m.get('cpu_count')} cores), torch {m.get('torch')}, "
        f"numba {m.get('numba')}",
        fontsize=10,
        x=0.4,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -------------------------------------------------------------------------------------------
# command line
# -------------------------------------------------------------------------------------------


def _parse_shapes(text: str) -> list[tuple[tuple[int, ...], str]]:
    """``"32x128x56x56,16x64x112x112:nhwc"`` -> shapes; layout defaults to nchw / nc."""
    shapes = []
    for item in text.split(","):
        spec, _, layout = item.strip().partition(":")
        try:
            shape = tuple(int(s) for s in spec.split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"bad shape {spec!r} (want e.g. 32x128x56x56)"
            ) from None
        if len(shape) < 2 or min(shape) < 1:
            raise argparse.ArgumentTypeError(f"shape {spec!r} needs >= 2 positive dims")
        layout = layout or ("nc" if len(shape) == 2 else "nchw")
        if layout not in ("nchw", "nhwc", "nc") or (layout == "nhwc" and len(shape) not in (4, 5)):
            raise argparse.ArgumentTypeError(f"bad layout {layout!r} for shape {spec!r}")
        shapes.append((shape, layout))
    return shapes


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="batchnorm bench",
        description="Time batch norm (training forward, backward, fwd+bwd, inference) for our "
        "kernels and PyTorch on this machine; report speed-ups and multiples of copy time.",
    )
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (seconds)")
    # A Path default is not passed through the type: only a given --out is created up front.
    p.add_argument("--out", type=out_dir, default=Path("bench-out"), help="output directory")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--dtype", default="float32",
                   choices=["float32", "float64", "float16", "bfloat16"])  # fmt: skip
    p.add_argument("--compile", action="store_true", help="also time torch.compile (slow)")
    p.add_argument("--peers", help="comma-separated subset of: " + ", ".join(
        peer.name for peer in PEERS))  # fmt: skip
    p.add_argument("--shapes", type=_parse_shapes,
                   help="e.g. 32x128x56x56,16x64x112x112:nhwc,4096x1024")  # fmt: skip
    p.add_argument("--repeats", type=positive_int,
                   help="timed repeats per op (default 15; quick 3)")  # fmt: skip
    p.add_argument(
        "--warmup", type=non_negative_int, help="untimed calls per op first (default 3; quick 1)"
    )
    p.add_argument("--no-plot", action="store_true", help="skip the PNG chart")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def _gpu_main(argv: list[str]) -> int | None:
    """``--device cuda`` goes to ``batchnorm.bench_gpu`` (CUDA-event timing, fused tails) when
    it is installed; None when it is not, and the generic peers below run on the GPU instead."""
    try:
        from . import bench_gpu
    except ImportError:
        return None
    cpu_only = {"--no-progress", "--no-plot"}
    return int(bench_gpu.main([a for a in argv if a not in cpu_only]) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_known_args(argv)[0]
    try:
        import torch
    except ImportError:
        print("batchnorm bench: needs torch (the baseline is PyTorch eager)", file=sys.stderr)
        return 2
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            print(
                "batchnorm bench: --device cuda asked for but no CUDA device is available",
                file=sys.stderr,
            )
            return 2
        code = _gpu_main(argv)
        if code is not None:
            return code
    args = _parser().parse_args(argv)
    device = args.device
    if device != "cpu" and not device.startswith("cuda"):
        print(f"batchnorm bench: unknown device {device!r} (cpu or cuda)", file=sys.stderr)
        return 2
    shapes = args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    repeats = args.repeats or (3 if args.quick else 15)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    peers = None if not args.peers else [s.strip() for s in args.peers.split(",")]
    if peers is not None:
        unknown = sorted(set(peers) - {peer.name for peer in PEERS})
        if unknown:
            print(f"batchnorm bench: unknown peer(s) {unknown}", file=sys.stderr)
            return 2
        if BASELINE not in peers:
            peers.append(BASELINE)
    record = run(
        shapes, dtype=args.dtype, device=device, repeats=repeats, warmup=warmup, peers=peers,
        compile=args.compile, progress=not args.no_progress,
    )  # fmt: skip
    record["command"] = "batchnorm bench " + " ".join(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{device.split(':')[0]}-{args.dtype}" + ("-quick" if args.quick else "")
    json_path = args.out / f"{stem}.json"
    json_path.write_text(json.dumps(record, indent=1) + "\n")
    print(format_table(record))
    print(f"wrote {json_path}")
    if not args.no_plot:
        png = plot(record, args.out / f"{stem}.png")
        if png is not None:
            print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
