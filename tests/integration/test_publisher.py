"""The reader's publisher on a real broker: a list Kafka does not take is published again."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from redis.asyncio import Redis

from freshrec.connections import kafka_config
from freshrec.models.mf import vector_width
from freshrec.serving.funnel import Funnel
from freshrec.serving.publisher import UNDELIVERED, RecommendationPublisher
from freshrec.serving.variants import Variants
from freshrec.settings import Settings
from freshrec.store.batch_update import BatchUpdater
from freshrec.store.keys import Keys
from freshrec.store.vectors import encode_vector
from freshrec.streams.events import Event
from freshrec.streams.topics import delete_topics

pytestmark = pytest.mark.integration

ITEMS = 40_000
TS = 1_700_000_000.0


@pytest.fixture
def refusing_topic(settings: Settings) -> Iterator[str]:
    """A topic whose broker refuses every record (larger than its 1-byte limit): each delivery
    report is an error, as for a list Kafka never took within the producer's timeout."""
    topic = f"{settings.topic_prefix}.refusing"
    admin = AdminClient(kafka_config(settings))
    config = {"max.message.bytes": "1"}
    admin.create_topics([NewTopic(topic, 1, 1, config=config)])[topic].result(30)
    yield topic
    delete_topics(settings.kafka_bootstrap, [topic], settings=settings)


def test_a_list_kafka_refuses_is_published_again(settings: Settings, refusing_topic: str) -> None:
    keys = Keys(settings.key_prefix)

    async def run() -> None:
        async with _publisher(settings, keys, refusing_topic, **{"linger.ms": 0}) as (
            redis,
            publisher,
        ):
            producer = publisher.producer
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

    asyncio.run(run())


def test_a_delivery_report_that_lands_while_others_are_put_back_is_kept(
    settings: Settings, refusing_topic: str
) -> None:
    """The reader's impression log polls the publisher's producer too, so a delivery report
    can run while the publisher awaits Redis to put back the users of earlier ones: the user it
    names must still be published again."""
    keys = Keys(settings.key_prefix)

    async def run() -> None:
        async with _publisher(settings, keys, refusing_topic, **{"linger.ms": 0}) as (
            redis,
            publisher,
        ):
            producer, put_back = publisher.producer, publisher._put_back

            async def put_back_while_u2_is_refused(users: Any, due_at: float) -> None:
                await put_back(users, due_at)
                # Sent and refused only now, so its report cannot come before the put-back
                # began: it runs here, inside it, as another poll of the producer would.
                producer.produce(
                    refusing_topic, key=b"u2", value=b"[]", on_delivery=publisher._delivered
                )
                assert producer.flush(30) == 0

            await redis.zadd(keys.dirty_users, {"u1": 1.0})
            assert await publisher.publish_due() == 1
            assert producer.flush(30) == 0
            assert publisher.undelivered == {"u1"}
            publisher._put_back = put_back_while_u2_is_refused  # type: ignore[method-assign]
            assert await publisher.publish_due() == 1  # u1, put back and published again
            assert "u2" in publisher.undelivered

    asyncio.run(run())


def test_a_list_the_producer_refuses_outright_is_due_again(settings: Settings) -> None:
    """``produce`` raising (here: the list is over the producer's own size limit; a producer
    in a fatal state raises the same way) leaves the user due again, not lost."""
    keys = Keys(settings.key_prefix)
    events = [Event("click", f"u{n % 5}", f"i{n % 30}", TS + n) for n in range(300)]

    async def run() -> None:
        config = {"message.max.bytes": 1000}
        async with _publisher(settings, keys, k=20, **config) as (redis, publisher):
            await BatchUpdater(redis, keys, settings.model_config()).apply(events)
            await redis.delete(keys.dirty_users)
            await redis.zadd(keys.dirty_users, {"u1": 1.0})
            with pytest.raises(BufferError, match="1 lists waiting for Kafka"):
                await publisher.publish_due()
            assert await redis.zrange(keys.dirty_users, 0, -1) == [b"u1"]

    asyncio.run(run())


