"""Fixtures for integration tests: real Kafka and real Redis, isolated per test.

Services come from FRESHREC_KAFKA_BOOTSTRAP / FRESHREC_REDIS_URL when set, else from Docker
through testcontainers, else from local processes started for the session. Each test gets its
own topic prefix and key prefix, and both are deleted afterwards.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster

from freshrec.devenv import local_services
from freshrec.settings import Settings
from freshrec.streams.topics import delete_topics, ensure_topics, topic_specs
from tests.support import (
    freshrec_process,
    group_is_consuming,
    running_reader,
    stop_process,
    wait_until,
)


@pytest.fixture(scope="session")
def endpoints() -> Iterator[local_services.Endpoints]:
    found, stop = local_services.resolve(Settings.from_env())
    yield found
    stop()


@pytest.fixture
def settings(endpoints: local_services.Endpoints) -> Iterator[Settings]:
    """Settings pointing at the session's services, with prefixes no other test uses."""
    tag = uuid.uuid4().hex[:10]
    configured = dataclasses.replace(
        Settings.from_env(),
        kafka_bootstrap=endpoints.kafka_bootstrap,
        redis_url=endpoints.redis_url,
        topic_prefix=f"test-{tag}",
        key_prefix=f"test-{tag}",
        partitions=2,
        worker_metrics_port=0,
        batch_within_s=0.02,
        publish_interval_s=0.1,
    )
    ensure_topics(configured.kafka_bootstrap, configured)
    yield configured
    delete_topics(configured.kafka_bootstrap, list(topic_specs(configured)))
    client = redis.Redis.from_url(configured.redis_url)
    doomed = list(client.scan_iter(match=f"{configured.key_prefix}:*", count=1000))
    if doomed:
        client.unlink(*doomed)
    client.close()


@pytest.fixture
def redis_client(settings: Settings) -> Iterator[redis.Redis]:
    """A blocking client of the test's Redis: a cluster client on a cluster."""
    kind = RedisCluster if settings.redis_cluster else redis.Redis
    client = kind.from_url(settings.redis_url)
    yield client
    client.close()


@pytest.fixture
def worker(settings: Settings, tmp_path: Path) -> Iterator[object]:
    proc = freshrec_process(["worker", "--loglevel", "warning"], settings, tmp_path / "worker.log")
    try:
        wait_until(
            lambda: (
                proc.poll() is not None
                or group_is_consuming(settings.kafka_bootstrap, f"{settings.topic_prefix}-worker")
            ),
            60,
            "the worker to join its consumer group",
        )
        assert proc.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
        yield proc
    finally:
        stop_process(proc)


@pytest.fixture
def reader(settings: Settings, tmp_path: Path) -> Iterator[str]:
    with running_reader(settings, tmp_path / "reader.log") as (base, _):
        yield base
