"""The record as text: one block per problem, then the targets and the first calls."""

from __future__ import annotations

from typing import Any

from . import machine
from .record import FUSED_OPS, OPS, TARGETS
from .shapes import shape_str

__all__ = ["format_table"]

_HEADER = (
    f"  {'peer':<15}{'op':<18}{'median ms':>10}{'min ms':>9}{'speed-up':>10}"
    f"{'x copy':>9}{'x clone':>9}{'x limit':>9}{'GB/s':>8}"
)


def _order(record: dict[str, Any]) -> tuple[list[str], list[str]]:
    peers = list(record["settings"]["peers"])
    ops = list(OPS + FUSED_OPS)
    return peers, ops


def _problem(entry: dict[str, Any], peers: list[str], ops: list[str]) -> list[str]:
    copy = entry["copy"]
    lines = [
        f"{shape_str(entry['shape'])} {entry['layout']} {entry['dtype']} [{entry['kind']}] "
        f"({entry['bytes'] / 2**20:.1f} MiB): copy {copy['copy']['median_s'] * 1e3:.3g} ms "
        f"({copy['bandwidth_GBps']:.1f} GB/s), clone {copy['clone']['median_s'] * 1e3:.3g} ms",
        _HEADER,
    ]

    def key(t: dict[str, Any]) -> tuple[int, int]:
        return ops.index(t["op"]), peers.index(t["peer"]) if t["peer"] in peers else len(peers)

    for t in sorted(entry["timings"], key=key):
        speedup = "" if t["speedup"] is None else f"{t['speedup']:.2f}x"
        lines.append(
            f"  {t['peer']:<15}{t['op']:<18}{t['median_s'] * 1e3:>10.3f}{t['min_s'] * 1e3:>9.3f}"
            f"{speedup:>10}{t['x_copy']:>9.2f}{t['x_clone']:>9.2f}{t['x_limit']:>9.2f}"
            f"{t['GBps']:>8.1f}"
        )
    for peer, diffs in entry.get("max_rel_diff_vs_torch", {}).items():
        lines.append(f"  {peer}: largest relative difference from torch {max(diffs.values()):.1e}")
    for name, reason in entry["skipped"].items():
        lines.append(f"  {name}: skipped ({reason})")
    return lines


def _targets(record: dict[str, Any]) -> list[str]:
    targets = record["summary"].get("targets")
    if not targets:
        return []
    peer = targets["peer"]
    device = next(iter(TARGETS[peer].values())).device
    kinds = {e["kind"] for e in record["results"]}
    note = "" if kinds == {"default"} else " (stated for the default shapes; indicative only here)"
    if record["settings"]["device"].split(":")[0] != device:
        note = f" (stated for {device}; not judged on this device)"
    lines = [f"targets ({peer}, across shapes){note}:"]
    for name, cell in targets.items():
        if name == "peer":
            continue
        value = "n/a" if cell["value"] is None else f"{cell['value']:.2f}"
        sign = "<=" if TARGETS[peer][name].at_most else ">="
        state = {True: "met", False: "NOT met", None: "n/a"}[cell["met"]]
        lines.append(f"  {name:<40} {value:>6} (target {sign} {cell['target']}): {state}")
    return lines


def format_table(record: dict[str, Any]) -> str:
    """What ``batchnorm bench`` prints: per problem every (peer, op) with its ratios, the
    problem's kind (quick / representative / default / custom), then targets and first calls."""
    peers, ops = _order(record)
    lines = [
        f"batchnorm bench on {machine.label(record['machine'])}, "
        f"device {record['settings']['device']}"
    ]
    for entry in record["results"]:
        lines += _problem(entry, peers, ops)
    lines += _targets(record)
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
