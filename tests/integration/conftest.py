"""Integration tests start readers, each within a start-up deadline (the ``reader`` fixture's is
30 s). A reader compiles the funnel's kernels before it answers, unless numba's cache holds
them; on a machine that has never compiled them that takes longer than the deadline. So the
session compiles them once, here, into the cache every reader it starts then loads from (the
children inherit ``NUMBA_CACHE_DIR``, see `freshrec`). Tests that break Redis on purpose get
a server of their own (``own_redis``). Tests on a Redis Cluster take ``cluster_settings``.

Each test file must leave no Kafka client of its own alive (``no_kafka_client_left``): a
producer that is never flushed keeps its undelivered reports' callbacks, which the garbage
collector cannot see through librdkafka, so it lives until pytest exits, logging a refused
connection every second once the session's broker has stopped.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

from freshrec.devenv import local_services
from freshrec.serving.kernels import WarmUp, warm_up
from freshrec.settings import Settings
from tests.support import OwnRedis, drop_cluster_keys, free_port

# A cluster of the caller's own for the cluster tests; not a FRESHREC_* name, since
# `Settings.from_env()` refuses any of those that is no setting.
_CLUSTER_URL = os.environ.get("TEST_REDIS_CLUSTER_URL", "")


@pytest.fixture(scope="session", autouse=True)
def compiled_kernels() -> WarmUp:
    return warm_up()


def _kafka_clients() -> list[object]:
    """Every confluent-kafka client this process holds."""
    gc.collect()
    kinds = (Producer, Consumer, AdminClient)
    return [o for o in gc.get_objects() if isinstance(o, kinds)]


@pytest.fixture(scope="module", autouse=True)
def no_kafka_client_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fails the test file that leaves a Kafka client it made alive (module docstring); not
    after a failure, whose traceback pytest keeps, with the clients in its frames."""
    before, failed = _kafka_clients(), request.session.testsfailed
    yield
    if request.session.testsfailed > failed:
        return
    # ``before`` holds the clients it lists, so no client made since can reuse one's id.
    known = {id(client) for client in before}
    left = sorted(type(c).__name__ for c in _kafka_clients() if id(c) not in known)
    assert not left, f"Kafka clients left alive by this test file: {', '.join(left)}"


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    """A started redis-server of the test's own, killed at the end."""
    if shutil.which("redis-server") is None:
        pytest.skip("needs a local redis-server binary of its own to break")
    server = OwnRedis(free_port(), tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def cluster_endpoints(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a node of a Redis Cluster: TEST_REDIS_CLUSTER_URL, else a local cluster
    started for the session in a folder of its own, memory only (nothing to keep)."""
    if _CLUSTER_URL:
        yield _CLUSTER_URL
        return
    wanted = Settings(redis_cluster=True, redis_persist=False)
    state_dir = tmp_path_factory.mktemp("cluster-services")
    found, stop = local_services.resolve(wanted, state_dir, services=("redis",))
    try:
        yield found.redis_url
    finally:
        stop()


@pytest.fixture
def cluster_settings(settings: Settings, cluster_endpoints: str) -> Iterator[Settings]:
    """The test's settings on the session's cluster; afterwards the test's keys are deleted
    from every primary, as ``settings`` does on the single Redis."""
    configured = dataclasses.replace(settings, redis_url=cluster_endpoints, redis_cluster=True)
    yield configured
    drop_cluster_keys(cluster_endpoints, configured.key_prefix)
