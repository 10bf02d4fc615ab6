"""Nothing lost: workers killed with SIGKILL three times during a replay, restarted each time,
then joined by a second one (a rebalance), end with the state of a worker that never crashed.

The same 50,000 synthetic events (ratings, views, clicks, purchases) are replayed twice, each
run on topics and keys of its own. Run A: one worker, never interrupted. Run B: a worker killed
with ``SIGKILL`` when the events applied pass 20%, 45% and 70% of the stream, and started again
each time; a restarted worker resumes after the offset watermarks in Redis (its commits on
assignment), and whatever Kafka still redelivers (a partition moved in a rebalance mid-batch)
the watermarks skip. Before the last restart the group's offsets are taken back to the start,
as if its commits were lost: the worker must still resume after what Redis holds. At 80% a
second worker joins, and the group rebalances while the first one consumes; run B's last 5%
are produced once the second worker owns a partition, so both have work. Both runs end when
every partition's watermark is its last offset. Then, key by key:
every event was applied once; histories, first-seen times and click counts are identical;
co-occurrence, occurrence and popularity sums are equal to float tolerance (each taken at the
newest event time, as the runs' decay landmarks may differ); every user and item counted each
of its ratings once; and the MF factors' RMSE on the ratings is within 1% of run A's.

Two things differ between any two runs, crashed or not, and the comparison allows for them:
where batches end (so neighbour lists are not trimmed here: a trim at the end of a batch keeps
a tail that depends on where it ends) and how the two partitions interleave (MF steps on an
item rated by users of both partitions come in another order, and the implicit negatives are
drawn per batch), hence RMSE within 1% rather than equal factors.

A restarted worker waits for the group to give up on the one it replaces (the worker's Kafka
session timeout, `SESSION_TIMEOUT_S`) before it gets its partitions.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from confluent_kafka import Consumer, TopicPartition
from redis.asyncio import Redis

from freshrec.connections import kafka_config, redis_client, redis_sync_client
from freshrec.evaluation.synth import SynthConfig, generate
from freshrec.models.mf import predict_rating, rating_count_at, rating_part
from freshrec.settings import Settings
from freshrec.store.batch_update import BatchUpdater, StateWentBack
from freshrec.store.keys import Keys
from freshrec.store.vectors import decode_vector
from freshrec.streams.events import Event
from freshrec.streams.producer import EventProducer
from freshrec.streams.topics import delete_topics, ensure_topics, topic_specs
from tests.metrics_support import scrape, total
from tests.support import (
    applied_events,
    free_port,
    freshrec_process,
    partition_watermarks,
    stop_process,
    wait_until,
)

pytestmark = pytest.mark.integration

EVENTS = 50_000
KILL_AT = (0.20, 0.45, 0.70)
"""Shares of the stream applied when the worker of run B is killed."""
JOIN_AT = 0.80
"""Share applied when a second worker joins run B's last one."""
UPFRONT, BY_JOIN = 0.85, 0.95
"""Run B's stream goes to Kafka in three parts: to 85% before it starts, to 95% as the second
worker starts (the first consumes these while the group rebalances), the rest once the second
owns a partition (so that both have work)."""
MILESTONE_S = 180.0
"""Longest wait from a worker's start to its next milestone (a kill, or the end)."""
EVENTS_PER_MESSAGE = 10  # as `freshrec replay` packs them (100 there), in smaller arrays


@pytest.fixture(scope="module")
def stream() -> list[dict]:
    return generate(SynthConfig(users=3_000, items=1_500, events=EVENTS, seed=23)).events


@pytest.fixture
def crash_settings(settings: Settings) -> Iterator[Settings]:
    """Topics and keys of run B, beside the ``settings`` fixture's (removed with them)."""
    other = dataclasses.replace(
        settings,
        topic_prefix=f"{settings.topic_prefix}-crash",
        key_prefix=f"{settings.key_prefix}:crash",  # under the fixture's prefix: cleaned with it
    )
    ensure_topics(other.kafka_bootstrap, other)
    yield other
    delete_topics(other.kafka_bootstrap, list(topic_specs(other)))


