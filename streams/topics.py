"""Explicit creation of freshrec's topics (the broker does not auto-create them)."""

from __future__ import annotations

import logging
import time
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from freshrec.connections import kafka_config
from freshrec.settings import Settings

log = logging.getLogger(__name__)

METADATA_WAIT_S = 10.0
"""How long a new client waits for its topic's partitions to have leaders: a topic created a
moment ago answers "leader not available" until its partitions are elected."""


def topic_specs(settings: Settings) -> dict[str, int]:
    """Topic name -> partitions. Recommendations and impressions are keyed by user like events."""
    return {
        settings.events_topic: settings.partitions,
        settings.impressions_topic: settings.partitions,
        settings.recommendations_topic: settings.partitions,
        settings.dlq_topic: 1,
    }


def partitions_with_leaders(client: Any, topic: str) -> int:
    """The partition count of ``topic`` once every partition has a leader, asked of a producer's
    or consumer's ``list_topics``; `RuntimeError` if the topic is still missing after
    `METADATA_WAIT_S`."""
    deadline = time.monotonic() + METADATA_WAIT_S
    while True:
        metadata = client.list_topics(topic, timeout=10)
        found = metadata.topics.get(topic)
        if (
            found is not None
            and found.error is None
            and found.partitions
            and all(p.error is None and p.leader >= 0 for p in found.partitions.values())
        ):
            return len(found.partitions)
        if time.monotonic() >= deadline:
            reason = "" if found is None or found.error is None else f" ({found.error})"
            raise RuntimeError(
                f"topic {topic!r} does not exist or has no leaders{reason}; create it "
                "with `freshrec services up` or streams.topics.ensure_topics"
            )
        time.sleep(0.1)  # polling the broker's metadata until the deadline


def ensure_topics(bootstrap: str, settings: Settings, timeout_s: float = 30.0) -> list[str]:
    """Create whichever of the topics is missing; returns the names created.

    Each partition gets ``FRESHREC_REPLICATION_FACTOR`` copies; above one, a write must reach
    all but one of them (``min.insync.replicas``), so with the producers' ``acks=all`` an
    acknowledged event survives the loss of a broker.
    """
    admin = AdminClient(kafka_config(settings, bootstrap, log_level=3))
    metadata = admin.list_topics(timeout=timeout_s)
    existing = set(metadata.topics)
    copies = settings.replication_factor
    options = {"min.insync.replicas": str(copies - 1)} if copies > 1 else {}
    wanted = [
        NewTopic(name, num_partitions=n, replication_factor=copies, config=options)
        for name, n in topic_specs(settings).items()
        if name not in existing
    ]
    if not wanted:
        return []
    if copies > len(metadata.brokers):
        raise ValueError(
            f"FRESHREC_REPLICATION_FACTOR={copies} needs at least {copies} brokers; "
            f"{bootstrap} has {len(metadata.brokers)}"
        )
    created = []
    for name, future in admin.create_topics(wanted, operation_timeout=timeout_s).items():
        try:
            future.result()
            created.append(name)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
    log.info("topics created", extra={"topics": created})
    return created


def delete_topics(
    bootstrap: str, names: list[str], timeout_s: float = 30.0, settings: Settings | None = None
) -> None:
    """Delete ``names``; a topic that does not exist is already what was asked for.

    Every name is sent to the controller, not only those a metadata request lists: a broker's
    metadata can lag a topic created moments before, and filtering by it left such topics
    behind. Returns once the broker's metadata no longer lists them either (it lags the
    deletion by a fraction of a second), so a caller that lists topics next sees them gone.
    ``settings`` brings the security options (default: none, a PLAINTEXT broker).
    """
    if not names:
        return
    admin = AdminClient(kafka_config(settings or Settings(), bootstrap, log_level=3))
    for future in admin.delete_topics(list(names), operation_timeout=timeout_s).values():
        try:
            future.result()
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise
    deadline = time.monotonic() + timeout_s
    while set(names) & set(admin.list_topics(timeout=timeout_s).topics):
        if time.monotonic() > deadline:
            raise TimeoutError(f"topics still listed {timeout_s:.0f} s after deletion: {names}")
        time.sleep(0.05)
