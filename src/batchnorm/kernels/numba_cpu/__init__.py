"""Numba CPU backend: fused, vectorised, parallel batch-norm stages on NumPy arrays and torch
CPU tensors, behind the stage protocol (``batchnorm.reference.stages``).

``NumbaBackend`` is what ``backend="numba"`` names everywhere (``batchnorm.torch``, and
``batchnorm.reference``'s ``batch_norm_train(..., backend="numba")`` on NumPy arrays), and what
``"auto"`` picks for CPU tensors of 65,536 elements or more.

Layouts are read from the strides, never fixed by a transposing copy: any *dense* array (a
permutation of a C-contiguous one, e.g. torch ``channels_last`` or a NumPy NHWC array with
``axis=-1``) is used in place and the output gets the same memory layout. Only non-dense inputs
(slices with gaps, broadcast or negative strides) are copied first. Every kernel works on one of
two *physical* views of the dense array, chosen from the strides (``layout.Prepared``):

* ``rows`` (outer, C, inner), inner >= ``ROWS_MIN_INNER``: each (n, c) row is contiguous
  (NCHW, NCL, NCDHW); kernels in ``rows``.
* ``cols`` (outer, W) with W = C * inner, inner small: channels-last, (N, C), NC(L) with tiny L;
  kernels in ``cols``.

Outputs of large passes are written with streaming (non-temporal) stores (``jit._stream``).

Numerical policy (``batchnorm.reference.stats``), per work item:

* A *block* (up to ``BLOCK`` values: a piece of one row, consecutive short rows of one
  channel, or a chunk of rows of one column) is reduced
  two-pass and centred in the compute dtype: ``total = sum(x - K)`` with K the block's first
  value (so x = 1e4 + N(0, 1) sums O(1) numbers, not O(1e4) ones), then
  ``m2_b = sum((x - mean_b)**2)``; the block mean ``K + total / n_b`` is kept in float64. The
  block is in L1 (rows) or L2 (cols) for the second pass.
* Blocks merge into float64 (count, mean, m2) with Chan et al.'s exact formula, in a fixed order.
  Per-item partials then merge per channel in item order. The split into items depends only on
  the shape, never on the thread count or scheduling (the pipelined backward's channel ranges
  follow the thread count, but each channel is still summed in one fixed order), so results
  are bitwise identical run to run.
* The backward sums ``sum(dy)`` and ``sum(dy * (x - mean))`` accumulate per block in the compute
  dtype and across blocks in float64; ``x - mean`` is formed before any product.

Storage dtypes: float32 and float64 as themselves; float16 travels as its uint16 bits and
bfloat16 as its int16 bits (numba has no 16-bit float arrays). ``_load`` widens to float32 in
registers and ``_store`` rounds to nearest-even, so 16-bit data costs no extra pass.

Files: ``tuning`` (constants, each with its measurement), ``jit`` (16-bit helpers, streaming
stores, the exact merge), ``elementwise`` (row loops shared by both views), ``rows``, ``cols``,
``relu`` (the fused activation and its 1-bit mask), ``compiled`` (the kernels, loaded on first
use), ``memory`` (output pool, scratch), ``layout`` (``Prepared``), ``launchers`` (a stage on a
prepared array), ``backend`` (``NumbaBackend``). ``docs/kernels.md`` has the numbers.
"""

from .backend import SUPPORTED_DTYPES, NumbaBackend, unavailable_reason
from .compiled import NUMBA_IMPORT_ERROR
from .layout import Prepared
from .memory import POOL, STREAM_CACHE_BYTES, OutputPool

__all__ = [
    "NUMBA_IMPORT_ERROR",
    "POOL",
    "STREAM_CACHE_BYTES",
    "SUPPORTED_DTYPES",
    "NumbaBackend",
    "OutputPool",
    "Prepared",
    "unavailable_reason",
]