def _replaying(settings: Settings) -> Settings:
    # More items than the cap: no neighbour list is trimmed, so none depends on batch ends.
    # Batches of at most 2,000 events (200 messages), so that a kill lands near its share.
    return dataclasses.replace(settings, neighbours_cap=100_000, batch_size=200)


class Offsets:
    """A consumer that never joins a group: a topic's end offsets and a group's commits."""

    def __init__(self, settings: Settings) -> None:
        self.topic, self.partitions = settings.events_topic, settings.partitions
        options = {
            "group.id": f"{settings.topic_prefix}-worker",  # the worker's (its Faust app id)
            "enable.auto.commit": False,
        }
        self.consumer = Consumer(kafka_config(settings, log_level=3, **options))

    def _tps(self) -> list[TopicPartition]:
        return [TopicPartition(self.topic, p) for p in range(self.partitions)]

    def last(self) -> dict[int, int]:
        """Each partition's last offset."""
        ends = (self.consumer.get_watermark_offsets(tp, timeout=10) for tp in self._tps())
        return {p: high - 1 for p, (_, high) in enumerate(ends)}

    def committed(self) -> dict[int, int]:
        """Each partition's next offset to consume, as the group committed it (-1: none)."""
        return {tp.partition: tp.offset for tp in self.consumer.committed(self._tps(), 10)}

    def rewind(self) -> bool:
        """Commit each partition's first offset for the group, as if its commits were lost.
        Kafka refuses (raises) while the group still counts a member: a killed worker until
        its session times out."""
        self.consumer.commit(
            offsets=[TopicPartition(self.topic, p, 0) for p in range(self.partitions)],
            asynchronous=False,
        )
        return True

    def close(self) -> None:
        self.consumer.close()


class Run:
    """One replay's worker processes (a new one after each kill) and its state in Redis."""

    def __init__(self, settings: Settings, client: redis.Redis, logs: Path, name: str) -> None:
        self.settings, self.client, self.logs, self.name = settings, client, logs, name
        self.keys = Keys(settings.key_prefix)
        self.live: list[tuple[subprocess.Popen, Path]] = []
        self.starts = 0

    def start(self, metrics_port: int = 0) -> str:
        """A new worker; returns the URL of its metrics (with a port)."""
        self.starts += 1
        log = self.logs / f"worker-{self.name}-{self.starts}.log"
        settings = dataclasses.replace(self.settings, worker_metrics_port=metrics_port)
        self.live.append(
            (freshrec_process(["worker", "--loglevel", "warning"], settings, log), log)
        )
        return f"http://127.0.0.1:{metrics_port}/metrics"

    def applied(self) -> int:
        return applied_events(self.client, self.settings)

    def watermarks(self) -> dict[int, int]:
        return partition_watermarks(self.client, self.settings)

    def wait(self, condition: Callable[[], bool], what: str) -> None:
        def reached() -> bool:
            for proc, log in self.live:
                assert proc.poll() is None, (
                    f"run {self.name}: a worker exited by itself (status {proc.returncode}): "
                    + log.read_text(errors="replace")[-3000:]
                )
            return condition()

        wait_until(reached, MILESTONE_S, f"run {self.name}: {what}", poll_s=0.02)

    def applied_past(self, share: float) -> None:
        self.wait(lambda: self.applied() >= share * EVENTS, f"{share:.0%} of the events applied")

    def kill(self) -> None:
        """SIGKILL the newest worker: no graceful stop, no last commit."""
        proc, _ = self.live.pop()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def finish(self, last: dict[int, int]) -> None:
        self.wait(lambda: self.watermarks() == last, f"every partition applied up to {last}")

    def stop(self) -> None:
        while self.live:
            stop_process(self.live.pop()[0])


def _owns_a_partition(metrics_url: str) -> bool:
    """Whether a worker reports lag for a partition of the events topic: one it owns."""
    try:
        samples = scrape(metrics_url)
    except OSError:  # not serving yet
        return False
    return any(
        name == "freshrec_consumer_lag_messages" and ("topic", "events") in labels
        for name, labels in samples
    )


def _learned(samples: dict) -> float:
    """Events a worker learned (the redelivered ones it skipped are not counted)."""
    return total(samples, "freshrec_events_total")


