"""Agreement with ``torch.nn.BatchNorm1d/2d/3d``: outputs, gradients, running statistics and
``num_batches_tracked`` over several training steps and then in eval, on a table of cases.

The oracle is PyTorch's own layer, fed the same parameters, inputs and output gradients.
Tolerances are ``torch.testing.assert_close``'s defaults for the dtype compared.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch_cases import assert_close, make_input, randomize_affine, require

import batchnorm.torch as bt

CLASSES = {
    1: (bt.BatchNorm1d, torch.nn.BatchNorm1d),
    2: (bt.BatchNorm2d, torch.nn.BatchNorm2d),
    3: (bt.BatchNorm3d, torch.nn.BatchNorm3d),
}

#: (module rank, input shape): every rank; m = 2; N = 1 with spatial extent > 1.
SHAPES = [
    (1, (5, 3)),
    (1, (2, 3)),  # m = 2
    (1, (2, 4, 5)),
    (2, (2, 3, 4, 5)),
    (2, (1, 3, 2, 1)),  # N = 1, m = 2
    (3, (2, 3, 2, 3, 4)),
]


def _ids(value: object) -> str:
    return str(value).replace("torch.", "")


def _compare(
    backend: str,
    rank: int,
    shape: tuple[int, ...],
    *,
    affine: bool = True,
    track: bool = True,
    momentum: float | None = 0.1,
    dtype: torch.dtype = torch.float64,
    param_dtype: torch.dtype | None = None,
    layout: str = "contiguous",
    steps: int = 3,
    oracle_dtype: torch.dtype | None = None,
) -> None:
    """Run ours and PyTorch's side by side: ``steps`` training steps, then two eval steps.

    With ``oracle_dtype``, PyTorch's layer runs in that dtype on the same values (inputs cast
    up), and its results are cast back to our dtypes before comparing.
    """
    ours_cls, theirs_cls = CLASSES[rank]
    param_dtype = param_dtype or dtype
    kwargs = dict(affine=affine, track_running_stats=track, momentum=momentum)
    gen = torch.Generator().manual_seed(sum(shape) * 1000 + rank + len(layout))
    theirs = theirs_cls(shape[1], **kwargs, dtype=oracle_dtype or param_dtype)
    randomize_affine(theirs, gen)
    ours = ours_cls(shape[1], **kwargs, dtype=param_dtype, backend=backend)
    ours.load_state_dict(theirs.state_dict())

    for step in range(steps + 2):
        training = step < steps
        ours.train(training)
        theirs.train(training)
        if oracle_dtype is not None:
            # Each step from the same state: ours holds its buffers in a narrower dtype.
            theirs.load_state_dict(ours.state_dict())
        leaf, x = make_input(shape, dtype, layout, gen)
        if step == 0:
            require(backend, x)
        dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        y_ours = ours(x)
        y_theirs = theirs(x if oracle_dtype is None else x.to(oracle_dtype)).to(dtype)
        where = f"step {step} ({'train' if training else 'eval'})"
        assert y_ours.dtype == dtype
        assert y_ours.stride() == y_theirs.stride(), f"{where}: output memory layout"
        assert_close(y_ours, y_theirs, f"{where}: output")
        params_ours = [p for p in (ours.weight, ours.bias) if p is not None]
        params_theirs = [p for p in (theirs.weight, theirs.bias) if p is not None]
        g_ours = torch.autograd.grad(y_ours, [x, *params_ours], dy)
        g_theirs = torch.autograd.grad(y_theirs, [x, *params_theirs], dy)
        assert g_ours[0].stride() == g_theirs[0].stride(), f"{where}: grad_input memory layout"
        assert g_ours[0].dtype == dtype, f"{where}: grad_input dtype"
        names = ("grad_input", "grad_weight", "grad_bias")[: len(g_theirs)]
        for name, a, b in zip(names, g_ours, g_theirs, strict=True):
            assert_close(a, b.to(a.dtype), f"{where}: {name}")
        for name, a in ours.named_buffers():
            b = dict(theirs.named_buffers())[name]
            assert a.dtype == (b.dtype if oracle_dtype is None else a.dtype)
            assert_close(a, b.to(a.dtype), f"{where}: {name}")
        for p in params_ours:
            assert p.dtype == param_dtype
        assert ours.last_backend == backend


@pytest.mark.parametrize(
    ("affine", "track", "momentum", "dtype"),
    list(
        itertools.product(
            [True, False], [True, False], [0.1, 0.5, None], [torch.float32, torch.float64]
        )
    ),
    ids=_ids,
)
@pytest.mark.parametrize(("rank", "shape"), SHAPES, ids=[str(s) for _, s in SHAPES])
def test_table(backend, rank, shape, affine, track, momentum, dtype):
    _compare(backend, rank, shape, affine=affine, track=track, momentum=momentum, dtype=dtype)


LAYOUTS = [
    (2, (2, 3, 4, 5), "channels_last"),
    (3, (2, 3, 2, 3, 4), "channels_last"),
    (1, (4, 3), "strided"),
    (1, (2, 3, 5), "strided"),
    (2, (2, 3, 4, 5), "strided"),
    (3, (2, 3, 2, 3, 4), "strided"),
    (1, (2, 3, 5), "permuted"),
    (2, (2, 3, 4, 5), "permuted"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=_ids)
@pytest.mark.parametrize(
    ("rank", "shape", "layout"), LAYOUTS, ids=[f"{layout}-{s}" for _, s, layout in LAYOUTS]
)
def test_layouts(backend, rank, shape, layout, dtype):
    _compare(backend, rank, shape, layout=layout, dtype=dtype, momentum=0.5)


@pytest.mark.parametrize("param_dtype", [torch.float32, None], ids=["fp32-params", "same-params"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_ids)
@pytest.mark.parametrize(
    ("rank", "shape", "layout"),
    [
        (1, (6, 3), "contiguous"),
        (1, (2, 3, 5), "contiguous"),
        (2, (2, 3, 4, 5), "contiguous"),
        (2, (2, 3, 4, 5), "channels_last"),
        (3, (2, 3, 2, 3, 4), "contiguous"),
    ],
)
def test_mixed_precision(backend, rank, shape, layout, dtype, param_dtype):
    """Half-precision input with float32 (or half) parameters and buffers, computed in float32:
    against PyTorch's layer run in float64 on the same values, every result must be within the
    default tolerance of the dtype it is delivered in (about one rounding of the exact
    result)."""
    _compare(
        backend,
        rank,
        shape,
        dtype=dtype,
        param_dtype=param_dtype,
        layout=layout,
        oracle_dtype=torch.float64,
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_ids)
@pytest.mark.parametrize(
    ("rank", "shape"), [(1, (2, 3, 5)), (2, (2, 3, 4, 5)), (3, (2, 3, 2, 3, 4))]
)
def test_mixed_precision_matches_torch(backend, rank, shape, dtype):
    """The same mixed-precision setting against PyTorch's own mixed-precision layer.

    Contiguous inputs only: for channels_last, PyTorch's CPU half-precision grad_input is less
    accurate than one rounding of the float32 result (docs/torch.md has the numbers), so there
    the float64 oracle above is the one that can judge.
    """
    _compare(backend, rank, shape, dtype=dtype, param_dtype=torch.float32)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_module_surface_matches_torch(rank):
    """Same parameter and buffer names, shapes, dtypes, init values and repr."""
    ours_cls, theirs_cls = CLASSES[rank]
    ours, theirs = ours_cls(4), theirs_cls(4)
    assert isinstance(ours, theirs_cls)
    assert [(n, p.shape, p.dtype) for n, p in ours.named_parameters()] == [
        (n, p.shape, p.dtype) for n, p in theirs.named_parameters()
    ]
    for (n_o, b_o), (n_t, b_t) in zip(ours.named_buffers(), theirs.named_buffers(), strict=True):
        assert n_o == n_t and torch.equal(b_o, b_t) and b_o.dtype == b_t.dtype
    assert repr(ours) == repr(theirs)
    assert "backend='reference'" in repr(ours_cls(4, backend="reference", through_var=False))
