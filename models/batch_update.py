"""Apply one batch of interactions to the state in Redis: one read, one atomic write.

The read fetches what the batch needs (the vectors it touches, the users' recent items, the
rating mean, the decay landmark, the partitions' offset watermarks). The batch is then learned
*sequentially* in memory, so an item that appears twice in a batch sees its own first update,
exactly as a one-event-at-a-time learner would. The write sends only *deltas* and increments,
aggregated per key, through single-key server scripts, so two workers touching the same hot
item lose nothing.

Exactly-once on a single Redis: the write is one MULTI/EXEC transaction that also advances the
per-partition offset watermarks, under WATCH on those watermarks. A message at or below its
partition's watermark was applied already (Kafka redelivered it after a crash or rebalance) and
is skipped; a crash before EXEC applies nothing. With ``atomic=False`` (Redis Cluster, where a
transaction cannot span slots) the same commands go as a plain pipeline: at-least-once.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from redis.asyncio import Redis
from redis.exceptions import WatchError

from models.config import ModelConfig
from models.decay import ForwardDecay
from models.keys import Keys
from models.mf import (
    implicit_part,
    implicit_step,
    initial_vector,
    predict_rating,
    rating_part,
    rating_step,
    vector_width,
)
from models.server_scripts import ServerScripts
from models.vectors import decode_vector, encode_vector

INTERACTIONS = frozenset(("click", "view", "purchase", "rating"))


class Interaction(Protocol):
    type: str
    user_id: str
    item_id: str
    ts: float
    value: float | None


Origin = tuple[str, int]
"""Where an event came from: (partition label such as ``"freshrec.events/3"``, offset)."""


@dataclass
class BatchResult:
    """What a batch changed: for metrics, publishing and prequential error."""

    events: int = 0
    skipped: int = 0
    users: set[str] = field(default_factory=set)
    items: set[str] = field(default_factory=set)
    rating_errors: list[float] = field(default_factory=list)
    pairs: int = 0
    max_ts: float = 0.0


@dataclass
class _Snapshot:
    """Everything the learning step reads."""

    landmark: float
    mean_sum: float
    mean_n: int
    vectors: dict[str, np.ndarray]
    fresh: set[str]
    windows: dict[str, list[str]]


@dataclass
class _Writes:
    """Everything the learning step changes, aggregated per key."""

    deltas: dict[str, np.ndarray] = field(default_factory=dict)
    bases: dict[str, np.ndarray] = field(default_factory=dict)
    mean_sum: float = 0.0
    mean_n: int = 0
    pairs: defaultdict[str, defaultdict[str, float]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(float))
    )
    occurrences: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    popularity: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    clicks: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    impressions: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    first_seen: dict[str, float] = field(default_factory=dict)
    history: defaultdict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(dict))


class _Rebased(Exception):
    """The decay landmark moved while reading; the batch is read again."""


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
    atomic
        Apply each batch and its offset watermarks in one transaction (single Redis).
    """

    def __init__(self, redis: Redis, keys: Keys, config: ModelConfig, atomic: bool = True) -> None:
        self.redis = redis
        self.keys = keys
        self.config = config
        self.atomic = atomic
        self.scripts = ServerScripts(redis)
        self._rng = np.random.default_rng(config.seed)

    async def apply(
        self, events: Sequence[Interaction], origins: Sequence[Origin] | None = None
    ) -> BatchResult:
        """Learn ``events``; with ``origins`` (one per event), skip what was applied before."""
        if origins is not None and len(origins) != len(events):
            raise ValueError("origins must have one entry per event")
        while True:
            try:
                return await self._apply_once(events, origins)
            except (WatchError, _Rebased):
                continue  # a partition moved on, or the decay landmark did: re-read, re-filter

    async def _apply_once(
        self, events: Sequence[Interaction], origins: Sequence[Origin] | None
    ) -> BatchResult:
        marks: dict[str, int] = {}
        async with self.redis.pipeline(transaction=self.atomic) as tx:
            if origins:
                labels = sorted({label for label, _ in origins})
                mark_keys = [self.keys.watermark(label) for label in labels]
                if self.atomic:
                    await tx.watch(*mark_keys)
                raw = await tx.mget(mark_keys) if self.atomic else await self._get_all(mark_keys)
                applied = {lab: int(v) for lab, v in zip(labels, raw, strict=True) if v is not None}
                keep = [
                    n
                    for n, (label, offset) in enumerate(origins)
                    if offset > applied.get(label, -1)
                ]
                for label, offset in origins:
                    marks[label] = max(offset, marks.get(label, -1))
            else:
                keep = list(range(len(events)))
            todo = [events[n] for n in keep]
            result = BatchResult(events=len(todo), skipped=len(events) - len(todo))
            if not todo:
                if self.atomic and origins:
                    await tx.unwatch()
                return result
            snapshot = await self._read(todo)
            writes = self._learn(todo, snapshot, result)
            if self.atomic:
                tx.multi()
            await self._queue_writes(tx, writes, marks, len(todo))
            await tx.execute()
        result.users = {e.user_id for e in todo}
        result.items = {e.item_id for e in todo}
        result.max_ts = max(e.ts for e in todo)
        return result

    # --- read ---------------------------------------------------------------------------------
    async def _get_all(self, keys: list[str]) -> list[bytes | None]:
        """GETs in one pipeline: unlike MGET, valid when the keys live in different slots."""
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.get(key)
        return await pipe.execute()

    async def _read(self, events: Sequence[Interaction]) -> _Snapshot:
        cfg, keys = self.config, self.keys
        learners = [e for e in events if e.type in INTERACTIONS]
        users = sorted({e.user_id for e in learners})
        items = sorted({e.item_id for e in learners})
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
        newest = max(e.ts for e in events)
        decay = ForwardDecay(cfg.decay_rate, landmark)
        if decay.needs_rebase(newest):
            await self.rebase(decay, newest)
            raise _Rebased
        width = vector_width(cfg.factors)
        names = [f"u:{u}" for u in users] + [f"i:{i}" for i in items]
        vectors: dict[str, np.ndarray] = {}
        fresh: set[str] = set()
        for name, blob in zip(names, replies[2 : 2 + len(names)], strict=True):
            if blob is not None and len(blob) == 4 * width:
                vectors[name] = decode_vector(blob)
            else:
                kind, entity = name.split(":", 1)
                vectors[name] = initial_vector(entity, kind, cfg.factors, cfg.init_std, cfg.seed)
                fresh.add(name)
        windows = {
            u: [m.decode() for m in win]
            for u, win in zip(users, replies[2 + len(names) :], strict=True)
        }
        return _Snapshot(
            landmark=landmark,
            mean_sum=float(replies[1][0] or 0.0),
            mean_n=int(replies[1][1] or 0),
            vectors=vectors,
            fresh=fresh,
            windows=windows,
        )

    # --- learn (pure) --------------------------------------------------------------------------
    def _learn(self, events: Sequence[Interaction], s: _Snapshot, result: BatchResult) -> _Writes:
        cfg = self.config
        k = cfg.factors
        decay = ForwardDecay(cfg.decay_rate, s.landmark)
        vectors = {name: vec.copy() for name, vec in s.vectors.items()}
        out = _Writes()
        negatives_pool = sorted({e.item_id for e in events if e.type in INTERACTIONS})
        mean_sum, mean_n = s.mean_sum, s.mean_n
        for ev in events:
            item = ev.item_id
            if ev.type == "impression":
                out.impressions[item] += 1.0
                continue
            user = ev.user_id
            uvec, ivec = vectors["u:" + user], vectors["i:" + item]
            strength = cfg.strengths.get(ev.type, 1.0)
            if ev.type == "rating":
                rating = float(ev.value)  # type: ignore[arg-type]
                u_part, i_part = rating_part(uvec, k), rating_part(ivec, k)
                # Prequential error: predicted before anything about this rating is known.
                prior_mean = mean_sum / mean_n if mean_n else 0.0
                result.rating_errors.append(rating - predict_rating(u_part, i_part, prior_mean))
                # The step itself folds the rating into mu first, as river's BiasedMF does.
                mean_sum += rating
                mean_n += 1
                rating_step(u_part, i_part, mean_sum / mean_n, rating, cfg.lr, cfg.reg)
            elif ev.type == "click":
                out.clicks[item] += 1.0
            confidence = 1.0 + cfg.implicit_alpha * strength
            y_user = implicit_part(uvec, k)
            implicit_step(y_user, implicit_part(ivec, k), 1.0, confidence, cfg.implicit_lr, cfg.reg)
            self._negative_steps(y_user, item, negatives_pool, vectors)

            weight = float(decay.weight(ev.ts))
            window = s.windows[user]
            for other in window:
                if other != item:
                    out.pairs[item][other] += weight
                    out.pairs[other][item] += weight
                    result.pairs += 1
            if item in window:
                window.remove(item)
            window.insert(0, item)
            del window[cfg.history_window :]
            out.occurrences[item] += weight
            out.popularity[item] += weight * strength
            seen = out.history[user]
            seen[item] = max(ev.ts, seen.get(item, -math.inf))
            out.first_seen[item] = min(ev.ts, out.first_seen.get(item, math.inf))
        for name, vec in vectors.items():
            delta = vec - s.vectors[name]
            if delta.any():
                out.deltas[name] = delta
                out.bases[name] = s.vectors[name]
        out.mean_sum, out.mean_n = mean_sum - s.mean_sum, mean_n - s.mean_n
        return out

    def _negative_steps(
        self, y_user: np.ndarray, positive: str, pool: list[str], vectors: dict[str, np.ndarray]
    ) -> None:
        """Unobserved side of the implicit objective: preference 0, confidence 1."""
        cfg = self.config
        if cfg.implicit_negatives <= 0 or len(pool) < 2:
            return
        for pick in self._rng.integers(0, len(pool), size=cfg.implicit_negatives):
            other = pool[int(pick)]
            if other != positive:
                y_other = implicit_part(vectors["i:" + other], cfg.factors)
                implicit_step(y_user, y_other, 0.0, 1.0, cfg.implicit_lr, cfg.reg)

    # --- write -------------------------------------------------------------------------------
    async def _queue_writes(
        self, pipe: Any, w: _Writes, marks: dict[str, int], applied: int
    ) -> None:
        cfg, keys = self.config, self.keys
        for name, delta in w.deltas.items():
            # The base is the vector as read: the starting point whenever the key is missing
            # at write time (new, or expired since the read); every worker derives the same.
            kind, entity = name.split(":", 1)
            key = keys.user_vector(entity) if kind == "u" else keys.item_vector(entity)
            ttl = cfg.user_ttl_s if kind == "u" else 0
            args = [encode_vector(delta), encode_vector(w.bases[name]), ttl]
            await self.scripts.add_vector(keys=[key], args=args, client=pipe)
        if w.mean_n:
            pipe.hincrbyfloat(keys.rating_mean, "sum", w.mean_sum)
            pipe.hincrby(keys.rating_mean, "n", w.mean_n)
        for item, row in w.pairs.items():
            await self._increment(pipe, keys.neighbours(item), row, trim_to=cfg.neighbours_cap)
        await self._increment(pipe, keys.occurrences, w.occurrences)
        await self._increment(pipe, keys.popularity, w.popularity)
        await self._increment(pipe, keys.clicks, w.clicks)
        await self._increment(pipe, keys.impressions, w.impressions)
        if w.impressions:
            pipe.incrbyfloat(keys.impressions_total, sum(w.impressions.values()))
        if w.first_seen:
            pipe.zadd(keys.item_first_seen, w.first_seen, lt=True)
        for user, seen in w.history.items():
            key = keys.history(user)
            pipe.zadd(key, seen, gt=True)
            pipe.zremrangebyrank(key, 0, -cfg.history_cap - 1)
            pipe.expire(key, cfg.user_ttl_s)
        for label, offset in marks.items():
            pipe.set(keys.watermark(label), offset)
        pipe.hincrby(keys.worker_stats, "events", applied)
        pipe.hset(keys.worker_stats, "applied_at", repr(time.time()))

    async def _increment(
        self, pipe: Any, key: str, increments: dict[str, float], trim_to: int = 0, ttl: int = 0
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

        Each rescale is a single-key ``ZUNIONSTORE key 1 key WEIGHTS f``; the new landmark is
        written in the same transaction, so readers see either the old scale or the new one.
        Other workers wait for the lock to clear, then re-read the landmark.
        """
        lock = self.keys.decay_landmark + ":lock"
        if not await self.redis.set(lock, "1", nx=True, px=60_000):
            deadline = time.monotonic() + 60
            while await self.redis.exists(lock) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return
        try:
            current = await self.redis.get(self.keys.decay_landmark)
            if current is not None and float(current) != decay.landmark:
                return  # someone rebased between our read and the lock
            factor = decay.rebase_factor(now)
            targets = [self.keys.occurrences, self.keys.popularity]
            async for key in self.redis.scan_iter(match=self.keys.neighbours("*"), count=1000):
                targets.append(key)
            pipe = self.redis.pipeline(transaction=self.atomic)
            for key in targets:
                pipe.zunionstore(key, {key: factor})
            pipe.set(self.keys.decay_landmark, repr(now))
            await pipe.execute()
        finally:
            await self.redis.delete(lock)
