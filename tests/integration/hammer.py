"""One of several processes updating the same hot item at once (see test_online_updates)."""

from __future__ import annotations

import asyncio
import sys
import time

import numpy as np
from redis.asyncio import Redis

from freshrec.models.config import ModelConfig
from freshrec.store.batch_update import BatchUpdater
from freshrec.store.keys import Keys
from freshrec.store.server_scripts import ServerScripts
from freshrec.store.vectors import encode_vector
from freshrec.streams.events import Event

TS = 1_700_000_000.0


async def start_together(redis: Redis, key: str, workers: int) -> None:
    """A barrier, so the processes really overlap instead of running one after the other."""
    await redis.incr(key)
    deadline = time.monotonic() + 60
    while int(await redis.get(key)) < workers:
        if time.monotonic() > deadline:
            raise TimeoutError("the other hammering processes never started")
        await asyncio.sleep(0.01)


async def main(
    url: str, prefix: str, worker: int, workers: int, batches: int, per_batch: int, atomic: bool
) -> None:
    redis = Redis.from_url(url)
    await start_together(redis, f"{prefix}:barrier", workers)
    keys = Keys(prefix)
    updater = BatchUpdater(redis, keys, ModelConfig(factors=4, implicit_negatives=0), atomic)
    scripts = ServerScripts(redis)
    ones, zeros = encode_vector(np.ones(4)), encode_vector(np.zeros(4))
    for b in range(batches):
        events = [Event("click", f"w{worker}-b{b}-u{n}", "hot", TS) for n in range(per_batch)]
        await updater.apply(events)
        await scripts.add_vector(keys=[f"{prefix}:bump"], args=[ones, zeros, 0])
    await redis.aclose()


if __name__ == "__main__":
    url, prefix, worker, workers, batches, per_batch, atomic = sys.argv[1:8]
    asyncio.run(
        main(url, prefix, int(worker), int(workers), int(batches), int(per_batch), atomic == "1")
    )
