"""The Faust worker: decode and validate event batches, learn them into Redis.

The agent stays thin: it takes a batch, splits valid events from invalid ones and hands the
valid ones, with their partition offsets, to `freshrec.store.batch_update.BatchUpdater` (which
also marks the touched users, whose fresh lists the reader then publishes). A message with any
invalid event goes to the dead-letter topic once, with its original bytes, a bounded summary of
the reasons and the number of events rejected; validation never raises, so a poison message
cannot stop the agent. A Redis outage pauses the agent (retrying with backoff) instead of
dropping or half-applying a batch; Kafka offsets advance only after the batch is applied, and a
redelivered message is skipped by its offset.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faust
from prometheus_client import Counter, Gauge, Histogram, start_http_server
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from freshrec.serving.variants import Variants
from freshrec.settings import Settings
from freshrec.store.batch_update import BatchUpdater
from freshrec.store.feedback import FeedbackLearner, Shown, parse_impression
from freshrec.store.keys import Keys
from freshrec.streams.events import Event, EventValidator, summarise_reasons

log = logging.getLogger(__name__)

EVENTS = Counter("freshrec_events_total", "Valid events learned", ["type"])
DEAD_LETTERS = Counter(
    "freshrec_dead_letters_total", "Messages sent to the DLQ (one per message, however many bad)"
)
REJECTED_EVENTS = Counter(
    "freshrec_rejected_events_total", "Events (or impression messages) rejected as invalid"
)
BATCHES = Counter("freshrec_batches_total", "Batches applied")
BATCH_SECONDS = Histogram(
    "freshrec_batch_apply_seconds",
    "Time to apply one batch to Redis",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
FRESHNESS = Histogram(
    "freshrec_event_to_state_seconds",
    "From the event's arrival in Kafka to its update landing in Redis",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RATING_ABS_ERROR = Histogram(
    "freshrec_prequential_rating_abs_error",
    "|r - r_hat| of each rating, predicted before it is learned",
    buckets=(0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0),
)
REDELIVERED = Counter(
    "freshrec_redelivered_events_total", "Events skipped because their offset was applied before"
)
REDIS_RETRIES = Counter("freshrec_redis_retries_total", "Batch applications retried")
VARIANT_IMPRESSIONS = Counter(
    "freshrec_variant_impressions_total", "Items shown, by A/B variant", ["variant"]
)
VARIANT_CLICKS = Counter(
    "freshrec_variant_clicks_total", "Clicks attributed to an impression, by variant", ["variant"]
)
LAST_EVENT_TS = Gauge("freshrec_last_event_time_seconds", "Event time of the newest event learned")


def faust_options(settings: Settings, kafka_bootstrap: str) -> dict[str, Any]:
    """The worker's Faust configuration (also the benchmark's no-op agent's, so both compare)."""
    data = Path(settings.home) / "faust"
    data.mkdir(parents=True, exist_ok=True)  # Faust creates only the last folder of its datadir
    return {
        "broker": f"kafka://{kafka_bootstrap}",
        "store": "memory://",
        # Faust's data folder (its tables' state) under FRESHREC_HOME, not the working directory.
        "datadir": str(data / "{conf.name}-data"),
        "value_serializer": "raw",
        "key_serializer": "raw",
        "topic_allow_declare": False,  # topics are created explicitly with their partition count
        "topic_disable_leader": True,
        "web_enabled": False,
        "consumer_auto_offset_reset": "earliest",
        "stream_buffer_maxsize": max(4 * settings.batch_size, 4096),
        "broker_max_poll_records": max(settings.batch_size, 500),
    }


