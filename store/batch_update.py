"""Apply one batch of interactions to the state in Redis: one read, one atomic write.

The read fetches what the batch needs (the vectors it touches, the users' histories, the
rating mean, the decay landmark and rate, the partitions' offset watermarks, which of its event
ids each user applied before). The batch less repeated events is then learned
*sequentially* in memory from that snapshot (`freshrec.models.interaction_learner`), so an item
that appears twice in a batch sees its own first update, exactly as a one-event-at-a-time
learner would. The write sends only *deltas* and increments, aggregated per key, applied by
server-side scripts, so two workers touching the same hot item lose nothing.

On a single Redis the read and the write of a step are one script call each, and the write is
atomic with the per-partition offset watermarks: a message at or below its partition's
watermark was applied already (Kafka redelivered it after a crash or rebalance) and is skipped,
as is an event whose ``event_id`` its user applied before (a producer's retry), and a crash
mid-step applies nothing of it. A batch is one step, or several when its write
would hold Redis longer than `WRITE_TARGET_S` (`StepSize`), split between messages (a
message's events always share a step: its offset is one watermark). On Redis Cluster the same
changes go as pipelined single-key commands and scripts, watermarks last: at least once
(``atomic=False``).

A batch may carry hash writes of its own (`HashWrites`: the impressions it remembers, the
clicks it attributes), asked of the caller once the step knows which of its events are new
and written in the step's own write: they land with the watermarks or not at all, so a
redelivered batch, skipped by its watermarks, has them already.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from itertools import compress
from typing import Any, Protocol

import numpy as np
import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from freshrec.models.config import ModelConfig
from freshrec.models.decay import ForwardDecay
from freshrec.models.interaction_learner import (
    INTERACTIONS,
    Changes,
    Interaction,
    InteractionLearner,
    Snapshot,
)
from freshrec.models.learned_pairs import PairRows
from freshrec.models.mf import VectorTable, vector_width
from freshrec.models.rating_stack import (
    PAIR_FIELDS,
    PRIOR_BYTES,
    RECORD_HEAD,
    decode_records,
    decode_state,
    encode_state,
)
from freshrec.store.keys import Keys
from freshrec.store.script_pipeline import script_pipeline
from freshrec.store.server_scripts import ServerScripts
from freshrec.store.vectors import VECTOR_DTYPE, decode_vector, encode_vector

__all__ = ["INTERACTIONS", "BatchResult", "BatchUpdater", "HashWrites", "Interaction", "Origin"]

log = logging.getLogger(__name__)

Origin = tuple[str, int]
"""Where an event came from: (partition label such as ``"freshrec.events/3"``, offset)."""

MAX_EVENTS_PER_WRITE = 2_000
"""Events per read-learn-write step at most (whole messages)."""
WRITE_TARGET_S = 0.25
"""How long one step's write should hold Redis: every reader's request waits behind it, and
this is an eighth of a reader's 2 s deadline. Shorter steps re-read and re-write the hot keys
more often."""
FIRST_STEP = 100
"""Events of the first step, before any write has been timed."""
REBASE_LOCK_MS = 60_000
"""How long a rebase's lock lasts unless its holder extends it: what a crashed holder costs."""


@dataclass
class BatchResult:
    """What a batch did: for metrics and the prequential error."""

    events: int = 0
    skipped: int = 0  # redelivered (at or below a watermark) or repeated (`duplicates`)
    duplicates: int = 0  # events whose event_id their user had already applied
    rating_errors: list[float] = field(default_factory=list)
    max_ts: float = 0.0
    applied: list[int] = field(default_factory=list)  # input positions learned, not skipped


@dataclass
class HashWrites:
    """Hash fields a batch sets (each hash then expiring after ``ttl_s``) and deletes in its
    own write; keys and fields as ``str``, values as JSON text."""

    set: dict[str, dict[str, str]] = field(default_factory=dict)
    ttl_s: int = 0
    delete: dict[str, list[str]] = field(default_factory=dict)


WritesFor = Callable[[list[int]], Awaitable[HashWrites]]
"""Asked for a step's `HashWrites`, given the positions (in the batch) of its new events."""


class _Retry(Exception):
    """The state moved under the batch (landmark rebased, a partition applied by another
    worker); the batch is read and learned again."""


