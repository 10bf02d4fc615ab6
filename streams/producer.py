"""The producer helper that event sources import: keyed by user, optionally batched per partition.

A message is one event, or a JSON array of events that share a partition. Arrays cut the
per-message cost of the consuming framework by the batch size; per-user order holds because a
user's events always go to the partition their key hashes to. An array goes when it is full
(of events, or of bytes: ``max_message_bytes``) or when its first event has waited
``max_wait_s``, whichever comes first, so a slow source's events are not held back for the next
ones.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

from confluent_kafka import KafkaException, Producer

from freshrec.streams.events import Event, encode_events
from freshrec.streams.partitioner import partition_for
from freshrec.streams.topics import partitions_with_leaders

log = logging.getLogger(__name__)

MAX_WAIT_S = 0.02
"""How long an array's first event waits for the array to fill before it is sent anyway."""
MAX_MESSAGE_BYTES = 900_000
"""The largest message sent: under librdkafka's ``message.max.bytes`` (1,000,000) and the
worker's ``FRESHREC_MAX_MESSAGE_BYTES`` (1,000,000), with room for the record's overhead."""
QUEUE_FULL_WAIT_S = 30.0
"""How long a send waits for room in librdkafka's local queue (full while the brokers do not
take messages) before it raises `BufferError`."""


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
    max_wait_s
        With arrays, how long one waits to fill before it is sent as it is.
    max_message_bytes
        The largest message: an array goes before the next event would take it past this,
        and an event that alone is larger is refused (`ValueError`) and not taken.
    queue_full_wait_s
        How long a send waits for room in the local queue. Past it, `send` raises
        `BufferError` and the event it was given is not taken; events sent before it are kept
        and go as soon as there is room (or with `flush`).

    `flush` (and `close`) raise `KafkaException` when messages failed delivery since the last
    `flush`; ``failed`` counts them all.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        events_per_message: int = 1,
        config: Mapping[str, Any] | None = None,
        max_wait_s: float = MAX_WAIT_S,
        queue_full_wait_s: float = QUEUE_FULL_WAIT_S,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self.topic = topic
        self.events_per_message = max(1, events_per_message)
        self.max_wait_s = max_wait_s
        self.max_message_bytes = max_message_bytes
        self.queue_full_wait_s = queue_full_wait_s
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
        self.partitions = partitions_with_leaders(self._producer, topic)
        self._pending: dict[int, list[bytes]] = {}  # each partition's array, events encoded
        self._bytes: dict[int, int] = {}  # the length of each array's message as it stands
        self._opened: dict[int, float] = {}  # when each partial array took its first event
        self.sent_events = 0
        self.sent_messages = 0
        self.failed = 0
        self._failed_reported = 0  # of `failed`, what a `flush` has raised for
        # Arrays are filled by `send` and sent by it, by `flush`, or when due by a thread of
        # their own; the lock guards them, the event wakes the thread when one opens.
        self._arrays = threading.Lock()
        self._opening = threading.Event()
        self._closing = False
        self._timer: threading.Thread | None = None
        if self.events_per_message > 1:
            # The thread holds the producer weakly: one never closed is still collected (and
            # librdkafka's client with it), and the thread, woken then, ends.
            self._timer = threading.Thread(
                target=_time_arrays,
                args=(weakref.ref(self), self._opening),
                name="freshrec-producer-arrays",
                daemon=True,
            )
            weakref.finalize(self, self._opening.set)
            self._timer.start()

    def send(self, event: Event | Mapping[str, Any]) -> None:
        payload = event.to_json() if isinstance(event, Event) else dict(event)
        user = payload.get("user_id")
        encoded = encode_events(payload)  # what cannot be sent is refused here, not in an array
        if len(encoded) + 2 > self.max_message_bytes:  # alone, as an array's one event
            raise ValueError(
                f"an event of {len(encoded)} bytes is over the largest message, "
                f"{self.max_message_bytes} bytes"
            )
        if self.events_per_message == 1:
            key = user.encode() if isinstance(user, str) else None
            self._produce(encoded, key=key, count=1)
            return
        partition = partition_for(user, self.partitions) if isinstance(user, str) else 0
        with self._arrays:
            if self._bytes.get(partition, 0) + 1 + len(encoded) > self.max_message_bytes:
                self._flush_partition(partition)  # full of bytes: it goes, this event opens one
            bucket = self._pending.get(partition)
            if bucket is None:
                bucket = self._pending[partition] = []
                self._bytes[partition] = 1  # "[" and "]", less the first event's ","
                if not self._opened:  # else the timer already waits for an earlier array
                    self._opening.set()
                self._opened[partition] = time.monotonic()
            bucket.append(encoded)
            self._bytes[partition] += 1 + len(encoded)
            if len(bucket) >= self.events_per_message:
                try:
                    self._flush_partition(partition)
                except BufferError:
                    self._pending[partition].pop()  # this event was not taken; the rest wait
                    self._bytes[partition] -= 1 + len(encoded)
                    raise

    def send_raw(self, payload: bytes, key: bytes | None = None) -> None:
        """Send bytes exactly as given (replaying a file with malformed lines, tests)."""
        self._produce(payload, key=key, count=1)

    def send_many(self, events: Iterable[Event | Mapping[str, Any]]) -> None:
        for event in events:
            self.send(event)

    def flush(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        with self._arrays:
            for partition in list(self._pending):
                try:
                    self._flush_partition(partition, max(deadline - time.monotonic(), 0.0))
                except BufferError:
                    waiting = sum(map(len, self._pending.values()))
                    raise TimeoutError(
                        f"{waiting} events still wait for room in the local queue after "
                        f"{timeout:.0f} s"
                    ) from None
        remaining = self._producer.flush(max(deadline - time.monotonic(), 0.0))
        if remaining:
            raise TimeoutError(f"{remaining} messages still undelivered after {timeout:.0f} s")
        total = self.failed  # read once: deliveries may be reported on the timer's thread
        failed, self._failed_reported = total - self._failed_reported, total
        if failed:
            raise KafkaException(f"{failed} messages failed delivery; see the log")

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._closing = True
            self._opening.set()
            if self._timer is not None:
                self._timer.join()

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send_due_arrays(self) -> float | None:
        """Sends each array whose first event has waited ``max_wait_s`` (on the timer's
        thread); returns how long until the next is due (None: no array waits)."""
        with self._arrays:
            now = time.monotonic()
            due = [p for p, opened in self._opened.items() if now - opened >= self.max_wait_s]
            for partition in due:
                try:  # no wait for room here: `send` and `flush` would wait for the lock
                    self._flush_partition(partition, wait_s=0.0)
                except BufferError:  # kept; tried again once it has waited once more
                    log.warning("the local queue is full; an array waits to be sent")
                    self._opened[partition] = time.monotonic()
                except Exception as exc:  # refused before it was queued: no report
                    self.failed += 1
                    log.error("an array could not be sent", extra={"error": str(exc)})
            first = min(self._opened.values(), default=None)
        return None if first is None else max(first + self.max_wait_s - time.monotonic(), 0.0)

    def _flush_partition(self, partition: int, wait_s: float | None = None) -> None:
        """Sends the partition's array (under ``_arrays``); kept if the queue stays full."""
        bucket = self._pending.pop(partition, None)
        if not bucket:
            return
        opened = self._opened.pop(partition)  # kept with every array
        size = self._bytes.pop(partition)
        try:
            value = b"[" + b",".join(bucket) + b"]"  # as encode_events encodes a list
            self._produce(value, key=None, count=len(bucket), partition=partition, wait_s=wait_s)
        except BufferError:
            self._pending[partition], self._opened[partition] = bucket, opened
            self._bytes[partition] = size
            raise

    def _produce(
        self,
        value: bytes,
        key: bytes | None,
        count: int,
        partition: int | None = None,
        wait_s: float | None = None,
    ) -> None:
        """Queues one message, waiting up to ``wait_s`` (``queue_full_wait_s``) for room."""
        wait_s = self.queue_full_wait_s if wait_s is None else wait_s
        kwargs: dict[str, Any] = {"value": value, "key": key, "on_delivery": self._delivered}
        if partition is not None:
            kwargs["partition"] = partition
        deadline: float | None = None
        while True:
            try:
                self._producer.produce(self.topic, **kwargs)
                break
            except BufferError:
                now = time.monotonic()
                deadline = now + wait_s if deadline is None else deadline
                if now >= deadline:
                    raise BufferError(
                        f"librdkafka's local queue stayed full for {wait_s:g} s:"
                        f" the brokers are not taking messages for {self.topic!r}"
                    ) from None
                self._producer.poll(0.05)  # local queue full: let deliveries drain
        self._producer.poll(0)
        self.sent_events += count
        self.sent_messages += 1

    def _delivered(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.failed += 1
            log.error("delivery failed", extra={"topic": msg.topic(), "error": str(err)})


def _time_arrays(producer: weakref.ref[EventProducer], opening: threading.Event) -> None:
    """The timer thread: sends due arrays until the producer is closed or collected."""
    wait: float | None = None  # until the first array is due; None while there is none
    while True:
        opening.wait(wait)
        opening.clear()
        live = producer()
        if live is None or live._closing:
            return
        wait = live._send_due_arrays()
        del live  # no strong reference while waiting
