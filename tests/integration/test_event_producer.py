"""The producer helper on a real broker: arrays that wait for no one, a full queue that is
reported instead of waited on for ever, and each failed delivery reported once."""

from __future__ import annotations

import dataclasses
import gc
import json
import shutil
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from freshrec.connections import kafka_config
from freshrec.settings import Settings
from freshrec.streams.producer import EventProducer
from freshrec.streams.topics import delete_topics, ensure_topics
from tests.support import OwnService, TopicReader, wait_until

pytestmark = pytest.mark.integration


def _event(n: int) -> dict[str, object]:
    return {"user_id": "u1", "item_id": f"i{n}", "event_type": "click", "ts": 1.7e9 + n}


def _items(reader: TopicReader) -> list[str]:
    return [event["item_id"] for m in reader.poll() for event in json.loads(m.value())]


@pytest.fixture
def own_topic(settings: Settings, request: pytest.FixtureRequest) -> Iterator[str]:
    """A one-partition topic of the test's own, with the topic configuration it asks for."""
    topic = f"{settings.topic_prefix}.own"
    config = getattr(request, "param", {})
    admin = AdminClient(kafka_config(settings))
    admin.create_topics([NewTopic(topic, 1, 1, config=config)])[topic].result(30)
    yield topic
    delete_topics(settings.kafka_bootstrap, [topic], settings=settings)


def test_a_partial_array_is_sent_once_its_first_event_has_waited(
    settings: Settings, own_topic: str
) -> None:
    """A slow source's events go within ``max_wait_s``, not when 100 have come or at `flush`.
    An event that cannot be encoded is refused by its `send`, not found later by the timer."""
    producer = EventProducer(settings.kafka_bootstrap, own_topic, 100, kafka_config(settings))
    reader = TopicReader(settings.kafka_bootstrap, own_topic)
    try:
        with pytest.raises(ValueError, match="JSON"):
            producer.send({**_event(9), "ts": float("nan")})
        for n in range(3):
            producer.send(_event(n))
        assert wait_until(lambda: _items(reader) or None, 20, "the partial array") == [
            "i0",
            "i1",
            "i2",
        ]
        assert producer.sent_messages == 1
    finally:
        producer.close()
        reader.close()


def test_arrays_stay_under_the_largest_message_and_an_event_over_it_is_refused(
    settings: Settings, own_topic: str
) -> None:
    """A hundred events of 20 kB would make a 2 MB array, which the producer refuses (with the
    events it had taken); they go as arrays under ``max_message_bytes``, all of them. An event
    that alone is over it is refused by its `send`."""
    producer = EventProducer(settings.kafka_bootstrap, own_topic, 100, kafka_config(settings))
    reader = TopicReader(settings.kafka_bootstrap, own_topic)
    try:
        with pytest.raises(ValueError, match="over the largest message"):
            producer.send({**_event(0), "context": {"note": "x" * 1_000_000}})
        for n in range(100):
            producer.send({**_event(n), "context": {"note": "x" * 20_000}})
        producer.flush()
        found: list[str] = []
        wait_until(lambda: found.extend(_items(reader)) or len(found) >= 100, 30, "every event")
        assert found == [f"i{n}" for n in range(100)]
        assert producer.sent_messages == 3 and producer.failed == 0  # 44, 44 and 12 events
    finally:
        producer.close()
        reader.close()


def test_a_full_queue_raises_after_its_wait_and_keeps_what_it_took(
    settings: Settings, tmp_path: Path
) -> None:
    """While the broker is down a local queue of one message stays full: the send raises after
    its wait instead of blocking until librdkafka gives up. What it took before is sent once the
    broker is back."""
    broker = OwnService("kafka", settings, tmp_path / "kafka")
    broker.start()
    try:
        configured = dataclasses.replace(settings, kafka_bootstrap=broker.address)
        ensure_topics(broker.address, configured)
        producer = EventProducer(
            broker.address,
            configured.events_topic,
            2,
            {
                **kafka_config(configured),
                "queue.buffering.max.messages": 1,
                "message.timeout.ms": 60_000,  # a send that blocks would end here, unreported
                "log_level": 2,  # quiet about the refused connections while the broker is down
            },
            queue_full_wait_s=1.0,
        )
        broker.stop()
        for n in range(3):
            producer.send(_event(n))  # i0 and i1 fill the queue; i2 waits in an array
        with pytest.raises(BufferError, match="stayed full for 1 s"):
            producer.send(_event(3))  # not taken
        broker.start()
        producer.close()
        reader = TopicReader(broker.address, configured.events_topic)
        try:
            assert wait_until(lambda: _items(reader) or None, 20, "the events") == [
                "i0",
                "i1",
                "i2",
            ]
        finally:
            reader.close()
        assert producer.failed == 0
    finally:
        broker.stop(hard=True)
        shutil.rmtree(broker.workdir, ignore_errors=True)


@pytest.mark.parametrize("own_topic", [{"max.message.bytes": "1"}], indirect=True)
def test_a_failed_delivery_is_reported_by_one_flush(settings: Settings, own_topic: str) -> None:
    producer = EventProducer(settings.kafka_bootstrap, own_topic, 1, kafka_config(settings))
    try:
        producer.send(_event(0))  # larger than the topic's limit: refused by the broker
        with pytest.raises(KafkaException, match="1 messages failed delivery"):
            producer.flush()
        producer.flush()  # nothing failed since: no error
        assert producer.failed == 1
    finally:
        producer.close()


def test_a_producer_never_closed_is_collected_and_its_timer_ends(
    settings: Settings, own_topic: str
) -> None:
    """Callers that only flush (as close did before the timer) leak nothing: the timer thread
    holds the producer weakly, so it and librdkafka's client go when it is no longer used."""
    producer = EventProducer(settings.kafka_bootstrap, own_topic, 100, kafka_config(settings))
    producer.send(_event(0))
    producer.flush()
    timer, alive = producer._timer, weakref.ref(producer)
    assert timer is not None and timer.is_alive()
    del producer
    gc.collect()
    assert alive() is None
    timer.join(10)
    assert not timer.is_alive()
