"""Restarts: Redis, and separately the Kafka broker, crashed and started again mid-stream.

The worker must resume by itself (the same process, no supervisor) within `RESUME_S` of the
service answering again, and every event must be applied exactly once: the state is checked
against counts taken from the stream itself (events applied, clicks per item, ratings per user
and per item, the rating mean, histories, first-seen times, and the forward-decayed
occurrence and popularity sums recomputed from the events), so a lost event or one learned
twice shows.

Each test crashes a service of its own, started as `freshrec services up` starts the local
ones (`freshrec.devenv.local_services`: redis-server with its append-only file, an Apache
Kafka broker in KRaft mode from the jars) and started again on the same ports and data, so
every client keeps its address. The crash is a SIGKILL while the worker is working through a
backlog, and more events are produced while the service is down:

- Redis: the worker holds the batch Redis refused and retries it (``freshrec_worker_blocked``
  shows it waiting); the events produced meanwhile reach Kafka as usual. A batch whose write
  landed just before the crash but whose reply was lost is retried and skipped by its offset
  watermarks, which the append-only file keeps with the state they belong to.
- Kafka: the producer buffers what is produced during the outage and delivers it once the
  broker is back; the worker's consumer finds the broker and its group again and goes on from
  its last committed offsets, the redelivered part skipped by the watermarks. A reader runs
  through the crash too: its publisher must get lists onto the topic again, and the worker's
  log must hold the Kafka client's errors at a bounded rate, not one per attempt.

"Resumed" is measured from the moment the restarted service answers: for Redis, to the next
event applied; for Kafka, to the first event produced during the outage being applied (events
the worker fetched before the crash can still be applied meanwhile, so they prove nothing),
and to the first list made after that moment reaching the recommendations topic.

A broker killed this way takes longer to come back than one stopped cleanly (10-20 s here):
its controller refuses the new registration until the old one's session has expired.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import redis
from confluent_kafka import Consumer, TopicPartition

from freshrec.connections import kafka_config
from freshrec.evaluation.synth import SynthConfig, generate
from freshrec.models.mf import rating_count_at
from freshrec.settings import Settings
from freshrec.store.keys import Keys
from freshrec.store.vectors import decode_vector
from freshrec.streams.producer import EventProducer
from freshrec.streams.topics import delete_topics, ensure_topics, topic_specs
from freshrec.streams.worker import LAG_UNKNOWN_AFTER_S, LOG_EVERY_S, OBSERVE_EVERY_S
from tests.metrics_support import scrape, total
from tests.support import (
    OwnService,
    TopicReader,
    applied_events,
    free_port,
    freshrec_process,
    http_json,
    partition_watermarks,
    running_reader,
    stop_process,
    wait_until,
)

pytestmark = pytest.mark.integration

T = TypeVar("T")

EVENTS = 20_000
UPFRONT = 0.5
"""Share of the stream in Kafka before the worker starts: the backlog it works through."""
CRASH_AT = 0.2
"""Share applied when the service is crashed (the worker is then mid-backlog)."""
BY_RESTART = 0.75
"""The stream is produced up to this share while the service is down, the rest after."""
RESUME_S = 30.0
"""Longest time from the restarted service answering to the worker applying again."""
REFUSALS = 6
"""Retries the worker makes before Redis comes back: its backoff is then up to 3.2 s between
two attempts (the outage lasts a few seconds, and the resume waits out a long pause)."""
MILESTONE_S = 90.0
"""Longest wait for any other step (worker start, the end of the stream)."""
EVENTS_PER_MESSAGE = 10


@pytest.fixture(scope="module")
def stream() -> list[dict]:
    return generate(SynthConfig(users=2_000, items=1_000, events=EVENTS, seed=29)).events


def _pipeline_settings(settings: Settings, **changes: object) -> Settings:
    # Batches of at most 2,000 events (200 messages), so the crash lands within the stream.
    return dataclasses.replace(settings, batch_size=200, worker_metrics_port=free_port(), **changes)


@pytest.fixture
def own_redis_settings(settings: Settings, tmp_path: Path) -> Iterator[tuple[Settings, OwnService]]:
    """The session's Kafka (topics of the test's own) and a persistent Redis of the test's own."""
    persistent = dataclasses.replace(settings, redis_persist=True)
    server = OwnService("redis", persistent, tmp_path / "redis")
    server.start()
    with redis.Redis.from_url(server.address) as client:
        # Every write acknowledged is in the file before the crash. With `everysec`, a slow
        # fsync lets Redis hold back its file writes for up to 2 s while it still answers, and
        # a SIGKILL then takes acknowledged writes with it: the worker would stop on the older
        # state (exit 76, `test_resume_from_watermarks`), which needs a supervisor to restart it.
        client.config_set("appendfsync", "always")
    try:
        yield _pipeline_settings(persistent, redis_url=server.address), server
    finally:
        server.stop(hard=True)
        shutil.rmtree(server.workdir, ignore_errors=True)  # its keys, with the append-only file


