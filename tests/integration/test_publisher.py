"""The reader's publisher on a real broker: a list Kafka does not take is published again."""

from __future__ import annotations

import asyncio

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from redis.asyncio import Redis

from freshrec.connections import kafka_config
from freshrec.serving.funnel import Funnel
from freshrec.serving.publisher import UNDELIVERED, RecommendationPublisher
from freshrec.settings import Settings
from freshrec.store.keys import Keys
from freshrec.streams.topics import delete_topics

pytestmark = pytest.mark.integration


def test_a_list_kafka_refuses_is_published_again(settings: Settings) -> None:
    # A topic whose broker refuses every record (larger than its 1-byte limit): each delivery
    # report is an error, as for a list Kafka never took within the producer's timeout.
    topic = f"{settings.topic_prefix}.refusing"
    admin = AdminClient(kafka_config(settings))
    config = {"max.message.bytes": "1"}
    admin.create_topics([NewTopic(topic, 1, 1, config=config)])[topic].result(30)
    keys = Keys(settings.key_prefix)

    async def run() -> None:
        redis = Redis.from_url(settings.redis_url)
        producer = Producer(kafka_config(settings, **{"linger.ms": 0}))
        funnel = Funnel(redis, keys, settings.funnel_config())
        publisher = RecommendationPublisher(redis, keys, funnel, producer, topic, 5, 0.0)
        try:
            await redis.zadd(keys.dirty_users, {"u1": 1.0})
            before = UNDELIVERED._value.get()
            assert await publisher.publish_due() == 1  # handed to the producer
            assert await redis.zcard(keys.dirty_users) == 0
            assert producer.flush(30) == 0  # its delivery report has come
            assert UNDELIVERED._value.get() == before + 1
            # The next round puts the user back and publishes their list again.
            assert await publisher.publish_due() == 1
            assert producer.flush(30) == 0
            assert UNDELIVERED._value.get() == before + 2
        finally:
            await funnel.aclose()
            await redis.aclose()

    try:
        asyncio.run(run())
    finally:
        delete_topics(settings.kafka_bootstrap, [topic], settings=settings)
