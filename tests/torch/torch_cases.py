"""Helpers shared by the tests of ``batchnorm.torch`` (inputs in every layout, tolerances)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from batchnorm.kernels import BackendUnavailable, get_backend


def require(backend: str, x: torch.Tensor) -> None:
    """Skip (naming the reason) when ``backend`` cannot run on ``x``: e.g. a dtype it lacks."""
    try:
        get_backend(backend, x)
    except BackendUnavailable as exc:
        pytest.skip(str(exc))


def make_input(
    shape: tuple[int, ...], dtype: torch.dtype, layout: str, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(leaf, x)``: a leaf that requires grad and a view ``x`` of it of logical ``shape``.

    ``layout``: "contiguous"; "channels_last" (rank 4 or 5: channels_last / channels_last_3d);
    "strided" (every other channel of a wider tensor: not dense); "permuted" (dense but not
    contiguous: the batch axis is innermost in memory).
    """
    n, c, *rest = shape
    if layout == "strided":
        leaf = torch.randn(n, 2 * c, *rest, generator=generator, dtype=torch.float64)
    elif layout == "permuted":
        leaf = torch.randn(c, *rest, n, generator=generator, dtype=torch.float64)
    else:
        leaf = torch.randn(*shape, generator=generator, dtype=torch.float64)
    # Off-centre with unequal per-channel scales, so the moments matter.
    leaf = (leaf * 2 + 0.5).to(dtype)
    if layout == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        leaf = leaf.contiguous(memory_format=fmt)
    leaf.requires_grad_(True)
    if layout == "strided":
        x = leaf[:, ::2]
    elif layout == "permuted":
        x = leaf.permute(len(shape) - 1, *range(len(shape) - 1))
    else:
        x = leaf
    assert tuple(x.shape) == tuple(shape)
    return leaf, x


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """``torch.testing.assert_close`` with its per-dtype default tolerances (not loosened)."""
    torch.testing.assert_close(got, want, msg=lambda m: f"{what}: {m}")


def copy_params(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    dst.load_state_dict(src.state_dict())


def randomize_affine(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Non-trivial weight and bias (the defaults 1 and 0 hide gamma/beta mistakes)."""
    with torch.no_grad():
        if module.weight is not None:
            w = torch.rand(module.weight.shape, generator=generator, dtype=torch.float64) + 0.5
            module.weight.copy_(w)
            b = torch.randn(module.bias.shape, generator=generator, dtype=torch.float64)
            module.bias.copy_(b)


Forward = Callable[[torch.Tensor], torch.Tensor]
