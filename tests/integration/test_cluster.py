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


# Written with the wall or server clock, not the events: their values differ by run.
CLOCKED = (":stats:worker", ":updated", ":active")


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
