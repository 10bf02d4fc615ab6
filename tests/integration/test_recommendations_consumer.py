"""The consumer helper for downstream services delivers each published list at least once."""

from __future__ import annotations

import json

import pytest
from confluent_kafka import Producer

from freshrec.connections import kafka_config
from freshrec.settings import Settings
from freshrec.streams.recommendations_consumer import RecommendationsConsumer
from tests.support import wait_until

pytestmark = pytest.mark.integration


def _helper(settings: Settings, group: str) -> RecommendationsConsumer:
    return RecommendationsConsumer(
        settings.kafka_bootstrap,
        settings.recommendations_topic,
        group,
        from_beginning=True,
        config=kafka_config(settings),
    )


def test_a_list_is_delivered_again_unless_the_consumer_was_done_with_it(
    settings: Settings,
) -> None:
    producer = Producer(kafka_config(settings))
    for user in ("u1", "u2", "u3"):
        body = {"user_id": user, "items": [], "generated_at": 1.0}
        producer.produce(
            settings.recommendations_topic, key=b"same", value=json.dumps(body).encode()
        )
    assert producer.flush(30) == 0
    group = f"{settings.topic_prefix}-downstream"

    def next_list(helper: RecommendationsConsumer) -> str:
        return wait_until(lambda: helper.poll(0.2), 30, "a published list").user_id

    crashed = _helper(settings, group)
    assert next_list(crashed) == "u1"
    crashed._consumer.close()  # a service stopped while it handled u1's list: no more calls
    again = _helper(settings, group)
    assert next_list(again) == "u1"  # delivered again
    assert next_list(again) == "u2"  # asking for it: done with u1
    again.close()  # done with u2 too
    last = _helper(settings, group)
    try:
        assert next_list(last) == "u3"
    finally:
        last.close()


def test_a_list_older_than_one_handed_over_is_skipped_and_so_is_a_malformed_one(
    settings: Settings,
) -> None:
    """Lists of one user from two readers can land out of order; the older is not handed over
    after the newer. A message that is not a list is logged and skipped, not raised."""
    producer = Producer(kafka_config(settings))
    messages = [
        json.dumps({"user_id": "u1", "items": [{"item_id": "new"}], "generated_at": 2.0}),
        json.dumps({"user_id": "u1", "items": [{"item_id": "old"}], "generated_at": 1.0}),
        "not json",
        json.dumps({"user_id": "u1", "items": "not a list", "generated_at": 3.0}),
        json.dumps({"user_id": "u2", "items": [{"item_id": "other"}], "generated_at": 1.5}),
        json.dumps({"user_id": "u1", "items": [{"item_id": "newer"}], "generated_at": 2.5}),
    ]
    for value in messages:
        producer.produce(settings.recommendations_topic, key=b"u1", value=value.encode())
    assert producer.flush(30) == 0
    helper = _helper(settings, f"{settings.topic_prefix}-downstream")
    try:
        handed = [wait_until(lambda: helper.poll(0.2), 30, "a list") for _ in range(3)]
        assert [(u.user_id, u.item_ids) for u in handed] == [
            ("u1", ["new"]),
            ("u2", ["other"]),
            ("u1", ["newer"]),
        ]
        assert (helper.skipped_stale, helper.skipped_malformed) == (1, 2)
    finally:
        helper.close()