class StateWentBack(Exception):
    """A partition's watermark in Redis is below one this updater wrote or read before: Redis
    lost writes it had acknowledged (restarted from an older snapshot or backup, a failover to
    a replica that was behind, a flush). Watermarks only ever move forward otherwise, whichever
    worker writes them. Carrying on would leave the lost messages unapplied for good, since
    Kafka goes on after what this process consumed; a process started again resumes after the
    watermarks (`freshrec.streams.worker`). On Redis Cluster this watches the watermarks' own
    slot only: a shard of other state that went back is not seen."""

    def __init__(self, behind: dict[str, tuple[int, int]]) -> None:
        self.behind = behind  # partition label -> (highest watermark seen, watermark now)
        shown = ", ".join(f"{lab} {now} < {seen}" for lab, (seen, now) in sorted(behind.items()))
        super().__init__(f"offset watermarks below what this worker saw: {shown}")


class Identified(Interaction, Protocol):
    """An interaction with the producer's ``event_id`` (None: none given), as
    `freshrec.streams.events.Event` has."""

    event_id: str | None


class DecayRateMismatch(Exception):
    """The state's forward-decayed sums grow at another rate than this updater's half-life
    gives. Adding to them at this rate would mix two scales in one sum; no retry can fix it,
    only the state's half-life (or an empty state)."""

    def __init__(self, stored: float, configured: float) -> None:
        self.stored, self.configured = stored, configured
        super().__init__(
            f"the state in Redis decays with a half-life of {math.log(2.0) / stored:g} s "
            f"(rate {stored!r}/s), this worker with {math.log(2.0) / configured:g} s: set "
            "FRESHREC_DECAY_HALF_LIFE_S to the state's, or start from an empty state"
        )


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
    max_events
        Events per step at most (`MAX_EVENTS_PER_WRITE`).
    write_target_s
        How long one step's write should hold Redis (`StepSize`).
    """

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        config: ModelConfig,
        atomic: bool = True,
        max_events: int = MAX_EVENTS_PER_WRITE,
        write_target_s: float = WRITE_TARGET_S,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.config = config
        self.atomic = atomic
        self.step = StepSize(write_target_s, max_events)
        self.scripts = ServerScripts(redis)
        self.learner = InteractionLearner(config)
        # Partition label -> the highest watermark Redis has shown this updater or taken from
        # it: a value it acknowledged, so never to be seen lower.
        self.marks_seen: dict[str, int] = {}

    async def apply(
        self,
        events: Sequence[Identified],
        origins: Sequence[Origin] | None = None,
        arrived: float | None = None,
        writes_for: WritesFor | None = None,
    ) -> BatchResult:
        """Learn ``events``; with ``origins`` (one per event), skip what was applied before.

        ``arrived`` (wall clock, unix seconds) is when the batch's oldest message reached Kafka:
        the users it touches are marked for publication from then, so the publisher's delay is
        the event-to-published freshness. Without it, from now. ``writes_for`` gives the hash
        writes that go with each step's write; it may be asked again for a step read again.
        """
        if origins is not None and len(origins) != len(events):
            raise ValueError("origins must have one entry per event")
        if not events:
            return BatchResult()
        total = BatchResult()
        start = 0
        while start < len(events):
            end = _step_end(origins, start, len(events), self.step.events)
            part = await self._apply_step(
                events[start:end],
                origins[start:end] if origins else [],
                arrived,
                _shifted(writes_for, start) if writes_for else None,
            )
            total.events += part.events
            total.skipped += part.skipped
            total.duplicates += part.duplicates
            total.rating_errors.extend(part.rating_errors)
            total.max_ts = max(total.max_ts, part.max_ts)
            total.applied.extend(start + n for n in part.applied)
            start = end
        return total

    async def _apply_step(
        self,
        events: Sequence[Identified],
        origins: Sequence[Origin],
        arrived: float | None,
        writes_for: WritesFor | None,
    ) -> BatchResult:
        while True:
            try:
                return await self._apply_once(events, origins, arrived, writes_for)
            except _Retry:
                continue

    async def _apply_once(
        self,
        events: Sequence[Identified],
        origins: Sequence[Origin],
        arrived: float | None,
        writes_for: WritesFor | None,
    ) -> BatchResult:
        labels = sorted({label for label, _ in origins})
        read = self._read_script if self.atomic else self._read_pipelined
        snapshot, applied, known = await read(events, [self.keys.watermark(lab) for lab in labels])
        done = {lab: mark for lab, mark in zip(labels, applied, strict=True)}
        seen = self.marks_seen
        behind = {lab: (seen[lab], mark) for lab, mark in done.items() if mark < seen.get(lab, -1)}
        if behind:
            raise StateWentBack(behind)
        seen.update(done)
        positions = (
            [n for n, (lab, off) in enumerate(origins) if off > done[lab]]
            if origins
            else list(range(len(events)))
        )
        fresh = len(positions)
        if self.config.dedup_events:
            positions = _unrepeated(events, positions, known)
        keep = [events[n] for n in positions]
        result = BatchResult(
            events=len(keep),
            skipped=len(events) - len(keep),
            duplicates=fresh - len(keep),
            applied=positions,
        )
        if not keep and not result.duplicates:  # all redelivered: the watermarks are past it
            return result
        # Never below what is applied: a partition whose part of the batch was all redelivered
        # keeps its watermark (its batch maximum would move it back, and what follows it
        # would be learned again).
        marks = dict(done)
        for lab, off in origins:
            marks[lab] = max(off, marks.get(lab, -1))
        hashes = await writes_for(positions) if writes_for and positions else HashWrites()
        writes = self.learner.learn_many(keep, snapshot)
        ids = {
            user: _newest(at, self.config.dedup_events)
            for user, at in self._event_ids(keep).items()
        }
        result.rating_errors.extend(writes.rating_errors)
        watermarks = [(self.keys.watermark(lab), done[lab], marks[lab]) for lab in labels]
        clock = max((e.ts for e in keep if e.type in INTERACTIONS), default=None)
        touched_at = time.time() if arrived is None else arrived
        began = time.perf_counter()
        if self.atomic:
            await self._write_script(
                writes, watermarks, len(keep), clock, touched_at, snapshot.landmark, ids, hashes
            )
        else:
            await self._write_pipelined(
                writes, watermarks, len(keep), clock, touched_at, ids, hashes
            )
        self.step.timed(len(keep), time.perf_counter() - began)
        seen.update(marks)
        result.max_ts = clock or 0.0
        return result

    # --- read ---------------------------------------------------------------------------------
    def _entities(self, events: Sequence[Identified]) -> tuple[list[str], list[str]]:
        learners = [e for e in events if e.type in INTERACTIONS]
        return sorted({e.user_id for e in learners}), sorted({e.item_id for e in learners})

    @staticmethod
    def _raters(events: Sequence[Identified]) -> dict[str, list[str]]:
        """User -> the distinct items they rate in the batch, in order."""
        out: dict[str, dict[str, None]] = {}
        for e in events:
            if e.type == "rating":
                out.setdefault(e.user_id, {})[e.item_id] = None
        return {user: list(items) for user, items in out.items()}

    def _event_ids(self, events: Sequence[Identified]) -> dict[str, dict[str, float]]:
        """Per user, the ids of ``events`` that carry one -> event time; none when
        ``dedup_events`` is 0."""
        out: dict[str, dict[str, float]] = {}
        if self.config.dedup_events:
            for e in events:
                if e.event_id is not None:
                    out.setdefault(e.user_id, {})[e.event_id] = e.ts
        return out

    async def _read_script(
        self, events: Sequence[Identified], mark_keys: list[str]
    ) -> tuple[Snapshot, list[int], set[tuple[str, str]]]:
        keys = self.keys
        users, items = self._entities(events)
        raters = self._raters(events)
        asked = self._event_ids(events)
        query = {
            "landmark": keys.decay_landmark,
            "rate": [keys.decay_rate, repr(self.config.decay_rate)],
            "mean": keys.rating_mean,
            "vectors": [keys.user_vector(u) for u in users] + [keys.item_vector(i) for i in items],
            "histories": [keys.history(u) for u in users],
            "window": self.config.cooccurrence_history,
            "marks": mark_keys,
            "ratings": [
                (keys.rating_history(u), [keys.rating_pairs(i) for i in rated], rated)
                for u, rated in raters.items()
            ],
            "rating_history": self.config.rating_history,
            "item_ratings": keys.item_ratings,
            "blend": keys.rating_blend,
            "ids": [(keys.event_ids(user), list(ids)) for user, ids in asked.items()],
        }
        if (first := _first_decayed(events)) is not None:
            query["first_ts"] = repr(first)
        read = await self.scripts.read_batch(args=[_json(query)])
        landmark, mean, blobs, histories, marks, rated, blend, rate, found = read
        self._check_rate(rate)
        snapshot = await self._snapshot(events, users, items, landmark, mean, blobs, histories)
        _rating_state(snapshot, raters, rated, blend)
        marked = [int(m) if m is not None else -1 for m in marks]
        return snapshot, marked, _known_ids(asked, found)

    def _check_rate(self, stored: bytes | None) -> None:
        """Refuses a state whose sums decay at another rate (`DecayRateMismatch`)."""
        if stored is not None and float(stored) != self.config.decay_rate:
            raise DecayRateMismatch(float(stored), self.config.decay_rate)

    async def _read_pipelined(
        self, events: Sequence[Identified], mark_keys: list[str]
    ) -> tuple[Snapshot, list[int], set[tuple[str, str]]]:
        keys = self.keys
        users, items = self._entities(events)
        asked = self._event_ids(events)
        pipe = self.redis.pipeline(transaction=False)
        for user, ids in asked.items():
            pipe.zmscore(keys.event_ids(user), list(ids))
        if (first := _first_decayed(events)) is not None:
            pipe.set(keys.decay_landmark, repr(first), nx=True, get=True)
            pipe.set(keys.decay_rate, repr(self.config.decay_rate), nx=True, get=True)
        else:
            pipe.get(keys.decay_landmark)
            pipe.get(keys.decay_rate)
        pipe.hmget(keys.rating_mean, "sum", "n")
        for u in users:
            pipe.get(keys.user_vector(u))
        for i in items:
            pipe.get(keys.item_vector(i))
        for u in users:
            pipe.zrevrange(keys.history(u), 0, self.config.cooccurrence_history - 1)
        for key in mark_keys:
            pipe.get(key)
        raters = self._raters(events)
        for u in raters:
            pipe.lrange(keys.rating_history(u), 0, self.config.rating_history - 1)
        pipe.get(keys.rating_blend)
        replies = await pipe.execute()
        found, (landmark, rate, *replies) = replies[: len(asked)], replies[len(asked) :]
        self._check_rate(rate)
        n = len(users) + len(items)
        blobs = replies[1 : 1 + n]
        histories = replies[1 + n : 1 + n + len(users)]
        marks = replies[1 + n + len(users) : 1 + n + len(users) + len(mark_keys)]
        records = replies[1 + n + len(users) + len(mark_keys) : -1]
        snapshot = await self._snapshot(
            events, users, items, landmark, replies[0], blobs, histories
        )
        # Each item's pairs are a key of their own: a second round, once the partners are known.
        pipe = self.redis.pipeline(transaction=False)
        for rated, raw in zip(raters.values(), records, strict=True):
            partners = [r[RECORD_HEAD:] for r in raw] + [i.encode() for i in rated]
            for i in rated:
                pipe.hmget(keys.rating_pairs(i), partners)
            pipe.zmscore(keys.item_ratings, partners)
        stats = await pipe.execute()
        rated_raw, at = [], 0
        for rated, raw in zip(raters.values(), records, strict=True):
            rated_raw.append([raw, stats[at : at + len(rated)], stats[at + len(rated)]])
            at += len(rated) + 1
        _rating_state(snapshot, raters, rated_raw, replies[-1])
        marked = [int(m) if m is not None else -1 for m in marks]
        return snapshot, marked, _known_ids(asked, found)

    async def _snapshot(
        self,
        events: Sequence[Identified],
        users: list[str],
        items: list[str],
        landmark_raw: bytes | None,
        mean_raw: list[bytes | None],
        blobs: list[bytes | None],
        histories_raw: list[list[bytes]],
    ) -> Snapshot:
        cfg = self.config
        # Only interactions are weighed by decay: an impression's time moves no landmark.
        first = _first_decayed(events)
        landmark = float(landmark_raw) if landmark_raw is not None else (first or 0.0)
        decay = ForwardDecay(cfg.decay_rate, landmark)
        newest = max((e.ts for e in events if e.type in INTERACTIONS), default=landmark)
        if decay.needs_rebase(newest):
            await self.rebase(decay, newest)
            raise _Retry
        width = vector_width(cfg.factors)
        names = [f"u:{u}" for u in users] + [f"i:{i}" for i in items]
        initial = VectorTable(cfg.factors, cfg.init_std, cfg.seed).initial
        vectors: dict[str, np.ndarray] = {}
        for name, blob in zip(names, blobs, strict=True):
            if blob is not None and len(blob) == 4 * width:
                vectors[name] = decode_vector(blob)
            else:
                vectors[name] = initial(name)
        histories = {u: [m.decode() for m in h] for u, h in zip(users, histories_raw, strict=True)}
        return Snapshot(
            landmark=landmark,
            mean_sum=float(mean_raw[0] or 0.0),
            mean_n=int(mean_raw[1] or 0),
            vectors=vectors,
            histories=histories,
        )

    # --- write -------------------------------------------------------------------------------
    def _vector_key(self, name: str) -> tuple[str, int]:
        kind, entity = name.split(":", 1)
        if kind == "u":
            return self.keys.user_vector(entity), self.config.user_ttl_s
        return self.keys.item_vector(entity), 0

    def _increment_sets(self, w: Changes) -> list[tuple[str, int, int, dict[str, float]]]:
        """(key, trim_to, ttl, member -> amount) for every sorted set the batch increments."""
        keys, cap = self.keys, self.config.neighbours_cap
        out = [(keys.neighbours(item), cap, 0, row) for item, row in w.pairs.items()]
        out += [
            (keys.item_ratings, 0, 0, w.item_ratings),
            (keys.occurrences, 0, 0, w.occurrences),
            (keys.popularity, 0, 0, w.popularity),
            (keys.clicks, 0, 0, w.clicks),
            (keys.impressions, 0, 0, w.impressions),
        ]
        return [entry for entry in out if entry[3]]

    @staticmethod
    def _changed_rows(w: Changes) -> list[str]:
        """Items whose vector or statistics (a reader's row of them) the batch changes."""
        vectors = (name[2:] for name in w.deltas if name.startswith("i:"))
        return list(dict.fromkeys([*vectors, *w.occurrences, *w.popularity, *w.first_seen]))

    @staticmethod
    def _active_items(w: Changes, rows: list[str]) -> list[str]:
        """Items the batch writes anything about (``rows``: its `_changed_rows`): retention
        keeps them for another TTL."""
        return list(dict.fromkeys([*rows, *w.pairs, *w.impressions, *w.clicks]))

    async def _write_script(
        self,
        w: Changes,
        watermarks: list[tuple[str, int, int]],
        applied: int,
        clock: float | None,
        touched_at: float,
        landmark: float,
        ids: dict[str, dict[str, float]],
        hashes: HashWrites,
    ) -> None:
        cfg, keys = self.config, self.keys
        ttl = cfg.user_ttl_s
        names = list(w.deltas)
        rows = self._changed_rows(w)
        vector_keys = [self._vector_key(name) for name in names]
        records = _encoded_records(w)
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
            ]
            + [  # the same capped, expiring sets, of event ids
                (keys.event_ids(user), cfg.dedup_events, ttl, list(at), list(at.values()))
                for user, at in ids.items()
            ],
            "first_seen": (keys.item_first_seen, list(w.first_seen), list(w.first_seen.values())),
            "hset": [
                (key, hashes.ttl_s, list(fields), list(fields.values()))
                for key, fields in hashes.set.items()
            ],
            "hdel": list(hashes.delete.items()),
            "mean": (keys.rating_mean, w.mean_sum, w.mean_n) if w.mean_n else (),
            "counters": [(keys.impressions_total, sum(w.impressions.values()))]
            if w.impressions
            else [],
            "stats": (keys.worker_stats, applied, repr(time.time())),
            "dirty": (keys.dirty_users, list(w.history), touched_at),
            "updated": (keys.updated_items, rows),
            "relisted": (keys.relisted_items, list(w.pairs)),
            "active": (keys.active_items, self._active_items(w, rows)),
            "rating_pairs": [
                (keys.rating_pairs(item), cfg.rating_pairs_cap, "\n".join(row.partners))
                for item, row in w.rating_pairs.items()
            ],
            "rating_records": [
                (
                    keys.rating_history(user),
                    cfg.rating_history,
                    cfg.user_ttl_s,
                    [len(r) for r in encoded],
                )
                for user, encoded in records.items()
            ],
        }
        if w.blend is not None:
            ops["blend"] = keys.rating_blend
        if clock is not None:  # absent, not null: Lua reads JSON null as a true value
            ops["landmark"] = (keys.decay_landmark, keys.decay_rebase_lock, repr(landmark))
            ops["clock"] = (keys.event_clock, clock, repr(clock))
        deltas, bases, updated = _vector_changes(
            [w.deltas[n] for n in names], [w.bases[n] for n in names]
        )
        pair_deltas = b"".join(_pack(row.stats) for row in w.rating_pairs.values())
        blend = (encode_state(w.blend), PRIOR_BYTES) if w.blend is not None else (b"", b"")
        done = await self.scripts.apply_batch(
            args=[
                _json(ops),
                deltas,
                bases,
                pair_deltas,
                b"".join(r for encoded in records.values() for r in encoded),
                *blend,
                updated,
            ]
        )
        if done == -2:  # a rebase under way: read again once it is over
            await self._rebase_over()
        if done != 1:
            raise _Retry  # another worker applied one of these partitions, or rebased

    async def _write_pipelined(
        self,
        w: Changes,
        watermarks: list[tuple[str, int, int]],
        applied: int,
        clock: float | None,
        touched_at: float,
        ids: dict[str, dict[str, float]],
        hashes: HashWrites,
    ) -> None:
        cfg, keys = self.config, self.keys
        pipe = script_pipeline(self.redis)
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
        for item, row in w.rating_pairs.items():
            args = [cfg.rating_pairs_cap, _pack(row.stats), *row.partners]
            await self.scripts.add_rating_pairs(
                keys=[keys.rating_pairs(item)], args=args, client=pipe
            )
        for user, encoded in _encoded_records(w).items():
            args = [cfg.rating_history, cfg.user_ttl_s, *encoded]
            await self.scripts.push_records(
                keys=[keys.rating_history(user)], args=args, client=pipe
            )
        if w.blend is not None:
            args = [encode_state(w.blend), PRIOR_BYTES]
            await self.scripts.add_doubles(keys=[keys.rating_blend], args=args, client=pipe)
        if w.impressions:
            pipe.incrbyfloat(keys.impressions_total, sum(w.impressions.values()))
        if w.first_seen:
            pipe.zadd(keys.item_first_seen, w.first_seen, lt=True)
        if clock is not None:
            await self.scripts.raise_clock(keys=[keys.event_clock], args=[repr(clock)], client=pipe)
        capped = [(keys.history(user), cfg.history_cap, seen) for user, seen in w.history.items()]
        capped += [(keys.event_ids(user), cfg.dedup_events, at) for user, at in ids.items()]
        for key, cap, members in capped:
            pipe.zadd(key, members, gt=True)
            pipe.zremrangebyrank(key, 0, -cap - 1)
            pipe.expire(key, cfg.user_ttl_s)
        for key, fields in hashes.set.items():
            pipe.hset(key, mapping=fields)
            if hashes.ttl_s > 0:
                pipe.expire(key, hashes.ttl_s)
        for key, names in hashes.delete.items():
            pipe.hdel(key, *names)
        if w.history:
            pipe.zadd(keys.dirty_users, dict.fromkeys(w.history, touched_at), nx=True)
        rows = self._changed_rows(w)
        if rows:
            await self.scripts.stamp_now(keys=[keys.updated_items], args=rows, client=pipe)
        if relisted := list(w.pairs):
            await self.scripts.stamp_now(keys=[keys.relisted_items], args=relisted, client=pipe)
        if active := self._active_items(w, rows):
            await self.scripts.stamp_now(keys=[keys.active_items], args=active, client=pipe)
        pipe.hincrby(keys.worker_stats, "events", applied)
        pipe.hset(keys.worker_stats, "applied_at", repr(time.time()))
        # Last: a batch cut short is redelivered whole. Only ever raised: a worker that read
        # before another applied the same partition (a rebalance) must not move it back.
        for key, _, offset in watermarks:
            await self.scripts.raise_clock(keys=[key], args=[offset], client=pipe)
        await pipe.execute()

    async def rebase(self, decay: ForwardDecay, now: float) -> None:
        """Move the landmark to ``now`` and rescale every forward-decayed sum, under a lock.

        Each rescale is a single-key ``ZUNIONSTORE key 1 key WEIGHTS f``; the new landmark is
        written in the same transaction, so readers see either the old scale or the new one.
        Other workers wait for the lock to clear, then re-read the landmark. The lock holds a
        token of this call's, its time is extended while the keys are listed, and only its
        holder releases it: a rebase whose lock expired gives way to whoever holds it now
        instead of rescaling beside them. On a single Redis
        the batch script refuses a write while the lock is held or once the landmark it was
        read at has moved, so no batch lands at the old scale after the rescale, nor creates a
        sum the scan has passed; the batch is read and learned again. Redis Cluster's
        pipelined writes have no such check: a batch that spans a rebase can land at the old
        scale there.
        """
        lock, token = self.keys.decay_rebase_lock, secrets.token_hex(16)
        if not await self.redis.set(lock, token, nx=True, px=REBASE_LOCK_MS):
            await self._rebase_over()
            return
        try:
            current = await self.redis.get(self.keys.decay_landmark)
            if current is not None and float(current) != decay.landmark:
                return  # someone rebased between our read and the lock
            factor = decay.rebase_factor(now)
            targets = await self._rescaled_keys(lock, token)
            if targets is None or not await self._still_held(lock, token):
                return
            pipe = self.redis.pipeline(transaction=self.atomic)
            for key in targets:
                pipe.zunionstore(key, {key: factor})
            pipe.set(self.keys.decay_landmark, repr(now))
            await pipe.execute()
        finally:
            try:
                await self.scripts.held_lock(keys=[lock], args=[token, 0])
            except RedisError as exc:  # it expires; the rebase's own error, if any, goes on
                log.warning("rebase lock not released (%s): it expires within a minute", exc)

    async def _rescaled_keys(self, lock: str, token: str) -> list[str | bytes] | None:
        """Every forward-decayed sorted set, listed while the lock is ours (None once it is
        not): occurrences, popularity, and each item's neighbours. The lock is extended at the
        first key listed a third of its time after the last extension."""
        targets: list[str | bytes] = [self.keys.occurrences, self.keys.popularity]
        extended = time.monotonic()
        async for key in self.redis.scan_iter(match=self.keys.neighbours("*"), count=1000):
            targets.append(key)
            if time.monotonic() - extended > REBASE_LOCK_MS / 3000:
                if not await self._still_held(lock, token):
                    return None
                extended = time.monotonic()
        return targets

    async def _still_held(self, lock: str, token: str) -> bool:
        """Whether the lock is still this token's; if so, its time starts again."""
        return bool(await self.scripts.held_lock(keys=[lock], args=[token, REBASE_LOCK_MS]))

    async def _rebase_over(self) -> None:
        """Waits until no rebase is under way (its lock expires after a minute at most)."""
        deadline = time.monotonic() + REBASE_LOCK_MS / 1000
        while await self.redis.exists(self.keys.decay_rebase_lock) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # polling the lock, as Redis has no wait for a key


