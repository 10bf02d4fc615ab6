"""Retention: idle items and users leave Redis and the reader's snapshot, and memory returns to
a bound once the idle period passes.

Two levels. The store: items written longer ago than the item TTL are retired with every trace
(vector, neighbour list, their entries in the per-item sets and in the lists of their
neighbours), items written since are kept, and the reader's index empties their rows, then
rebuilds itself once dead rows outnumber live ones. The whole system: 200,000 events over
50,000 users and 20,000 items replayed through Kafka, a worker and a reader, with both TTLs set
to `TTL_S`; once the stream stops and the idle period passes, Redis holds no key of any user or
item and its memory is back within `MEMORY_BOUND` of what it used before the replay, and the
reader's snapshot holds no item (`index_items` 0, its arrays rebuilt empty).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from redis.asyncio import Redis

from freshrec.serving import item_index
from freshrec.serving.item_index import ItemIndex
from freshrec.settings import Settings
from freshrec.store.batch_update import BatchUpdater
from freshrec.store.keys import Keys
from freshrec.store.retention import retire_idle_items
from freshrec.streams.events import Event
from freshrec.streams.producer import EventProducer
from tests.support import (
    OwnRedis,
    freshrec_process,
    http_json,
    running_reader,
    stop_process,
    wait_until,
)

pytestmark = pytest.mark.integration

TS = 1_700_000_000.0
EVENTS, USERS, ITEMS = 200_000, 50_000, 20_000
TTL_S = 15
"""Idle time after which users and items go, in the replay (the defaults are 90 days)."""
IDLE_S = 3
"""The item TTL of the store-level retirement test, seconds."""
MEMORY_BOUND = 2 * 2**20
"""Redis memory once idle, above its level before the replay: the fixed keys (watermarks,
ranker, counters) and the last retirements, not one entry per user or item."""
REPLAY_S = 600.0


def _server_time(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return seconds + micros / 1e6


@pytest.mark.parametrize("atomic", [True, False], ids=["script", "pipelined"])
def test_items_idle_for_the_ttl_are_retired_with_every_trace(
    settings: Settings, redis_client: redis.Redis, atomic: bool
) -> None:
    keys, cfg = Keys(settings.key_prefix), settings.model_config()

    def zset(key: str) -> set[str]:
        return {m.decode() for m in redis_client.zrange(key, 0, -1)}

    async def apply(redis_async: Redis, events: list[Event]) -> None:
        await BatchUpdater(redis_async, keys, cfg, atomic=atomic).apply(events)

    async def run() -> None:
        client = Redis.from_url(settings.redis_url)
        try:
            # u1 pairs a, b, c; u2 pairs c and d, so d's list names c.
            await apply(
                client,
                [Event("click", "u1", item, TS + n) for n, item in enumerate("abc")]
                + [Event("click", "u2", "c", TS + 5), Event("click", "u2", "d", TS + 6)],
            )
            index = ItemIndex(client, keys, cfg.factors)
            assert await index.refresh() == 4 and index.live == 4
            assert await retire_idle_items(client, keys, 3600, atomic) == 0
            # a, b and c are idle for IDLE_S by the time d and e are written, which stay under
            # it for IDLE_S more: the checks below have that long.
            written = _server_time(redis_client)
            wait_until(
                lambda: _server_time(redis_client) > written + IDLE_S, IDLE_S + 5, "idle items"
            )
            await apply(
                client, [Event("click", "u3", "d", TS + 7), Event("view", "u3", "e", TS + 8)]
            )
            assert "c" in zset(keys.neighbours("d"))

            assert await retire_idle_items(client, keys, IDLE_S, atomic) == 3
            gone = ["a", "b", "c"]
            for item in gone:
                assert not redis_client.exists(keys.item_vector(item), keys.neighbours(item))
            assert zset(keys.retired_items) == set(gone)
            for key in (
                keys.active_items,
                keys.updated_items,
                keys.relisted_items,
                keys.occurrences,
                keys.popularity,
                keys.item_first_seen,
            ):
                assert zset(key) == {"d", "e"}, key
            assert zset(keys.clicks) == {"d"}  # e was viewed
            assert "c" not in zset(keys.neighbours("d"))  # its pair, counted both ways
            assert redis_client.exists(keys.item_vector("d"), keys.item_vector("e")) == 2
            assert await retire_idle_items(client, keys, IDLE_S, atomic) == 0

            await index.refresh()
            assert index.live == 2 and len(index) == 5 and index.dead_rows == 3
            assert index.row_of(gone).tolist() == [-1, -1, -1]
            dead = np.flatnonzero(index.dead[: len(index)])
            assert not index.matrix[dead].any() and (index.neighbours[dead] == -1).all()
            assert not index.needs_rebuild  # 3 dead rows are too few to rebuild for

            # An item that comes back is new: a row of its own, alive.
            await apply(client, [Event("click", "u4", "a", TS + 9)])
            await index.refresh()
            assert index.live == 3 and not index.dead[index.rows["a"]]
        finally:
            await client.aclose()

    asyncio.run(run())


def test_the_index_rebuilds_once_dead_rows_outnumber_live_ones(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys, cfg = Keys(settings.key_prefix), settings.model_config()
    monkeypatch.setattr(item_index, "COMPACT_MIN_DEAD", 2)

    async def run() -> None:
        client = Redis.from_url(settings.redis_url)
        try:
            updater = BatchUpdater(client, keys, cfg)
            await updater.apply([Event("click", f"u{n}", f"i{n}", TS + n) for n in range(5)])
            index = ItemIndex(client, keys, cfg.factors)
            await index.refresh()
            retired = ["i0", "i1", "i2"]
            now, micros = await client.time()
            await client.zadd(keys.retired_items, dict.fromkeys(retired, now + micros / 1e6))
            await index.refresh()
            assert index.needs_rebuild and index.live == 2
            fresh = await index.rebuilt()
            assert fresh.epoch == index.epoch + 1
            assert fresh.live == len(fresh) == 5  # Redis still holds them: only stamps here
            for item in retired:
                await client.zrem(keys.updated_items, item)
            fresh = await index.rebuilt()
            assert fresh.live == len(fresh) == 2 and sorted(fresh.ids) == ["i3", "i4"]

            # Records it never read were forgotten (it was idle longer than they are kept):
            # it loads again. A first load has nothing to miss.
            await fresh.refresh()
            assert not fresh.needs_rebuild
            await client.set(keys.retired_horizon, repr(now + 3600.0))
            await fresh.refresh()
            assert fresh.needs_rebuild
            first = ItemIndex(client, keys, cfg.factors)
            await first.refresh()
            assert not first.needs_rebuild and first.live == 2

            # However few, dead rows are rebuilt away once nothing is live.
            monkeypatch.setattr(item_index, "COMPACT_MIN_DEAD", 1024)
            await client.zadd(keys.retired_items, dict.fromkeys(["i3", "i4"], now + 7200.0))
            await first.refresh()
            assert first.live == 0 and first.needs_rebuild
            await client.zrem(keys.updated_items, "i3", "i4")
            assert len(await first.rebuilt()) == 0
        finally:
            await client.aclose()

    asyncio.run(run())


@pytest.fixture
def idle_soon(settings: Settings, own_redis: OwnRedis) -> Iterator[Settings]:
    """The test's settings on a Redis of its own (whose memory is the state's alone), with
    short TTLs."""
    yield dataclasses.replace(
        settings, redis_url=own_redis.url, user_ttl_s=TTL_S, item_ttl_s=TTL_S, batch_size=1000
    )


def _stream(seed: int = 7) -> list[dict]:
    """Events over every user and item at least once, then skewed (Zipf-like) draws."""
    rng = np.random.default_rng(seed)
    users = np.concatenate([np.arange(USERS), rng.integers(0, USERS, EVENTS - USERS)])
    items = np.concatenate(
        [
            np.arange(ITEMS),
            np.minimum(rng.zipf(1.3, EVENTS - ITEMS) - 1, ITEMS - 1),
        ]
    )
    rng.shuffle(items)
    kinds = rng.choice(["view", "click", "rating"], EVENTS, p=[0.6, 0.3, 0.1])
    events = []
    for n, (user, item, kind) in enumerate(zip(users.tolist(), items.tolist(), kinds, strict=True)):
        event = {"type": str(kind), "user_id": f"u{user}", "item_id": f"i{item}", "ts": TS + n}
        if kind == "rating":
            event["value"] = float(1 + n % 5)
        events.append(event)
    return events


def _memory_report(client: redis.Redis) -> str:
    """Where Redis memory is: its own accounting and the biggest keys."""
    stats = {k: v for k, v in client.memory_stats().items() if not isinstance(v, dict)}
    sizes = sorted(
        ((client.memory_usage(k) or 0, k.decode()) for k in client.scan_iter(count=1000)),
        reverse=True,
    )
    return f"memory stats {stats}; biggest keys {sizes[:10]}; keys {len(sizes)}"


def _family_count(client: redis.Redis, empty: str) -> int:
    """Keys of a family, given its key for the empty id (``prefix:hist:{u:}``)."""
    head, tail = empty[:-1], empty[-1]
    return sum(1 for _ in client.scan_iter(match=f"{head}*{tail}", count=5000))


@pytest.mark.timeout(900)
def test_memory_returns_to_a_bound_once_the_idle_period_passes(
    idle_soon: Settings, tmp_path: Path
) -> None:
    settings = idle_soon
    keys = Keys(settings.key_prefix)
    client = redis.Redis.from_url(settings.redis_url)
    events = _stream()
    with running_reader(settings, tmp_path / "reader.log") as (base, _):
        before = int(client.info("memory")["used_memory"])
        worker = freshrec_process(
            ["worker", "--loglevel", "warning"], settings, tmp_path / "worker.log"
        )
        try:
            with EventProducer(settings.kafka_bootstrap, settings.events_topic, 100) as producer:
                producer.send_many(events)

            def applied() -> bool:
                assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
                return int(client.hget(keys.worker_stats, "events") or 0) >= EVENTS

            wait_until(applied, REPLAY_S, "the worker to apply the replay", poll_s=0.5)
            peak = int(client.info("memory")["used_memory"])
            users_at_end = _family_count(client, keys.history(""))
            items_at_end = client.zcard(keys.active_items)

            def debug() -> dict:
                status, body = http_json(f"{base}/recommendations/u1?k=5&debug=1")
                assert status == 200, body
                return body["debug"]

            def idle() -> bool:
                return (
                    client.zcard(keys.active_items) == 0
                    and client.zcard(keys.retired_items) == 0
                    and _family_count(client, keys.user_vector("")) == 0
                    and _family_count(client, keys.item_vector("")) == 0
                    and _family_count(client, keys.history("")) == 0
                    and _family_count(client, keys.neighbours("")) == 0
                )

            wait_until(idle, 6 * TTL_S + 60, "every user and item to leave Redis", poll_s=0.5)
            wait_until(
                lambda: debug()["index_items"] == 0 and debug()["index_rows"] == 0,
                30,
                "the reader's snapshot to empty",
                poll_s=0.2,
            )

            def settled() -> bool:  # freed tables and client buffers shrink on Redis's cron
                return int(client.info("memory")["used_memory"]) - before <= MEMORY_BOUND

            try:
                wait_until(settled, 30, f"Redis memory within {MEMORY_BOUND} B of {before} B")
            except AssertionError:
                print(_memory_report(client))
                raise
            after = int(client.info("memory")["used_memory"])
        finally:
            stop_process(worker)
            client.close()
    assert users_at_end > 0 and items_at_end > 0, "nothing was live at the end of the replay"
    stamps = (keys.updated_items, keys.relisted_items)
    for key in (keys.occurrences, keys.popularity, keys.item_first_seen, *stamps):
        assert redis.Redis.from_url(settings.redis_url).zcard(key) == 0, key
    print(
        f"\nretention: used_memory before {before / 2**20:.1f} MiB, end of replay "
        f"{peak / 2**20:.1f} MiB ({users_at_end} users, {items_at_end} items live), "
        f"after the idle period {after / 2**20:.1f} MiB"
    )
