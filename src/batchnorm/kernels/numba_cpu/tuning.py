"""Tuning constants of the Numba kernels, each with the measurement that set it.

Pure Python (no numba import), so the launchers can plan a call before the kernels load.
"""

#: Longest block of one row reduced in the compute dtype before a float64 merge (16 KiB f64).
BLOCK = 2048
#: Rows layout when a contiguous run per (n, c) has at least this many values; cols below.
#: (Measured fwd+bwd: cols wins at 49 and 100 values per run, rows at 196.)
ROWS_MIN_INNER = 128
#: Rows layout: split the n range of a channel until there are this many work items.
ROWS_MIN_ITEMS = 32
#: Rows layout: and into at least this many n-ranges (when N allows), so that the reductions
#: sweep memory slab by slab instead of channel by channel (measured fwd+bwd, in copy times:
#: (32, 128, 56, 56) 3.6 at 1 range, 3.4 at 16; (64, 256, 14, 14) 4.5 at 1, 2.7 at 16).
ROWS_MIN_PARTS = 16
#: Rows layout: the backward is software-pipelined across channels (``rows_backward_pipelined``)
#: when each contiguous row is at least this long; shorter rows read channel by channel are far
#: from memory order (measured backward, in copy times: (32, 128, 56, 56) 1.7 pipelined
#: vs 2.1 in two passes, NCHW (16, 64, 112, 112) 1.5 vs 2.0; (64, 256, 14, 14) 4.1 vs 1.8).
ROWS_PIPELINE_MIN_BYTES = 4096
#: Rows layout, fused kernels: channels per group, so that a group's data stays in L2 (1 MiB).
ROWS_GROUP_BYTES = 256 * 1024
#: Cols layout: at most this many columns per work item (their accumulators stay in L1).
COLS_MAX_BLOCK = 1024
#: Cols layout: up to this many values per work item (1 MiB float32, mostly re-read from L2;
#: fewer, larger chunks make the serial merge of chunk partials cheaper: measured at
#: (4096, 1024), 0.65 / 0.68 of a copy's time for stats / backward_reduce against 0.68 / 0.84
#: with 256 KiB chunks).
COLS_CHUNK_ELEMS = 262144
#: Cols layout: at least this many row chunks when there are 16 rows per chunk to be had.
COLS_MIN_CHUNKS = 8
#: Cols layout, narrow rows (NHWC with few channels): the elementwise kernels take this many
#: values of consecutive rows as one flat run, with the coefficient vectors tiled to match, so
#: that a 64-value row does not pay a loop's set-up alone (measured at (16, 64, 112, 112)
#: channels-last: per-row loops 2.2 copy times, flat runs 1.x).
COLS_FLAT_ELEMS = 1024
