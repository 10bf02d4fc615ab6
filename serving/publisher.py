"""Publishes fresh top-K lists of the users new events touched to the recommendations topic.

Workers mark each touched user in a sorted set, scored by when the batch that *first* touched
them since their last publication reached Kafka (its oldest message). The reader pops the users
whose mark is at least the debounce interval old and publishes their lists: a user who sends
ten events in a second gets one message, not ten, a user whose events waited in Kafka longer
than that is published as soon as they are learned, and ranking never runs on the learning
path. The mark's age at publication is the event-to-published freshness. Popping is atomic, so any
number of reader replicas share the work without publishing a user twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson
from confluent_kafka import KafkaException, Producer
from prometheus_client import Counter, Histogram
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from freshrec.serving.cancellation import pause, raise_if_cancelled
from freshrec.serving.funnel import Funnel
from freshrec.serving.variants import Variants
from freshrec.store.keys import Keys
from freshrec.store.server_scripts import ServerScripts

log = logging.getLogger(__name__)

PUBLISHED = Counter("freshrec_recommendations_published_total", "Lists published to Kafka")
UNDELIVERED = Counter(
    "freshrec_recommendations_undelivered_total",
    "Published lists Kafka did not take (refused, or not delivered within the producer's "
    "message timeout); their users are published again",
)
PUBLISH_DELAY = Histogram(
    "freshrec_event_to_published_seconds",
    "From the arrival in Kafka of a user's oldest unpublished event to their list being "
    "published (the oldest message of the batch that learned it)",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
)


class RecommendationPublisher:
    """Pops due users and publishes their lists, keyed by user, until stopped."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        funnel: Funnel,
        producer: Producer,
        topic: str,
        k: int,
        debounce_s: float,
        max_users: int = 200,
        concurrency: int = 8,
        variants: Variants | None = None,
        requests_in_flight: Callable[[], int] = lambda: 0,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.funnel = funnel
        self.producer = producer
        self.topic = topic
        self.k = k
        self.debounce_s = debounce_s
        self.max_users = max_users
        self.concurrency = concurrency
        self.variants = variants  # a user's published list is the one their variant serves
        self.requests_in_flight = requests_in_flight  # the reader's, which go first
        self.ranking = 0  # users being ranked now
        self._ranked = asyncio.Event()  # set when a ranking ends
        self.scripts = ServerScripts(redis)
        self.published = 0
        self.undelivered: set[str] = set()  # users whose list Kafka did not take

    def _delivered(self, err: Any, msg: Any) -> None:
        """Delivery report (from ``poll``): a list Kafka did not take is published again."""
        if err is not None:
            UNDELIVERED.inc()
            self.undelivered.add(msg.key().decode())
            log.warning("a list for Kafka was not delivered, to be published again: %s", err)

    async def publish_due(self) -> int:
        """Publish every due user (up to ``max_users``); returns how many."""
        cutoff = time.time() - self.debounce_s
        self.producer.poll(0)  # delivery reports of earlier lists
        if self.undelivered:
            # Taken before the await: a delivery report that lands during it (the reader's
            # impression log polls the same producer) adds to the new set, not to one cleared.
            pending, self.undelivered = self.undelivered, set()
            try:
                await self._put_back(pending, cutoff)
            except BaseException:
                self.undelivered |= pending
                raise
        due = await self._pop_due(cutoff)
        if not due:
            return 0
        users = [u.decode() for u in due[::2]]
        touched = [float(t) for t in due[1::2]]
        gate = asyncio.Semaphore(self.concurrency)

        async def ranked(user: str) -> list[Any]:
            config = self.variants.assign(user).config if self.variants is not None else None
            async with gate:  # bounded: each ranking holds a pooled connection
                await self._turn()
                try:
                    return await self.funnel.recommend(user, self.k, config)
                finally:
                    self.ranking -= 1
                    self._ranked.set()

        try:
            lists = await asyncio.gather(*(ranked(u) for u in users))
        except BaseException:
            # Put them back and let the caller back off; nobody's fresh list is dropped. A stop
            # (cancellation) puts them back too, for another replica or the next start. If
            # Redis refuses, the error that led here still propagates.
            try:
                await self._put_back(users, cutoff)
            except Exception as exc:
                log.warning("%d users' lists not put back to publish again: %s", len(users), exc)
            raise
        now = time.time()
        unsent: list[str] = []
        refused: Exception | None = None
        for user, ranked in zip(users, lists, strict=True):
            message = {
                "user_id": user,
                "items": [c.to_json() for c in ranked],
                "generated_at": now,
            }
            value = orjson.dumps(message)
            try:
                self.producer.produce(
                    self.topic, key=user.encode(), value=value, on_delivery=self._delivered
                )
            except (BufferError, KafkaException) as exc:
                # Kafka unreachable and the queue full, or the producer refusing (in error, or
                # this list over its size limit): the user is due again, this list is not lost.
                unsent.append(user)
                refused = exc
        self.producer.poll(0)
        if unsent:
            await self._put_back(unsent, cutoff)
        for first_touch in touched:
            PUBLISH_DELAY.observe(max(0.0, now - first_touch))
        sent = len(users) - len(unsent)
        PUBLISHED.inc(sent)
        self.published += sent
        if unsent:
            raise BufferError(f"{len(unsent)} lists waiting for Kafka: {refused}")
        return sent

    async def _turn(self) -> None:
        """Waits until one more ranking may start: the first at once, others only while no
        request is in flight. A ranking holds the event loop between its awaits and sends
        Redis commands that queue ahead of a request's, so while requests are being answered
        users are ranked one at a time; publishing slows down but never stops."""
        while self.ranking and self.requests_in_flight():
            self._ranked.clear()
            await self._ranked.wait()
        self.ranking += 1

    async def _pop_due(self, cutoff: float) -> list[bytes]:
        """Pops the due users (user, first touch, ...). A stop that lands while the reply is on
        its way waits for it and puts those users back: Redis has popped them either way."""
        pop = asyncio.ensure_future(
            self.scripts.pop_due(keys=[self.keys.dirty_users], args=[repr(cutoff), self.max_users])
        )
        try:
            return await asyncio.shield(pop)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):  # a failed pop popped nothing
                due = await asyncio.shield(pop)
                if due:
                    await self._put_back([u.decode() for u in due[::2]], cutoff)
            raise

    async def _put_back(self, users: Iterable[str], due_at: float) -> None:
        """Users popped and not published: due again at once (their first-touch time is lost),
        unless marked again meanwhile. Shielded, so that a stop in progress does not cut it
        short."""
        again = dict.fromkeys(users, due_at)
        await asyncio.shield(self.redis.zadd(self.keys.dirty_users, again, nx=True))

    async def run(self, interval_s: float) -> None:
        """Publish until cancelled; outages of Redis or Kafka only delay publishing."""
        delay = interval_s
        while True:
            raise_if_cancelled()
            try:
                published = await self.publish_due()
                delay = interval_s
                if published == self.max_users:
                    continue  # a backlog: keep going without waiting
            except (
                redis_errors.ConnectionError,
                redis_errors.TimeoutError,
                OSError,
                BufferError,
            ) as exc:
                log.warning("publishing deferred: %s", exc)
                delay = min(max(delay * 2, 0.5), 5.0)
            await pause(delay)

    def close(self, timeout_s: float = 10.0) -> Any:
        return self.producer.flush(timeout_s)