class StepSize:
    r"""Events per step, so that one step's write holds Redis about ``target_s``.

    A write's time grows with its events and with the state they meet (a rating's pairs grow
    with its user's history, an interaction's co-occurrences with the user's recent items),
    from tens of microseconds to milliseconds per event: no fixed count bounds it on every
    stream. Each write's time per event sets the next step,
    :math:`n \leftarrow \mathrm{clip}(\min(2n, \, t^* / \bar t), 1, n_{max})`, never more
    than doubling, so one cheap step does not let the next one run long.

    Examples
    --------
    >>> step = StepSize(0.25, 2_000)
    >>> step.events
    100
    >>> step.timed(100, 2.5); step.events  # 25 ms an event: ten fit in 250 ms
    10
    >>> step.timed(10, 0.001); step.events  # cheap now: grows, at most doubling
    20
    """

    def __init__(self, target_s: float, most: int, first: int = FIRST_STEP) -> None:
        if not target_s > 0 or most < 1:
            raise ValueError("a step needs a positive target time and at least one event")
        self.target_s = target_s
        self.most = most
        self.events = min(first, most)

    def timed(self, events: int, seconds: float) -> None:
        """A write of ``events`` took ``seconds``."""
        if events < 1:
            return
        fits = self.target_s * events / max(seconds, 1e-9)
        self.events = int(max(1, min(self.most, 2 * self.events, fits)))


