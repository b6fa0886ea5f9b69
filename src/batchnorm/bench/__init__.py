"""``batchnorm bench``: our kernels against PyTorch, in one process, on this machine.

One package for CPU and GPU (``docs/bench.md``): ``shapes`` (what is measured), ``timing``
(interleaved rounds; perf_counter or CUDA events), ``machine`` (what it ran on), ``peers``
(who is timed; ``cpu`` and ``gpu`` hold the device-only ones), ``runner`` (``run``), ``record``
(schema, bytes model, ratios, summary, targets, the CSV log), ``table`` and ``plot`` (output),
``cli`` (``main``). The package imports no torch until a run starts.
"""

from __future__ import annotations

from .cli import build_parser, main
from .peers import EPS, BackendPeer, Peer, TorchCompilePeer, TorchPeer, Unavailable
from .plot import plot
from .record import (
    BASELINE,
    FUSED_OPS,
    LOG_FIELDS,
    MODEL_BYTES,
    OPS,
    SCHEMA,
    TARGETS,
    append_log,
    log_row,
    summarize,
)
from .runner import PEERS, run
from .shapes import (
    DEFAULT_SHAPES,
    GPU_QUICK_SHAPES,
    GPU_SHAPES,
    LAYOUTS,
    QUICK_SHAPES,
    REPRESENTATIVE_SHAPES,
    kind_of,
    parse_shapes,
)
from .table import format_table

__all__ = [
    "BASELINE", "DEFAULT_SHAPES", "EPS", "FUSED_OPS", "GPU_QUICK_SHAPES", "GPU_SHAPES",
    "LAYOUTS", "LOG_FIELDS", "MODEL_BYTES", "OPS", "PEERS", "QUICK_SHAPES",
    "REPRESENTATIVE_SHAPES", "SCHEMA", "TARGETS", "BackendPeer", "Peer", "TorchCompilePeer",
    "TorchPeer", "Unavailable", "append_log", "build_parser", "format_table", "kind_of",
    "log_row", "main", "parse_shapes", "plot", "run", "summarize",
]  # fmt: skip
