"""Malformed messages go to the dead-letter topic with a reason; valid ones are learned."""

from __future__ import annotations

import json
import time

import pytest

from freshrec.settings import Settings
from freshrec.streams.producer import EventProducer
from tests.support import TopicReader, wait_until

pytestmark = pytest.mark.integration

TS = time.time() - 60


def _valid(n: int) -> bytes:
    return json.dumps(
        {"type": "click", "user_id": f"ok-{n}", "item_id": f"item-{n}", "ts": TS}
    ).encode()


BAD = {
    b"{not json": "not valid JSON",
    json.dumps({"type": "click", "user_id": "u", "ts": TS}).encode(): "missing field 'item_id'",
    json.dumps(
        {"type": "click", "user_id": 7, "item_id": "i", "ts": TS}
    ).encode(): "'user_id' must be a string",
    json.dumps(
        {"type": "like", "user_id": "u", "item_id": "i", "ts": TS}
    ).encode(): "unknown type 'like'",
    b'{"type": "rating", "user_id": "u", "item_id": "i", "value": NaN, "ts": 1.7e9}': "NaN",
    json.dumps(
        {"type": "rating", "user_id": "u", "item_id": "i", "value": 9, "ts": TS}
    ).encode(): "outside the scale",
    json.dumps(
        {"type": "view", "user_id": "u", "item_id": "i", "ts": 12.0}
    ).encode(): "plausible unix time",
}


def test_each_bad_message_lands_in_the_dlq_and_every_valid_one_is_applied(
    settings: Settings, worker, redis_client
) -> None:
    sent_bad = list(BAD)
    with EventProducer(settings.kafka_bootstrap, settings.events_topic) as producer:
        for n, bad in enumerate(sent_bad):
            producer.send_raw(_valid(n), key=f"ok-{n}".encode())
            producer.send_raw(bad, key=b"u")
        # One array: a valid event next to an invalid one; only the invalid one is rejected.
        mixed = [json.loads(_valid(100)), {"type": "click", "user_id": "u", "ts": TS}]
        producer.send_raw(json.dumps(mixed).encode(), key=b"ok-100")

    dlq = TopicReader(settings.kafka_bootstrap, settings.dlq_topic)
    try:
        messages = wait_until(
            lambda: (m := dlq.poll()) and len(m) >= len(sent_bad) + 1 and m,
            30,
            "every bad message on the DLQ",
        )
        by_value = {m.value(): dict(m.headers())["freshrec-reason"].decode() for m in messages}
        for bad, expected in BAD.items():
            assert bad in by_value, f"{bad!r} missing from the DLQ"
            assert expected in by_value[bad], (bad, by_value[bad])
        mixed_reason = by_value[json.dumps(mixed).encode()]
        assert "event [1]" in mixed_reason and "missing field 'item_id'" in mixed_reason
        assert all(
            dict(m.headers())["freshrec-source"].startswith(settings.events_topic.encode())
            for m in messages
        )
    finally:
        dlq.close()

    for n in [*range(len(sent_bad)), 100]:
        wait_until(
            lambda n=n: redis_client.zscore(f"{settings.key_prefix}:hist:ok-{n}", f"item-{n}"),
            30,
            f"valid event {n} to be applied",
        )
    assert redis_client.exists(f"{settings.key_prefix}:hist:u") == 0  # nothing of the bad user
    assert worker.poll() is None, "the worker stopped"
