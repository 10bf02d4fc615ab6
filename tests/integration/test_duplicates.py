"""Events sent again with their ``event_id`` (a producer's retry, a file replayed twice),
through Kafka and a worker: learned once."""

from __future__ import annotations

import collections
from typing import Any

import pytest

from freshrec.evaluation.synth import SynthConfig, generate
from freshrec.settings import Settings
from freshrec.store.keys import Keys
from freshrec.streams.producer import EventProducer
from tests.support import applied_events, partition_watermarks, wait_until

pytestmark = pytest.mark.integration


class _Tracked(EventProducer):
    """The producer helper, keeping the last offset delivered to each partition."""

    def __init__(self, settings: Settings, per_message: int) -> None:
        self.last: dict[int, int] = {}
        super().__init__(settings.kafka_bootstrap, settings.events_topic, per_message)

    def _delivered(self, err: Any, msg: Any) -> None:
        super()._delivered(err, msg)
        if err is None:
            self.last[msg.partition()] = max(msg.offset(), self.last.get(msg.partition(), -1))


def _send(settings: Settings, events: list[dict], per_message: int) -> dict[int, int]:
    """The events, ``per_message`` to a message; the last offset written per partition."""
    with _Tracked(settings, per_message) as producer:
        producer.send_many(events)
    return producer.last


def test_a_stream_sent_twice_is_learned_once(
    settings: Settings, redis_client: object, worker: object
) -> None:
    events = generate(SynthConfig(users=150, items=60, events=1_000, seed=12)).events
    assert len({e["event_id"] for e in events}) == len(events)
    per_user = collections.Counter(e["user_id"] for e in events)
    assert max(per_user.values()) <= settings.dedup_events  # every id within its user's window
    keys = Keys(settings.key_prefix)
    _send(settings, events, per_message=50)
    wait_until(lambda: applied_events(redis_client, settings) == len(events), 60, "the stream")
    users = sorted({e["user_id"] for e in events})
    state = [redis_client.zrange(keys.history(u), 0, -1, withscores=True) for u in users]
    vectors = [redis_client.get(keys.user_vector(u)) for u in users]
    last = _send(settings, events, per_message=1)  # the same events again, one to a message

    def passed() -> bool:
        marks = partition_watermarks(redis_client, settings)
        return all(marks.get(p, -1) >= offset for p, offset in last.items())

    wait_until(passed, 60, f"the worker to pass offsets {last}")
    assert applied_events(redis_client, settings) == len(events)
    assert [redis_client.zrange(keys.history(u), 0, -1, withscores=True) for u in users] == state
    assert [redis_client.get(keys.user_vector(u)) for u in users] == vectors
