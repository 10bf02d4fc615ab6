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
