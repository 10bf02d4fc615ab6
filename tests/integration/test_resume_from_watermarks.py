"""A worker resumes after what Redis holds, not after what Kafka was told.

Redis can come back older than the group's Kafka commits: restored from a backup, or after a
machine crash that lost the append-only file's last second. The messages between its offset
watermarks and the commits would then never be applied again. Here a worker applies the first
half of a stream, Redis is snapshotted (``SAVE``), the worker applies the second half and
commits it, and stops; Redis is killed and started again from the snapshot. A new worker must
apply the second half again, each event once: the totals, watermarks and histories end as if
nothing had been lost. The second test does the same under a worker that keeps running: it
meets the older watermarks with its next batch and exits (status 76) to be started again. It
runs once more with Redis flushed under a running worker whose group has committed everything:
started again, the worker rebuilds the state from the earliest offsets, not from the commits.
A worker that has only read the watermarks, never written one, stops on a flush too; and the
mark a rebuild leaves sends every later worker's unwatermarked partitions to the earliest too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from confluent_kafka import Consumer, TopicPartition

from freshrec.connections import kafka_config
from freshrec.settings import Settings
from freshrec.store.keys import Keys
from freshrec.streams.producer import EventProducer
from freshrec.streams.worker import state_built_from_log
from tests.support import OwnRedis, applied_events, freshrec_process, stop_process, wait_until

pytestmark = pytest.mark.integration

HALF = 2_000
REST = 500  # events after Redis lost writes
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

    @contextlib.contextmanager
    def worker(self, log_path: Path) -> Iterator[subprocess.Popen]:
        """A worker on this stream, stopped (gracefully, so it commits) on leaving."""
        proc = _worker(self.settings, log_path)
        try:
            yield proc
        finally:
            stop_process(proc)

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

    def wait_for_commits_of_everything_applied(self) -> None:
        ends = {int(k.decode().rsplit("/", 1)[1]): m + 1 for k, m in self.marks().items()}
        wait_until(
            lambda: {p: o for p, o in _committed(self.settings).items() if o >= 0} == ends,
            60,
            "Kafka to hold the commits of everything applied",
        )

    def stops_at_the_next_batch(
        self, worker: subprocess.Popen, events: list[dict], log_path: Path
    ) -> None:
        """After Redis lost writes under ``worker``, its next batch (``events``) stops it with
        status 76, writing nothing."""
        applied = self.applied()
        self.produce(events)
        wait_until(lambda: worker.poll() is not None, 60, "the worker to stop on the state")
        log = log_path.read_text()
        assert worker.returncode == 76, log[-3000:]
        assert "Redis holds less than it had acknowledged" in log
        assert self.applied() == applied

    def restarted_applies_each_once(self, events: list[dict], log_path: Path) -> str:
        """A new worker applies ``events``, each once; returns its log."""
        with self.worker(log_path):
            wait_until(lambda: self.applied() >= len(events), 120, "the lost events applied")
        self.assert_each_event_once(events)
        return log_path.read_text()

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
    with run.worker(tmp_path / "worker-1.log"):  # its graceful stop commits what it applied
        saved = run.two_halves_with_a_snapshot_between()
        marks = run.marks()
    run.wait_for_commits_of_everything_applied()

    run.restart_from_the_snapshot()  # the first half only
    assert run.applied() == HALF and run.marks() == saved

    log = run.restarted_applies_each_once(_events(0, 2 * HALF), tmp_path / "worker-2.log")
    assert run.marks() == marks  # every watermark back where it was
    assert "resuming after the watermarks" in log
    run.client.close()


def _restored_from_a_snapshot(run: _OwnRedisStream) -> list[dict]:
    """Redis goes back to a snapshot of the first half; returns every event sent."""
    run.two_halves_with_a_snapshot_between()
    run.restart_from_the_snapshot()
    assert run.applied() == HALF
    return _events(0, 2 * HALF)


def _flushed_after_the_commits(run: _OwnRedisStream) -> list[dict]:
    """Redis is emptied after the group committed everything; returns every event sent."""
    run.produce(_events(0, HALF))
    wait_until(lambda: run.applied() == HALF, 120, "the stream applied")
    run.wait_for_commits_of_everything_applied()  # by the running worker
    run.client.flushall()
    return _events(0, HALF)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("lose_writes", "restart_says"),
    [
        (_restored_from_a_snapshot, "resuming after the watermarks"),
        (_flushed_after_the_commits, "starting partitions with no watermark at the earliest"),
    ],
    ids=["snapshot", "flush"],
)
def test_a_running_worker_that_meets_a_redis_that_lost_writes_stops_and_its_restart_applies_them(
    settings: Settings,
    own_redis: OwnRedis,
    tmp_path: Path,
    lose_writes: Callable[[_OwnRedisStream], list[dict]],
    restart_says: str,
) -> None:
    run = _OwnRedisStream(settings, own_redis)
    with run.worker(tmp_path / "worker-1.log") as first:
        sent = lose_writes(run)  # under the running worker
        rest = _events(len(sent), REST)
        run.stops_at_the_next_batch(first, rest, tmp_path / "worker-1.log")
    log = run.restarted_applies_each_once(sent + rest, tmp_path / "worker-2.log")
    assert restart_says in log
    run.client.close()


@pytest.mark.timeout(300)
def test_a_worker_that_only_read_the_watermarks_stops_on_a_flush_and_its_restart_rebuilds(
    settings: Settings, own_redis: OwnRedis, tmp_path: Path
) -> None:
    run = _OwnRedisStream(settings, own_redis)
    with run.worker(tmp_path / "worker-0.log"):
        run.produce(_events(0, HALF))
        wait_until(lambda: run.applied() == HALF, 120, "the stream applied")
    run.wait_for_commits_of_everything_applied()
    watched = tmp_path / "worker-1.log"
    with run.worker(watched) as first:  # it applies nothing before the flush
        wait_until(lambda: "resuming after the watermarks" in watched.read_text(), 60, "a resume")
        run.client.flushall()
        run.stops_at_the_next_batch(first, _events(HALF, REST), watched)
    log = run.restarted_applies_each_once(_events(0, HALF + REST), tmp_path / "worker-2.log")
    assert "starting partitions with no watermark at the earliest" in log
    run.client.close()


def test_a_state_is_built_from_the_log_when_it_holds_no_event_or_says_so(
    settings: Settings, redis_client
) -> None:
    if settings.redis_cluster:
        pytest.skip("a worker on Redis Cluster never rebuilds by itself")
    keys = Keys(settings.key_prefix)

    async def decide() -> bool:
        client = aioredis.Redis.from_url(settings.redis_url)
        try:
            return await state_built_from_log(client, keys)
        finally:
            await client.aclose()

    try:
        redis_client.set(keys.event_clock, TS)
        assert not asyncio.run(decide())  # events, no mark: the commits hold
        assert not redis_client.exists(keys.built_from_log)
        redis_client.delete(keys.event_clock)
        assert asyncio.run(decide())  # no event: begun from the log, and marked so
        assert redis_client.exists(keys.built_from_log)
        redis_client.set(keys.event_clock, TS)  # another worker's first batch landed
        assert asyncio.run(decide())  # the mark still says so
    finally:
        redis_client.delete(keys.event_clock, keys.built_from_log)
