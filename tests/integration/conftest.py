"""Integration tests start readers, each within a start-up deadline (the ``reader`` fixture's is
30 s). A reader compiles the funnel's kernels before it answers, unless numba's cache holds
them; on a machine that has never compiled them that takes longer than the deadline. So the
session compiles them once, here, into the cache every reader it starts then loads from (the
children inherit ``NUMBA_CACHE_DIR``, see `freshrec`).
"""

from __future__ import annotations

import pytest

from freshrec.serving.kernels import WarmUp, warm_up


@pytest.fixture(scope="session", autouse=True)
def compiled_kernels() -> WarmUp:
    return warm_up()