def _produce(settings: Settings, events: list[dict]) -> None:
    """The events as a replay sends them: arrays of up to `EVENTS_PER_MESSAGE` events of one
    partition, a user's events always on theirs."""
    topic = settings.events_topic
    with EventProducer(settings.kafka_bootstrap, topic, EVENTS_PER_MESSAGE) as producer:
        producer.send_many(events)


def _zset(client: redis.Redis, key: str) -> dict[str, float]:
    return {m.decode(): s for m, s in client.zrange(key, 0, -1, withscores=True)}


def _family(client: redis.Redis, prefix: str, family: str) -> set[str]:
    """The ids of a key family (``hist``, ``cf``) under ``prefix``."""
    head, tail = f"{prefix}:{family}:{{", "}"
    found = client.scan_iter(match=f"{head}*{tail}", count=1000)
    return {k.decode()[len(head) + 2 : -len(tail)] for k in found}  # past "u:" or "i:"


def _to_clock(client: redis.Redis, keys: Keys, rate: float) -> float:
    """The factor that takes stored forward-decayed sums to their value at the state's clock."""
    landmark = float(client.get(keys.decay_landmark))
    return math.exp(-rate * (float(client.get(keys.event_clock)) - landmark))


def _rmse(client: redis.Redis, keys: Keys, ratings: list[dict], factors: int) -> float:
    total, n = client.hmget(keys.rating_mean, "sum", "n")
    mean = float(total) / int(n)
    users = client.mget([keys.user_vector(e["user_id"]) for e in ratings])
    items = client.mget([keys.item_vector(e["item_id"]) for e in ratings])
    errors = [
        e["value"]
        - predict_rating(
            rating_part(decode_vector(u), factors), rating_part(decode_vector(i), factors), mean
        )
        for e, u, i in zip(ratings, users, items, strict=True)
    ]
    return float(np.sqrt(np.mean(np.square(errors))))


def _rating_counts(client: redis.Redis, keys: list[str], factors: int) -> list[float]:
    return [float(decode_vector(b)[rating_count_at(factors)]) for b in client.mget(keys)]


