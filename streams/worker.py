"""The Faust worker: decode and validate event batches, learn them into Redis.

The agent stays thin: it takes a batch, splits valid events from invalid ones and hands the
valid ones, with their partition offsets, to `freshrec.store.batch_update.BatchUpdater` (which
also marks the touched users, whose fresh lists the reader then publishes). A message with any
invalid event goes to the dead-letter topic once, with its original bytes, a bounded summary of
the reasons and the number of events rejected; validation never raises, so a poison message
cannot stop the agent. Kafka offsets advance only after the batch is applied, and a
redelivered message is skipped by its offset.

Redis failures (`RedisSteps`). Every Redis step of both agents (applying a batch, with the
impressions it remembers and the clicks it attributes, and loading the click model at start)
runs under one policy, decided per error:

- *Transient*, retried with capped exponential backoff and full jitter for as long as it takes:
  a lost or refused connection or a timeout (``ConnectionError``, ``TimeoutError``, "max
  number of clients reached"), a server still loading its data (``LOADING``), busy in a slow
  script (``BUSY``), out of memory under ``noeviction`` (``OOM command not allowed``), a
  script cache flushed under us (``NOSCRIPT``; redis-py reloads a registered script when it
  meets one, a retry covers the pipelined case), a replica that is not (or no longer) the
  primary (``READONLY``), a cluster mid-failover or resharding (``TRYAGAIN``,
  ``CLUSTERDOWN``, ``MASTERDOWN``, a slot no node in the client's map holds). Meanwhile the
  agent holds its batch (nothing is acked), logs at most once per `LOG_EVERY_S` per step,
  counts each retry in ``freshrec_worker_redis_retries_total{error}`` (one label per kind
  above) and sets ``freshrec_worker_blocked`` to 1.
- *Fatal*, everything else: an error reply retrying cannot fix (``WRONGTYPE``, a script
  error, ``NOPERM``, a rejected password), or an exception from our own code. The worker logs
  it with its context and exits at once with status `EXIT_FATAL`, without acknowledging the
  batch; the supervisor restarts it and Kafka redelivers from the last committed offset. The
  exit is immediate (``os._exit``) on purpose: an exception leaving the agent would close
  Faust's batch generator, which acks the batch, and a graceful stop then commits it.

Likewise a stop request (cancellation) that arrives while a step is waiting out a failure
exits at once with `EXIT_UNAPPLIED`, so the batch it holds is redelivered, not acked.

Redis can also come back *older* than what it acknowledged: restarted from a snapshot or a
backup, or a failover to a replica that was behind. A batch then reads a partition's offset
watermark below one this process wrote or read before
(`freshrec.store.batch_update.StateWentBack`); the messages in between are in no state and
Kafka will not send them again to this consumer. The worker exits at once with
`EXIT_STATE_WENT_BACK`, unacknowledged; started again, it resumes each partition after its
watermark (`resume_after_watermarks`), so they are applied, once. A Redis that lost
everything (a flush, one that came back empty) has no watermark and no event clock: started
again, the worker marks the state as built from the log and starts every partition without a
watermark at the earliest offset Kafka still holds, whatever the group committed; other
workers that find the mark do the same. A partition whose watermark alone is gone from a
state that holds events and no such mark resumes from the group's commits: replaying the
whole log into the rest of the state would apply it twice. On Redis Cluster a node that lost
the watermarks' slot may have taken the event clock with it while other nodes kept their
state, so there the worker never rebuilds by itself and resumes from the commits.

A consumer can also stop handing the worker its partitions' messages while it keeps them
(`freshrec.streams.stall`): `watch_for_stall` then exits with `EXIT_STALLED`, and the worker
started again resumes after its watermarks.

A retried step is safe to repeat: the batch write is skipped by its offset watermarks if it
landed, and the feedback of a batch (the impressions it remembers, the clicks it attributes,
`freshrec.store.feedback`) is part of that write. The click model learns from a batch in
memory once its write has landed, under the lock its merge timer takes too; what it learned
since its last merge is lost with the process. The click model's merge timer
(`merge_click_model`) catches and logs its own failures (at a bounded rate) and tries again on
its next tick: it never stops the app.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import faust
from prometheus_client import Counter, Gauge, Histogram, start_http_server
from redis import exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster

from freshrec.connections import faust_credentials, redis_client
from freshrec.models.drift import DETECTORS, Firing
from freshrec.serving.variants import Variants
from freshrec.settings import Settings
from freshrec.store.batch_update import BatchUpdater, StateWentBack
from freshrec.store.drift_log import BatchDrift, record_firings
from freshrec.store.feedback import (
    BatchClicks,
    BatchImpressions,
    FeedbackLearner,
    Shown,
    parse_impression,
)
from freshrec.store.keys import Keys
from freshrec.store.redis_errors import TRANSIENT_ERRORS, transient_error
from freshrec.store.retention import retire_idle_items
from freshrec.streams.client_logs import limit_kafka_client_logs
from freshrec.streams.events import EVENT_TYPES, Event, EventValidator, summarise_reasons
from freshrec.streams.read_committed import ReadCommittedApp
from freshrec.streams.reason_classes import REASON_CLASSES, reason_class
from freshrec.streams.stall import StallWatch, watched_offset

log = logging.getLogger(__name__)

EVENTS = Counter("freshrec_events_total", "Valid events learned", ["type"])
DEAD_LETTERS = Counter(
    "freshrec_dead_letters_total",
    "Messages sent to the DLQ (one per message, however many bad), by source topic and the "
    "class of its first reason",
    ["source", "reason"],
)
REJECTED_EVENTS = Counter(
    "freshrec_rejected_events_total",
    "Events (or impression messages) rejected as invalid, by class of reason",
    ["reason"],
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
DUPLICATES = Counter(
    "freshrec_duplicate_events_total",
    "Events dropped because their user had applied their event_id before (FRESHREC_DEDUP_EVENTS)",
)
REDIS_RETRIES = Counter(
    "freshrec_worker_redis_retries_total",
    "Redis steps retried after a transient error, by kind of error",
    ["error"],
)
BLOCKED = Gauge(
    "freshrec_worker_blocked", "1 while an agent holds a batch Redis has not accepted yet"
)
VARIANT_IMPRESSIONS = Counter(
    "freshrec_variant_impressions_total", "Items shown, by A/B variant", ["variant"]
)
VARIANT_CLICKS = Counter(
    "freshrec_variant_clicks_total", "Clicks attributed to an impression, by variant", ["variant"]
)
DRIFT_DETECTIONS = Counter(
    "freshrec_drift_detections_total",
    "Drift detector firings (freshrec.models.drift), by signal and detector",
    ["signal", "detector"],
)
DRIFT_SIGNAL = Gauge(
    "freshrec_drift_signal_mean",
    "A drift signal's current level (mean of its latest values)",
    ["signal"],
)
LAST_EVENT_TS = Gauge("freshrec_last_event_time_seconds", "Event time of the newest event learned")
CONSUMER_LAG = Gauge(
    "freshrec_consumer_lag_messages",
    "Messages in a partition this worker owns that it has not processed yet (the end offset, "
    "the last stable one, minus the next offset to process; commit markers not counted)",
    ["topic", "partition"],
)
REDIS_MEMORY = Gauge("freshrec_redis_memory_used_bytes", "Redis used_memory (INFO memory)")
REDIS_MAXMEMORY = Gauge(
    "freshrec_redis_memory_max_bytes", "Redis maxmemory (0: no limit configured)"
)
TOPIC_LABELS = ("events", "impressions")
"""The ``topic`` label values of the lag gauge: the role of a topic, not its (prefixed) name."""
OBSERVE_EVERY_S = 5.0
"""How often the worker reads its consumer lag and Redis memory."""
LAG_UNKNOWN_AFTER_S = 3 * OBSERVE_EVERY_S
"""With no answer to a request for end offsets for this long (the broker away), the lag
gauge's series go: a figure that old would read as current."""
OFFSETS_AGE = Gauge(
    "freshrec_worker_end_offsets_age_seconds",
    "Seconds since the broker last answered this worker's request for end offsets (its lag "
    "gauge's source): growing while the broker is away",
)
RETIRED_ITEMS = Counter(
    "freshrec_retired_items_total", "Items retired after the item TTL without any write"
)
SESSION_TIMEOUT_S = 15.0
"""Kafka consumer-group session: how long a crashed worker's partitions wait for another."""
DEAD_LETTER_BYTES = 900_000
"""The longest message a dead letter carries whole; room is left for key and headers under
the 1,000,000-byte request limit of Faust's producer and the broker's default message size."""
DEAD_LETTER_KEY_BYTES = 4096
"""The longest key a dead letter carries whole (a key is a user id, a few dozen bytes)."""


