"""The workers' write path on a real Redis Cluster (three nodes, `cluster_settings`).

What holds on Cluster: every write is a command or script of one slot (`freshrec.store.keys`),
so the same batches build the same state as on a single Redis, key for key, spread over the
nodes. What changes: batches are at least once (`Settings.exactly_once` is off), since a batch's
writes and its offset watermarks no longer land in one script.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from redis.cluster import RedisCluster

from freshrec.connections import redis_client
from freshrec.evaluation.synth import SynthConfig, generate
from freshrec.models.decay import REBASE_EXPONENT
from freshrec.serving.funnel import Funnel
from freshrec.settings import Settings
from freshrec.store.batch_update import BatchUpdater
from freshrec.store.keys import Keys
from freshrec.streams.events import Event
from freshrec.streams.producer import EventProducer
from tests.support import freshrec_process, stop_process, wait_until

pytestmark = pytest.mark.integration


def _events(raw: list[dict]) -> list[Event]:
    return [Event(e["type"], e["user_id"], e["item_id"], e["ts"], e.get("value")) for e in raw]


async def _learn(settings: Settings, events: list[Event], atomic: bool, cfg: Any) -> list[float]:
    """The events through the workers' `BatchUpdater` in 250-event batches. Steps of a fixed
    size (no time target), so both topologies split the batches alike."""
    client = redis_client(settings, socket_timeout=30)
    try:
        updater = BatchUpdater(
            client, Keys(settings.key_prefix), cfg, atomic=atomic, write_target_s=math.inf
        )
        errors: list[float] = []
        for start in range(0, len(events), 250):
            errors += (await updater.apply(events[start : start + 250])).rating_errors
        return errors
    finally:
        await client.aclose()


def _read(client: Any, key: bytes) -> Any:
    kind = client.type(key).decode()
    if kind == "string":
        return client.get(key)
    if kind == "zset":
        return {m.decode(): s for m, s in client.zrange(key, 0, -1, withscores=True)}
    if kind == "hash":
        return client.hgetall(key)
    if kind == "list":
        return client.lrange(key, 0, -1)
    raise AssertionError(f"unexpected type {kind} of {key!r}")


def _state(clients: list[redis.Redis], prefix: str) -> dict[str, Any]:
    """Every key under ``prefix`` with its value, named without the prefix."""
    out = {}
    for client in clients:
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            out[key.decode().replace(prefix, "<p>")] = _read(client, key)
    return out


def _same(a: Any, b: Any) -> bool:
    """Equal, floats within rounding (server-side sums of the same terms)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, bytes) and isinstance(b, bytes) and a != b:
        try:  # a running sum (HINCRBYFLOAT) printed to 17 digits
            a, b = float(a), float(b)
        except ValueError:
            return False
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


# Scored or written with the wall or server clock, not the events: their values differ by run.
CLOCKED = (":stats:worker", ":updated", ":relisted", ":active", ":dirty")


def test_the_write_path_builds_the_same_state_on_a_cluster_as_on_a_single_redis(
    settings: Settings, cluster_settings: Settings
) -> None:
    stream = generate(SynthConfig(users=80, items=120, events=4_000, duration_s=4 * 86400, seed=3))
    events = _events(stream.events)
    assert {e.type for e in events} >= {"rating", "click", "view"}
    span = events[-1].ts - events[0].ts
    # A half-life that makes the forward decay rebase twice: a scan of every node's lists.
    cfg = dataclasses.replace(
        settings.model_config(), decay_half_life_s=span * math.log(2) / (2.5 * REBASE_EXPONENT)
    )
    assert not cluster_settings.exactly_once

    single_errors = asyncio.run(_learn(settings, events, True, cfg))
    cluster_errors = asyncio.run(_learn(cluster_settings, events, False, cfg))

    np.testing.assert_allclose(cluster_errors, single_errors, rtol=1e-9, atol=1e-12)
    prefix = settings.key_prefix
    single = redis.Redis.from_url(settings.redis_url)
    cluster = RedisCluster.from_url(cluster_settings.redis_url)
    try:
        nodes = [redis.Redis(host=n.host, port=n.port) for n in cluster.get_primaries()]
        on_single, on_cluster = _state([single], prefix), _state(nodes, prefix)
        per_node = [sum(1 for _ in n.scan_iter(match=f"{prefix}:*", count=1000)) for n in nodes]
        landmark = float(cluster.get(Keys(prefix).decay_landmark))
    finally:
        single.close()
        cluster.close()
    assert landmark > events[0].ts  # rebased on the cluster too
    assert sorted(on_cluster) == sorted(on_single)
    assert len(on_single) > 300
    assert all(count > len(on_single) / 10 for count in per_node), per_node  # spread out
    differ = [
        key
        for key, value in on_single.items()
        if not key.endswith(CLOCKED) and not _same(value, on_cluster[key])
    ]
    assert not differ, differ[:10]
    clocked_sets = [k for k in on_single if k.endswith(CLOCKED[1:])]
    assert all(on_single[k].keys() == on_cluster[k].keys() for k in clocked_sets)