def create_app(settings: Settings, kafka_bootstrap: str, redis_url: str) -> faust.App:
    app = faust.App(f"{settings.topic_prefix}-worker", **faust_options(settings, kafka_bootstrap))
    events_topic = app.topic(settings.events_topic, value_type=bytes, key_type=bytes)
    impressions_topic = app.topic(settings.impressions_topic, value_type=bytes, key_type=bytes)
    dlq_topic = app.topic(settings.dlq_topic, value_type=bytes, key_type=bytes)
    validator = EventValidator(settings)
    keys = Keys(settings.key_prefix)
    state: dict[str, Any] = {}

    first_use = asyncio.Lock()  # both agents start at once; one of them builds the state

    async def ready() -> tuple[BatchUpdater, FeedbackLearner]:
        async with first_use:
            if not state:
                client = Redis.from_url(redis_url, socket_timeout=5, health_check_interval=10)
                feedback = await FeedbackLearner.load(client, keys, settings.attribution_window_s)
                state["updater"] = BatchUpdater(
                    client, keys, settings.model_config(), atomic=settings.atomic_batches
                )
                state["feedback"] = feedback
        return state["updater"], state["feedback"]

    variant_label = variant_labels(settings)

    async def dead_letter(message: Any, reasons: list[str]) -> None:
        """One DLQ record for a message, however many of its events were invalid: the original
        bytes, a bounded summary of the reasons, and how many were rejected."""
        DEAD_LETTERS.inc()
        REJECTED_EVENTS.inc(len(reasons))
        await dlq_topic.send(
            key=message.key,
            value=message.value,
            headers={
                "freshrec-reason": summarise_reasons(reasons).encode(),
                "freshrec-rejected": str(len(reasons)).encode(),
                "freshrec-source": f"{message.topic}/{message.partition}/{message.offset}".encode(),
            },
        )

    @app.agent(events_topic)
    async def learn(stream: faust.StreamT) -> None:
        updater, feedback = await ready()
        async for batch in stream.take_events(settings.batch_size, within=settings.batch_within_s):
            valid: list[Event] = []
            origins: list[tuple[str, int]] = []
            arrived: list[float] = []
            for record in batch:
                message = record.message
                events, errors = validator.parse_message(message.value)
                valid.extend(events)
                origins.extend([_origin(message)] * len(events))
                arrived.append(_seconds(message.timestamp))
                if errors:
                    await dead_letter(message, [error.reason for error in errors])
            if not valid:
                continue
            started = time.perf_counter()
            result = await _apply_until_done(updater, valid, origins)
            finished = time.time()
            BATCH_SECONDS.observe(time.perf_counter() - started)
            BATCHES.inc()
            for kind, count in collections.Counter(e.type for e in valid).items():
                EVENTS.labels(kind).inc(count)
            REDELIVERED.inc(result.skipped)
            for err in result.rating_errors:
                RATING_ABS_ERROR.observe(abs(err))
            for ts in arrived:
                if ts > 0:
                    FRESHNESS.observe(max(0.0, finished - ts))
            if result.events:
                LAST_EVENT_TS.set(result.max_ts)
            clicks = [(e.user_id, e.item_id, e.ts) for e in valid if e.type == "click"]
            if clicks and result.events:
                for variant, n in (await feedback.attribute_clicks(clicks)).items():
                    VARIANT_CLICKS.labels(variant_label(variant)).inc(n)

    @app.agent(impressions_topic)
    async def count_impressions(stream: faust.StreamT) -> None:
        """Impressions feed UCB counts, click attribution and the click model."""
        updater, feedback = await ready()
        async for batch in stream.take_events(settings.batch_size, within=settings.batch_within_s):
            shown: list[Shown] = []
            events: list[Event] = []
            origins: list[tuple[str, int]] = []
            for record in batch:
                message = record.message
                try:
                    items = parse_impression(
                        message.value, settings.max_id_length, settings.max_message_bytes
                    )
                except ValueError as exc:
                    await dead_letter(message, [f"impression: {exc}"])
                    continue
                sent = _seconds(message.timestamp) or time.time()  # readers before event time
                shown.extend(items)
                events.extend(
                    Event("impression", s.user_id, s.item_id, s.ts or sent) for s in items
                )
                origins.extend([_origin(message)] * len(items))
            if not events:
                continue
            result = await _apply_until_done(updater, events, origins)
            fresh = [shown[n] for n in result.applied]  # a redelivered part was learned before
            if not fresh:
                continue
            for variant, n in (await feedback.record_impressions(fresh)).items():
                VARIANT_IMPRESSIONS.labels(variant_label(variant)).inc(n)

    @app.timer(interval=2.0)
    async def merge_click_model() -> None:
        if "feedback" in state:
            await state["feedback"].sync()

    @app.task
    async def serve_metrics() -> None:
        if settings.worker_metrics_port:
            try:
                start_http_server(settings.worker_metrics_port, addr=settings.serve_host)
            except OSError as exc:
                log.warning(
                    "worker metrics not served on %s: %s", settings.worker_metrics_port, exc
                )

    return app


OTHER_VARIANT = "other"


def variant_labels(settings: Settings) -> Callable[[str], str]:
    """The metric label of a variant: its name if FRESHREC_VARIANTS configures it, else
    "other", so a producer cannot grow the label set (a Prometheus series per label value).

    The worker reads the same FRESHREC_VARIANTS as the readers; without it only "control" is
    configured. A spec the worker cannot parse leaves "control" alone (the readers refuse it).
    """
    try:
        names = frozenset(Variants.parse(settings.variants, settings.funnel_config()).names)
    except (ValueError, TypeError, AttributeError) as exc:
        log.warning("FRESHREC_VARIANTS not understood (%s); variant metrics: control, other", exc)
        names = frozenset(("control",))
    return lambda variant: variant if variant in names else OTHER_VARIANT


async def _apply_until_done(
    updater: BatchUpdater, events: list[Event], origins: list[tuple[str, int]]
) -> Any:
    """Apply a batch, waiting out a Redis outage; the batch is never dropped.

    A retry is safe: the offset watermarks skip whatever did land.
    """
    delay = 0.1
    while True:
        try:
            return await updater.apply(events, origins)
        except (redis_errors.ConnectionError, redis_errors.TimeoutError) as exc:
            REDIS_RETRIES.inc()
            log.warning(
                "Redis unavailable, retrying batch of %d in %.1fs: %s", len(events), delay, exc
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def _origin(message: Any) -> tuple[str, int]:
    """(partition label, offset): what the batch updater's watermarks are kept by."""
    return f"{message.topic}/{message.partition}", message.offset


def _seconds(timestamp: float | None) -> float:
    if not timestamp:
        return 0.0
    return timestamp / 1000.0 if timestamp > 1e11 else float(timestamp)


def run_worker(settings: Settings, kafka_bootstrap: str, redis_url: str, loglevel: str) -> None:
    """Run a worker in this process until interrupted (SIGINT/SIGTERM)."""
    from faust.worker import Worker

    app = create_app(settings, kafka_bootstrap, redis_url)
    Worker(app, loglevel=loglevel).execute_from_commandline()
