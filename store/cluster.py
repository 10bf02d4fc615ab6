"""What changes on Redis Cluster: how scripts are sent, and reads whose keys span slots.

The key layout (`freshrec.store.keys`) puts each user's keys in one slot and each item's in
another, so every write script touches one slot and runs unchanged. Two things differ:

* redis-py's cluster pipelines refuse ``EVALSHA`` (a node that lacks the script could not be
  told to load it mid-pipeline), so on Cluster scripts are sent whole with ``EVAL``; each node
  caches a script's compiled body by its hash, so only the bytes on the wire grow.
* A script may only touch keys of one slot. Reads that gather many users' or items' keys in
  one script on a single Redis are done as pipelined single-slot commands instead, which the
  cluster client sends to each node in parallel. Such a read is no longer one snapshot: it may
  see one batch's writes to one node and not yet to another, as two readers' requests may.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from freshrec.models.rating_stack import PAIR_FIELDS, RECORD_HEAD
from freshrec.store.keys import Keys

PAIR_BYTES = 4 * PAIR_FIELDS
NO_PAIR = bytes(PAIR_BYTES)  # a pair's statistics where there are none


def is_cluster(client: Any) -> bool:
    """Whether ``client`` (a client or a pipeline, blocking or asyncio) talks to Redis Cluster."""
    from redis.asyncio.cluster import ClusterPipeline as AsyncClusterPipeline
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
    from redis.cluster import ClusterPipeline, RedisCluster

    return isinstance(
        client, (AsyncRedisCluster, AsyncClusterPipeline, RedisCluster, ClusterPipeline)
    )


class EvalScript:
    """A server script sent whole on every call (``EVAL``), with redis-py's script call form:
    ``script(keys=[...], args=[...], client=pipe)``."""

    def __init__(self, client: Any, source: str) -> None:
        self.client = client
        self.script = source

    def __call__(self, keys: Any = (), args: Any = (), client: Any = None) -> Any:
        from redis.asyncio.cluster import ClusterPipeline

        keys, args = list(keys), list(args)
        target = client or self.client
        queued = target.eval(self.script, len(keys), *keys, *args)
        if isinstance(target, ClusterPipeline):
            # Queued, as redis-py's scripts are in a pipeline; awaiting the pipeline itself
            # would start it afresh and drop what is queued.
            return _done(queued)
        return queued


async def _done(value: Any) -> Any:
    return value


async def per_key(client: Any, source: str, keys: list[str], args: list[Any]) -> list[Any]:
    """A script whose reply holds one entry per key (``NEIGHBOUR_LISTS``), run once per key in
    one cluster pipeline: each node answers its keys in one round trip."""
    if not keys:
        return []
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.eval(source, 1, key, *args)
    return [reply[0] for reply in await pipe.execute()]


async def item_rows(
    client: Any, stat_keys: list[str], items: list[str], head: str, tail: str
) -> list[bytes]:
    """``ITEM_ROWS``'s reply on Cluster: the items' vectors (key ``head .. id .. tail``)
    concatenated, their byte lengths (int32, 0 for none) and the three statistics of
    ``stat_keys`` (doubles, 0 where absent). The statistics share a slot; each vector is in its
    item's."""
    if not items:
        return [b"", b"", b""]
    pipe = client.pipeline(transaction=False)
    for item in items:
        pipe.get(head + item + tail)
    for key in stat_keys:
        pipe.zmscore(key, items)
    replies = await pipe.execute()
    blobs, scores = replies[: len(items)], replies[len(items) :]
    lengths = np.array([len(blob) if blob else 0 for blob in blobs], dtype="<i4")
    stats = np.array([[s or 0.0 for s in column] for column in scores], dtype="<f8").T
    return [b"".join(blob or b"" for blob in blobs), lengths.tobytes(), stats.tobytes()]


async def rating_states(
    client: Any, keys: Keys, asked: dict[str, list[str]]
) -> list[tuple[list[bytes], bytes, list[bytes]]]:
    """``RATING_STATE``'s reply for each user of ``asked`` (user -> items to predict), on
    Cluster: their records (newest first), their items' rating counts (doubles, 0 where none)
    and per item asked its 16-byte statistics with each record's item (zeros where none). The
    records first, then what they name, each from its own slot."""
    users = list(asked)
    pipe = client.pipeline(transaction=False)
    for user in users:
        pipe.lrange(keys.rating_history(user), 0, -1)
    records = await pipe.execute()
    pipe = client.pipeline(transaction=False)
    partners = [[record[RECORD_HEAD:] for record in raw] for raw in records]
    for user, named in zip(users, partners, strict=True):
        if named:
            pipe.zmscore(keys.item_ratings, named)
            for item in asked[user]:
                pipe.hmget(keys.rating_pairs(item), named)
    replies = iter(await pipe.execute() if len(pipe) else [])
    out: list[tuple[list[bytes], bytes, list[bytes]]] = []
    for user, raw, named in zip(users, records, partners, strict=True):
        if not named:
            out.append((raw, b"", []))
            continue
        counts = np.array([c or 0.0 for c in next(replies)], dtype="<f8").tobytes()
        stats = [
            b"".join(
                v if v is not None and len(v) == PAIR_BYTES else NO_PAIR for v in next(replies)
            )
            for _ in asked[user]
        ]
        out.append((raw, counts, stats))
    return out