def faust_options(settings: Settings, kafka_bootstrap: str) -> dict[str, Any]:
    """The worker's Faust configuration (`faust_app`)."""
    data = Path(settings.home) / "faust"
    data.mkdir(parents=True, exist_ok=True)  # Faust creates only the last folder of its datadir
    return {
        "broker": f"kafka://{kafka_bootstrap}",
        "broker_credentials": faust_credentials(settings),  # SASL and TLS, None for PLAINTEXT
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
        # A worker killed without leaving its group holds its partitions until its session
        # times out: Faust's 60 s would keep a restarted worker idle that long. Heartbeats
        # every 3 s, so a member is dropped after five missed ones, not on one slow batch.
        "broker_session_timeout": SESSION_TIMEOUT_S,
        "broker_heartbeat_interval": 3.0,
        "broker_max_poll_records": max(settings.batch_size, 500),
    }


def faust_app(app_id: str, settings: Settings, kafka_bootstrap: str) -> faust.App:
    """The worker's Faust app, unstarted (also the benchmark's no-op agent's): its options,
    reading committed transactions only (`freshrec.streams.read_committed`)."""
    return ReadCommittedApp(app_id, **faust_options(settings, kafka_bootstrap))


def create_app(settings: Settings, kafka_bootstrap: str, redis_url: str) -> faust.App:
    app = faust_app(f"{settings.topic_prefix}-worker", settings, kafka_bootstrap)
    events_topic = app.topic(settings.events_topic, value_type=bytes, key_type=bytes)
    impressions_topic = app.topic(settings.impressions_topic, value_type=bytes, key_type=bytes)
    dlq_topic = app.topic(settings.dlq_topic, value_type=bytes, key_type=bytes)
    validator = EventValidator(settings)
    keys = Keys(settings.key_prefix)
    state: dict[str, Any] = {}
    steps = RedisSteps()
    # The click model in memory: a failed attempt of a step that learns it is undone, and the
    # merge timer must not run between the learning and the undoing.
    click_model = asyncio.Lock()

    first_use = asyncio.Lock()  # both agents start at once; one of them builds the state

    async def ready() -> tuple[BatchUpdater, FeedbackLearner]:
        async with first_use:
            if not state:
                client = redis_client(
                    settings, redis_url, socket_timeout=5, health_check_interval=10
                )
                feedback = await steps.run(
                    "loading the click model",
                    lambda: FeedbackLearner.load(client, keys, settings.attribution_window_s),
                )
                state["updater"] = BatchUpdater(
                    client, keys, settings.model_config(), atomic=settings.exactly_once
                )
                state["feedback"] = feedback
        return state["updater"], state["feedback"]

    def freeze_heap(agent: str) -> None:
        """Once each agent has applied its first batch (libraries imported, its kernels
        compiled, clients and models built), collect and move every object the collector
        tracks to its permanent generation.

        Batches keep their events alive across awaits on Redis, so survivors reach the oldest
        generation fast and trigger frequent full collections, each walking the whole heap
        while no message is consumed. Frozen, a full collection walks only what was made
        since (the reader does the same after its first load)."""
        frozen = state.setdefault("heap_frozen_for", set())
        if agent not in frozen:
            gc.collect()  # cyclic garbage of the start-up is freed, not kept for good
            gc.freeze()
            frozen.add(agent)

    variant_label = variant_labels(settings)
    for variant in variant_label.names:  # every bounded series exists from the start
        VARIANT_IMPRESSIONS.labels(variant)
        VARIANT_CLICKS.labels(variant)
    for kind in EVENT_TYPES:
        EVENTS.labels(kind)
    for kind in TRANSIENT_ERRORS:
        REDIS_RETRIES.labels(kind)
    drift = BatchDrift(variant_label.names)
    for signal in drift.monitor.watches:
        DRIFT_SIGNAL.labels(signal).set(float("nan"))  # no value yet, not a level of 0
        for detector in DETECTORS:
            DRIFT_DETECTIONS.labels(signal, detector)
    for reason in REASON_CLASSES:
        REJECTED_EVENTS.labels(reason)
        for source in TOPIC_LABELS:
            DEAD_LETTERS.labels(source, reason)
    topic_label = {settings.events_topic: "events", settings.impressions_topic: "impressions"}
    processed: dict[tuple[str, int], int] = {}  # (topic, partition) -> next offset to process
    resumed_at: dict[tuple[str, int], int] = {}  # where a partition resumed, when known
    sought_at: dict[tuple[str, int], int] = {}  # the offset committed for Faust's seek
    stalls = StallWatch(STALL_S)

    async def dead_letter(message: Any, reasons: list[str], source: str) -> Any:
        """Sends one DLQ record for a message, however many of its events were invalid: the
        original bytes, a bounded summary of the reasons, and how many were rejected. Returns
        what to await for Kafka to hold it.

        A record must fit the producer's request and the broker's message size (both about
        1 MB by default) with its headers: a message longer than `DEAD_LETTER_BYTES` goes as
        its first bytes, with ``freshrec-original-bytes``, a key longer than
        `DEAD_LETTER_KEY_BYTES` likewise with ``freshrec-original-key-bytes``;
        ``freshrec-source`` names where the whole message stays. A message with neither key
        nor value, which Kafka's producer refuses to send as it is, goes with an empty value."""
        DEAD_LETTERS.labels(source, reason_class(reasons[0]) if reasons else "other").inc()
        for kind, count in collections.Counter(map(reason_class, reasons)).items():
            REJECTED_EVENTS.labels(kind).inc(count)
        key, value = message.key, message.value
        headers = {
            "freshrec-reason": summarise_reasons(reasons).encode(),
            "freshrec-rejected": str(len(reasons)).encode(),
            "freshrec-source": f"{message.topic}/{message.partition}/{message.offset}".encode(),
        }
        if value is not None and len(value) > DEAD_LETTER_BYTES:
            headers["freshrec-original-bytes"] = str(len(value)).encode()
            value = value[:DEAD_LETTER_BYTES]
        if key is not None and len(key) > DEAD_LETTER_KEY_BYTES:
            headers["freshrec-original-key-bytes"] = str(len(key)).encode()
            key = key[:DEAD_LETTER_KEY_BYTES]
        if key is None and value is None:
            value = b""
        return await dlq_topic.send(key=key, value=value, headers=headers)

    async def send_dead_letters(letters: list[tuple[Any, list[str], str]], where: str) -> None:
        """Sends a batch's dead letters (message, reasons, source topic's label) and waits
        until Kafka holds them all, before the batch can be acknowledged. One refused (the
        topic missing, a record over the broker's limit, the broker away past the producer's
        timeout) exits the worker (`EXIT_FATAL`) without acknowledging the batch: redelivered,
        its letters are sent again, none is lost."""
        try:
            await asyncio.gather(*[await dead_letter(*letter) for letter in letters])
        except Exception as exc:
            steps.exit_unacknowledged(f"the dead letters of {where} were not delivered", exc)
            raise  # only when a test's exit returns

    async def watch_drift(
        updater: BatchUpdater, valid: list[Event], errors: list[float], ts: float
    ) -> None:
        """Feed the batch's drift signals; count, log and record what fired."""
        items, users = [e.item_id for e in valid], [e.user_id for e in valid]
        await report_drift(updater, drift.observe(items, users, errors, ts))

    async def report_drift(updater: BatchUpdater, firings: list[Firing]) -> None:
        for signal, mean in drift.monitor.means().items():
            DRIFT_SIGNAL.labels(signal).set(mean)
        for f in firings:
            DRIFT_DETECTIONS.labels(f.signal, f.detector).inc()
            log.warning(
                "drift detected: signal=%s detector=%s event_ts=%.3f before=%.4g after=%.4g",
                f.signal,
                f.detector,
                f.ts,
                f.before,
                f.after,
            )
        if firings:
            await steps.run(
                f"recording {len(firings)} drift firings",
                partial(record_firings, updater.redis, keys, firings),
            )

    @app.on_rebalance_complete.connect
    async def resume_after_watermarks(app: faust.App, **kwargs: Any) -> None:
        """Commit each assigned partition's offset as its watermark + 1, so that the seek to
        the committed offsets that follows resumes right after what Redis holds. A state built
        from the log (`state_built_from_log`) starts its partitions with no watermark at the
        earliest offset Kafka holds instead, whatever the group committed."""
        consumer = app.consumer
        processed.clear()  # the partitions start again from their commits, below or not
        resumed_at.clear()
        sought_at.clear()
        stalls.forget()
        owned = [tp for tp in consumer.assignment() if tp.topic in topic_label]
        if not owned:
            return
        updater, _ = await ready()
        labels = [f"{tp.topic}/{tp.partition}" for tp in owned]
        marks = await steps.run(
            "reading the offset watermarks",
            partial(updater.redis.mget, [keys.watermark(label) for label in labels]),
        )
        seen = updater.marks_seen  # read from Redis: never to be seen lower (StateWentBack)
        for label, mark in zip(labels, marks, strict=True):
            if mark:
                seen[label] = max(int(mark), seen.get(label, -1))
        resume = {tp: int(mark) + 1 for tp, mark in zip(owned, marks, strict=True) if mark}
        unmarked = [tp for tp, mark in zip(owned, marks, strict=True) if not mark]
        if unmarked and updater.atomic:
            from_log = await steps.run(
                "reading where the state began", partial(state_built_from_log, updater.redis, keys)
            )
            if from_log:
                earliest = await consumer.earliest_offsets(*unmarked)
                rebuild = {tp: int(earliest[tp]) for tp in unmarked}
                await consumer._commit(rebuild)
                # The seek to the commits that follows skips offset 0, so seek here too: in the
                # consumer's own thread (`seek_wait`), never from this one, where the seek can
                # land between two steps of its fetcher resetting the partition and kill it.
                await consumer.seek_wait(rebuild)
                resumed_at.update(_by_key(rebuild))
                sought_at.update(_by_key(rebuild))
                log.warning(
                    "the state is built from the log: starting partitions with no watermark "
                    "at the earliest offsets: %s",
                    _offsets_text(rebuild),
                )
        if resume:
            await consumer._commit(resume)  # the transport's commit of given offsets
            sought_at.update(_by_key(resume))
            resumed_at.update(_by_key(resume))
            try:  # past a watermark the log no longer holds, the consumer starts at its start
                earliest = await consumer.earliest_offsets(*resume)
            except Exception as exc:  # watched from their watermarks
                log.debug("earliest offsets not read for the stall watch: %s", exc)
            else:
                resumed_at.update(
                    _by_key({tp: max(o, int(earliest[tp])) for tp, o in resume.items()})
                )
            log.info("resuming after the watermarks: %s", _offsets_text(resume))

    @app.agent(events_topic)
    async def learn(stream: faust.StreamT) -> None:
        updater, feedback = await ready()
        async for batch in stream.take_events(settings.batch_size, within=settings.batch_within_s):
            valid: list[Event] = []
            origins: list[tuple[str, int]] = []
            arrived: list[float] = []
            letters: list[tuple[Any, list[str], str]] = []
            for record in batch:
                message = record.message
                processed[message.topic, message.partition] = message.offset + 1
                events, errors = validator.parse_message(message.value)
                valid.extend(events)
                origins.extend([_origin(message)] * len(events))
                arrived.append(_seconds(message.timestamp))
                if errors:
                    letters.append((message, [error.reason for error in errors], "events"))
            where = _batch_context(batch)
            if letters:
                await send_dead_letters(letters, where)
            if not valid:
                continue
            started = time.perf_counter()
            oldest = min((ts for ts in arrived if ts > 0), default=None)
            clicks = BatchClicks(feedback, valid)  # attributed by the batch's own write
            result = await steps.run(
                f"applying {len(valid)} events ({where})",
                partial(
                    updater.apply,
                    valid,
                    origins,
                    oldest,
                    clicks.writes_for if clicks.clicks else None,
                ),
            )
            finished = time.time()
            freeze_heap("events")
            BATCH_SECONDS.observe(time.perf_counter() - started)
            BATCHES.inc()
            learned = (valid[n].type for n in result.applied)  # not what was redelivered
            for kind, count in collections.Counter(learned).items():
                EVENTS.labels(kind).inc(count)
            REDELIVERED.inc(result.skipped - result.duplicates)
            DUPLICATES.inc(result.duplicates)
            for err in result.rating_errors:
                RATING_ABS_ERROR.observe(abs(err))
            for ts in arrived:
                if ts > 0:
                    FRESHNESS.observe(max(0.0, finished - ts))
            if result.events:
                LAST_EVENT_TS.set(result.max_ts)
                await watch_drift(updater, valid, result.rating_errors, result.max_ts)
            if clicks.clicks and result.events:
                async with click_model:
                    attributed, hits = clicks.learn(result.applied)
                for variant, n in attributed.items():
                    VARIANT_CLICKS.labels(variant_label(variant)).inc(n)
                by_variant = _by_label(attributed, variant_label)
                await report_drift(updater, drift.observe_clicks(by_variant, hits, result.max_ts))

    @app.agent(impressions_topic)
    async def count_impressions(stream: faust.StreamT) -> None:
        """Impressions feed UCB counts, click attribution and the click model."""
        updater, feedback = await ready()
        async for batch in stream.take_events(settings.batch_size, within=settings.batch_within_s):
            shown: list[Shown] = []
            events: list[Event] = []
            origins: list[tuple[str, int]] = []
            letters: list[tuple[Any, list[str], str]] = []
            for record in batch:
                message = record.message
                processed[message.topic, message.partition] = message.offset + 1
                try:
                    items = parse_impression(
                        message.value,
                        settings.max_id_length,
                        settings.max_message_bytes,
                        (settings.min_event_ts, time.time() + settings.max_future_s),
                    )
                except ValueError as exc:
                    letters.append((message, [f"impression: {exc}"], "impressions"))
                    continue
                sent = _seconds(message.timestamp) or time.time()  # readers before event time
                shown.extend(items)
                events.extend(
                    Event("impression", s.user_id, s.item_id, s.ts or sent) for s in items
                )
                origins.extend([_origin(message)] * len(items))
            where = _batch_context(batch)
            if letters:
                await send_dead_letters(letters, where)
            if not events:
                continue
            remembered = BatchImpressions(feedback, shown)  # remembered by the batch's write
            result = await steps.run(
                f"applying {len(events)} impressions ({where})",
                partial(updater.apply, events, origins, writes_for=remembered.writes_for),
            )
            freeze_heap("impressions")
            fresh = [shown[n] for n in result.applied]  # a redelivered part was learned before
            if not fresh:
                continue
            async with click_model:
                recorded = feedback.learn_impressions(fresh)
            for variant, n in recorded.items():
                VARIANT_IMPRESSIONS.labels(variant_label(variant)).inc(n)
            shown_ts = max((s.ts for s in fresh if s.ts), default=time.time())
            firings = drift.observe_impressions(_by_label(recorded, variant_label), shown_ts)
            await report_drift(updater, firings)

    sync_failures = {"count": 0, "logged_at": float("-inf")}

    @app.timer(interval=2.0)
    async def merge_click_model() -> None:
        """Merge the click model; a failure is logged (at a bounded rate) and the merge tried
        again on the next tick (`FeedbackLearner.sync` changes nothing when it fails)."""
        if "feedback" not in state:
            return
        try:
            async with click_model:
                await state["feedback"].sync()
        except Exception as exc:
            sync_failures["count"] += 1
            kind = transient_error(exc)
            if kind is not None:
                REDIS_RETRIES.labels(kind).inc()
            now = time.monotonic()
            if now - sync_failures["logged_at"] >= LOG_EVERY_S:
                sync_failures["logged_at"] = now
                log.log(
                    logging.WARNING if kind else logging.ERROR,
                    "click model merge failed (%d times since it last worked), trying again "
                    "on the next tick: %s: %s",
                    sync_failures["count"],
                    type(exc).__name__,
                    exc,
                    exc_info=None if kind else exc,
                )
        else:
            if sync_failures["count"]:
                log.warning("click model merged again after %d failures", sync_failures["count"])
                sync_failures["count"] = 0

    retire_failures = {"logged_at": float("-inf")}

    @app.timer(interval=retire_every_s(settings.item_ttl_s))
    async def retire_items() -> None:
        """Retire the items idle for the item TTL (`freshrec.store.retention`); a failure is
        logged at a bounded rate and the next tick tries again (a retired item is gone in
        one atomic step, or not at all)."""
        if "updater" not in state:
            return
        updater = state["updater"]
        try:
            retired = await retire_idle_items(
                updater.redis, keys, settings.item_ttl_s, atomic=settings.exactly_once
            )
        except Exception as exc:
            now = time.monotonic()
            if now - retire_failures["logged_at"] >= LOG_EVERY_S:
                retire_failures["logged_at"] = now
                log.warning("retiring idle items failed, next tick tries again: %s", exc)
            return
        if retired:
            RETIRED_ITEMS.inc(retired)
            log.info("retired %d items idle for %d s", retired, settings.item_ttl_s)

    def export_lag(lags: dict[tuple[str, int], int]) -> None:
        """Messages waiting per partition this worker owns (the stall watch's figures, so an
        open transaction's records and commit markers do not count); a revoked partition's
        series goes away."""
        owned = {(topic_label[topic], str(partition)) for topic, partition in lags}
        for (topic, partition), lag in lags.items():
            CONSUMER_LAG.labels(topic_label[topic], str(partition)).set(max(0, lag))
        for labels in exported_lag - owned:
            CONSUMER_LAG.remove(*labels)
        exported_lag.clear()
        exported_lag.update(owned)

    def lag_unknown(now: float) -> None:
        """No end offsets this tick. An answer the tick no longer waited for still counts (a
        slow broker is not an absent one); past `LAG_UNKNOWN_AFTER_S` without any, the series
        go."""
        if exported_lag and now - answered_at[0] >= LAG_UNKNOWN_AFTER_S:
            export_lag({})

    def answered(request: asyncio.Future[Any]) -> None:
        if not request.cancelled() and request.exception() is None:
            answered_at[:] = [time.monotonic()]

    exported_lag: set[tuple[str, str]] = set()
    answered_at = [time.monotonic()]
    OFFSETS_AGE.set_function(lambda: time.monotonic() - answered_at[0])
    probe: list[asyncio.Future[Any]] = []  # the end offsets asked of the broker, one at a time
    probe_started: list[float] = []
    rebalancing_since: list[float] = []

    @app.timer(interval=OBSERVE_EVERY_S)
    async def watch_for_stall() -> None:
        """Exit (`EXIT_STALLED`) when the consumer has stopped handing this worker the
        messages waiting in a partition it owns (`freshrec.streams.stall`): nothing in the
        group would reassign them. The supervisor starts the worker again, which resumes
        after its watermarks."""
        now = time.monotonic()
        if probe and not probe[0].done():  # the broker slow or away: no second request
            stalls.forget()
            lag_unknown(now)
            if now - probe_started[0] > PROBE_LIMIT_S:  # bounded by the request timeout
                log.critical(
                    "the consumer's thread has not answered a request for end offsets in %.0f "
                    "s; exiting (status %d) so that the worker started again resumes after its "
                    "watermarks",
                    now - probe_started[0],
                    EXIT_STALLED,
                )
                _exit_now(EXIT_STALLED)
            return
        try:
            owned = [tp for tp in app.consumer.assignment() if tp.topic in topic_label]
            if not owned:  # nothing to ask the broker about, so nothing unknown either
                stalls.forget()
                export_lag({})
                answered_at[:] = [now]
                return
            thread = app.consumer._thread  # aiokafka's consumer runs on it
            probe[:] = [asyncio.ensure_future(thread.call_thread(_ends_and_fetched, thread, owned))]
            probe[0].add_done_callback(answered)
            probe_started[:] = [now]
            # Shielded: a request that outlives the tick finishes in the background, where
            # the next tick finds it, instead of leaving the consumer's thread a cancelled one.
            highwaters, fetched = await asyncio.wait_for(
                asyncio.shield(probe[0]), OBSERVE_EVERY_S / 2
            )
        except Exception as exc:  # the consumer starting or rebalancing, the broker away
            log.debug("end offsets for the stall watch not read: %s", exc)
            stalls.forget()  # a consumer gets time to resume once the broker is back
            lag_unknown(now)
            return
        ends = {(tp.topic, tp.partition): int(o) for tp, o in highwaters.items() if o is not None}
        handed = app.consumer._read_offset  # Faust's, per partition; a defaultdict: get()
        nexts = {}
        for tp in owned:
            key = (tp.topic, tp.partition)
            watched = watched_offset(
                processed.get(key),
                resumed_at.get(key),
                sought_at.get(key),
                handed.get(tp),
                fetched.get(tp),
            )
            if key in ends and watched is not None:
                nexts[key] = watched
        export_lag({key: ends[key] - nexts[key] for key in nexts})
        now = time.monotonic()
        if not app.rebalancing:
            rebalancing_since.clear()
        elif not rebalancing_since:
            rebalancing_since.append(now)
        busy = (
            steps.blocked > 0
            or steps.running_s() > OBSERVE_EVERY_S
            or bool(rebalancing_since and now - rebalancing_since[0] < REBALANCE_LIMIT_S)
        )
        stalled = sorted(stalls.observe(now, ends, nexts, busy=busy))
        if stalled:
            log.critical(
                "the consumer has handed this worker nothing for %.0f s while messages wait: "
                "%s; exiting (status %d) so that the worker started again resumes after its "
                "watermarks",
                stalls.waited_s(now, stalled[0]),
                ", ".join(f"{t}/{p} next {nexts[t, p]} of {ends[t, p]}" for t, p in stalled),
                EXIT_STALLED,
            )
            _exit_now(EXIT_STALLED)

    memory_client = redis_client(settings, redis_url, socket_timeout=5)

    @app.timer(interval=OBSERVE_EVERY_S)
    async def observe_redis_memory() -> None:
        """Redis memory against its limit: an alert before writes start failing with OOM. On
        Redis Cluster, the fullest primary's (the first to refuse writes)."""
        try:
            if settings.redis_cluster:
                nodes = await memory_client.info("memory", target_nodes=RedisCluster.PRIMARIES)
                info = max(nodes.values(), key=_memory_share)
            else:
                info = await memory_client.info("memory")
        except (redis_errors.RedisError, redis_errors.RedisClusterException, OSError) as exc:
            log.debug("Redis memory not read: %s", exc)
            return
        REDIS_MEMORY.set(float(info.get("used_memory", 0)))
        REDIS_MAXMEMORY.set(float(info.get("maxmemory", 0)))

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