def _step_end(origins: Sequence[Origin] | None, start: int, count: int, most: int) -> int:
    """The end of the step from ``start``: at most ``most`` events, cut only where the message
    changes (a message longer than ``most`` is a step of its own)."""
    end = min(start + most, count)
    if origins and end < count:
        cut = end
        while cut > start and origins[cut] == origins[cut - 1]:
            cut -= 1
        if cut == start:  # one message fills the step: take it whole
            cut = end
            while cut < count and origins[cut] == origins[cut - 1]:
                cut += 1
        end = cut
    return end


def _shifted(writes_for: WritesFor, start: int) -> WritesFor:
    """``writes_for`` of a step that begins at position ``start`` of the batch."""

    async def shifted(positions: list[int]) -> HashWrites:
        return await writes_for([start + n for n in positions])

    return shifted


def _json(value: Any) -> bytes:
    """A script's JSON argument; numpy scalars pass as numbers."""
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)


def _pack(vectors: Sequence[Sequence[float]] | np.ndarray) -> bytes:
    """float32 vectors back to back, the form the batch script reads them in."""
    if len(vectors) == 0:
        return b""
    return np.asarray(vectors, dtype=VECTOR_DTYPE).tobytes()


def _vector_changes(
    deltas: Sequence[np.ndarray], bases: Sequence[np.ndarray]
) -> tuple[bytes, bytes, bytes]:
    """The packed deltas, bases and updated vectors `APPLY_BATCH` takes. An updated vector is
    what the script computes from the stored float32 values: each sum in double precision, then
    rounded to float32, so setting it is the same as adding the delta on the server."""
    if not deltas:
        return b"", b"", b""
    delta = np.asarray(deltas, dtype=VECTOR_DTYPE)
    base = np.asarray(bases, dtype=VECTOR_DTYPE)
    updated = (base.astype(np.float64) + delta.astype(np.float64)).astype(VECTOR_DTYPE)
    return delta.tobytes(), base.tobytes(), updated.tobytes()


