"""A worker resumes after what Redis holds, not after what Kafka was told.

Redis can come back older than the group's Kafka commits: restored from a backup, or after a
machine crash that lost the append-only file's last second. The messages between its offset
watermarks and the commits would then never be applied again. Here a worker applies the first
half of a stream, Redis is snapshotted (``SAVE``), the worker applies the second half and
commits it, and stops; Redis is killed and started again from the snapshot. A new worker must
apply the second half again, each event once: the totals, watermarks and histories end as if
nothing had been lost. The second test does the same under a worker that keeps running: it
meets the older watermarks with its next batch and exits (status 76) to be started again.
"""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest
import redis
from confluent_kafka import Consumer, TopicPartition

from freshrec.connections import kafka_config
from freshrec.settings import Settings
from freshrec.store.keys import Keys
from freshrec.streams.producer import EventProducer
from tests.support import OwnRedis, applied_events, freshrec_process, stop_process, wait_until

pytestmark = pytest.mark.integration

HALF = 2_000
TS = 1_700_000_000.0


def _events(start: int, count: int) -> list[dict]:
    return [
        {"type": "view", "user_id": f"u{n % 97}", "item_id": f"i{n % 211}", "ts": TS + n}
        for n in range(start, start + count)
    ]


def _worker(settings: Settings, log_path: Path) -> subprocess.Popen:
    return freshrec_process(["worker", "--loglevel", "info"], settings, log_path)


class _OwnRedisStream:
    """The test's stream on a Redis of its own, which the test restarts from a snapshot."""

    def __init__(self, settings: Settings, own_redis: OwnRedis) -> None:
        self.settings = dataclasses.replace(settings, redis_url=own_redis.url)
        self.server = own_redis
        self.keys = Keys(self.settings.key_prefix)
        self.client = redis.Redis.from_url(own_redis.url)

    def applied(self) -> int:
        return applied_events(self.client, self.settings)

    def marks(self) -> dict[bytes, int]:
        return {k: int(self.client.get(k)) for k in self.client.keys(self.keys.watermark("*"))}

    def produce(self, events: list[dict]) -> None:
        topic = self.settings.events_topic
        with EventProducer(self.settings.kafka_bootstrap, topic, 10) as producer:
            producer.send_many(events)

    def two_halves_with_a_snapshot_between(self) -> dict[bytes, int]:
        """A running worker applies the first half, Redis saves it, the worker applies the
        second half; returns the watermarks of the snapshot."""
        self.produce(_events(0, HALF))
        wait_until(lambda: self.applied() == HALF, 120, "the first half applied")
        self.client.save()
        saved = self.marks()
        self.produce(_events(HALF, HALF))
        wait_until(lambda: self.applied() == 2 * HALF, 120, "the second half applied")
        return saved

    def restart_from_the_snapshot(self) -> None:
        self.client.close()
        self.server.kill()
        self.server.start()
        self.client = redis.Redis.from_url(self.server.url)

    def assert_each_event_once(self, events: list[dict]) -> None:
        assert self.applied() == len(events)
        users = {e["user_id"] for e in events}
        histories = sum(self.client.zcard(self.keys.history(u)) for u in users)
        assert histories == len({(e["user_id"], e["item_id"]) for e in events})


def _committed(settings: Settings) -> dict[int, int]:
    """The worker group's committed offset per partition of the events topic (-1: none)."""
    consumer = Consumer(
        kafka_config(settings, log_level=3, **{"group.id": f"{settings.topic_prefix}-worker"})
    )
    try:
        tps = [TopicPartition(settings.events_topic, p) for p in range(settings.partitions)]
        return {tp.partition: tp.offset for tp in consumer.committed(tps, 10)}
    finally:
        consumer.close()


@pytest.mark.timeout(300)
def test_a_redis_older_than_the_kafka_commits_gets_the_missing_events_again(
    settings: Settings, own_redis: OwnRedis, tmp_path: Path
) -> None:
    run = _OwnRedisStream(settings, own_redis)
    first = _worker(run.settings, tmp_path / "worker-1.log")
    try:
        saved = run.two_halves_with_a_snapshot_between()
        marks = run.marks()
        ends = {int(k.decode().rsplit("/", 1)[1]): m + 1 for k, m in marks.items()}
    finally:
        stop_process(first)  # a graceful stop commits what it applied
    wait_until(
        lambda: {p: o for p, o in _committed(run.settings).items() if o >= 0} == ends,
        60,
        "Kafka to hold the commits of everything applied",
    )

    run.restart_from_the_snapshot()  # the first half only
    assert run.applied() == HALF and run.marks() == saved

    second = _worker(run.settings, tmp_path / "worker-2.log")
    try:
        wait_until(lambda: run.applied() >= 2 * HALF, 120, "the second half applied again")
        wait_until(lambda: run.marks() == marks, 30, "every watermark back where it was")
    finally:
        stop_process(second)
    run.assert_each_event_once(_events(0, 2 * HALF))
    assert "resuming after the watermarks" in (tmp_path / "worker-2.log").read_text()
    run.client.close()


@pytest.mark.timeout(300)
def test_a_running_worker_that_meets_an_older_redis_restarts_and_applies_what_was_lost(
    settings: Settings, own_redis: OwnRedis, tmp_path: Path
) -> None:
    run = _OwnRedisStream(settings, own_redis)
    rest = 500
    first = _worker(run.settings, tmp_path / "worker-1.log")
    try:
        run.two_halves_with_a_snapshot_between()
        run.restart_from_the_snapshot()  # under the running worker
        assert run.applied() == HALF
        run.produce(_events(2 * HALF, rest))
        wait_until(lambda: first.poll() is not None, 60, "the worker to stop on the older state")
    finally:
        stop_process(first)
    log = (tmp_path / "worker-1.log").read_text()
    assert first.returncode == 76, log[-3000:]
    assert "Redis holds less than it had acknowledged" in log
    assert run.applied() == HALF  # the batch that met the older state wrote nothing

    second = _worker(run.settings, tmp_path / "worker-2.log")
    try:
        wait_until(lambda: run.applied() >= 2 * HALF + rest, 120, "what was lost, and the rest")
    finally:
        stop_process(second)
    run.assert_each_event_once(_events(0, 2 * HALF + rest))
    assert "resuming after the watermarks" in (tmp_path / "worker-2.log").read_text()
    run.client.close()
