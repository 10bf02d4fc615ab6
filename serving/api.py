"""The reader's HTTP API: the contract's routes, JSON errors, Prometheus metrics.

Stateless over Redis, so any number of replicas can sit behind a load balancer. A Redis outage
answers 503 with a message and ``Retry-After``, and the client reconnects on the next request by
itself; so does a Redis that is up but cannot answer now (``BUSY`` running a script, ``LOADING``
its dataset, ``OOM``, ``TRYAGAIN``, ``MASTERDOWN``, ``CLUSTERDOWN``).

The background loops (the snapshot refresh, the publisher) run under a supervisor: a loop that
fails is logged with its traceback and restarted after a back-off (``LOOP_BACKOFF_S`` doubling
up to ``LOOP_BACKOFF_MAX_S``). ``/healthz`` answers 503 while a loop is down, when the item
snapshot is older than ``MAX_SNAPSHOT_AGE_S`` (30 s), or when Redis does not answer a PING on the
connection requests use. The HTTP limits (connections, deadlines, sizes) are
`freshrec.serving.http_server`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import itertools
import logging
import os
import resource
import signal
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import uvloop
from confluent_kafka import Producer
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster

from freshrec.serving.cancellation import pause
from freshrec.serving.exposure import ExposureMeter
from freshrec.serving.funnel import Funnel, FunnelConfig, UnknownItem
from freshrec.serving.http_server import (
    MAX_CONNECTIONS,
    Handler,
    HttpServer,
    Request,
    Response,
    Router,
    unavailable,
)
from freshrec.serving.impressions import SERVED as VARIANT_SERVED
from freshrec.serving.impressions import ImpressionLog
from freshrec.serving.kernels import warm_up
from freshrec.serving.openapi import OPENAPI
from freshrec.serving.publisher import RecommendationPublisher
from freshrec.serving.variants import Variants
from freshrec.store.drift_log import read_firings
from freshrec.store.keys import Keys
from freshrec.store.redis_errors import transient_error

log = logging.getLogger(__name__)

REQUESTS = Counter("freshrec_http_requests_total", "Reader requests", ["route", "status"])
LATENCY = Histogram(
    "freshrec_http_request_seconds",
    "Reader request latency",
    ["route"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)
LOOP_RESTARTS = Counter(
    "freshrec_reader_loop_restarts_total", "Background loops restarted after a failure", ["loop"]
)
SNAPSHOT_AGE = Gauge(
    "freshrec_reader_snapshot_age_seconds",
    "Time since the reader's item snapshot last caught up with Redis (+Inf before the first)",
)

MAX_SNAPSHOT_AGE_S = 30.0  # /healthz: an item snapshot older than this is unhealthy
LOOP_BACKOFF_S = 0.5  # first wait before restarting a failed background loop
LOOP_BACKOFF_MAX_S = 30.0
LOOP_HEALTHY_AFTER_S = 60.0  # a loop running this long since its restart resets its back-off


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
    client_config: Mapping[str, Any] = field(default_factory=dict)
    """More librdkafka options: the security ones (``freshrec.connections.kafka_config``)."""


@dataclass
class LoopHealth:
    """A supervised background loop: up, or down since its last failure until it restarts."""

    running: bool = False
    restarts: int = 0
    last_error: str | None = None

    def to_json(self) -> dict[str, object]:
        return {"running": self.running, "restarts": self.restarts, "last_error": self.last_error}


class Reader:
    """The routes over one funnel, with the background work that keeps it fresh and publishes.

    Parameters
    ----------
    index_refresh_s
        How often the item snapshot and the pools catch up with Redis; a request finding the
        snapshot older than ten intervals starts a catch-up itself.
    max_snapshot_age_s
        ``/healthz`` answers 503 when the snapshot is older than this.
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
        max_snapshot_age_s: float = MAX_SNAPSHOT_AGE_S,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.funnel = Funnel(redis, keys, config, max_staleness_s=10 * index_refresh_s)
        self.variants = variants or Variants.parse("", config)
        self.max_k = max_k
        self.max_id_length = max_id_length
        self.index_refresh_s = index_refresh_s
        self.max_snapshot_age_s = max_snapshot_age_s
        self.loops: dict[str, LoopHealth] = {}
        self.publishing = publishing
        self.impressions: ImpressionLog | None = None
        self.publisher: RecommendationPublisher | None = None
        if publishing is not None:
            producer = Producer(
                {
                    **publishing.client_config,
                    "bootstrap.servers": publishing.kafka_bootstrap,
                    "linger.ms": 20,
                    # A retried batch is neither written twice (an impression counted twice)
                    # nor after a newer one (a user's older list last on the topic).
                    "enable.idempotence": True,
                    "log_level": 3,
                }
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
                variants=self.variants,
                requests_in_flight=lambda: self.server.in_flight,
            )
        router = Router()
        router.add("/recommendations/{user_id}", self.recommendations)
        router.add("/similar/{item_id}", self.similar)
        router.add("/predict/{user_id}/{item_id}", self.predict)
        router.add("/healthz", self.healthz)
        router.add("/drift", self.drift)
        router.add("/metrics", self.metrics)
        router.add("/openapi.json", self.openapi)
        self.server = HttpServer(router, self.dispatch)
        self._background: list[asyncio.Task[None]] = []
        self._labels: dict[tuple[str, int], tuple[Any, Any]] = {}
        for variant in self.variants.variants:  # every bounded series exists from the start
            VARIANT_SERVED.labels(variant.name)
        self.exposure = ExposureMeter(lambda: self.funnel.index.live)
        self.exposure.export()
        self.request_ids = request_ids()
        SNAPSHOT_AGE.set_function(lambda: self.funnel.index.staleness_s)

    async def start(self, host: str, port: int, reuse_port: bool = False) -> None:
        """Binds ``host:port`` (beside other readers on it with ``reuse_port``: they share the
        connections and, through the atomic pop of due users, the publishing), compiles the
        kernels, starts the background work, then listens.

        A port another process listens on fails at once, before anything else starts. The
        port listens only once the kernels are ready, so neither a request nor the first
        refresh of the snapshot pays for a compile, and no route (``/healthz`` included) can
        answer before the reader serves at speed. Listening first and answering 503 until
        ready would need the compile on a thread beside the loop (it holds the GIL most of the
        time, so even those answers would be slow) and every route to refuse meanwhile; a port
        not yet open already means "not up yet" to every client, probe and load balancer.
        """
        with _port_taken(host, port, reuse_port):
            await self.server.bind(host, port, reuse_port)
        warm_up([self.funnel.config, *(v.config for v in self.variants.variants)])
        self._background.append(asyncio.create_task(self._supervise("refresh", self._keep_fresh)))
        publisher, publishing = self.publisher, self.publishing
        if publisher is not None and publishing is not None:
            run = functools.partial(publisher.run, publishing.interval_s)
            self._background.append(asyncio.create_task(self._supervise("publisher", run)))
        try:
            with _port_taken(host, port, reuse_port):  # another took it while we compiled
                await self.server.serve()
        except RuntimeError:
            await self.stop()
            raise

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

    async def _supervise(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Runs ``loop`` forever: a failure is logged, backed off and restarted, never silent."""
        health = self.loops[name] = LoopHealth()
        LOOP_RESTARTS.labels(name)  # the series exists (at 0) before any restart
        backoff = LOOP_BACKOFF_S
        while True:
            health.running = True
            started = time.monotonic()
            try:
                await loop()
                raise RuntimeError("returned")  # loops run until cancelled
            except asyncio.CancelledError:
                health.running = False
                raise
            except Exception as exc:
                health.running = False
                health.last_error = f"{type(exc).__name__}: {exc}"
                if time.monotonic() - started > LOOP_HEALTHY_AFTER_S:
                    backoff = LOOP_BACKOFF_S
                log.exception("background loop %r failed; restarting in %.1f s", name, backoff)
            LOOP_RESTARTS.labels(name).inc()
            await pause(backoff)
            backoff = min(2 * backoff, LOOP_BACKOFF_MAX_S)
            health.restarts += 1

    async def _keep_fresh(self) -> None:
        """The item snapshot, pools and click-model weights, refreshed in the background.

        After the first load the collector's generations are frozen: the snapshot's objects
        (item ids, their row map) live as long as the reader, and a full collection walking
        them all would pause the loop for tens of milliseconds at 50,000 items.
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
            except redis_errors.ResponseError as exc:
                if transient_error(exc) is None:  # not a Redis that cannot answer now
                    raise
                log.warning("funnel state not refreshed: %s", exc)
            await pause(self.index_refresh_s)

    # --- routes -------------------------------------------------------------------------------
    async def recommendations(self, request: Request) -> Response:
        user_id = self._identifier(request, "user_id")
        k = self._k(request)
        started = time.perf_counter()
        variant = self.variants.assign(user_id)
        served = await self.funnel.serve(user_id, k, variant.config, learn=True)
        request_id = self.request_ids()
        self.exposure.record([c.item_id for c in served.items], (c.channels for c in served.items))
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
                "index_items": self.funnel.index.live,
                "index_rows": len(self.funnel.index),
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
        """Redis answers on the requests' own connection, the snapshot is recent, loops run."""
        await self.funnel.user_state.execute("PING")
        age = self.funnel.index.staleness_s
        loops = {name: health.to_json() for name, health in self.loops.items()}
        problems = [f"the {name} loop is down" for name, h in self.loops.items() if not h.running]
        if age > self.max_snapshot_age_s:
            problems.append(f"the item snapshot is older than {self.max_snapshot_age_s} s")
        body = {
            "status": "unhealthy" if problems else "ok",
            "redis": "ok",
            "snapshot_age_s": round(age, 3) if age != float("inf") else None,
            "loops": loops,
        }
        if problems:
            body["error"] = "; ".join(problems)
            return Response.json(body, 503, (("Retry-After", "1"),))
        return Response.json(body)

    async def drift(self, request: Request) -> Response:
        """The workers' latest drift firings, newest first (`freshrec.store.drift_log`)."""
        return Response.json({"firings": await read_firings(self.redis, self.keys)})

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
            response = unavailable("state store (Redis) unavailable; retry shortly")
        except Exception as exc:
            if transient_error(exc) is not None:  # up but cannot answer now: 503, not 500
                log.warning("Redis cannot answer now: %s", exc)
                response = unavailable(f"state store (Redis) cannot answer now ({exc}); retry")
            else:
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
        # ASCII digits only: int() would also take " 5", "+5", "1_0" and other scripts' digits.
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 9:
            raise BadRequest(f"k must be an integer from 1 to {limit}, got {raw[:32]!r}")
        k = int(raw)
        if not 1 <= k <= limit:
            raise BadRequest(f"k must be an integer from 1 to {limit}, got {k}")
        return k


def request_ids() -> Callable[[], str]:
    """Ids for served lists, unique across readers and restarts: 64 random bits drawn once per
    process, then a counter (32 hex digits, as a UUID's). uuid4 asked the kernel for random
    bytes on every request."""
    prefix, counter = os.urandom(8).hex(), itertools.count()
    return lambda: f"{prefix}{next(counter):016x}"


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
    redis_options: Mapping[str, Any] | None = None,
    reuse_port: bool = False,
    metrics_port: int = 0,
    cluster: bool = False,
) -> None:
    """Serves until SIGTERM or SIGINT, then finishes requests in flight and closes cleanly.

    ``redis_options`` are redis-py's options beside the URL (ACL user, password, TLS files:
    ``freshrec.connections.redis_options``); the request path's multiplexed connection takes
    them from the same pool. With ``reuse_port`` several readers listen on one port; each then
    needs a ``metrics_port`` of its own for Prometheus, since a scrape of the shared port
    reaches whichever reader the kernel picks. With ``cluster`` the Redis URL names a node of a
    Redis Cluster, and the reader reads through a cluster client (`freshrec.store.cluster`)."""

    _allow_open_files(MAX_CONNECTIONS + 256)
    if metrics_port:  # the default registry, as /metrics on the serving port
        try:
            start_http_server(metrics_port, addr=host)
        except OSError as exc:
            raise RuntimeError(f"the reader's metrics port {host}:{metrics_port}: {exc}") from exc

    async def main() -> None:
        client: Redis | RedisCluster
        if cluster:  # a pool per node; requests reach their slot's node
            client = RedisCluster.from_url(
                redis_url,
                max_connections=64,
                socket_timeout=2,
                socket_connect_timeout=2,
                **(redis_options or {}),
            )
        else:
            # Requests beyond the pool wait for a connection (up to the timeout), not fail.
            pool = BlockingConnectionPool.from_url(
                redis_url,
                max_connections=64,
                timeout=2,
                socket_timeout=2,
                socket_connect_timeout=2,
                **(redis_options or {}),
            )
            client = Redis(connection_pool=pool)
        reader = Reader(client, keys, config, max_k, max_id_length, publishing, variants)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await reader.start(host, port, reuse_port)
        log.info("reader listening on http://%s:%d", host, port)
        try:
            await stop.wait()
        finally:
            await reader.stop()

    uvloop.run(main())


@contextlib.contextmanager
def _port_taken(host: str, port: int, reuse_port: bool) -> Iterator[None]:
    """An OSError binding or listening becomes a RuntimeError saying which port and why."""
    try:
        yield
    except OSError as exc:
        shared = "" if reuse_port else " (readers share a port with FRESHREC_SERVE_REUSE_PORT)"
        raise RuntimeError(f"the reader cannot take {host}:{port}: {exc}{shared}") from exc


def _allow_open_files(wanted: int) -> None:
    """Raises the soft limit on open files towards ``wanted`` (within the hard limit), so the
    connection cap, not the file table, decides when clients are turned away."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