@contextlib.asynccontextmanager
async def _publisher(
    settings: Settings, keys: Keys, topic: str | None = None, k: int = 5, **producer: object
) -> AsyncIterator[tuple[Redis, RecommendationPublisher]]:
    """A publisher of lists of ``k`` to ``topic`` (the recommendations topic) on the test's
    Redis, with a producer of the test's options; closed at the end as the reader closes it
    (the producer flushed, so no delivery report still holds the publisher), then its funnel
    and client."""
    redis = Redis.from_url(settings.redis_url)
    funnel = Funnel(redis, keys, settings.funnel_config())
    publisher = RecommendationPublisher(
        redis,
        keys,
        funnel,
        Producer(kafka_config(settings, **producer)),
        topic or settings.recommendations_topic,
        k,
        0.0,
    )
    try:
        yield redis, publisher
    finally:
        publisher.close(30)
        await funnel.aclose()
        await redis.aclose()


async def _stopped(publishing: asyncio.Future[int], redis: Redis, keys: Keys, users: dict) -> None:
    """``publishing`` ends cancelled, and every user it popped is due again."""
    with pytest.raises(asyncio.CancelledError):
        await publishing
    assert await redis.zrange(keys.dirty_users, 0, -1) == sorted(u.encode() for u in users)


def test_users_popped_when_a_stop_lands_before_the_pops_reply_are_put_back(
    settings: Settings,
) -> None:
    """Redis pops the due users whether or not the reply reaches the publisher: a stop while
    it is on its way must put them back, as a stop mid-ranking does."""
    keys = Keys(settings.key_prefix)
    users = {f"u{n}": 1.0 for n in range(5)}

    async def run() -> None:
        async with _publisher(settings, keys) as (redis, publisher):
            popped, reply = asyncio.Event(), asyncio.Event()
            pop_due = publisher.scripts.pop_due

            async def delayed_reply(**kwargs: object) -> object:
                answer = await pop_due(**kwargs)
                popped.set()
                await reply.wait()  # the reply still on its way
                return answer

            publisher.scripts.pop_due = delayed_reply
            await redis.zadd(keys.dirty_users, users)
            publishing = asyncio.ensure_future(publisher.publish_due())
            await asyncio.wait_for(popped.wait(), 10)
            assert await redis.zcard(keys.dirty_users) == 0
            publishing.cancel()  # the stop lands before the reply
            reply.set()
            await _stopped(publishing, redis, keys, users)

    asyncio.run(run())


def test_users_popped_when_the_reader_stops_mid_ranking_are_put_back(settings: Settings) -> None:
    keys = Keys(settings.key_prefix)
    users = {f"u{n}": 1.0 for n in range(5)}

    async def run() -> None:
        async with _publisher(settings, keys) as (redis, publisher):
            # A catalogue the funnel's first refresh takes a while to load: the stop lands in it.
            width = vector_width(settings.funnel_config().factors)
            blob = encode_vector(np.full(width, 0.1))
            pipe = redis.pipeline(transaction=False)
            for start in range(0, ITEMS, 5_000):
                chunk = [f"i{n}" for n in range(start, start + 5_000)]
                pipe.mset({keys.item_vector(item): blob for item in chunk})
                pipe.zadd(keys.updated_items, dict.fromkeys(chunk, 1.0))
            await pipe.execute()
            await redis.zadd(keys.dirty_users, users)
            publishing = asyncio.ensure_future(publisher.publish_due())
            while await redis.zcard(keys.dirty_users):  # popped: the ranking has begun
                assert not publishing.done(), publishing.result()
            publishing.cancel()
            await _stopped(publishing, redis, keys, users)

    asyncio.run(run())


