"""The consumer helper for downstream services: fresh recommendation lists, one per user update.

Messages on ``freshrec.recommendations`` are keyed by user; a service that keeps the latest list
per user (a cache, a push sender) can consume them with any consumer group and a compacting
mindset: the newest message for a user replaces the older ones.

Delivery is at least once: a list's offset is committed only once the caller asks for the next
list (or closes the consumer), so a service that stops while handling one gets it again.

A list is never handed over after a newer one of the same user: two reader replicas may publish
lists of one user moments apart, and a list a producer retried can land after the newer one. A
list that is not JSON of the contract's shape is logged with its offset and skipped; an error
Kafka will not recover from by itself (an authorisation refused, the topic gone) is raised.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException

from freshrec.streams.topics import partitions_with_leaders

log = logging.getLogger(__name__)

LASTING_ERRORS = frozenset(
    {
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.GROUP_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.SASL_AUTHENTICATION_FAILED,
        KafkaError._AUTHENTICATION,
        KafkaError._SSL,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._UNKNOWN_TOPIC,
        KafkaError.INVALID_GROUP_ID,
    }
)
"""Errors `poll` raises: nothing waiting will mend them. confluent-kafka reports a consumed
message's error as not retriable whatever it is, so the others (a broker restarting, all brokers
down for a while) are logged and polled through: librdkafka reconnects by itself."""
REMEMBERED_USERS = 100_000
"""Users whose newest list's time the consumer keeps, the most recent first: lists of a user
arrive out of order by seconds at most, so older entries are dropped."""


@dataclass(frozen=True)
class RecommendationList:
    user_id: str
    items: list[dict[str, Any]]
    generated_at: float

    @property
    def item_ids(self) -> list[str]:
        return [item["item_id"] for item in self.items]


class RecommendationsConsumer:
    """Iterates the lists published for users, as they arrive.

    Parameters
    ----------
    bootstrap
        Kafka bootstrap servers.
    topic
        ``Settings().recommendations_topic``.
    group
        The consumer group of the downstream service.
    from_beginning
        Start from the oldest retained list when the group has no committed offset.
    config
        More librdkafka options: the security ones from
        ``freshrec.connections.kafka_config(settings)``.

    ``skipped_stale`` and ``skipped_malformed`` count the lists not handed over,
    ``errors_polled_through`` the errors logged and not raised.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        group: str,
        from_beginning: bool = False,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": group,
                "auto.offset.reset": "earliest" if from_beginning else "latest",
                "enable.auto.commit": True,
                # Offsets are stored for committing when the caller is done with a list, not
                # when it is handed over.
                "enable.auto.offset.store": False,
                "log_level": 3,
                **(config or {}),
            }
        )
        try:
            partitions_with_leaders(self._consumer, topic)  # a missing topic is named at once
        except RuntimeError:
            self._consumer.close()
            raise
        self._consumer.subscribe([topic])
        self._handed: Any = None  # the message of the last list returned
        self._newest: OrderedDict[str, float] = OrderedDict()  # user -> newest list handed
        self.skipped_stale = 0
        self.skipped_malformed = 0
        self.errors_polled_through = 0

    def poll(self, timeout_s: float = 1.0) -> RecommendationList | None:
        """The next list, or None if none came within ``timeout_s``; asking for it is what
        marks the list returned before as handled."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._done_with_handed()
            message = self._consumer.poll(max(deadline - time.monotonic(), 0.0))
            if message is None:
                return None
            update = self._handed_over(message)
            if update is not None or time.monotonic() >= deadline:
                return update

    def _handed_over(self, message: Any) -> RecommendationList | None:
        """The message's list, or None for an error Kafka retries or a list skipped."""
        error = message.error()
        if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
                return None
            if error.fatal() or error.code() in LASTING_ERRORS:
                raise KafkaException(error)
            self.errors_polled_through += 1
            log.warning("consuming recommendations: %s (retrying)", error.str())
            return None
        self._handed = message  # handled, whatever follows, once the caller asks again
        update = _parsed(message)
        if update is None:
            self.skipped_malformed += 1
            return None
        newest = self._newest.get(update.user_id)
        if newest is not None and update.generated_at < newest:
            self.skipped_stale += 1  # the user's newer list was handed over already
            return None
        self._newest[update.user_id] = update.generated_at
        self._newest.move_to_end(update.user_id)
        if len(self._newest) > REMEMBERED_USERS:
            self._newest.popitem(last=False)
        return update

    def __iter__(self) -> Iterator[RecommendationList]:
        while True:
            update = self.poll()
            if update is not None:
                yield update

    def close(self) -> None:
        """Commits the lists handled, the last one returned included, and leaves the group."""
        self._done_with_handed()
        self._consumer.close()

    def _done_with_handed(self) -> None:
        if self._handed is not None:
            self._consumer.store_offsets(message=self._handed)
            self._handed = None


def _parsed(message: Any) -> RecommendationList | None:
    """The list a message holds, or None (logged) when it is not one."""
    try:
        body = json.loads(message.value())
        items = body["items"]
        if not isinstance(items, list) or not all(
            isinstance(item, dict) and isinstance(item.get("item_id"), str) for item in items
        ):
            raise ValueError("items is not a list of objects with an item_id")
        return RecommendationList(str(body["user_id"]), items, float(body["generated_at"]))
    except (ValueError, TypeError, KeyError) as exc:  # JSONDecodeError is a ValueError
        log.error(
            "skipped a message that is not a recommendation list",
            extra={
                "topic": message.topic(),
                "partition": message.partition(),
                "offset": message.offset(),
                "error": f"{type(exc).__name__}: {exc}",
            },
        )
        return None
