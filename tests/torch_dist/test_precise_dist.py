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
