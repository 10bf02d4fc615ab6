"""The reader's HTTP API: the contract's routes, JSON errors, Prometheus metrics.

Stateless over Redis, so any number of replicas can sit behind a load balancer. A Redis outage
answers 503 with a message and the client reconnects on the next request by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
import uuid
from dataclasses import dataclass
from typing import Any

import uvloop
from confluent_kafka import Producer
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis

from freshrec.serving.funnel import Funnel, FunnelConfig, UnknownItem
from freshrec.serving.http_server import Handler, HttpServer, Request, Response, Router
from freshrec.serving.impressions import ImpressionLog
from freshrec.serving.kernels import warm_up
from freshrec.serving.openapi import OPENAPI
from freshrec.serving.publisher import RecommendationPublisher
from freshrec.serving.variants import Variants
from freshrec.store.keys import Keys

log = logging.getLogger(__name__)

REQUESTS = Counter("freshrec_http_requests_total", "Reader requests", ["route", "status"])
LATENCY = Histogram(
    "freshrec_http_request_seconds",
    "Reader request latency",
    ["route"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)


class BadRequest(ValueError):
    """A request the client must change; answered 400 with this message."""


@dataclass(frozen=True)
class Publishing:
    """Where the reader logs impressions and publishes fresh lists of touched users."""

    kafka_bootstrap: str
    topic: str
    impressions_topic: str
    k: int = 10
    debounce_s: float = 0.5
    interval_s: float = 0.1


class Reader:
    """The routes over one funnel, with the background work that keeps it fresh and publishes.

    Parameters
    ----------
    index_refresh_s
        How often the item snapshot and the pools catch up with Redis; a request finding the
        snapshot older than ten intervals starts a catch-up itself.
    """

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        config: FunnelConfig,
        max_k: int = 200,
        max_id_length: int = 128,
        publishing: Publishing | None = None,
        variants: Variants | None = None,
        index_refresh_s: float = 0.5,
    ) -> None:
        self.redis = redis
        self.funnel = Funnel(redis, keys, config, max_staleness_s=10 * index_refresh_s)
        self.variants = variants or Variants.parse("", config)
        self.max_k = max_k
        self.max_id_length = max_id_length
        self.index_refresh_s = index_refresh_s
        self.publishing = publishing
        self.impressions: ImpressionLog | None = None
        self.publisher: RecommendationPublisher | None = None
        if publishing is not None:
            producer = Producer(
                {"bootstrap.servers": publishing.kafka_bootstrap, "linger.ms": 20, "log_level": 3}
            )
            self.impressions = ImpressionLog(producer, publishing.impressions_topic)
            self.publisher = RecommendationPublisher(
                redis,
                keys,
                self.funnel,
                producer,
                publishing.topic,
                publishing.k,
                publishing.debounce_s,
            )
        router = Router()
        router.add("/recommendations/{user_id}", self.recommendations)
        router.add("/similar/{item_id}", self.similar)
        router.add("/predict/{user_id}/{item_id}", self.predict)
        router.add("/healthz", self.healthz)
        router.add("/metrics", self.metrics)
        router.add("/openapi.json", self.openapi)
        self.server = HttpServer(router, self.dispatch)
        self._background: list[asyncio.Task[None]] = []
        self._labels: dict[tuple[str, int], tuple[Any, Any]] = {}

    async def start(self, host: str, port: int) -> None:
        """Compiles the kernels, starts the background work, then binds ``host:port``.

        The port opens only once the kernels are ready, so neither a request nor the first
        refresh of the snapshot pays for a compile, and no route (``/healthz`` included) can
        answer before the reader serves at speed. Binding first and answering 503 until ready
        would need the compile on a thread beside the loop (it holds the GIL most of the time,
        so even those answers would be slow) and every route to refuse meanwhile; a port not
        yet open already means "not up yet" to every client, probe and load balancer.
        """
        warm_up([self.funnel.config, *(v.config for v in self.variants.variants)])
        self._background.append(asyncio.create_task(self._keep_fresh()))
        if self.publisher is not None and self.publishing is not None:
            self._background.append(
                asyncio.create_task(self.publisher.run(self.publishing.interval_s))
            )
        await self.server.start(host, port)

    async def stop(self) -> None:
        await self.server.stop()
        for task in self._background:
            task.cancel()
        for task in self._background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.publisher is not None:
            self.publisher.close()
        await self.funnel.aclose()
        await self.redis.aclose()

    async def _keep_fresh(self) -> None:
        """The item snapshot, pools and click-model weights, refreshed in the background.

        After the first load the collector's generations are frozen: the snapshot's objects
        (item ids, their row map) live as long as the reader, and a full collection walking
        them all paused the loop 40-50 ms at 50,000 items; after, 0.5-0.7 ms.
        """
        frozen = False
        while True:
            try:
                await self.funnel.refresh()
                if not frozen:
                    gc.freeze()
                    frozen = True
            except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
                log.warning("funnel state not refreshed: %s", exc)
            await asyncio.sleep(self.index_refresh_s)

    # --- routes -------------------------------------------------------------------------------
    async def recommendations(self, request: Request) -> Response:
        user_id = self._identifier(request, "user_id")
        k = self._k(request)
        started = time.perf_counter()
        variant = self.variants.assign(user_id)
        served = await self.funnel.serve(user_id, k, variant.config)
        request_id = uuid.uuid4().hex
        if self.impressions is not None:
            # Shown at the state's clock: event time, so a replayed log attributes alike.
            shown_at = max(self.funnel.event_clock or 0.0, served.latest_event_ts or 0.0)
            self.impressions.log(request_id, user_id, variant.name, served, shown_at or None)
        body: dict[str, object] = {
            "user_id": user_id,
            "k": k,
            "request_id": request_id,
            "variant": variant.name,
            "items": [c.to_json() for c in served.items],
            "latest_event_ts": served.latest_event_ts,
            "took_ms": round(1000 * (time.perf_counter() - started), 3),
        }
        if request.query.get("debug") in ("1", "true"):
            learned = self.funnel.scorer(variant.config).learned
            body["debug"] = {
                "stages_ms": served.timings_ms,
                "index_items": len(self.funnel.index),
                "mf_items_read": served.mf_items_read,
                "index_staleness_s": round(self.funnel.index.staleness_s, 3),
                "ranker": "learned" if learned else "fixed blend",
            }
        return Response.json(body)

    async def similar(self, request: Request) -> Response:
        item_id = self._identifier(request, "item_id")
        items = await self.funnel.similar(item_id, self._k(request))
        return Response.json({"item_id": item_id, "items": items})

    async def predict(self, request: Request) -> Response:
        user_id = self._identifier(request, "user_id")
        item_id = self._identifier(request, "item_id")
        return Response.json(await self.funnel.predict(user_id, item_id))

    async def healthz(self, request: Request) -> Response:
        await self.redis.ping()
        return Response.json({"status": "ok", "redis": "ok"})

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(), content_type=CONTENT_TYPE_LATEST)

    async def openapi(self, request: Request) -> Response:
        return Response.json(OPENAPI)

    # --- errors and metrics -------------------------------------------------------------------
    async def dispatch(self, request: Request, route: str, handler: Handler) -> Response:
        started = time.perf_counter()
        try:
            response = await handler(request)
        except BadRequest as exc:
            response = _error(400, str(exc))
        except UnknownItem as exc:
            response = _error(404, f"unknown item {exc.args[0]!r}: no event has mentioned it yet")
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
            log.warning("Redis unavailable: %s", exc)
            response = _error(503, "state store (Redis) unavailable; retry shortly")
        except Exception:
            log.exception("unhandled error on %s", request.path)
            response = _error(500, "internal error; see the reader's log")
        requests, latency = self._metric_children(route, response.status)
        requests.inc()
        latency.observe(time.perf_counter() - started)
        return response

    def _metric_children(self, route: str, status: int) -> tuple[Any, Any]:
        """Label lookups cached: ``labels()`` costs more than the increment itself."""
        children = self._labels.get((route, status))
        if children is None:
            children = (REQUESTS.labels(route, str(status)), LATENCY.labels(route))
            self._labels[(route, status)] = children
        return children

    def _identifier(self, request: Request, name: str) -> str:
        value = request.params[name]
        limit = self.max_id_length
        if not value or len(value) > limit or not value.isprintable():
            raise BadRequest(f"{name} must be 1 to {limit} printable characters")
        return value

    def _k(self, request: Request) -> int:
        raw = request.query.get("k", "10")
        limit = self.max_k
        try:
            k = int(raw)
        except ValueError:
            raise BadRequest(f"k must be an integer from 1 to {limit}, got {raw!r}") from None
        if not 1 <= k <= limit:
            raise BadRequest(f"k must be an integer from 1 to {limit}, got {k}")
        return k


def _error(status: int, message: str) -> Response:
    return Response.json({"error": message, "status": status}, status)


def run_reader(
    redis_url: str,
    keys: Keys,
    config: FunnelConfig,
    host: str,
    port: int,
    max_k: int = 200,
    max_id_length: int = 128,
    publishing: Publishing | None = None,
    variants: Variants | None = None,
) -> None:
    """Serves until SIGTERM or SIGINT, then finishes requests in flight and closes cleanly."""

    async def main() -> None:
        # Requests beyond the pool wait for a connection (up to the timeout) instead of failing.
        pool = BlockingConnectionPool.from_url(
            redis_url, max_connections=64, timeout=2, socket_timeout=2, socket_connect_timeout=2
        )
        reader = Reader(Redis(connection_pool=pool), keys, config, max_k, max_id_length,
                        publishing, variants)  # fmt: skip
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await reader.start(host, port)
        log.info("reader listening on http://%s:%d", host, port)
        try:
            await stop.wait()
        finally:
            await reader.stop()

    uvloop.run(main())
