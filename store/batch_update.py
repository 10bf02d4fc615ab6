"""Apply one batch of interactions to the state in Redis: one read, one atomic write.

The read fetches what the batch needs (the vectors it touches, the users' recent items, the
rating mean, the decay landmark, the partitions' offset watermarks). The batch is then learned
*sequentially* in memory, so an item that appears twice in a batch sees its own first update,
exactly as a one-event-at-a-time learner would. The write sends only *deltas* and increments,
aggregated per key, applied by server-side scripts, so two workers touching the same hot item
lose nothing.

On a single Redis the read and the write are one script call each, whatever the batch size, and
the write is atomic with the per-partition offset watermarks: a message at or below its
partition's watermark was applied already (Kafka redelivered it after a crash or rebalance) and
is skipped, and a crash mid-batch applies nothing. On Redis Cluster the same
changes go as pipelined single-key commands and scripts, watermarks last: at least once
(``atomic=False``).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from redis.asyncio import Redis

from freshrec.models.config import ModelConfig
from freshrec.models.decay import ForwardDecay
from freshrec.models.mf import (
    implicit_part,
    implicit_step,
    initial_vector,
    predict_rating,
    rating_part,
    rating_step,
    vector_width,
)
from freshrec.store.keys import Keys
from freshrec.store.server_scripts import ServerScripts
from freshrec.store.vectors import VECTOR_DTYPE, decode_vector, encode_vector

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
    """What a batch did: for metrics and the prequential error."""

    events: int = 0
    skipped: int = 0
    rating_errors: list[float] = field(default_factory=list)
    max_ts: float = 0.0
    applied: list[int] = field(default_factory=list)  # input positions learned, not skipped


@dataclass
class _Snapshot:
    """Everything the learning step reads."""

    landmark: float
    mean_sum: float
    mean_n: int
    vectors: dict[str, np.ndarray]
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


class _Retry(Exception):
    """The state moved under the batch (landmark rebased, a partition applied by another
    worker); the batch is read and learned again."""


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
        One script per batch, atomic with its offset watermarks (a single Redis). False for
        Redis Cluster: only single-key commands and scripts, at-least-once batches.
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
        if not events:
            return BatchResult()
        while True:
            try:
                return await self._apply_once(events, origins or [])
            except _Retry:
                continue

    async def _apply_once(
        self, events: Sequence[Interaction], origins: Sequence[Origin]
    ) -> BatchResult:
        labels = sorted({label for label, _ in origins})
        read = self._read_script if self.atomic else self._read_pipelined
        snapshot, applied = await read(events, [self.keys.watermark(lab) for lab in labels])
        done = {lab: mark for lab, mark in zip(labels, applied, strict=True)}
        positions = (
            [n for n, (lab, off) in enumerate(origins) if off > done[lab]]
            if origins
            else list(range(len(events)))
        )
        keep = [events[n] for n in positions]
        result = BatchResult(events=len(keep), skipped=len(events) - len(keep), applied=positions)
        if not keep:
            return result
        marks = {}
        for lab, off in origins:
            marks[lab] = max(off, marks.get(lab, -1))
        writes = self._learn(keep, snapshot, result)
        watermarks = [(self.keys.watermark(lab), done[lab], marks[lab]) for lab in labels]
        if self.atomic:
            await self._write_script(writes, watermarks, len(keep))
        else:
            await self._write_pipelined(writes, watermarks, len(keep))
        result.max_ts = max(e.ts for e in keep)
        return result

    # --- read ---------------------------------------------------------------------------------
    def _entities(self, events: Sequence[Interaction]) -> tuple[list[str], list[str]]:
        learners = [e for e in events if e.type in INTERACTIONS]
        return sorted({e.user_id for e in learners}), sorted({e.item_id for e in learners})

    async def _read_script(
        self, events: Sequence[Interaction], mark_keys: list[str]
    ) -> tuple[_Snapshot, list[int]]:
        keys = self.keys
        users, items = self._entities(events)
        query = {
            "landmark": keys.decay_landmark,
            "first_ts": repr(min(e.ts for e in events)),
            "mean": keys.rating_mean,
            "vectors": [keys.user_vector(u) for u in users] + [keys.item_vector(i) for i in items],
            "histories": [keys.history(u) for u in users],
            "window": self.config.history_window,
            "marks": mark_keys,
        }
        landmark, mean, blobs, windows, marks = await self.scripts.read_batch(
            args=[json.dumps(query, separators=(",", ":"))]
        )
        snapshot = await self._snapshot(events, users, items, landmark, mean, blobs, windows)
        return snapshot, [int(m) if m is not None else -1 for m in marks]

    async def _read_pipelined(
        self, events: Sequence[Interaction], mark_keys: list[str]
    ) -> tuple[_Snapshot, list[int]]:
        keys = self.keys
        users, items = self._entities(events)
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(keys.decay_landmark, repr(min(e.ts for e in events)), nx=True, get=True)
        pipe.hmget(keys.rating_mean, "sum", "n")
        for u in users:
            pipe.get(keys.user_vector(u))
        for i in items:
            pipe.get(keys.item_vector(i))
        for u in users:
            pipe.zrevrange(keys.history(u), 0, self.config.history_window - 1)
        for key in mark_keys:
            pipe.get(key)
        replies = await pipe.execute()
        n = len(users) + len(items)
        blobs = replies[2 : 2 + n]
        windows = replies[2 + n : 2 + n + len(users)]
        marks = replies[2 + n + len(users) :]
        snapshot = await self._snapshot(
            events, users, items, replies[0], replies[1], blobs, windows
        )
        return snapshot, [int(m) if m is not None else -1 for m in marks]

    async def _snapshot(
        self,
        events: Sequence[Interaction],
        users: list[str],
        items: list[str],
        landmark_raw: bytes | None,
        mean_raw: list[bytes | None],
        blobs: list[bytes | None],
        windows_raw: list[list[bytes]],
    ) -> _Snapshot:
        cfg = self.config
        landmark = float(landmark_raw) if landmark_raw is not None else min(e.ts for e in events)
        decay = ForwardDecay(cfg.decay_rate, landmark)
        newest = max(e.ts for e in events)
        if decay.needs_rebase(newest):
            await self.rebase(decay, newest)
            raise _Retry
        width = vector_width(cfg.factors)
        names = [f"u:{u}" for u in users] + [f"i:{i}" for i in items]
        vectors: dict[str, np.ndarray] = {}
        for name, blob in zip(names, blobs, strict=True):
            if blob is not None and len(blob) == 4 * width:
                vectors[name] = decode_vector(blob)
            else:
                kind, entity = name.split(":", 1)
                vectors[name] = initial_vector(entity, kind, cfg.factors, cfg.init_std, cfg.seed)
        windows = {u: [m.decode() for m in w] for u, w in zip(users, windows_raw, strict=True)}
        return _Snapshot(
            landmark=landmark,
            mean_sum=float(mean_raw[0] or 0.0),
            mean_n=int(mean_raw[1] or 0),
            vectors=vectors,
            windows=windows,
        )

    # --- learn (pure) --------------------------------------------------------------------------
    def _learn(self, events: Sequence[Interaction], s: _Snapshot, result: BatchResult) -> _Writes:
        cfg = self.config
        k = cfg.factors
        decay = ForwardDecay(cfg.decay_rate, s.landmark)
        vectors = {name: vec.copy() for name, vec in s.vectors.items()}
        out = _Writes()
        pool = sorted({e.item_id for e in events if e.type in INTERACTIONS})
        # All negative draws of the batch at once: one generator call, not one per event.
        picks = self._rng.integers(0, max(len(pool), 1), (len(events), cfg.implicit_negatives))
        mean_sum, mean_n = s.mean_sum, s.mean_n
        for n, ev in enumerate(events):
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
            self._implicit(implicit_part(uvec, k), item, confidence, pool, picks[n], vectors)

            weight = decay.weight(ev.ts)
            window = s.windows[user]
            for other in window:
                if other != item:
                    out.pairs[item][other] += weight
                    out.pairs[other][item] += weight
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

    def _implicit(
        self,
        y_user: np.ndarray,
        positive: str,
        confidence: float,
        pool: list[str],
        picks: np.ndarray,
        vectors: dict[str, np.ndarray],
    ) -> None:
        """The event (preference 1, confidence c) and its sampled negatives (0, 1) in one step."""
        k = self.config.factors
        names = [positive]
        for pick in picks.tolist():
            other = pool[pick]
            if other not in names:
                names.append(other)
        rows = [implicit_part(vectors["i:" + name], k) for name in names]
        preferences = np.zeros(len(names))
        preferences[0] = 1.0
        confidences = np.ones(len(names))
        confidences[0] = confidence
        cfg = self.config
        implicit_step(y_user, rows, preferences, confidences, cfg.implicit_lr, cfg.reg)

    # --- write -------------------------------------------------------------------------------
    def _vector_key(self, name: str) -> tuple[str, int]:
        kind, entity = name.split(":", 1)
        if kind == "u":
            return self.keys.user_vector(entity), self.config.user_ttl_s
        return self.keys.item_vector(entity), 0

    def _increment_sets(self, w: _Writes) -> list[tuple[str, int, int, dict[str, float]]]:
        """(key, trim_to, ttl, member -> amount) for every sorted set the batch increments."""
        keys, cap = self.keys, self.config.neighbours_cap
        out = [(keys.neighbours(item), cap, 0, row) for item, row in w.pairs.items()]
        out += [
            (keys.occurrences, 0, 0, w.occurrences),
            (keys.popularity, 0, 0, w.popularity),
            (keys.clicks, 0, 0, w.clicks),
            (keys.impressions, 0, 0, w.impressions),
        ]
        return [entry for entry in out if entry[3]]

    @staticmethod
    def _changed_items(w: _Writes) -> list[str]:
        """Items whose vector or neighbour list the batch changes: what readers must refetch."""
        vectors = (name[2:] for name in w.deltas if name.startswith("i:"))
        return list(dict.fromkeys([*vectors, *w.pairs]))

    async def _write_script(
        self, w: _Writes, watermarks: list[tuple[str, int, int]], applied: int
    ) -> None:
        cfg, keys = self.config, self.keys
        names = list(w.deltas)
        vector_keys = [self._vector_key(name) for name in names]
        ops = {
            "marks": watermarks,
            "width": vector_width(cfg.factors),
            "vectors": [key for key, _ in vector_keys],
            "ttls": [ttl for _, ttl in vector_keys],
            "increments": [
                (key, trim, ttl, list(row), list(row.values()))
                for key, trim, ttl, row in self._increment_sets(w)
            ],
            "histories": [
                (
                    keys.history(user),
                    cfg.history_cap,
                    cfg.user_ttl_s,
                    list(seen),
                    list(seen.values()),
                )
                for user, seen in w.history.items()
            ],
            "first_seen": (keys.item_first_seen, list(w.first_seen), list(w.first_seen.values())),
            "mean": (keys.rating_mean, w.mean_sum, w.mean_n) if w.mean_n else (),
            "counters": [(keys.impressions_total, sum(w.impressions.values()))]
            if w.impressions
            else [],
            "stats": (keys.worker_stats, applied, repr(time.time())),
            "dirty": (keys.dirty_users, list(w.history), time.time()),
            "updated": (keys.updated_items, self._changed_items(w)),
        }
        deltas = _pack([w.deltas[n] for n in names])
        bases = _pack([w.bases[n] for n in names])
        done = await self.scripts.apply_batch(
            args=[json.dumps(ops, separators=(",", ":")), deltas, bases]
        )
        if not done:
            raise _Retry  # another worker applied one of these partitions since the read

    async def _write_pipelined(
        self, w: _Writes, watermarks: list[tuple[str, int, int]], applied: int
    ) -> None:
        cfg, keys = self.config, self.keys
        pipe = self.redis.pipeline(transaction=False)
        for name, delta in w.deltas.items():
            key, ttl = self._vector_key(name)
            args = [encode_vector(delta), encode_vector(w.bases[name]), ttl]
            await self.scripts.add_vector(keys=[key], args=args, client=pipe)
        if w.mean_n:
            pipe.hincrbyfloat(keys.rating_mean, "sum", w.mean_sum)
            pipe.hincrby(keys.rating_mean, "n", w.mean_n)
        for key, trim, ttl, row in self._increment_sets(w):
            args: list[object] = [trim, ttl]
            for member, amount in row.items():
                args.append(member)
                args.append(repr(amount))
            await self.scripts.zincrby_many(keys=[key], args=args, client=pipe)
        if w.impressions:
            pipe.incrbyfloat(keys.impressions_total, sum(w.impressions.values()))
        if w.first_seen:
            pipe.zadd(keys.item_first_seen, w.first_seen, lt=True)
        for user, seen in w.history.items():
            key = keys.history(user)
            pipe.zadd(key, seen, gt=True)
            pipe.zremrangebyrank(key, 0, -cfg.history_cap - 1)
            pipe.expire(key, cfg.user_ttl_s)
        if w.history:
            pipe.zadd(keys.dirty_users, dict.fromkeys(w.history, time.time()), nx=True)
        if changed := self._changed_items(w):
            await self.scripts.stamp_now(keys=[keys.updated_items], args=changed, client=pipe)
        pipe.hincrby(keys.worker_stats, "events", applied)
        pipe.hset(keys.worker_stats, "applied_at", repr(time.time()))
        for key, _, offset in watermarks:  # last: a batch cut short is redelivered whole
            pipe.set(key, offset)
        await pipe.execute()

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


def _pack(vectors: list[np.ndarray]) -> bytes:
    """float32 vectors back to back, the form the batch script reads them in."""
    if not vectors:
        return b""
    return np.asarray(vectors, dtype=VECTOR_DTYPE).tobytes()
