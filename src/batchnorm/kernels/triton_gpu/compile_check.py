"""Compile every Triton kernel variant for a GPU target without a GPU (triton ships ptxas), and
check that the running-statistics kernel is compiled without FMA contraction.

``python -m batchnorm.kernels.triton_gpu.compile_check [ARCH]`` (default 90, Hopper) exits 0 when
every variant lowers to a cubin, 3 when triton or its NVIDIA backend is missing, 1 on a compile
error. Must run without ``TRITON_INTERPRET=1`` (the interpreter patches ``triton.language``).
"""

from __future__ import annotations

import os
import sys
from typing import Any


def _pointers(dtype: str, *names: str) -> dict[str, str]:
    return {name: f"*{dtype}" for name in names}


def _compile(
    fn: Any, arch: int, pointers: dict, constexprs: dict, scalars: dict, **options: Any
) -> Any:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {
        name: "constexpr" if name in constexprs else pointers.get(name, scalars.get(name, "i32"))
        for name in fn.arg_names
    }
    source = ASTSource(fn, signature, constexprs=constexprs)
    return triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, **options}
    )


def variants() -> list[tuple[str, dict, dict, dict]]:
    """(kernel name, pointer types, constexprs, scalar types) covering every code path."""
    out = []
    for blocks in (
        {"BLOCK_O": 2, "BLOCK_C": 1, "BLOCK_I": 1024, "INDEX_64": False},  # NCHW-style
        {"BLOCK_O": 32, "BLOCK_C": 64, "BLOCK_I": 1, "INDEX_64": True},  # channels-last
    ):
        pack = {"PACK_I": blocks["BLOCK_I"] >= 8}
        stats_parts = ("part_count_ptr", "part_mean_ptr", "part_m2_ptr")
        out.append(
            (
                "_stats_partial_kernel",
                _pointers("bf16", "x_ptr") | _pointers("fp32", *stats_parts),
                blocks,
                {},
            )
        )
        for flag in (True, False):
            flags = {"HAS_WEIGHT": flag, "HAS_BIAS": flag, "HAS_RESIDUAL": flag, "RELU": flag}
            out.append(
                (
                    "_forward_elemt_kernel",
                    _pointers("bf16", "x_ptr", "y_ptr", "residual_ptr")
                    | _pointers("fp32", "mean_ptr", "invstd_ptr", "weight_ptr", "bias_ptr")
                    | _pointers("u8", "mask_ptr"),
                    blocks | flags | pack | {"FROM_VAR": flag},
                    {"eps": "fp32"},
                )
            )
            out.append(
                (
                    "_backward_reduce_partial_kernel",
                    _pointers("fp16", "dy_ptr", "x_ptr")
                    | _pointers("fp32", "mean_ptr", "part_sum_dy_ptr", "part_sum_dy_xc_ptr")
                    | _pointers("u8", "mask_ptr"),
                    blocks | pack | {"HAS_MASK": flag},
                    {},
                )
            )
            sums = ("mean_ptr", "invstd_ptr", "weight_ptr", "sum_dy_ptr", "sum_dy_xhat_ptr")
            out.append(
                (
                    "_backward_elemt_kernel",
                    _pointers("fp32", "dy_ptr", "x_ptr", "dx_ptr", "dresidual_ptr", *sums)
                    | _pointers("u8", "mask_ptr"),
                    blocks
                    | pack
                    | {"HAS_WEIGHT": flag, "HAS_MASK": flag, "WRITE_DRESIDUAL": flag}
                    | {"THROUGH_MEAN": flag, "THROUGH_VAR": not flag},
                    {"count": "fp32"},
                )
            )
    stats = ("part_count_ptr", "part_mean_ptr", "part_m2_ptr", "mean_ptr", "var_ptr", "invstd_ptr")
    for index_64 in (False, True):
        out.append(
            (
                "_stats_combine_kernel",
                _pointers("fp32", *stats) | _pointers("bf16", "x_ptr"),
                {"BLOCK_C": 256, "INDEX_64": index_64},
                {"eps": "fp32"},
            )
        )
    sums = ("part_sum_dy_ptr", "part_sum_dy_xc_ptr", "invstd_ptr", "sum_dy_ptr", "sum_dy_xhat_ptr")
    out.append(("_backward_combine_kernel", _pointers("fp32", *sums), {"BLOCK_C": 256}, {}))
    for buffers in ("fp32", "fp16", "bf16"):
        out.append((
            "_running_update_kernel",
            _pointers(buffers, "running_mean_ptr", "running_var_ptr")
            | _pointers("fp32", "mean_ptr", "var_ptr"),
            {"BLOCK_C": 256}, {"keep": "fp32", "w": "fp32", "unbias": "fp32"},
        ))  # fmt: skip
    return out + masked_variants()