@pytest.fixture
def own_kafka_settings(tmp_path: Path) -> Iterator[tuple[Settings, OwnService]]:
    """A Kafka broker and a Redis of the test's own (no session service is touched)."""
    tag = uuid.uuid4().hex[:10]
    base = dataclasses.replace(
        Settings.from_env(),
        topic_prefix=f"test-{tag}",
        key_prefix=f"test-{tag}",
        partitions=2,
        batch_within_s=0.02,
        publish_interval_s=0.1,
        redis_persist=False,
    )
    broker = OwnService("kafka", base, tmp_path / "kafka")
    server = OwnService("redis", base, tmp_path / "redis")
    try:
        broker.start()
        server.start()
        configured = _pipeline_settings(
            base, kafka_bootstrap=broker.address, redis_url=server.address
        )
        ensure_topics(configured.kafka_bootstrap, configured)
        yield configured, broker
        if broker.record is not None:
            delete_topics(configured.kafka_bootstrap, list(topic_specs(configured)))
    finally:
        broker.stop()
        server.stop(hard=True)
        for service in (broker, server):
            shutil.rmtree(service.workdir, ignore_errors=True)


class Worker:
    """One worker process, never restarted, and the state it writes."""

    def __init__(self, settings: Settings, log: Path) -> None:
        self.settings, self.log = settings, log
        self.keys = Keys(settings.key_prefix)
        self.client = redis.Redis.from_url(
            settings.redis_url, socket_timeout=2, socket_connect_timeout=2
        )
        self.metrics = f"http://127.0.0.1:{settings.worker_metrics_port}/metrics"
        self.proc: subprocess.Popen = freshrec_process(
            ["worker", "--loglevel", "warning"], settings, log
        )

    def applied(self) -> int:
        return applied_events(self.client, self.settings)

    def watermarks(self) -> dict[int, int]:
        return partition_watermarks(self.client, self.settings)

    def blocked(self, retries: int = 1) -> bool:
        """Whether the worker reports a batch held for Redis, after at least ``retries``."""
        samples = scrape(self.metrics)
        return (
            samples.get(("freshrec_worker_blocked", ()), 0.0) == 1.0
            and total(samples, "freshrec_worker_redis_retries_total") >= retries
        )

    def wait(self, condition: Callable[[], T], timeout_s: float, what: str) -> T:
        """``condition`` within ``timeout_s``; fails at once, with the log, if the worker exits
        (a Redis or Kafka error it gave up on)."""

        def reached() -> T:
            assert self.proc.poll() is None, (
                f"the worker exited by itself (status {self.proc.returncode}): "
                + self.log.read_text(errors="replace")[-3000:]
            )
            return condition()

        return wait_until(reached, timeout_s, what, poll_s=0.02)

    def finish(self) -> None:
        """Every partition applied up to its last offset."""
        last = _last_offsets(self.settings)
        self.wait(lambda: self.watermarks() == last, MILESTONE_S, f"offsets {last} applied")

    def stop(self) -> None:
        stop_process(self.proc)
        self.client.close()


def _lag_series(worker: Worker) -> list[tuple]:
    """The worker's consumer-lag series on its /metrics page."""
    return [s for s in scrape(worker.metrics) if s[0] == "freshrec_consumer_lag_messages"]


def _last_offsets(settings: Settings) -> dict[int, int]:
    """Each partition's last offset in the events topic."""
    consumer = Consumer(kafka_config(settings, log_level=3, **{"group.id": "restart-probe"}))
    try:
        tps = [TopicPartition(settings.events_topic, p) for p in range(settings.partitions)]
        return {tp.partition: consumer.get_watermark_offsets(tp, timeout=10)[1] - 1 for tp in tps}
    finally:
        consumer.close()


def _producer(settings: Settings, **config: object) -> EventProducer:
    """Arrays of up to `EVENTS_PER_MESSAGE` events of one partition, as a replay sends them."""
    topic = settings.events_topic
    return EventProducer(settings.kafka_bootstrap, topic, EVENTS_PER_MESSAGE, config)


def _produce(settings: Settings, events: list[dict]) -> None:
    with _producer(settings) as producer:
        producer.send_many(events)


def _zset(client: redis.Redis, key: str) -> dict[str, float]:
    return {m.decode(): s for m, s in client.zrange(key, 0, -1, withscores=True)}


