"""Producers that write the events topic in transactions: the worker learns what they commit
and nothing of what they abort, on a real broker."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import Producer

from freshrec.connections import kafka_config
from freshrec.settings import Settings
from freshrec.streams.events import encode_events
from tests.support import applied_events, partition_watermarks, wait_until

pytestmark = pytest.mark.integration

TS = time.time() - 60


def _send(producer: Producer, topic: str, users: range) -> dict[int, int]:
    """One click per user, each keyed by its user; the last offset written per partition."""
    last: dict[int, int] = {}

    def delivered(err: object, msg: object) -> None:
        assert err is None, err
        last[msg.partition()] = max(msg.offset(), last.get(msg.partition(), -1))  # type: ignore[attr-defined]

    for n in users:
        event = {"type": "click", "user_id": f"u{n}", "item_id": f"i{n % 7}", "ts": TS}
        producer.produce(topic, encode_events(event), key=f"u{n}".encode(), on_delivery=delivered)
    producer.flush(30)
    return last


def test_events_of_an_aborted_transaction_are_not_learned(
    settings: Settings, redis_client, worker
) -> None:
    producer = Producer(kafka_config(settings, **{"transactional.id": settings.topic_prefix}))
    producer.init_transactions(30)
    producer.begin_transaction()
    _send(producer, settings.events_topic, range(0, 30))
    producer.abort_transaction(30)
    producer.begin_transaction()
    committed = _send(producer, settings.events_topic, range(30, 50))
    producer.commit_transaction(30)
    # The committed events follow the aborted ones in every partition: once the watermarks
    # reach them, the worker has read past every aborted event.
    wait_until(
        lambda: partition_watermarks(redis_client, settings) == committed,
        60,
        f"the worker to apply up to {committed}",
    )
    assert applied_events(redis_client, settings) == 20