def test_a_worker_process_learns_a_stream_into_the_cluster(
    cluster_settings: Settings, tmp_path: Path
) -> None:
    """`freshrec worker` with FRESHREC_REDIS_CLUSTER=1: each user's events reach the node of
    their slot, offsets are watermarked, and the worker reports them learned."""
    settings = cluster_settings
    stream = generate(SynthConfig(users=40, items=60, events=600, seed=8))
    with EventProducer(settings.kafka_bootstrap, settings.events_topic) as producer:
        producer.send_many(stream.events)
    keys = Keys(settings.key_prefix)
    users = sorted({e["user_id"] for e in stream.events if e["type"] != "impression"})
    proc = freshrec_process(["worker", "--loglevel", "warning"], settings, tmp_path / "w.log")
    cluster = RedisCluster.from_url(settings.redis_url)
    try:

        def learned() -> bool:
            assert proc.poll() is None, (tmp_path / "w.log").read_text()[-3000:]
            return int(cluster.hget(keys.worker_stats, "events") or 0) == len(stream.events)

        wait_until(learned, 120, "the worker to learn every event on the cluster")
        assert all(cluster.exists(keys.history(user)) for user in users)
        slots = {cluster.keyslot(keys.history(user)) for user in users}
        nodes = {cluster.get_node_from_key(keys.history(user)).name for user in users}
        marks = [cluster.get(keys.watermark(f"{settings.events_topic}/{p}")) for p in (0, 1)]
    finally:
        cluster.close()
        stop_process(proc)
    assert len(slots) == len(users) and len(nodes) == 3
    assert all(mark is not None for mark in marks)


async def _answers(settings: Settings, users: list[str], items: list[str]) -> dict[str, Any]:
    """What a reader's funnel answers on ``settings``'s Redis: lists, similar items and
    rating predictions."""
    client = redis_client(settings, socket_timeout=30)
    funnel = Funnel(client, Keys(settings.key_prefix), settings.funnel_config())
    try:
        await funnel.refresh()
        lists = [await funnel.recommend(user, 10, learn=False) for user in users]
        similar = [await funnel.similar(item, 10) for item in items[:5]]
        pairs = [(user, item) for user in users for item in items[:3]]
        predictions = await funnel.predict_many(pairs)
        return {
            "lists": [[c.to_json() for c in served] for served in lists],
            "similar": similar,
            "predictions": [p["prediction"] for p in predictions],
        }
    finally:
        await funnel.aclose()
        await client.aclose()


def test_a_reader_serves_the_same_answers_from_a_cluster_as_from_a_single_redis(
    settings: Settings, cluster_settings: Settings
) -> None:
    """The reader's cluster reads (item rows, neighbour lists per item, each user's rating
    state from three slots) give what its single-server scripts give."""
    stream = generate(SynthConfig(users=50, items=80, events=3_000, rating_share=0.5, seed=4))
    events = _events(stream.events)
    cfg = settings.model_config()
    asyncio.run(_learn(settings, events, True, cfg))
    asyncio.run(_learn(cluster_settings, events, False, cfg))
    users = sorted({e.user_id for e in events})[:12]
    items = sorted({e.item_id for e in events})[:10]

    on_single = asyncio.run(_answers(settings, users, items))
    on_cluster = asyncio.run(_answers(cluster_settings, users, items))

    assert all(len(served) == 10 for served in on_single["lists"])
    assert on_cluster["lists"] == on_single["lists"]
    assert on_cluster["similar"] == on_single["similar"]
    assert any(p != on_single["predictions"][0] for p in on_single["predictions"])
    np.testing.assert_allclose(on_cluster["predictions"], on_single["predictions"], rtol=1e-12)


def test_a_redelivered_batch_is_skipped_by_its_watermarks_on_a_cluster(
    cluster_settings: Settings,
) -> None:
    """What stays exactly once on Cluster: a batch delivered again after its watermarks were
    written (a rebalance, a restart) is skipped whole. What does not: a batch cut short before
    its watermarks is applied again in full, its earlier writes twice (at least once)."""
    settings = cluster_settings
    keys = Keys(settings.key_prefix)
    events = [Event("click", f"u{n % 7}", f"i{n % 11}", 1_700_000_000.0 + n) for n in range(60)]
    origins = [(f"events/{n % 2}", n // 2) for n in range(60)]

    async def run() -> tuple[Any, Any, float, float]:
        client = redis_client(settings)
        try:
            updater = BatchUpdater(client, keys, settings.model_config(), atomic=False)
            first = await updater.apply(events, origins)
            before = await client.zscore(keys.occurrences, "i0")
            again = await updater.apply(events, origins)
            return first, again, before, await client.zscore(keys.occurrences, "i0")
        finally:
            await client.aclose()

    first, again, before, after = asyncio.run(run())
    assert (first.events, first.skipped) == (60, 0)
    assert (again.events, again.skipped) == (0, 60)
    assert before == after > 0