class VariantLabels:
    """Maps a variant name to its metric label; ``names`` is every label but "other"."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = sorted(names | {OTHER_VARIANT})
        self._configured = names

    def __call__(self, variant: str) -> str:
        return variant if variant in self._configured else OTHER_VARIANT


def variant_labels(settings: Settings) -> VariantLabels:
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
    return VariantLabels(names)


T = TypeVar("T")

EXIT_FATAL = 70  # EX_SOFTWARE: an error retrying cannot fix
EXIT_UNAPPLIED = 75  # EX_TEMPFAIL: stopped while a batch waited for Redis
EXIT_STATE_WENT_BACK = 76  # Redis lost writes it had acknowledged: resume after its watermarks
EXIT_STALLED = 69  # EX_UNAVAILABLE: the consumer stopped delivering its partitions' messages
STALL_S = 60.0
"""How long messages may wait in an owned partition, its next offset unmoved and the worker
not busy, before the worker counts its consumer as stalled (`freshrec.streams.stall`)."""
REBALANCE_LIMIT_S = 5 * STALL_S
"""A rebalance in progress keeps the stall watch's clocks at zero for this long at most."""
PROBE_LIMIT_S = 90.0 + STALL_S
"""A request for end offsets unanswered this long (Faust's request timeout bounds a healthy
one at 90 s) means the consumer's thread is wedged: a stall too."""
LOG_EVERY_S = 10.0
"""At most one log line per step and this many seconds while a step is being retried."""