_PAIR_BYTES = 4 * PAIR_FIELDS  # a pair's statistics as stored: four float32


def _encoded_records(w: Changes) -> dict[str, list[bytes]]:
    return {user: [r.encode() for r in records] for user, records in w.rating_records.items()}


def _float64_rows(packed: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(packed), "<f4").astype(np.float64).reshape(-1, PAIR_FIELDS)


def _rating_state(
    snapshot: Snapshot,
    raters: dict[str, list[str]],
    replies: Sequence[Sequence[object]],
    blend: bytes | None,
) -> None:
    """Fills the snapshot's rating side from the read's replies: per rating user, their
    records, the pair statistics of each item they rate, and the partners' rating counts."""
    found: dict[str, tuple[list[str], list[bytes]]] = {}
    for (user, rated), (raw, stats, counts) in zip(raters.items(), replies, strict=True):
        records = decode_records(raw)  # type: ignore[arg-type]
        snapshot.ratings[user] = records
        partners = [r.item for r in records] + rated
        for item, values in zip(rated, stats, strict=True):  # type: ignore[call-overload]
            kept = [value is not None and len(value) == _PAIR_BYTES for value in values]
            named, packed = found.setdefault(item, ([], []))
            named += compress(partners, kept)
            packed += compress(values, kept)
        for partner, count in zip(partners, counts, strict=True):  # type: ignore[call-overload]
            if count is not None:
                snapshot.item_ratings[partner] = float(count)
    snapshot.rating_pairs = {
        item: PairRows(named, _float64_rows(packed)) for item, (named, packed) in found.items()
    }
    snapshot.blend = decode_state(blend)


