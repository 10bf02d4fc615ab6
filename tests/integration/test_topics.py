"""The topics freshrec creates: with the configured copies, or a clear refusal."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
from confluent_kafka.admin import AdminClient

from freshrec.connections import kafka_config
from freshrec.settings import Settings
from freshrec.streams import topics as topics_module
from freshrec.streams.producer import EventProducer
from freshrec.streams.recommendations_consumer import RecommendationsConsumer
from freshrec.streams.topics import delete_topics, ensure_topics, topic_specs

pytestmark = pytest.mark.integration


def test_a_replication_factor_above_the_brokers_is_refused_before_any_topic_is_made(
    settings: Settings,
) -> None:
    wanted = dataclasses.replace(
        settings, topic_prefix=f"{settings.topic_prefix}-copies", replication_factor=2
    )
    with pytest.raises(ValueError, match="REPLICATION_FACTOR=2 needs at least 2 brokers"):
        ensure_topics(wanted.kafka_bootstrap, wanted)
    admin = AdminClient(kafka_config(wanted, log_level=3))
    made = [t for t in admin.list_topics(timeout=30).topics if t.startswith(wanted.topic_prefix)]
    assert made == []


def test_a_producer_waits_for_a_topic_that_gets_its_partitions_during_its_wait(
    settings: Settings,
) -> None:
    """A topic created a moment ago answers "unknown" or "leader not available" until the
    broker has applied it and its partitions have leaders; a producer made then waits for them
    instead of failing. Here the topics are created 1 s after the producer starts asking."""
    fresh = dataclasses.replace(settings, topic_prefix=f"{settings.topic_prefix}-late")
    creating = threading.Timer(1.0, ensure_topics, (fresh.kafka_bootstrap, fresh))
    creating.start()
    try:
        started = time.monotonic()
        with EventProducer(fresh.kafka_bootstrap, fresh.events_topic) as producer:
            assert producer.partitions == fresh.partitions
        assert time.monotonic() - started >= 1.0  # it did wait for the topic
    finally:
        creating.join()
        delete_topics(settings.kafka_bootstrap, list(topic_specs(fresh)), settings=settings)


def test_a_producer_for_a_missing_topic_names_it_once_its_wait_is_over(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(topics_module, "METADATA_WAIT_S", 0.5)
    missing = f"{settings.topic_prefix}-never-made.events"
    with pytest.raises(RuntimeError, match=f"topic '{missing}' does not exist"):
        EventProducer(settings.kafka_bootstrap, missing)
    with pytest.raises(RuntimeError, match=f"topic '{missing}' does not exist"):
        RecommendationsConsumer(settings.kafka_bootstrap, missing, "downstream")