def retire_every_s(item_ttl_s: float) -> float:
    """How often a worker retires idle items: a tenth of the TTL, between 1 s and a minute,
    so an item outlives its TTL by at most that much."""
    return min(60.0, max(1.0, item_ttl_s / 10))


def _exit_now(status: int) -> NoReturn:
    """Leave the process without unwinding: no generator finalizer acks the batch held, no
    graceful stop commits it."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


class RedisSteps:
    """Runs the agents' Redis steps under the worker's failure policy (module docstring).

    ``exit`` and ``sleep`` are for tests; the backoff starts at ``first_s`` and doubles up
    to ``cap_s``, each wait drawn uniformly below it (full jitter).
    """

    def __init__(
        self,
        first_s: float = 0.05,
        cap_s: float = 5.0,
        log_every_s: float = LOG_EVERY_S,
        exit: Callable[[int], NoReturn] = _exit_now,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.first_s = first_s
        self.cap_s = cap_s
        self.log_every_s = log_every_s
        self.exit = exit
        self.sleep = sleep
        self.blocked = 0  # steps waiting out a failure now
        self._running: dict[object, float] = {}  # each step running now -> when it began

    def exit_unacknowledged(self, what: str, exc: BaseException) -> None:
        """Logs ``what`` happened and exits with `EXIT_FATAL`, the batch unacknowledged."""
        log.critical(
            "%s; exiting (status %d) without acknowledging the batch, Kafka redelivers it from "
            "the last committed offset: %s: %s",
            what,
            EXIT_FATAL,
            type(exc).__name__,
            exc,
            exc_info=exc,
        )
        self.exit(EXIT_FATAL)

    async def run(self, what: str, step: Callable[[], Awaitable[T]]) -> T:
        """``step()`` until it succeeds; ``what`` names the step and its batch in logs."""
        attempt = 0
        since = time.monotonic()
        logged_at = float("-inf")
        token = object()
        self._running[token] = since
        try:
            while True:
                try:
                    result = await step()
                except asyncio.CancelledError:
                    raise
                except StateWentBack as exc:
                    log.critical(
                        "%s: Redis holds less than it had acknowledged (%s); exiting (status "
                        "%d) without acknowledging the batch, so that the process started "
                        "again resumes each partition after its watermark in Redis",
                        what,
                        exc,
                        EXIT_STATE_WENT_BACK,
                    )
                    self.exit(EXIT_STATE_WENT_BACK)
                    raise  # only when a test's exit returns
                except Exception as exc:
                    kind = transient_error(exc)
                    if kind is None:
                        self.exit_unacknowledged(
                            f"{what} failed with an error retrying cannot fix", exc
                        )
                        raise  # only when a test's exit returns
                    REDIS_RETRIES.labels(kind).inc()
                    if attempt == 0:
                        self._block()
                    attempt += 1
                    delay = random.uniform(0, min(self.cap_s, self.first_s * 2**attempt))
                    now = time.monotonic()
                    if now - logged_at >= self.log_every_s:
                        logged_at = now
                        log.warning(
                            "Redis refused %s (%s), holding the batch and retrying "
                            "(attempt %d, %.0fs so far): %s: %s",
                            what,
                            kind,
                            attempt,
                            now - since,
                            type(exc).__name__,
                            exc,
                        )
                    await self.sleep(delay)
                else:
                    if attempt:
                        log.warning(
                            "Redis accepted %s after %d retries (%.1fs)",
                            what,
                            attempt,
                            time.monotonic() - since,
                        )
                    return result
        except asyncio.CancelledError:
            if attempt:
                log.critical(
                    "stopped while %s waited for Redis (%d retries); exiting (status %d) "
                    "without acknowledging the batch, Kafka redelivers it",
                    what,
                    attempt,
                    EXIT_UNAPPLIED,
                )
                self.exit(EXIT_UNAPPLIED)
            raise
        finally:
            del self._running[token]
            if attempt:
                self._unblock()

    def running_s(self) -> float:
        """How long the oldest step running now has run, retries included (0 if none)."""
        if not self._running:
            return 0.0
        return time.monotonic() - min(self._running.values())

    def _block(self) -> None:
        self.blocked += 1
        BLOCKED.set(1)

    def _unblock(self) -> None:
        self.blocked -= 1
        if not self.blocked:
            BLOCKED.set(0)


async def _ends_and_fetched(thread: Any, partitions: list[Any]) -> tuple[Any, dict[Any, int]]:
    """On the consumer's thread (`thread`, Faust's for aiokafka): each partition's end offset,
    asked of the broker, and the consumer's position where it has one: past every record
    Faust took from it and every control record it stepped over. Read from aiokafka's
    subscription state on the thread that writes it; `position()` would wait for a
    partition without one."""
    consumer = thread._ensure_consumer()
    ends = await consumer.end_offsets(partitions)
    subscription = consumer._subscription.subscription
    states = subscription.assignment if subscription is not None else None
    fetched = {}
    for tp in partitions:
        state = states.state_value(tp) if states is not None else None
        if state is not None and state.has_valid_position:
            fetched[tp] = state.position
    return ends, fetched


def _by_key(offsets: dict[Any, int]) -> dict[tuple[str, int], int]:
    """Offsets by (topic, partition), the key the worker's own maps use."""
    return {(tp.topic, tp.partition): offset for tp, offset in offsets.items()}


