"""Integration tests start readers, each within a start-up deadline (the ``reader`` fixture's is
30 s). A reader compiles the funnel's kernels before it answers, unless numba's cache holds
them; on a machine that has never compiled them that takes longer than the deadline. So the
session compiles them once, here, into the cache every reader it starts then loads from (the
children inherit ``NUMBA_CACHE_DIR``, see `freshrec`). Tests that break Redis on purpose get
a server of their own (``own_redis``).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from freshrec.serving.kernels import WarmUp, warm_up
from tests.support import OwnRedis, free_port


@pytest.fixture(scope="session", autouse=True)
def compiled_kernels() -> WarmUp:
    return warm_up()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    """A started redis-server of the test's own, killed at the end."""
    if shutil.which("redis-server") is None:
        pytest.skip("needs a local redis-server binary of its own to break")
    server = OwnRedis(free_port(), tmp_path)
    server.start()
    yield server
    server.kill()
