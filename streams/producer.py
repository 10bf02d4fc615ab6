"""The producer helper that event sources import: keyed by user, optionally batched per partition.

A message is one event, or a JSON array of events that share a partition. Arrays cut the
per-message cost of the consuming framework by the batch size; per-user order holds because a
user's events always go to the partition their key hashes to.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from confluent_kafka import KafkaException, Producer

from freshrec.streams.events import Event, encode_events
from freshrec.streams.partitioner import partition_for

log = logging.getLogger(__name__)

METADATA_WAIT_S = 10.0
"""How long a new producer waits for its topic's partitions to have leaders: a topic created
a moment ago answers "leader not available" until its partitions are elected."""


class EventProducer:
    """Publishes events to the events topic.

    Parameters
    ----------
    bootstrap
        Kafka bootstrap servers.
    topic
        The events topic, e.g. ``Settings().events_topic``.
    events_per_message
        1 sends each event as its own keyed message; more packs up to that many events of the
        same partition into one JSON array.
    config
        More librdkafka options: the security ones from
        ``freshrec.connections.kafka_config(settings)``.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        events_per_message: int = 1,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.topic = topic
        self.events_per_message = max(1, events_per_message)
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "partitioner": "murmur2_random",  # Java-compatible, as partition_for
                "linger.ms": 5,
                "compression.type": "lz4",
                "enable.idempotence": True,
                "log_level": 3,
                **(config or {}),
            }
        )
        self.partitions = self._partition_count()
        self._pending: dict[int, list[dict[str, Any]]] = {}
        self.sent_events = 0
        self.sent_messages = 0
        self.failed = 0

    def _partition_count(self) -> int:
        deadline = time.monotonic() + METADATA_WAIT_S
        while True:
            metadata = self._producer.list_topics(self.topic, timeout=10)
            topic = metadata.topics.get(self.topic)
            if (
                topic is not None
                and topic.error is None
                and topic.partitions
                and all(p.error is None and p.leader >= 0 for p in topic.partitions.values())
            ):
                return len(topic.partitions)
            if time.monotonic() >= deadline:
                reason = "" if topic is None or topic.error is None else f" ({topic.error})"
                raise RuntimeError(
                    f"topic {self.topic!r} does not exist or has no leaders{reason}; create it "
                    "with `freshrec services up` or streams.topics.ensure_topics"
                )
            time.sleep(0.1)  # polling the broker's metadata until the deadline

    def send(self, event: Event | Mapping[str, Any]) -> None:
        payload = event.to_json() if isinstance(event, Event) else dict(event)
        if self.events_per_message == 1:
            user = payload.get("user_id")
            key = user.encode() if isinstance(user, str) else None
            self._produce(encode_events(payload), key=key, count=1)
            return
        user = payload.get("user_id")
        partition = partition_for(user, self.partitions) if isinstance(user, str) else 0
        bucket = self._pending.setdefault(partition, [])
        bucket.append(payload)
        if len(bucket) >= self.events_per_message:
            self._flush_partition(partition)

    def send_raw(self, payload: bytes, key: bytes | None = None) -> None:
        """Send bytes exactly as given (replaying a file with malformed lines, tests)."""
        self._produce(payload, key=key, count=1)

    def send_many(self, events: Iterable[Event | Mapping[str, Any]]) -> None:
        for event in events:
            self.send(event)

    def flush(self, timeout: float = 30.0) -> None:
        for partition in list(self._pending):
            self._flush_partition(partition)
        remaining = self._producer.flush(timeout)
        if remaining:
            raise TimeoutError(f"{remaining} messages still undelivered after {timeout:.0f} s")
        if self.failed:
            raise KafkaException(f"{self.failed} messages failed delivery; see the log")

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _flush_partition(self, partition: int) -> None:
        bucket = self._pending.pop(partition, None)
        if not bucket:
            return
        self._produce(encode_events(bucket), key=None, count=len(bucket), partition=partition)

    def _produce(
        self, value: bytes, key: bytes | None, count: int, partition: int | None = None
    ) -> None:
        kwargs: dict[str, Any] = {"value": value, "key": key, "on_delivery": self._delivered}
        if partition is not None:
            kwargs["partition"] = partition
        while True:
            try:
                self._producer.produce(self.topic, **kwargs)
                break
            except BufferError:
                self._producer.poll(0.05)  # local queue full: let deliveries drain
        self._producer.poll(0)
        self.sent_events += count
        self.sent_messages += 1

    def _delivered(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.failed += 1
            log.error("delivery failed", extra={"topic": msg.topic(), "error": str(err)})