def _assert_each_event_applied_once(
    client: redis.Redis, settings: Settings, stream: list[dict]
) -> None:
    """The state holds every event of ``stream`` once: no loss, no double application."""
    keys = Keys(settings.key_prefix)
    assert int(client.hget(keys.worker_stats, "events")) == len(stream)

    clicks = collections.Counter(e["item_id"] for e in stream if e["type"] == "click")
    assert _zset(client, keys.clicks) == {item: float(n) for item, n in clicks.items()}

    ratings = [e for e in stream if e["type"] == "rating"]
    factors = settings.mf_factors
    for kind in ("user", "item"):
        expected = collections.Counter(e[f"{kind}_id"] for e in ratings)
        ids = sorted(expected)
        vectors = client.mget([getattr(keys, f"{kind}_vector")(x) for x in ids])
        count = rating_count_at(factors)
        counts = {x: float(decode_vector(v)[count]) for x, v in zip(ids, vectors, strict=True)}
        assert counts == {x: float(n) for x, n in expected.items()}, f"{kind} rating counts"
    total_rating, n = client.hmget(keys.rating_mean, "sum", "n")
    assert int(n) == len(ratings)
    assert math.isclose(float(total_rating), math.fsum(e["value"] for e in ratings), rel_tol=1e-9)

    # Each user's items at their latest event time, each item's first event time.
    histories: dict[str, dict[str, float]] = collections.defaultdict(dict)
    first_seen: dict[str, float] = {}
    for e in stream:
        seen = histories[e["user_id"]]
        seen[e["item_id"]] = max(e["ts"], seen.get(e["item_id"], -math.inf))
        first_seen[e["item_id"]] = min(e["ts"], first_seen.get(e["item_id"], math.inf))
    assert max(map(len, histories.values())) < settings.history_cap  # none trimmed
    for user, items in histories.items():
        assert _zset(client, keys.history(user)) == items, user
    assert _zset(client, keys.item_first_seen) == first_seen

    # Forward-decayed sums, taken at the state's clock, against the events' own weights.
    rate, strengths = settings.decay_rate, settings.event_strengths
    clock = float(client.get(keys.event_clock))
    assert clock == max(e["ts"] for e in stream)
    to_clock = math.exp(-rate * (clock - float(client.get(keys.decay_landmark))))
    occurrences: dict[str, list[float]] = collections.defaultdict(list)
    popularity: dict[str, list[float]] = collections.defaultdict(list)
    # An item counts toward its occurrences when it is not among the user's
    # cooccurrence_history most recent distinct items (it pairs then too).
    cap = settings.model_config().cooccurrence_history
    last_seen: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for n, e in enumerate(stream):
        weight = math.exp(-rate * (clock - e["ts"]))
        seen = last_seen[e["user_id"]]
        if e["item_id"] not in sorted(seen, key=seen.__getitem__, reverse=True)[:cap]:
            occurrences[e["item_id"]].append(weight)
        seen[e["item_id"]] = n
        popularity[e["item_id"]].append(strengths[e["type"]] * weight)
    for key, expected in ((keys.occurrences, occurrences), (keys.popularity, popularity)):
        stored = _zset(client, key)
        assert set(stored) == set(expected), key
        for item, weights in expected.items():
            at_clock = stored[item] * to_clock
            assert math.isclose(at_clock, math.fsum(weights), rel_tol=1e-9), (key, item)


@pytest.mark.timeout(300)
def test_the_worker_resumes_by_itself_after_redis_crashes_and_restarts_mid_stream(
    own_redis_settings: tuple[Settings, OwnService], stream: list[dict], tmp_path: Path
) -> None:
    settings, server = own_redis_settings
    upfront, by_restart = int(UPFRONT * EVENTS), int(BY_RESTART * EVENTS)
    started = time.monotonic()
    _produce(settings, stream[:upfront])
    worker = Worker(settings, tmp_path / "worker.log")
    try:
        worker.wait(lambda: worker.applied() >= CRASH_AT * EVENTS, MILESTONE_S, "the backlog")
        server.stop(hard=True)
        crashed_at = time.monotonic()
        _produce(settings, stream[upfront:by_restart])  # Kafka is up: the worker gets these
        worker.wait(
            lambda: worker.blocked(REFUSALS), RESUME_S, "the worker to hold its batch for Redis"
        )

        back = server.start()
        kept = worker.applied()  # what the append-only file brought back
        assert CRASH_AT * EVENTS <= kept < upfront, "the crash did not land mid-stream"
        worker.wait(lambda: worker.applied() > kept, RESUME_S, "the worker to apply again")
        resumed_s = time.monotonic() - back
        _produce(settings, stream[by_restart:])
        worker.finish()
        assert not worker.blocked()
    finally:
        worker.stop()
    print(
        f"Redis down {back - crashed_at:.1f} s with {kept} of {EVENTS} events applied; "
        f"the worker applied again {resumed_s:.2f} s after it answered; "
        f"test {time.monotonic() - started:.0f} s"
    )
    assert resumed_s <= RESUME_S
    with redis.Redis.from_url(settings.redis_url) as client:
        _assert_each_event_applied_once(client, settings, stream)