def _by_label(counts: dict[str, int], label: Callable[[str], str]) -> dict[str, int]:
    """Counts per variant summed per metric label (unknown variants share "other")."""
    out: collections.Counter[str] = collections.Counter()
    for variant, n in counts.items():
        out[label(variant)] += n
    return dict(out)


def _batch_context(batch: list[Any]) -> str:
    """Where a batch came from, for logs: each partition's first and last offset."""
    spans: dict[str, list[int]] = {}
    for record in batch:
        label, offset = _origin(record.message)
        span = spans.setdefault(label, [offset, offset])
        span[0], span[1] = min(span[0], offset), max(span[1], offset)
    return ", ".join(f"{label}@{lo}-{hi}" for label, (lo, hi) in sorted(spans.items()))


async def state_built_from_log(redis: Any, keys: Keys) -> bool:
    """Whether the state began from the earliest offsets Kafka held: it says so, or it holds
    no event at all (no event clock: a new Redis, a flush, one that came back empty), and then
    it is marked so. The mark outlives the first batch, so a worker that looks after another
    has begun the rebuild starts its own partitions at the earliest offsets too."""
    pipe = redis.pipeline(transaction=True)
    pipe.exists(keys.built_from_log)
    pipe.exists(keys.event_clock)
    marked, clocked = await pipe.execute()
    if marked:
        return True
    if clocked:
        return False
    await redis.set(keys.built_from_log, repr(time.time()), nx=True)
    return True


