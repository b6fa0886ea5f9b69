"""PreciseBN (``recompute_stats``) across gloo ranks: identical statistics on every rank, equal
to the single-process result over all the batches, with uneven and empty shards."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from test_sync import WORKER, launch

from batchnorm.torch.lifecycle import recompute_stats

pytestmark = pytest.mark.xdist_group("distributed")


@pytest.mark.parametrize("batches", ["2,1", "2,0,3"], ids=["2-ranks-uneven", "3-ranks-empty"])
@pytest.mark.parametrize("estimator", ["population", "average"])
def test_ranks_agree_with_the_single_process_result(tmp_path, batches, estimator):
    counts = [int(c) for c in batches.split(",")]
    results, _, _ = launch(
        tmp_path, "precise", len(counts), f"batches={batches}", f"estimator={estimator}"
    )
    sys.path.insert(0, str(WORKER.parent))
    from worker import precise_batches, precise_model

    model = precise_model()
    every, _ = precise_batches(counts)
    summary = recompute_stats(model, every, estimator=estimator)
    for r in results:
        assert int(r["count"]) == summary["1"].count  # pooled over every rank
        for key, value in model.state_dict().items():
            if "running" in key:
                np.testing.assert_allclose(r[key], value.double().numpy(), rtol=0, atol=1e-10)
                # Bitwise the same on every rank: one merge, in one order, everywhere.
                assert np.array_equal(r[key], results[0][key]), key


@pytest.mark.parametrize(
    ("backend", "opts"),
    [
        ("reference", ()),
        ("numba", ()),
        ("numba", ("layout=nlc",)),
        ("numba", ("path=compaction",)),
    ],
    ids=["reference", "numba", "numba-nlc", "numba-compaction"],
)
def test_masked_sync_batch_norm_equals_the_single_process_masked_result(tmp_path, backend, opts):
    """Two ranks with different masks (one sequence all padding): the ranks are weighted by
    their real positions; the backend's masked stages run (the gather path when it lacks
    them), an (N, L, C) sequence comes back in its layout."""
    if backend == "numba":
        pytest.importorskip("numba")
    import torch

    import batchnorm.torch as bt

    results, _, _ = launch(tmp_path, "masked", 2, f"backend={backend}", *opts)
    for r in results:
        assert bool(r["native"]) == ("path=compaction" not in opts)
        assert bool(r["nlc_layout"]) == ("layout=nlc" in opts)
    sys.path.insert(0, str(WORKER.parent))
    from worker import masked_batch

    parts = [masked_batch(rank) for rank in range(2)]
    x = torch.cat([p[0] for p in parts]).requires_grad_(True)
    mask = torch.cat([p[1] for p in parts])
    bn = bt.BatchNorm1d(x.shape[1], backend="reference").double()
    y = bn(x, mask=mask)
    weights = torch.cat([torch.linspace(-1, 1, p[0].numel()).view_as(p[0]) for p in parts])
    (y.nan_to_num() * weights).sum().backward()
    np.testing.assert_allclose(np.concatenate([r["y"] for r in results]), y.detach().numpy(),
                               rtol=0, atol=1e-10)  # fmt: skip
    np.testing.assert_allclose(np.concatenate([r["dx"] for r in results]), x.grad.numpy(),
                               rtol=0, atol=1e-10)  # fmt: skip
    np.testing.assert_allclose(sum(r["dweight"] for r in results), bn.weight.grad.numpy(),
                               rtol=0, atol=1e-10)  # fmt: skip
    for r in results:
        np.testing.assert_allclose(r["running_var"], bn.running_var.numpy(), rtol=0, atol=1e-10)
        np.testing.assert_allclose(r["running_mean"], bn.running_mean.numpy(), rtol=0, atol=1e-10)


def test_sync_batch_norm_accumulates_over_ranks_and_micro_batches(tmp_path):
    """Each micro-batch is normalised over the ranks; on leaving accumulate_stats every rank
    writes once the statistics of all micro-batches of all ranks."""
    import torch

    results, _, _ = launch(tmp_path, "accumulate", 2)
    sys.path.insert(0, str(WORKER.parent))
    from worker import CHANNELS, global_batch

    x_all, _ = global_batch([4] * 4, torch.float64)
    whole = torch.nn.BatchNorm2d(CHANNELS).double()
    whole(x_all)
    for r in results:
        np.testing.assert_allclose(r["running_mean"], whole.running_mean.numpy(), rtol=0,
                                   atol=1e-12)  # fmt: skip
        np.testing.assert_allclose(r["running_var"], whole.running_var.numpy(), rtol=0,
                                   atol=1e-12)  # fmt: skip
        assert int(r["num_batches_tracked"]) == 1
