"""The topics freshrec creates: with the configured copies, or a clear refusal."""

from __future__ import annotations

import dataclasses

import pytest
from confluent_kafka.admin import AdminClient

from freshrec.connections import kafka_config
from freshrec.settings import Settings
from freshrec.streams.topics import ensure_topics

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