def _offsets_text(offsets: dict[Any, int]) -> str:
    return ", ".join(f"{tp.topic}/{tp.partition}@{o}" for tp, o in sorted(offsets.items()))


def _origin(message: Any) -> tuple[str, int]:
    """(partition label, offset): what the batch updater's watermarks are kept by."""
    return f"{message.topic}/{message.partition}", message.offset


def _seconds(timestamp: float | None) -> float:
    if not timestamp:
        return 0.0
    return timestamp / 1000.0 if timestamp > 1e11 else float(timestamp)


def run_worker(settings: Settings, kafka_bootstrap: str, redis_url: str, loglevel: str) -> None:
    """Run a worker in this process until interrupted (SIGINT/SIGTERM)."""
    app = create_app(settings, kafka_bootstrap, redis_url)
    limit_kafka_client_logs(LOG_EVERY_S)  # a broker outage is waited out, not logged per try
    faust_worker(app, loglevel).execute_from_commandline()


def faust_worker(app: faust.App, loglevel: str) -> Any:
    """Faust's `Worker` for ``app``, logging at ``loglevel``, without its terminal spinner.

    At WARNING and above Faust's spinner sets the root logger to DEBUG and hangs a handler of
    its own on it for the process's life, so every debug call of every library (aiokafka's,
    several per fetch) builds a record that the handlers then drop. A service has no terminal
    to spin on: without the spinner the root logger stays at ``loglevel``.
    """
    from faust.worker import Worker

    worker = Worker(app, loglevel=loglevel)
    worker.spinner = None
    return worker


def _memory_share(info: dict[str, Any]) -> tuple[float, float]:
    """A node's used memory against its limit (0 without one), then its bytes."""
    used, limit = float(info.get("used_memory", 0)), float(info.get("maxmemory", 0))
    return (used / limit if limit else 0.0, used)