@pytest.mark.timeout(600)
def test_workers_killed_and_rebalanced_mid_replay_end_with_the_state_of_an_uninterrupted_one(
    settings: Settings,
    crash_settings: Settings,
    redis_client: redis.Redis,
    stream: list[dict],
    tmp_path: Path,
) -> None:
    steady = Run(_replaying(settings), redis_client, tmp_path, "steady")
    crashed = Run(_replaying(crash_settings), redis_client, tmp_path, "crashed")
    upfront, by_join = int(UPFRONT * EVENTS), int(BY_JOIN * EVENTS)
    _produce(steady.settings, stream)
    _produce(crashed.settings, stream[:upfront])
    offsets = Offsets(crashed.settings)
    redelivered = []  # per kill: messages applied but not committed, that Kafka sends again
    try:
        with contextlib.closing(Offsets(steady.settings)) as ends:
            last = ends.last()
        steady.start()
        steady.finish(last)
        steady.stop()

        crashed.start()
        for share in KILL_AT:
            crashed.applied_past(share)
            crashed.kill()
            marks, committed = crashed.watermarks(), offsets.committed()
            # Kafka never has a commit past what Redis applied; what lies between comes again.
            assert all(committed[p] <= marks.get(p, -1) + 1 for p in committed), (committed, marks)
            redelivered.append(sum(m + 1 - max(committed[p], 0) for p, m in marks.items()))
            if share == KILL_AT[-1]:  # the last restart redelivers every partition from its start
                wait_until(offsets.rewind, MILESTONE_S, "Kafka to take the group's offsets back")
            crashed.start()
        crashed.applied_past(JOIN_AT)
        second = crashed.start(free_port())  # the group rebalances: each worker one partition
        _produce(crashed.settings, stream[upfront:by_join])
        crashed.wait(lambda: _owns_a_partition(second), "the second worker to own a partition")
        _produce(crashed.settings, stream[by_join:])
        crashed.finish(offsets.last())
        learned_by_second = _learned(scrape(second))
        crashed.stop()
    finally:
        steady.stop()
        crashed.stop()
        offsets.close()
    assert sum(redelivered) > 0, "no restart had anything redelivered to skip"
    assert learned_by_second > 0, "the second worker learned nothing"

    a, b, client = steady.keys, crashed.keys, redis_client
    # Every event applied exactly once in both runs.
    assert steady.applied() == crashed.applied() == EVENTS

    # Histories, first-seen times, clicks: the same, exactly.
    assert _family(client, a.prefix, "hist") == _family(client, b.prefix, "hist")
    for user in {e["user_id"] for e in stream}:
        assert _zset(client, a.history(user)) == _zset(client, b.history(user)), user
    assert _zset(client, a.item_first_seen) == _zset(client, b.item_first_seen)
    assert _zset(client, a.clicks) == _zset(client, b.clicks)

    # Forward-decayed sums, each taken at the newest event time.
    assert float(client.get(a.event_clock)) == float(client.get(b.event_clock))
    scale_a = _to_clock(client, a, steady.settings.decay_rate)
    scale_b = _to_clock(client, b, crashed.settings.decay_rate)

    def assert_same_sums(key_a: str, key_b: str) -> int:
        sums_a, sums_b = _zset(client, key_a), _zset(client, key_b)
        assert set(sums_a) == set(sums_b), key_a
        for member, value in sums_a.items():
            at_a, at_b = value * scale_a, sums_b[member] * scale_b
            assert math.isclose(at_a, at_b, rel_tol=1e-9), (key_a, member, at_a, at_b)
        return len(sums_a)

    assert_same_sums(a.occurrences, b.occurrences)
    assert_same_sums(a.popularity, b.popularity)
    assert _family(client, a.prefix, "cf") == _family(client, b.prefix, "cf")
    items = {e["item_id"] for e in stream}
    assert sum(assert_same_sums(a.neighbours(i), b.neighbours(i)) for i in items) > 100_000

    # MF: each rating counted once by its user and its item, the same mean, RMSE within 1%.
    factors = steady.settings.mf_factors
    ratings = [e for e in stream if e["type"] == "rating"]
    for kind in ("user", "item"):
        ids = sorted({e[f"{kind}_id"] for e in ratings})
        vector_a, vector_b = getattr(a, f"{kind}_vector"), getattr(b, f"{kind}_vector")
        counts = _rating_counts(client, [vector_a(x) for x in ids], factors)
        assert counts == _rating_counts(client, [vector_b(x) for x in ids], factors), kind
        assert sum(counts) == len(ratings)
    (sum_a, n_a), (sum_b, n_b) = (client.hmget(k.rating_mean, "sum", "n") for k in (a, b))
    assert int(n_a) == int(n_b) == len(ratings)
    assert math.isclose(float(sum_a), float(sum_b), rel_tol=1e-9)
    rmse_a = _rmse(client, a, ratings, factors)
    rmse_b = _rmse(client, b, ratings, factors)
    assert abs(rmse_b - rmse_a) <= 0.01 * rmse_a, (rmse_a, rmse_b)


@pytest.mark.parametrize("atomic", [True, False], ids=["single-redis-scripts", "cluster-safe"])
def test_a_partition_redelivered_beside_new_events_keeps_its_watermark(
    settings: Settings, redis_client: redis.Redis, atomic: bool
) -> None:
    """After a restart every partition is redelivered from its committed offset, so one batch
    may hold only applied messages of one partition beside new ones of another: the first
    partition's watermark must stay where it was, or its next messages are learned twice."""
    events = [Event("click", f"u{n % 7}", f"i{n % 11}", 1_700_000_000.0 + n) for n in range(300)]
    first = [("events/0", n) for n in range(200)]
    second = [("events/1", n) for n in range(100)]

    async def run() -> list:
        client = Redis.from_url(settings.redis_url)
        updater = BatchUpdater(client, Keys(settings.key_prefix), settings.model_config(), atomic)
        try:
            return [
                await updater.apply(events[:200], first),
                await updater.apply(events[100:150] + events[200:], first[100:150] + second),
                await updater.apply(events[150:200], first[150:200]),  # the rest of the replay
            ]
        finally:
            await client.aclose()

    applied, mixed, rest = asyncio.run(run())
    assert (applied.events, mixed.events, mixed.skipped) == (200, 100, 50)
    assert (rest.events, rest.skipped) == (0, 50)
    keys = Keys(settings.key_prefix)
    assert int(redis_client.get(keys.watermark("events/0"))) == 199
    assert int(redis_client.get(keys.watermark("events/1"))) == 99
    assert int(redis_client.hget(keys.worker_stats, "events")) == 300


