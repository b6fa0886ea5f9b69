"""The public table of conformance cases, their data and their tolerances.

Every case is a small, deterministic problem: a few training batches (to follow the running
statistics over several steps), an upstream gradient per batch and one batch for the eval
forward. Values are generated in float64 and rounded to the case's dtype, so that the expected
answers can be computed in float64 from *exactly* the numbers the implementation sees: the only
error left is the implementation's own.

Tolerances bound the max-norm error relative to the size of the terms a quantity is computed
from (``checker`` says which), as ``K_ROUND[dtype] * eps(dtype) + K_COND * eps(compute) *
condition``:

* ``condition = max |x| / std(x)`` over the case's channels and batches is the conditioning of
  centring: with the mean 1e4 standard deviations from 0, a correct float32 mean still carries
  an absolute error of about 1e4 * eps32, a relative error of that size in ``x - mean``.
* ``compute`` is float32 for float16/bfloat16/float32 input and float64 for float64 input
  (the design's numerical policy); the ``K_ROUND`` term is the rounding of the output to a
  narrow dtype.
* The factors were set from measured errors of correct implementations (PyTorch's modules,
  this library's backends, NumPy code computing in the input dtype): the worst of them uses
  0.21 of the tolerance (bfloat16) and 0.05 in float32, while the mistakes of
  ``mistakes.py`` exceed it by a median factor of 500 to 90000 on the float32 cases
  (``docs/conformance.md`` has the table).
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass, field

import numpy as np

from .._xp import channel_axis, reduce_axes, values_per_channel

__all__ = [
    "DTYPES",
    "MACHINE_EPS",
    "K_ROUND",
    "K_COND",
    "QUANTITIES",
    "Case",
    "CaseData",
    "CASES",
    "MASKS",
    "make_data",
    "real_values",
    "with_padding",
    "round_to_dtype",
    "tolerance",
    "select_cases",
]

DTYPES: tuple[str, ...] = ("float16", "bfloat16", "float32", "float64")

#: Distance from 1.0 to the next representable number.
MACHINE_EPS: dict[str, float] = {
    "float16": 2.0**-10,
    "bfloat16": 2.0**-7,
    "float32": 2.0**-23,
    "float64": 2.0**-52,
}

#: Output rounding allowance of the narrow dtypes, in units of their machine eps.
K_ROUND: dict[str, float] = {"float16": 8.0, "bfloat16": 4.0, "float32": 0.0, "float64": 0.0}
#: Allowance for centring and summation, in units of eps(compute) * condition.
K_COND = 16.0

#: What the checker compares, in report order.
QUANTITIES: tuple[str, ...] = (
    "forward(train)",
    "dx",
    "dgamma",
    "dbeta",
    "running_mean",
    "running_var",
    "forward(eval)",
    "eval keeps running",
)


#: Mask patterns of the masked cases: (N, L) booleans, True = a real value.
MASKS: dict[str, str] = {
    "random": "each position real with probability 0.6",
    "all-but-one": "one real position per sequence, the rest padding",
    "empty-seq": "prefix lengths, one sequence entirely padding",
}


@dataclass(frozen=True)
class Case:
    """One conformance problem.

    ``x`` has per-channel means ``offset + scale * N(0, 1)`` and standard deviations
    ``scale * U(0.5, 2)``; ``axis`` is the channel axis (1 or -1).

    ``mask`` (a key of :data:`MASKS`) makes it a masked case: (N, C, L) input with an (N, L)
    mask, padded positions filled with large values (``offset + scale * U(1e3, 1e4)``) or
    NaN (``pad_nan``), so that an implementation that reads them fails.
    """

    name: str
    shape: tuple[int, ...]
    axis: int = 1
    dtype: str = "float32"
    eps: float = 1e-5
    affine: bool = True
    offset: float = 0.0
    scale: float = 1.0
    steps: int = 3
    mask: str = ""
    pad_nan: bool = False
    what: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        channel_axis(len(self.shape), self.axis)
        if self.steps < 1:
            raise ValueError(f"case {self.name!r}: steps must be >= 1, got {self.steps}")
        if values_per_channel(self.shape, self.channel_axis) < 2:
            raise ValueError(f"case {self.name!r}: m must be >= 2 to train, shape {self.shape}")
        if self.mask and (self.mask not in MASKS or len(self.shape) != 3 or self.axis != 1):
            raise ValueError(
                f"case {self.name!r}: mask must be one of {tuple(MASKS)}, on (N, C, L) input "
                f"with axis 1; got mask {self.mask!r}, shape {self.shape}, axis {self.axis}"
            )
        if self.mask and self.shape[0] < 2:
            raise ValueError(f"case {self.name!r}: a masked case needs N >= 2 for m >= 2")

    @property
    def channel_axis(self) -> int:
        return self.axis % len(self.shape)

    @property
    def channels(self) -> int:
        return self.shape[self.channel_axis]

    @property
    def m(self) -> int:
        """Values per channel (padding included, for a masked case)."""
        return values_per_channel(self.shape, self.channel_axis)

    @property
    def large_offset(self) -> bool:
        """Whether the one-pass variance formula is expected to break on this case."""
        return abs(self.offset) >= 100.0 * self.scale


def _table() -> tuple[Case, ...]:
    r2, r3, r4, r5 = (16, 4), (4, 3, 6), (2, 3, 4, 5), (2, 2, 3, 3, 4)
    return (
        Case("rank2", r2, what="(N, C)"),
        Case("rank3", r3, what="(N, C, L)"),
        Case("rank4", r4, what="(N, C, H, W)"),
        Case("rank5", r5, what="(N, C, D, H, W)"),
        Case("m2", (2, 3), what="m = 2, the smallest trainable batch; m/(m-1) = 2"),
        Case("n1-rank3", (1, 3, 8), what="N = 1, spatial > 1: moments over one sample"),
        Case("n1-rank4", (1, 2, 3, 4), what="N = 1, spatial > 1"),
        Case("last-rank3", (4, 6, 3), axis=-1, what="channels-last (N, L, C)"),
        Case("last-rank4", (2, 3, 4, 3), axis=-1, what="channels-last (N, H, W, C)"),
        Case("no-affine-rank2", r2, affine=False, what="affine off"),
        Case("no-affine-rank4", r4, affine=False, what="affine off"),
        Case("large-offset", (64, 3), offset=1e4, what="x = 1e4 + N(0, 1): E[x^2]-E[x]^2 cancels"),
        Case(
            "offset-rank4",
            (4, 3, 4, 4),
            offset=1e3,
            what="x = 1e3 + N(0, 1), (N, C, H, W): E[x^2]-E[x]^2 is off but finite",
        ),
        Case("tiny-var", (32, 3), scale=1e-4, what="var ~ 1e-8, far below eps"),
        Case("eps-large", r2, eps=0.1, what="eps = 0.1: eps inside vs outside sqrt differ"),
        Case("eps-tiny", r2, eps=1e-10, scale=1e-3, what="eps = 1e-10, var ~ 1e-6"),
        Case("rank2-f64", r2, dtype="float64", what="(N, C) in float64"),
        Case("rank4-f64", r4, dtype="float64", what="(N, C, H, W) in float64"),
        Case("m2-f64", (2, 3), dtype="float64", what="m = 2 in float64"),
        Case(
            "last-rank4-f64", (2, 3, 4, 3), axis=-1, dtype="float64", what="channels-last, float64"
        ),
        Case(
            "large-offset-f64",
            (64, 3),
            dtype="float64",
            offset=1e8,
            what="x = 1e8 + N(0, 1) in float64",
        ),
        Case("tiny-var-f64", (32, 3), dtype="float64", scale=1e-4, what="var ~ 1e-8 << eps"),
        Case("eps-large-f64", r2, dtype="float64", eps=0.1, what="eps = 0.1 in float64"),
        Case("rank2-f16", r2, dtype="float16", what="float16 in, float32 compute"),
        Case("rank4-f16", r4, dtype="float16", what="float16, (N, C, H, W)"),
        Case(
            "last-rank4-f16", (2, 3, 4, 3), axis=-1, dtype="float16", what="float16, channels-last"
        ),
        Case("rank2-bf16", r2, dtype="bfloat16", what="bfloat16 (not in NumPy)"),
        Case("rank4-bf16", r4, dtype="bfloat16", what="bfloat16, (N, C, H, W)"),
        Case(
            "no-affine-rank4-bf16", r4, dtype="bfloat16", affine=False, what="bfloat16, affine off"
        ),
        *(
            Case(f"masked-{kind}{tag}", shape, dtype=dtype, mask=kind, what=f"mask: {what}")
            for tag, dtype in (("", "float32"), ("-f64", "float64"))
            for kind, shape, what in (
                ("random", (4, 3, 10), "random positions, large values in the padding"),
                ("all-but-one", (5, 3, 6), "one real position per sequence (m = N = 5)"),
                ("empty-seq", (4, 3, 8), "one sequence entirely padding"),
            )
        ),
        Case(
            "masked-nan-pad",
            (4, 3, 8),
            mask="empty-seq",
            pad_nan=True,
            what="mask: NaN in the padding, one sequence entirely padding",
        ),
    )


#: The public case table.
CASES: tuple[Case, ...] = _table()


def select_cases(patterns: str | None, cases: tuple[Case, ...] = CASES) -> tuple[Case, ...]:
    """Cases whose name matches any of the comma-separated shell patterns (all when ``None``)."""
    import fnmatch

    if not patterns:
        return cases
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    return tuple(c for c in cases if any(fnmatch.fnmatchcase(c.name, p) for p in wanted))


def tolerance(case: Case, quantity: str, compute: str | None = None) -> float:
    """Largest accepted error of ``quantity`` in ``case`` (see the module docstring).

    ``compute`` overrides the compute dtype (the diagnosis asks what float32 arithmetic on
    float64 input would be allowed).
    """
    if quantity == "eval keeps running":
        return 0.0
    if compute is None:
        compute = "float64" if case.dtype == "float64" else "float32"
    # A mean is as well conditioned as a sum; everything computed from x - mean inherits
    # the conditioning of centring.
    condition = 1.0 if quantity == "running_mean" else _condition(case)
    return K_ROUND[case.dtype] * MACHINE_EPS[case.dtype] + (
        K_COND * MACHINE_EPS[compute] * condition
    )


@functools.lru_cache(maxsize=256)
def _condition(case: Case) -> float:
    data = make_data(case)
    axes = reduce_axes(len(case.shape), case.channel_axis)
    if data.mask is not None:  # the real values only, as (m, C) rows
        axes = (0,)
    return max(
        float(np.max(np.max(np.abs(x), axis=axes) / np.std(x, axis=axes)))
        for x in (real_values(x, data.mask) for x in (*data.xs, data.x_eval))
    )


def round_to_dtype(values: np.ndarray, dtype: str) -> np.ndarray:
    """``values`` rounded to ``dtype`` (nearest, ties to even), returned as float64."""
    values = np.asarray(values, dtype=np.float64)
    if dtype == "float64":
        return values.copy()
    if dtype == "bfloat16":
        # NumPy has no bfloat16: round the float32 bit pattern to its top 16 bits.
        bits = values.astype(np.float32).view(np.uint32).astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return rounded.astype(np.uint32).view(np.float32).astype(np.float64)
    return values.astype(dtype).astype(np.float64)


@dataclass(frozen=True)
class CaseData:
    """Inputs of one case, float64 arrays holding values exactly representable in its dtype."""

    case: Case
    xs: tuple[np.ndarray, ...]
    dys: tuple[np.ndarray, ...]
    x_eval: np.ndarray
    gamma: np.ndarray | None
    beta: np.ndarray | None
    running_mean: np.ndarray
    running_var: np.ndarray
    #: (N, L) booleans of a masked case (True = a real value), else None
    mask: np.ndarray | None = None


def real_values(arr: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The real positions of an (N, C, L) array as (m, C) rows (``arr`` itself if no mask)."""
    return arr if mask is None else np.moveaxis(arr, 1, -1)[mask]


