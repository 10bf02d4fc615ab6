"""A worker resumes after what Redis holds, not after what Kafka was told.

Redis can come back older than the group's Kafka commits: restored from a backup, or after a
machine crash that lost the append-only file's last second. The messages between its offset
watermarks and the commits would then never be applied again. Here a worker applies the first
half of a stream, Redis is snapshotted (``SAVE``), the worker applies the second half and
commits it, and stops; Redis is killed and started again from the snapshot. A new worker must
apply the second half again, each event once: the totals, watermarks and histories end as if
nothing had been lost.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import redis
from confluent_kafka import Consumer, TopicPartition

from freshrec.connections import kafka_config
from freshrec.settings import Settings
from freshrec.store.keys import Keys
from freshrec.streams.producer import EventProducer
from tests.support import OwnRedis, freshrec_process, stop_process, wait_until

pytestmark = pytest.mark.integration

HALF = 2_000
TS = 1_700_000_000.0


def _events(start: int, count: int) -> list[dict]:
    return [
        {"type": "view", "user_id": f"u{n % 97}", "item_id": f"i{n % 211}", "ts": TS + n}
        for n in range(start, start + count)
    ]


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
    settings = dataclasses.replace(settings, redis_url=own_redis.url)
    keys = Keys(settings.key_prefix)
    client = redis.Redis.from_url(settings.redis_url)

    def applied() -> int:
        return int(client.hget(keys.worker_stats, "events") or 0)

    def worker(name: str):
        return freshrec_process(["worker", "--loglevel", "info"], settings, tmp_path / name)

    def produce(events: list[dict]) -> None:
        with EventProducer(settings.kafka_bootstrap, settings.events_topic, 10) as producer:
            producer.send_many(events)

    first = worker("worker-1.log")
    try:
        produce(_events(0, HALF))
        wait_until(lambda: applied() == HALF, 120, "the first half applied")
        client.save()
        saved_marks = sorted(client.keys(keys.watermark("*")))
        produce(_events(HALF, HALF))
        wait_until(lambda: applied() == 2 * HALF, 120, "the second half applied")
        marks = {k: int(client.get(k)) for k in client.keys(keys.watermark("*"))}
        ends = {int(k.decode().rsplit("/", 1)[1]): m + 1 for k, m in marks.items()}
    finally:
        stop_process(first)  # a graceful stop commits what it applied
    wait_until(
        lambda: {p: o for p, o in _committed(settings).items() if o >= 0} == ends,
        60,
        "Kafka to hold the commits of everything applied",
    )

    client.close()
    own_redis.kill()
    own_redis.start()  # from the snapshot: the first half only
    client = redis.Redis.from_url(settings.redis_url)
    assert applied() == HALF and sorted(client.keys(keys.watermark("*"))) == saved_marks

    second = worker("worker-2.log")
    try:
        wait_until(lambda: applied() >= 2 * HALF, 120, "the second half applied again")
        wait_until(
            lambda: {k: int(client.get(k)) for k in client.keys(keys.watermark("*"))} == marks,
            30,
            "every watermark back where it was",
        )
    finally:
        stop_process(second)
    assert applied() == 2 * HALF  # each event once
    users = {e["user_id"] for e in _events(0, 2 * HALF)}
    histories = sum(client.zcard(keys.history(u)) for u in users)
    assert histories == len({(e["user_id"], e["item_id"]) for e in _events(0, 2 * HALF)})
    assert "resuming after the watermarks" in (tmp_path / "worker-2.log").read_text()
    client.close()
