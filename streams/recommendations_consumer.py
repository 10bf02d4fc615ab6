"""The consumer helper for downstream services: fresh recommendation lists, one per user update.

Messages on ``freshrec.recommendations`` are keyed by user; a service that keeps the latest list
per user (a cache, a push sender) can consume them with any consumer group and a compacting
mindset: the newest message for a user replaces the older ones.

Delivery is at least once: a list's offset is committed only once the caller asks for the next
list (or closes the consumer), so a service that stops while handling one gets it again.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer


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
        self._consumer.subscribe([topic])
        self._handed: Any = None  # the message of the last list returned

    def poll(self, timeout_s: float = 1.0) -> RecommendationList | None:
        """The next list, or None if none came within ``timeout_s``; asking for it is what
        marks the list returned before as handled."""
        self._done_with_handed()
        message = self._consumer.poll(timeout_s)
        if message is None or message.error() is not None:
            return None
        self._handed = message
        body = json.loads(message.value())
        return RecommendationList(body["user_id"], body["items"], body["generated_at"])

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