def _first_decayed(events: Sequence[Identified]) -> float | None:
    """The earliest time of an event that decay weighs (an interaction), if any."""
    return min((e.ts for e in events if e.type in INTERACTIONS), default=None)


def _known_ids(
    asked: dict[str, dict[str, float]], found: Sequence[Sequence[float | None]]
) -> set[tuple[str, str]]:
    """(user, event id) of the ids asked for that their user's set holds."""
    return {
        (user, event_id)
        for (user, ids), scores in zip(asked.items(), found, strict=True)
        for event_id, score in zip(ids, scores, strict=True)
        if score is not None
    }


def _unrepeated(
    events: Sequence[Identified], positions: list[int], known: set[tuple[str, str]]
) -> list[int]:
    """``positions`` less the events whose ``event_id`` their user applied before (``known``)
    or that repeat an earlier one of these positions: a producer's retry or a file replayed
    again is learned once. Events without an id are all kept."""
    seen = set(known)
    out = []
    for n in positions:
        e = events[n]
        if e.event_id is not None:
            key = (e.user_id, e.event_id)
            if key in seen:
                continue
            seen.add(key)
        out.append(n)
    return out


def _newest(at: dict[str, float], most: int) -> dict[str, float]:
    """The ``most`` newest of ``at`` (id -> event time), ordered as a sorted set orders them
    (by time, then id): what a set capped at ``most`` keeps of them, whatever it held before.
    With the default 64, a set and what a batch adds to it stay within Redis's compact
    encoding (a listpack, up to 128 members of up to 64 bytes by default), which a set past
    it never returns to."""
    if len(at) <= most:
        return at
    return dict(sorted(at.items(), key=lambda pair: (pair[1], pair[0]))[-most:])
