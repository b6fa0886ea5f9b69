"""Keep the experiments' data cache inside the test session (no writes to the home directory)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _experiments_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BATCHNORM_CACHE", str(tmp_path_factory.mktemp("batchnorm-cache")))
        yield