@pytest.mark.timeout(300)
def test_the_worker_resumes_by_itself_after_the_kafka_broker_crashes_and_restarts_mid_stream(
    own_kafka_settings: tuple[Settings, OwnService], stream: list[dict], tmp_path: Path
) -> None:
    settings, broker = own_kafka_settings
    upfront, by_restart = int(UPFRONT * EVENTS), int(BY_RESTART * EVENTS)
    started = time.monotonic()
    _produce(settings, stream[:upfront])
    before = _last_offsets(settings)
    with contextlib.ExitStack() as stack:
        # A reader too: its publisher sends the lists of the users learned to Kafka.
        base, reader = stack.enter_context(running_reader(settings, tmp_path / "reader.log"))
        worker = Worker(settings, tmp_path / "worker.log")
        stack.callback(worker.stop)
        # Made while the broker is up (it learns the partitions then); quiet about the
        # refused connections it retries while the broker is down.
        during = _producer(settings, log_level=2)
        worker.wait(lambda: worker.applied() >= CRASH_AT * EVENTS, MILESTONE_S, "the backlog")
        broker.stop(hard=True)
        crashed_at = time.monotonic()
        assert worker.applied() < upfront, "the crash did not land mid-stream"
        during.send_many(stream[upfront:by_restart])  # buffered until the broker is back

        back, back_wall = broker.start(), time.time()
        worker.wait(
            lambda: any(m > before[p] for p, m in worker.watermarks().items()),
            RESUME_S,
            "the worker to apply an event produced while the broker was down",
        )
        resumed_s = time.monotonic() - back
        lists = TopicReader(settings.kafka_bootstrap, settings.recommendations_topic)
        stack.callback(lists.close)
        worker.wait(
            lambda: any(json.loads(m.value())["generated_at"] > back_wall for m in lists.poll()),
            RESUME_S,
            "the reader to publish a list made after the broker came back",
        )
        published_s = time.monotonic() - back
        during.flush(RESUME_S)
        _produce(settings, stream[by_restart:])
        worker.finish()
        assert reader.poll() is None, "the reader exited"
        assert http_json(base + "/healthz")[0] == 200
    print(
        f"Kafka down {back - crashed_at:.1f} s; from the broker answering to the worker "
        f"applying an event produced meanwhile {resumed_s:.2f} s, to the reader publishing a "
        f"list {published_s:.2f} s; test {time.monotonic() - started:.0f} s"
    )
    assert resumed_s <= RESUME_S and published_s <= RESUME_S
    # The Kafka client's errors while the broker was down, at most one per kind and interval.
    errors = collections.Counter(
        line.split("[ERROR]", 1)[1].split(":")[0].strip()
        for line in (tmp_path / "worker.log").read_text(errors="replace").splitlines()
        if "[ERROR]" in line
    )
    allowed = (back - crashed_at + resumed_s) / LOG_EVERY_S + 2
    assert errors and max(errors.values()) <= allowed, errors
    with redis.Redis.from_url(settings.redis_url) as client:
        _assert_each_event_applied_once(client, settings, stream)


def test_the_lag_series_go_while_no_end_offsets_can_be_read(
    own_kafka_settings: tuple[Settings, OwnService], stream: list[dict], tmp_path: Path
) -> None:
    """A lag read before the broker went away must not stand for the present on a dashboard
    or in an alert: past `LAG_UNKNOWN_AFTER_S` without end offsets the series go, and the age
    of the last answer says why. They come back with the broker."""
    settings, broker = own_kafka_settings
    _produce(settings, stream[:200])
    worker = Worker(settings, tmp_path / "worker.log")
    age = ("freshrec_worker_end_offsets_age_seconds", ())
    try:
        worker.wait(lambda: _lag_series(worker), MILESTONE_S, "the worker to export its lag")
        assert scrape(worker.metrics)[age] < LAG_UNKNOWN_AFTER_S
        broker.stop(hard=True)
        worker.wait(
            lambda: not _lag_series(worker),
            LAG_UNKNOWN_AFTER_S + 3 * OBSERVE_EVERY_S,
            "the lag series to go while the broker is away",
        )
        assert scrape(worker.metrics)[age] >= LAG_UNKNOWN_AFTER_S
        broker.start()
        worker.wait(lambda: _lag_series(worker), RESUME_S, "the lag series to come back")
        assert scrape(worker.metrics)[age] < LAG_UNKNOWN_AFTER_S
    finally:
        worker.stop()
