"""The system under evaluation: in this process (direct), or through Kafka and the reader.

Both answer the same three questions, rating predictions, ranked lists and "learn these
events", so the prequential loop (:mod:`freshrec.evaluation.prequential`) is the same in both
modes: ``direct`` runs the worker's update code and the reader's funnel here against Redis,
``pipeline`` produces events to Kafka, waits for a real worker's offset watermarks and asks a
real reader over HTTP.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

from redis.asyncio import Redis

from freshrec.connections import kafka_config
from freshrec.serving.funnel import Funnel, FunnelConfig
from freshrec.settings import Settings
from freshrec.store.batch_update import BatchUpdater
from freshrec.store.keys import Keys
from freshrec.streams.events import Event
from freshrec.streams.producer import EventProducer

if TYPE_CHECKING:
    from freshrec.devenv.processes import Children

CONCURRENCY = 32
"""Requests in flight to the reader (pipeline mode)."""
APPLY_TIMEOUT_S = 120.0
"""How long a batch may take to be applied. It covers a worker that stalled and was started
again (the stall watch exits within `STALL_S` and a tick); not one whose stall came during a
rebalance that never ended, which the watch waits out for `REBALANCE_LIMIT_S` first."""
RETRY_503_S = 60.0
"""How long the pipeline mode retries a request the reader sheds with 503 and Retry-After."""
READ_TIMEOUT_S = 60.0
"""How long an evaluation waits for a reply from Redis: the server may be running a long batch
script of another walk (``--freshness`` walks its lags side by side), which a reader's 2 s
deadline would fail."""


# --- the system under evaluation: in process, or through Kafka and the reader -------------------
Ranked = tuple[list[str], list[float]]


class Backend(Protocol):
    async def predict(self, pairs: Sequence[tuple[str, str]]) -> list[float | None]:
        """Rating prediction per (user, item); None where the system has no answer."""

    async def recommend(self, users: Sequence[str], k: int) -> list[Ranked]:
        """One ranked list (items, scores) per user, as the reader serves it."""

    async def learn(self, events: Sequence[Event]) -> None:
        """Learn ``events`` and return once the state reflects all of them."""

    async def close(self) -> None:
        """Releases connections; the Redis client passed in stays open."""


async def _bounded(calls: Sequence[Any], limit: int = CONCURRENCY) -> list[Any]:
    gate = asyncio.Semaphore(limit)

    async def run(call: Any) -> Any:
        async with gate:
            return await call

    return await asyncio.gather(*(run(c) for c in calls))


class DirectBackend:
    """The worker's update code and the reader's funnel, called in this process."""

    def __init__(self, settings: Settings, redis: Redis) -> None:
        keys = Keys(settings.key_prefix)
        # Refreshed at fixed points of the walk (before a group's lists), never on the wall
        # clock: the same stream ranks alike at any speed (in pipeline mode, the reader's own
        # timing decides).
        self.funnel = Funnel(
            redis, keys, settings.funnel_config(), deterministic=True, read_timeout_s=READ_TIMEOUT_S
        )
        # Steps sized by count alone (doubling up to the most), not by how long writes take.
        self.updater = BatchUpdater(
            redis,
            keys,
            settings.model_config(),
            atomic=settings.exactly_once,
            write_target_s=math.inf,
        )
        self.rating_errors: list[float] = []
        self._index_behind = True  # the funnel's item snapshot misses learned batches

    async def predict(self, pairs: Sequence[tuple[str, str]]) -> list[float | None]:
        answers = await self.funnel.predict_many(pairs) if pairs else []
        return [float(answer["prediction"]) for answer in answers]  # type: ignore[arg-type]

    async def recommend(
        self, users: Sequence[str], k: int, config: FunnelConfig | None = None
    ) -> list[Ranked]:
        async def one(user: str) -> Ranked:
            # Through the reader's own JSON form, so scores carry the same rounding as served.
            # A request as a reader serves it: the lists of the default configuration teach the
            # choice ranker; an ablation's lists of the same moment must not teach it again.
            lists = await self.funnel.recommend(user, k, config, learn=config is None)
            served = [c.to_json() for c in lists]
            return [c["item_id"] for c in served], [c["score"] for c in served]  # type: ignore[misc]

        if not users:
            return []
        if self._index_behind:
            # The reader's item snapshot, caught up as a reader's would be; only when a list is
            # asked for (ratings are read from Redis directly), so most batches skip it.
            await self.funnel.refresh()
            self._index_behind = False
        # One user after another: each list teaches the choice ranker the next one ranks with,
        # so lists served side by side would learn in whatever order Redis answered them.
        return [await one(user) for user in users]

    async def learn(self, events: Sequence[Event]) -> None:
        result = await self.updater.apply(events)
        self.rating_errors.extend(result.rating_errors)
        self._index_behind = True

    async def close(self) -> None:
        await self.funnel.aclose()


class _TrackedProducer(EventProducer):
    """The producer helper, remembering the last offset delivered to each partition."""

    def __init__(
        self, bootstrap: str, topic: str, events_per_message: int, config: dict[str, Any]
    ) -> None:
        self.delivered: dict[int, int] = {}
        super().__init__(bootstrap, topic, events_per_message, config)

    def _delivered(self, err: Any, msg: Any) -> None:
        super()._delivered(err, msg)
        if err is None:
            partition, offset = msg.partition(), msg.offset()
            self.delivered[partition] = max(offset, self.delivered.get(partition, -1))


class PipelineBackend:
    """Kafka -> Faust worker -> Redis -> reader: produce a batch, wait for it, ask over HTTP.

    The reader reads each user's state from Redis per request, but serves the item side from a
    snapshot it refreshes on its own timer (every 0.5 s), and at once for a user whose newest
    event the snapshot does not hold yet. A list for a user with nothing new in a batch may thus
    miss that batch's item-side changes (other users' co-occurrences, trending): the one way
    this mode can differ from ``direct``, which refreshes before every list.

    A batch counts as learned once the worker's offset watermark of every partition it went to
    has reached the last offset delivered there: exact, whatever else the worker consumes.
    """

    def __init__(
        self, settings: Settings, redis: Redis, base_url: str, processes: Children
    ) -> None:
        import aiohttp

        self.producer = _TrackedProducer(
            settings.kafka_bootstrap,
            settings.events_topic,
            events_per_message=100,
            config=kafka_config(settings),
        )
        self.redis = redis
        self.keys = Keys(settings.key_prefix)
        self.topic = settings.events_topic
        self.base_url = base_url
        self.processes = processes
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=CONCURRENCY),
            timeout=aiohttp.ClientTimeout(total=30),
        )

    async def close(self) -> None:
        await self.session.close()
        self.producer.close()
        # The last reference: librdkafka's threads stop now, not at exit after the broker has
        # stopped, where they would log a refused connection every few milliseconds.
        del self.producer

    async def _get(self, path: str) -> tuple[int, Any]:
        """GET as a well-behaved client: a 503 is retried after its ``Retry-After``, until
        ``RETRY_503_S`` has passed (a reader under load sheds requests that way)."""
        from yarl import URL

        deadline = time.monotonic() + RETRY_503_S
        while True:
            async with self.session.get(URL(self.base_url + path, encoded=True)) as response:
                status, body = response.status, await response.json()
                wait = float(response.headers.get("Retry-After", "1"))
            if status != 503 or time.monotonic() + wait > deadline:
                return status, body
            await asyncio.sleep(wait)

    async def predict(self, pairs: Sequence[tuple[str, str]]) -> list[float | None]:
        async def one(user: str, item: str) -> float | None:
            status, body = await self._get(
                f"/predict/{quote(user, safe='')}/{quote(item, safe='')}"
            )
            if status != 200:
                raise RuntimeError(f"reader answered {status} to a prediction: {body}")
            return float(body["prediction"])

        return await _bounded([one(u, i) for u, i in pairs])

    async def recommend(self, users: Sequence[str], k: int) -> list[Ranked]:
        async def one(user: str) -> Ranked:
            status, body = await self._get(f"/recommendations/{quote(user, safe='')}?k={k}")
            if status != 200:
                raise RuntimeError(f"reader answered {status} to a recommendation: {body}")
            return [c["item_id"] for c in body["items"]], [c["score"] for c in body["items"]]

        return await _bounded([one(u) for u in users])

    async def learn(self, events: Sequence[Event]) -> None:
        for event in events:
            self.producer.send(event.to_json())
        self.producer.flush()
        wanted = dict(self.producer.delivered)
        marks = [self.keys.watermark(f"{self.topic}/{p}") for p in wanted]
        deadline = time.monotonic() + APPLY_TIMEOUT_S
        restarted = self.processes.restarts["worker"]  # grows as `check` restarts the worker
        restarts = len(restarted)
        pause = 0.001
        while True:
            pipe = self.redis.pipeline(transaction=False)  # GETs: the keys may span slots
            for mark in marks:
                pipe.get(mark)
            applied = await pipe.execute()
            if all(
                raw is not None and int(raw) >= offset
                for raw, offset in zip(applied, wanted.values(), strict=True)
            ):
                return
            if time.monotonic() > deadline:
                problem = f"had not applied the batch after {APPLY_TIMEOUT_S:.0f} s"
                raise TimeoutError(str(self.processes.exited("worker", problem)))
            self.processes.check()
            if len(restarted) > restarts:  # a new worker: its own time to apply the batch
                restarts = len(restarted)
                deadline = time.monotonic() + APPLY_TIMEOUT_S
            await asyncio.sleep(pause)
            pause = min(2 * pause, 0.01)
