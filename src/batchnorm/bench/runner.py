"""``run``: every chosen peer on every problem, interleaved, into one record (docs/bench.md)."""

from __future__ import annotations

import datetime as _dt
import gc
from collections.abc import Sequence
from typing import Any

from . import machine
from .cpu import NumpyReferencePeer, copy_ops
from .gpu import LayerPeer, triton_tuning
from .peers import EPS, BackendPeer, Peer, TorchCompilePeer, TorchPeer, Unavailable
from .record import BASELINE, MODEL_BYTES, SCHEMA, derive, summarize
from .shapes import kind_of, make_problem, normalize, shape_str
from .timing import Op, time_interleaved
from .timing import progress as progress_bar

__all__ = ["PEERS", "run", "choose_peers"]

#: Every peer, in report order. A new backend registered in ``batchnorm.kernels`` is one more
#: ``BackendPeer(name, devices)`` line (and a ``LayerPeer`` for its path through the layers).
PEERS: list[Peer] = [
    BackendPeer("numba", devices=("cpu",)),
    BackendPeer("triton", devices=("cuda",)),
    LayerPeer("triton", devices=("cuda",)),
    TorchPeer(),
    TorchCompilePeer(),
    NumpyReferencePeer(),
]
DTYPES = ("float32", "float64", "float16", "bfloat16")


def choose_peers(device: str, peers: Sequence[str] | None, compile: bool) -> list[Peer]:
    """The peers that run: by default those made for the device (``torch.compile`` only with
    ``compile``); named ones whatever the device (a peer that cannot run says why). The
    baseline always runs: every speed-up is against it."""
    known = {peer.name for peer in PEERS}
    if peers is not None:
        unknown = sorted(set(peers) - known)
        if unknown:
            raise ValueError(f"unknown peers {unknown}; known: {sorted(known)}")
        wanted = set(peers) | {BASELINE} | ({TorchCompilePeer.name} if compile else set())
        return [peer for peer in PEERS if peer.name in wanted]
    kind = device.split(":")[0]
    return [p for p in PEERS if kind in p.devices and (not p.optional or compile)]


def run(
    shapes: Sequence[Any],
    *,
    dtype: str | Sequence[str] = "float32",
    device: str = "cpu",
    repeats: int = 15,
    warmup: int = 3,
    peers: Sequence[str] | None = None,
    compile: bool = False,
    progress: bool = True,
    fused: bool | None = None,
    tile_elems: int | None = None,
    programs: int | None = None,
) -> dict[str, Any]:
    """Time every peer on every problem; return the JSON-able record.

    ``shapes``: ``(shape, layout)`` pairs or bare shapes (default layout), e.g.
    ``QUICK_SHAPES + REPRESENTATIVE_SHAPES``. ``dtype``: one name or several (each problem runs
    in each). ``fused`` (default: on CUDA) adds the fused BN+ReLU tails and checks every
    torch-like peer's results against eager. ``tile_elems``/``programs`` override the Triton
    kernels' tuning. ValueError for a bad argument, before anything runs.
    """
    dtypes = [dtype] if isinstance(dtype, str) else list(dtype)
    for name in dtypes:
        if name not in DTYPES:
            raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r} (cpu or cuda)")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    specs = [normalize(item) for item in shapes]
    chosen = choose_peers(device, peers, compile)
    fused = device.startswith("cuda") if fused is None else fused
    record: dict[str, Any] = {
        "schema": SCHEMA,
        "command": None,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine.describe(device),
        "settings": {
            "device": device, "dtypes": dtypes, "repeats": repeats, "warmup": warmup,
            "peers": [p.name for p in chosen], "baseline": BASELINE, "fused": fused,
            "eps": EPS, "model_bytes": MODEL_BYTES, "copy_reference": "copy",
            "tile_elems": tile_elems, "programs": programs,
        },
        "first_call": {},
        "results": [],
    }  # fmt: skip
    bar = progress_bar(len(specs) * len(dtypes) * repeats, progress)
    try:
        with triton_tuning(tile_elems, programs):
            for shape, layout in specs:
                for name in dtypes:
                    record["results"].append(
                        _run_problem(record, chosen, shape, layout, name, fused, bar)
                    )
    finally:
        bar.close()
    record["summary"] = summarize(record)
    machine.finish(record["machine"])
    return record


def _run_problem(record, chosen, shape, layout, dtype, fused, bar) -> dict[str, Any]:
    settings = record["settings"]
    device = settings["device"]
    gc.collect()
    problem = make_problem(shape, layout, dtype, device)
    entry: dict[str, Any] = {
        "shape": list(shape),
        "layout": layout,
        "dtype": dtype,
        "kind": kind_of(shape, layout),
        "bytes": problem.nbytes,
        "skipped": {},
        "max_rel_diff_vs_torch": {},
    }
    ops: dict[tuple[str, str], Op] = {("copy", n): op for n, op in copy_ops(problem).items()}
    for peer in chosen:
        bar.set_description(f"{peer.name} {shape_str(shape)} setup")
        try:
            if peer.name not in record["first_call"]:  # the first problem of this run
                first = peer.first_call(problem)
                if first is not None:
                    record["first_call"][peer.name] = first
            peer_ops = peer.ops(problem, fused)
            diff = peer.check(problem) if fused else None
        except Unavailable as exc:
            entry["skipped"][peer.name] = str(exc)
            continue
        except Exception as exc:  # noqa: BLE001 - a peer that fails here is recorded, not fatal
            entry["skipped"][peer.name] = f"{type(exc).__name__}: {exc}"
            continue
        if diff is not None:
            entry["max_rel_diff_vs_torch"][peer.name] = diff
        for op_name, op in peer_ops.items():
            try:  # one untimed call: an op that cannot run is dropped before the rounds
                op.run()
            except Exception as exc:  # noqa: BLE001
                entry["skipped"][f"{peer.name} {op_name}"] = f"{type(exc).__name__}: {exc}"
                continue
            ops[(peer.name, op_name)] = op
    bar.set_description(f"{shape_str(shape)} {layout} {dtype}")
    summaries = time_interleaved(
        ops, settings["repeats"], settings["warmup"], device, lambda: bar.update(1)
    )
    derive(entry, summaries)
    del problem, ops
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
    return entry