def test_a_users_published_list_is_the_one_their_variant_serves(settings: Settings) -> None:
    keys = Keys(settings.key_prefix)
    spec = '{"control": {"share": 0.5}, "popular": {"share": 0.5, "channels": ["trending"]}}'
    variants = Variants.parse(spec, settings.funnel_config())
    users = [f"u{n}" for n in range(30)]
    rng = np.random.default_rng(3)
    events = [
        Event("click", users[int(rng.integers(len(users)))], f"i{int(rng.integers(40))}", TS + n)
        for n in range(1_500)
    ]

    async def run() -> None:
        redis = Redis.from_url(settings.redis_url)
        updater = BatchUpdater(redis, keys, settings.model_config())
        await updater.apply(events)
        producer = Producer(kafka_config(settings))
        funnel = Funnel(redis, keys, settings.funnel_config())
        publisher = RecommendationPublisher(
            redis, keys, funnel, producer, settings.recommendations_topic, 5, 0.0,
            variants=variants,
        )  # fmt: skip
        try:
            await redis.delete(keys.dirty_users)
            await redis.zadd(keys.dirty_users, dict.fromkeys(users, 1.0))
            assert await publisher.publish_due() == len(users)
            assert producer.flush(30) == 0
        finally:
            await funnel.aclose()
            await redis.aclose()

    asyncio.run(run())
    lists = _consume(settings, settings.recommendations_topic, len(users))
    by_variant: dict[str, list[set[str]]] = {"control": [], "popular": []}
    for user, items in lists.items():
        channels = {channel for item in items for channel in item["channels"]}
        by_variant[variants.assign(user).name].append(channels)
    assert by_variant["popular"] and by_variant["control"]
    assert all(channels <= {"trending"} for channels in by_variant["popular"])
    assert any(channels & {"cf", "mf"} for channels in by_variant["control"])


def _consume(settings: Settings, topic: str, count: int) -> dict[str, list[dict]]:
    """The first ``count`` lists on ``topic``, by user."""
    consumer = Consumer(
        kafka_config(
            settings,
            **{"group.id": f"{settings.topic_prefix}-lists", "auto.offset.reset": "earliest"},
        )
    )
    consumer.subscribe([topic])
    lists: dict[str, list[dict]] = {}
    try:
        deadline = time.monotonic() + 30
        while len(lists) < count and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                body = json.loads(message.value())
                lists[body["user_id"]] = body["items"]
    finally:
        consumer.close()
    assert len(lists) == count, f"{len(lists)} of {count} lists read"
    return lists


class _CountingFunnel(Funnel):
    """A funnel that records how many users it ranks at once."""

    ranking = 0
    most = 0

    async def recommend(self, *args: object, **kwargs: object) -> list[Any]:
        self.ranking += 1
        self.most = max(self.most, self.ranking)
        try:
            return await super().recommend(*args, **kwargs)
        finally:
            self.ranking -= 1


@pytest.mark.parametrize(("requests", "most"), [(0, 4), (1, 1)])
def test_the_publisher_ranks_one_user_at_a_time_while_requests_are_in_flight(
    settings: Settings, requests: int, most: int
) -> None:
    keys = Keys(settings.key_prefix)
    users = [f"u{n}" for n in range(12)]
    events = [Event("click", users[n % len(users)], f"i{n % 30}", TS + n) for n in range(300)]

    async def run() -> int:
        redis = Redis.from_url(settings.redis_url)
        await BatchUpdater(redis, keys, settings.model_config()).apply(events)
        producer = Producer(kafka_config(settings))
        funnel = _CountingFunnel(redis, keys, settings.funnel_config())
        publisher = RecommendationPublisher(
            redis, keys, funnel, producer, settings.recommendations_topic, 5, 0.0,
            concurrency=4, requests_in_flight=lambda: requests,
        )  # fmt: skip
        try:
            await funnel.refresh()
            await redis.delete(keys.dirty_users)
            await redis.zadd(keys.dirty_users, dict.fromkeys(users, 1.0))
            assert await publisher.publish_due() == len(users)
            assert publisher.ranking == 0 and producer.flush(30) == 0
            return funnel.most
        finally:
            await funnel.aclose()
            await redis.aclose()

    assert asyncio.run(run()) == most