@pytest.mark.parametrize("atomic", [True, False], ids=["single-redis-scripts", "cluster-safe"])
def test_a_watermark_below_one_the_updater_saw_stops_it_before_it_writes(
    settings: Settings, redis_client: redis.Redis, atomic: bool
) -> None:
    """Redis restarted from an older snapshot holds a lower watermark than one this updater
    wrote, or read (another worker's, or one it resumed after): going on would leave the
    messages in between unapplied for good, so the next batch of that partition raises
    instead of writing. A higher watermark, or a partition never seen here, is no such sign."""
    keys = Keys(settings.key_prefix)
    events = [Event("click", f"u{n % 5}", f"i{n % 9}", 1_700_000_000.0 + n) for n in range(40)]

    async def run() -> list[StateWentBack]:
        client = Redis.from_url(settings.redis_url)
        updater = BatchUpdater(client, keys, settings.model_config(), atomic)
        went_back = []
        try:
            await updater.apply(events[:20], [("events/0", n) for n in range(20)])
            await client.set(keys.watermark("events/0"), 29)  # another worker went on
            await client.set(keys.watermark("events/1"), 3)  # not seen here yet
            await updater.apply(events[20:30], [("events/0", n) for n in range(25, 35)])
            assert updater.marks_seen == {"events/0": 34}
            await client.set(keys.watermark("events/0"), 24)  # back to an older state
            with pytest.raises(StateWentBack) as raised:
                await updater.apply(events[30:], [("events/1", 4 + n) for n in range(5)]
                                    + [("events/0", 35 + n) for n in range(5)])  # fmt: skip
            went_back.append(raised.value)
            # A watermark only read here (every message redelivered, nothing written) counts
            # as much as one written.
            await client.set(keys.watermark("events/2"), 9)
            await updater.apply(events[:5], [("events/2", n) for n in range(5)])
            assert updater.marks_seen["events/2"] == 9
            await client.set(keys.watermark("events/2"), 7)
            with pytest.raises(StateWentBack) as raised:
                await updater.apply(events[5:10], [("events/2", 10 + n) for n in range(5)])
            went_back.append(raised.value)
            return went_back
        finally:
            await client.aclose()

    written, read = asyncio.run(run())
    assert written.behind == {"events/0": (34, 24)}
    assert "events/0 24 < 34" in str(written)
    assert read.behind == {"events/2": (9, 7)}
    assert int(redis_client.hget(keys.worker_stats, "events")) == 25  # nothing written since
    assert int(redis_client.get(keys.watermark("events/1"))) == 3


@pytest.mark.parametrize("topology", ["single", "cluster"])
def test_on_the_cluster_safe_path_a_slower_worker_never_moves_a_watermark_back(
    settings: Settings, topology: str, request: pytest.FixtureRequest
) -> None:
    """Without one atomic script (Redis Cluster), two workers can overlap on a partition during
    a rebalance: the one that read first may write last. Its watermark must not undo the
    other's, or the messages between them would be learned again after the next restart."""
    if topology == "cluster":
        settings = request.getfixturevalue("cluster_settings")
    keys = Keys(settings.key_prefix)
    mark = keys.watermark("events/0")
    events = [Event("click", f"u{n % 5}", f"i{n % 9}", 1_700_000_000.0 + n) for n in range(20)]

    async def run() -> None:
        client = redis_client(settings)
        updater = BatchUpdater(client, keys, settings.model_config(), atomic=False)
        read = updater._read_pipelined

        async def read_then_overtaken(*args: object) -> object:
            snapshot = await read(*args)
            await client.set(mark, 500)  # the other worker applies up to offset 500 meanwhile
            return snapshot

        updater._read_pipelined = read_then_overtaken  # type: ignore[method-assign]
        try:
            await updater.apply(events, [("events/0", n) for n in range(20)])
        finally:
            await client.aclose()

    asyncio.run(run())
    store = redis_sync_client(settings)
    assert int(store.get(mark)) == 500
    store.close()
