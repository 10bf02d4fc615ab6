"""Retention: items nobody has touched for the item TTL leave the state.

A catalogue only grows: items are added by their first event and, without retention, kept for
ever with their factors, neighbour list and an entry in every per-item sorted set. Users need
nothing here: their keys carry a Redis TTL renewed by each of their events (the user TTL). An
item's state is spread over keys many batches write (its pairs are counted in its neighbours'
lists too), so it cannot expire by itself; each batch stamps the items it writes anything about
in ``items:active`` (the server's clock), and `retire_idle_items`, called on a timer by every
worker, removes those stamped longer ago than the item TTL, a bounded number per call so no call
holds Redis for long. Readers follow through ``items:retired``.

Time is the Redis server's clock, like the users' TTL: retention bounds memory as it is used,
where the models' clocks (decay, item age) are event time.
"""

from __future__ import annotations

from redis.asyncio import Redis

from freshrec.store.keys import Keys
from freshrec.store.server_scripts import ServerScripts

RETIRE_PER_CALL = 50  # items per script call: with full neighbour lists, 10,000 removals
RETIRE_CALLS = 40  # calls per sweep at most; the next sweep goes on


async def retire_idle_items(
    redis: Redis,
    keys: Keys,
    ttl_s: int,
    atomic: bool = True,
    per_call: int = RETIRE_PER_CALL,
    calls: int = RETIRE_CALLS,
) -> int:
    """Retire items not written for ``ttl_s`` seconds; returns how many.

    ``atomic`` (a single Redis): one script call per ``per_call`` items, each atomic. On Redis
    Cluster (``atomic=False``) single-key commands: an item written between the scan and its
    removal loses that write (it starts again from its initial vector), a race of one
    round trip against a TTL of days.
    """
    retire = _retire_script if atomic else _retire_pipelined
    total = 0
    for _ in range(calls):
        done = await retire(redis, keys, ttl_s, per_call)
        total += done
        if done < per_call:
            break
    return total


def _per_item_sets(keys: Keys) -> list[str]:
    return [
        keys.updated_items,
        keys.relisted_items,
        keys.occurrences,
        keys.popularity,
        keys.impressions,
        keys.clicks,
        keys.item_first_seen,
        keys.item_ratings,
    ]


async def _retire_script(redis: Redis, keys: Keys, ttl_s: int, limit: int) -> int:
    scripts = ServerScripts(redis)
    return int(
        await scripts.retire_idle(
            keys=[
                keys.active_items,
                keys.retired_items,
                keys.retired_horizon,
                *_per_item_sets(keys),
            ],
            args=[
                ttl_s,
                limit,
                *keys.item_key_parts("mf"),
                *keys.item_key_parts("cf"),
                *keys.item_key_parts("rp"),
            ],
        )
    )


async def _retire_pipelined(redis: Redis, keys: Keys, ttl_s: int, limit: int) -> int:
    seconds, micros = await redis.time()
    now = seconds + micros / 1e6
    cutoff = now - ttl_s
    idle = [
        m.decode()
        for m in await redis.zrangebyscore(keys.active_items, "-inf", cutoff, start=0, num=limit)
    ]
    if not idle:
        await _forget_records(redis, keys, cutoff)
        return 0
    pipe = redis.pipeline(transaction=False)
    for item in idle:
        pipe.zrange(keys.neighbours(item), 0, -1)
        pipe.hkeys(keys.rating_pairs(item))
    lists = await pipe.execute()
    pipe = redis.pipeline(transaction=False)
    for n, item in enumerate(idle):
        for other in lists[2 * n]:
            pipe.zrem(keys.neighbours(other.decode()), item)
        for other in lists[2 * n + 1]:
            pipe.hdel(keys.rating_pairs(other.decode()), item)
        pipe.delete(keys.item_vector(item))
        pipe.delete(keys.neighbours(item))
        pipe.delete(keys.rating_pairs(item))
    for key in _per_item_sets(keys):
        pipe.zrem(key, *idle)
    pipe.zadd(keys.retired_items, dict.fromkeys(idle, now))
    pipe.zrem(keys.active_items, *idle)  # last: an item cut short is found again next sweep
    await pipe.execute()
    await _forget_records(redis, keys, cutoff)
    return len(idle)


async def _forget_records(redis: Redis, keys: Keys, cutoff: float) -> None:
    """Drops the retirement records older than ``cutoff``, the newest of them kept as the
    horizon (written first: a reader then rebuilds at worst once too often)."""
    old = await redis.zrevrangebyscore(keys.retired_items, cutoff, "-inf", 0, 1, withscores=True)
    if old:
        await redis.set(keys.retired_horizon, repr(old[0][1]))
        await redis.zremrangebyscore(keys.retired_items, "-inf", cutoff)
