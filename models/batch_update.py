"""Apply one batch of interactions to the state in Redis in two pipelined round trips.

Round trip 1 reads what the batch needs (the vectors it touches, the users' recent items, the
rating mean, the decay landmark). The batch is then learned *sequentially* in memory, so an
item that appears twice in a batch sees its own first update, exactly as a one-event-at-a-time
learner would. Round trip 2 writes only *deltas* and increments through single-key server
scripts, aggregated per key, so two workers touching the same hot item lose nothing.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from redis.asyncio import Redis

from models.config import ModelConfig
from models.decay import ForwardDecay
from models.keys import Keys
from models.mf import implicit_step, initial_vector, rating_step
from models.server_scripts import ServerScripts
from models.vectors import decode_vector, encode_vector

IMPLICIT_TYPES = frozenset(("click", "view", "purchase"))


class Interaction(Protocol):
    type: str
    user_id: str
    item_id: str
    ts: float
    value: float | None


@dataclass
class BatchResult:
    """What a batch changed: for metrics, publishing and prequential error."""

    events: int = 0
    users: set[str] = field(default_factory=set)
    items: set[str] = field(default_factory=set)
    rating_errors: list[float] = field(default_factory=list)
    pairs: int = 0
    max_ts: float = 0.0


class BatchUpdater:
    """Learns batches of interactions into the Redis state of all models.

    Parameters
    ----------
    redis
        An asyncio Redis client (``decode_responses=False``).
    keys
        The key layout (prefix).
    config
        Hyperparameters of MF, co-occurrence, popularity and history.
    """

    def __init__(self, redis: Redis, keys: Keys, config: ModelConfig) -> None:
        self.redis = redis
        self.keys = keys
        self.config = config
        self.scripts = ServerScripts(redis)
        self._rng = np.random.default_rng(config.seed)

    async def apply(self, events: Sequence[Interaction]) -> BatchResult:
        result = BatchResult(events=len(events))
        if not events:
            return result
        cfg, keys = self.config, self.keys
        learners = [e for e in events if e.type != "impression"]
        users = sorted({e.user_id for e in learners})
        items = sorted({e.item_id for e in learners})

        # --- round trip 1: read ------------------------------------------------------------
        first_ts = min(e.ts for e in events)
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(keys.decay_landmark, repr(first_ts), nx=True, get=True)
        pipe.hmget(keys.rating_mean, "sum", "n")
        for u in users:
            pipe.get(keys.user_vector(u))
        for i in items:
            pipe.get(keys.item_vector(i))
        for u in users:
            pipe.zrevrange(keys.history(u), 0, cfg.history_window - 1)
        replies = await pipe.execute()

        landmark = float(replies[0]) if replies[0] is not None else first_ts
        decay = ForwardDecay(cfg.decay_rate, landmark)
        if decay.needs_rebase(max(e.ts for e in events)):
            await self.rebase(decay, max(e.ts for e in events))
            return await self.apply(events)
        mean_sum = float(replies[1][0] or 0.0)
        mean_n = int(replies[1][1] or 0)
        offset = 2
        stored: dict[str, bytes | None] = {}
        for u, blob in zip(users, replies[offset : offset + len(users)], strict=True):
            stored["u:" + u] = blob
        offset += len(users)
        for i, blob in zip(items, replies[offset : offset + len(items)], strict=True):
            stored["i:" + i] = blob
        offset += len(items)
        windows = {
            u: [m.decode() for m in win] for u, win in zip(users, replies[offset:], strict=True)
        }

        # --- learn sequentially in memory ----------------------------------------------------
        before: dict[str, np.ndarray] = {}
        vectors: dict[str, np.ndarray] = {}
        fresh: set[str] = set()
        for name, blob in stored.items():
            kind, entity = name[0], name[2:]
            if blob is not None and len(blob) == 4 * (cfg.factors + 1):
                vec = decode_vector(blob)
            else:
                vec = initial_vector(entity, kind, cfg.factors, cfg.init_std, cfg.seed)
                fresh.add(name)
            before[name] = vec
            vectors[name] = vec.copy()

        pairs: defaultdict[str, defaultdict[str, float]] = defaultdict(lambda: defaultdict(float))
        occurrences: defaultdict[str, float] = defaultdict(float)
        popularity: defaultdict[str, float] = defaultdict(float)
        impressions: defaultdict[str, float] = defaultdict(float)
        first_seen: dict[str, float] = {}
        history: defaultdict[str, dict[str, float]] = defaultdict(dict)
        implicit_items = sorted({e.item_id for e in learners if e.type in IMPLICIT_TYPES})
        mean_sum0, mean_n0 = mean_sum, mean_n

        for ev in events:
            item = ev.item_id
            if ev.type == "impression":
                impressions[item] += 1.0
                continue
            user = ev.user_id
            uvec, ivec = vectors["u:" + user], vectors["i:" + item]
            strength = cfg.strengths.get(ev.type, 1.0)
            if ev.type == "rating":
                mean_sum += float(ev.value)  # type: ignore[arg-type]
                mean_n += 1
                err = rating_step(uvec, ivec, mean_sum / mean_n, float(ev.value), cfg.lr, cfg.reg)  # type: ignore[arg-type]
                result.rating_errors.append(err)
            else:
                confidence = 1.0 + cfg.implicit_alpha * strength
                implicit_step(uvec, ivec, 1.0, confidence, cfg.implicit_lr, cfg.reg)
                self._negative_steps(uvec, item, implicit_items, vectors)

            weight = float(decay.weight(ev.ts))
            window = windows[user]
            for other in window:
                if other != item:
                    pairs[item][other] += weight
                    pairs[other][item] += weight
                    result.pairs += 1
            if item in window:
                window.remove(item)
            window.insert(0, item)
            del window[cfg.history_window :]
            occurrences[item] += weight
            popularity[item] += weight * strength
            seen = history[user]
            seen[item] = max(ev.ts, seen.get(item, -math.inf))
            first_seen[item] = min(ev.ts, first_seen.get(item, math.inf))

        # --- round trip 2: write deltas and increments -------------------------------------
        pipe = self.redis.pipeline(transaction=False)
        for name, vec in vectors.items():
            delta = vec - before[name]
            if not delta.any():
                continue
            kind, entity = name[0], name[2:]
            key = keys.user_vector(entity) if kind == "u" else keys.item_vector(entity)
            init = before[name] if name in fresh else np.zeros_like(vec)
            ttl = cfg.user_ttl_s if kind == "u" else 0
            await self.scripts.add_vector(
                keys=[key], args=[encode_vector(delta), encode_vector(init), ttl], client=pipe
            )
        if mean_n != mean_n0:
            pipe.hincrbyfloat(keys.rating_mean, "sum", mean_sum - mean_sum0)
            pipe.hincrby(keys.rating_mean, "n", mean_n - mean_n0)
        for item, row in pairs.items():
            await self._increment(pipe, keys.neighbours(item), row, trim_to=cfg.neighbours_cap)
        await self._increment(pipe, keys.occurrences, occurrences)
        await self._increment(pipe, keys.popularity, popularity)
        await self._increment(pipe, keys.impressions, impressions)
        if first_seen:
            pipe.zadd(keys.item_first_seen, first_seen, lt=True)
        for user, seen in history.items():
            key = keys.history(user)
            pipe.zadd(key, seen, gt=True)
            pipe.zremrangebyrank(key, 0, -cfg.history_cap - 1)
            pipe.expire(key, cfg.user_ttl_s)
        pipe.hincrby(keys.worker_stats, "events", len(events))
        pipe.hset(keys.worker_stats, "applied_at", repr(time.time()))
        await pipe.execute()

        result.users = set(history) | {e.user_id for e in events if e.type == "impression"}
        result.items = set(occurrences) | set(impressions)
        result.max_ts = max(e.ts for e in events)
        return result

    def _negative_steps(
        self, uvec: np.ndarray, positive: str, candidates: list[str], vectors: dict[str, np.ndarray]
    ) -> None:
        """Unobserved side of the implicit objective: preference 0, confidence 1."""
        n = self.config.implicit_negatives
        if n <= 0 or len(candidates) < 2:
            return
        picks = self._rng.integers(0, len(candidates), size=n)
        for pick in picks:
            other = candidates[int(pick)]
            if other != positive:
                implicit_step(
                    uvec, vectors["i:" + other], 0.0, 1.0, self.config.implicit_lr, self.config.reg
                )

    async def _increment(
        self, pipe: object, key: str, increments: dict[str, float], trim_to: int = 0, ttl: int = 0
    ) -> None:
        if not increments:
            return
        args: list[object] = [trim_to, ttl]
        for member, amount in increments.items():
            args.append(member)
            args.append(repr(amount))
        await self.scripts.zincrby_many(keys=[key], args=args, client=pipe)

    async def rebase(self, decay: ForwardDecay, now: float) -> None:
        """Move the landmark to ``now`` and rescale every forward-decayed sum, under a lock.

        Each rescale is a single-key ``ZUNIONSTORE key 1 key WEIGHTS f``; the landmark is
        written last, so a worker that reads the old landmark meanwhile adds weights on the old
        scale to keys about to be rescaled — a bounded, once-in-years imprecision.
        """
        lock = self.keys.decay_landmark + ":lock"
        if not await self.redis.set(lock, "1", nx=True, px=60_000):
            deadline = time.monotonic() + 60
            while await self.redis.exists(lock) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return
        try:
            factor = decay.rebase_factor(now)
            targets = [self.keys.occurrences, self.keys.popularity]
            async for key in self.redis.scan_iter(match=self.keys.neighbours("*"), count=1000):
                targets.append(key)
            pipe = self.redis.pipeline(transaction=False)
            for key in targets:
                pipe.zunionstore(key, {key: factor})
            pipe.set(self.keys.decay_landmark, repr(now))
            await pipe.execute()
        finally:
            await self.redis.delete(lock)