def masked_variants() -> list[tuple[str, dict, dict, dict]]:
    """The kernels of ``masked_kernels`` (the ``mask=`` option), every code path."""
    out = []
    stats_parts = ("part_count_ptr", "part_mean_ptr", "part_m2_ptr")
    vectors = ("mean_ptr", "invstd_ptr", "weight_ptr", "bias_ptr")
    for blocks in (
        {"BLOCK_O": 2, "BLOCK_C": 1, "BLOCK_I": 1024, "INDEX_64": False},  # NCL-style
        {"BLOCK_O": 32, "BLOCK_C": 64, "BLOCK_I": 1, "INDEX_64": True},  # (N, L, C)
    ):
        out.append((
            "_masked_stats_partial_kernel",
            _pointers("bf16", "x_ptr") | _pointers("u8", "pos_ptr")
            | _pointers("fp32", "shift_ptr", *stats_parts),
            blocks, {},
        ))  # fmt: skip
        out.append((
            "_masked_backward_reduce_partial_kernel",
            _pointers("fp16", "dy_ptr", "x_ptr") | _pointers("u8", "pos_ptr")
            | _pointers("fp32", "mean_ptr", "part_sum_dy_ptr", "part_sum_dy_xc_ptr"),
            blocks, {},
        ))  # fmt: skip
        for flag in (True, False):
            out.append((
                "_masked_elemt_kernel",
                _pointers("bf16", "x_ptr", "y_ptr") | _pointers("u8", "pos_ptr")
                | _pointers("fp32", *vectors),
                blocks | {"HAS_WEIGHT": flag, "HAS_BIAS": flag}, {},
            ))  # fmt: skip
            sums = ("mean_ptr", "invstd_ptr", "weight_ptr", "sum_dy_ptr", "sum_dy_xhat_ptr")
            out.append((
                "_masked_backward_elemt_kernel",
                _pointers("fp32", "dy_ptr", "x_ptr", "dx_ptr", *sums) | _pointers("u8", "pos_ptr"),
                blocks | {"HAS_WEIGHT": flag, "THROUGH_MEAN": flag, "THROUGH_VAR": not flag},
                {"count": "fp32"},
            ))  # fmt: skip
    combine = ("part_count_ptr", "part_mean_ptr", "part_m2_ptr", "shift_ptr", "mean_ptr", "var_ptr")
    out.append(("_masked_stats_combine_kernel", _pointers("fp32", *combine), {"BLOCK_C": 256}, {}))
    return out


def running_update_fma(arch: int) -> str | None:
    """None if ``_running_update_kernel``, compiled with the options its launch uses, has no
    fused multiply-add for float32 buffers (each product then rounds as the reference's torch
    op does), else what was found. The same kernel compiled with contraction allowed must have
    one, or the check could not tell."""
    from . import kernels
    from .launchers import RUNNING_UPDATE_OPTIONS

    name, pointers, constexprs, scalars = next(
        v for v in variants() if v[0] == "_running_update_kernel" and "*fp32" in v[1].values()
    )
    fn = getattr(kernels, name)
    allowed = _compile(fn, arch, pointers, constexprs, scalars, enable_fp_fusion=True)
    if "fma." not in allowed.asm["ptx"]:
        return "the check cannot tell: no fma even with contraction allowed"
    used = _compile(fn, arch, pointers, constexprs, scalars, **RUNNING_UPDATE_OPTIONS)
    fused = [line.strip() for line in used.asm["ptx"].splitlines() if "fma." in line]
    return f"fma in the launched kernel: {fused[:3]}" if fused else None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    arch = int(args[0]) if args else 90
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter cannot compile for a GPU")
        return 3
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401

        from . import kernels, masked_kernels
    except ImportError as exc:
        print(f"triton with its NVIDIA backend is not installed: {exc}")
        return 3
    todo = variants()
    for name, pointers, constexprs, scalars in todo:
        module = masked_kernels if name.startswith("_masked") else kernels
        _compile(getattr(module, name), arch, pointers, constexprs, scalars)
    print(f"compiled {len(todo)} kernel variants for sm_{arch}")
    problem = running_update_fma(arch)
    if problem is not None:
        print(f"_running_update_kernel: {problem}")
        return 1
    print("_running_update_kernel: no FMA contraction (rounds as the reference)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