def with_padding(rows: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """(m, C) ``rows`` back at the real positions of an (N, C, L) array, 0 at the padding
    (``rows`` itself if no mask)."""
    if mask is None:
        return rows
    out = np.zeros((*mask.shape, rows.shape[-1]))
    out[mask] = rows
    return np.moveaxis(out, -1, 1)


def _make_mask(case: Case, rng: np.random.Generator) -> np.ndarray:
    n, _, length = case.shape
    if case.mask == "random":
        mask = rng.random((n, length)) < 0.6
        mask[0, 0] = mask[1, 0] = True  # m >= 2 whatever the draw
    elif case.mask == "all-but-one":
        mask = np.zeros((n, length), dtype=bool)
        mask[np.arange(n), rng.integers(0, length, n)] = True
    else:  # "empty-seq"
        lengths = rng.integers(1, length + 1, n)
        lengths[rng.integers(0, n)] = 0
        mask = np.arange(length)[None, :] < lengths[:, None]
        if mask.sum() < 2:
            mask[np.flatnonzero(lengths)[0], :2] = True
    return mask


def make_data(case: Case) -> CaseData:
    """Deterministic data of ``case`` (seeded by its name)."""
    rng = np.random.default_rng(zlib.crc32(case.name.encode()))
    c, ax, nd = case.channels, case.channel_axis, len(case.shape)
    bshape = [1] * nd
    bshape[ax] = c
    means = (case.offset + case.scale * rng.standard_normal(c)).reshape(bshape)
    stds = (case.scale * rng.uniform(0.5, 2.0, c)).reshape(bshape)

    def batch() -> np.ndarray:
        return round_to_dtype(means + stds * rng.standard_normal(case.shape), case.dtype)

    xs = tuple(batch() for _ in range(case.steps))
    dys = tuple(
        round_to_dtype(rng.standard_normal(case.shape), case.dtype) for _ in range(case.steps)
    )
    x_eval = batch()
    gamma = beta = None
    if case.affine:
        gamma = round_to_dtype(rng.uniform(0.5, 1.5, c) * rng.choice([-1.0, 1.0], c), case.dtype)
        beta = round_to_dtype(0.5 * rng.standard_normal(c), case.dtype)
    # Running statistics start away from (0, 1) and from the batch moments, so that every
    # convention (momentum meaning, biased or unbiased) gives a visibly different update.
    running_mean = round_to_dtype(
        means.reshape(c) + case.scale * rng.uniform(-1.0, 1.0, c), case.dtype
    )
    running_var = round_to_dtype((stds.reshape(c) ** 2) * rng.uniform(0.3, 3.0, c), case.dtype)
    mask = None
    if case.mask:  # drawn last: the unmasked cases' data do not depend on it
        mask = _make_mask(case, rng)
        pads = np.broadcast_to(~mask[:, None, :], case.shape)

        def padded(x: np.ndarray) -> np.ndarray:
            fill = case.offset + case.scale * rng.uniform(1e3, 1e4, case.shape)
            return np.where(pads, np.nan if case.pad_nan else round_to_dtype(fill, case.dtype), x)

        xs, x_eval = tuple(padded(x) for x in xs), padded(x_eval)
    return CaseData(case, xs, dys, x_eval, gamma, beta, running_mean, running_var, mask)


def _check_unique(cases: tuple[Case, ...]) -> None:
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise ValueError("case names must be unique")


_check_unique(CASES)
