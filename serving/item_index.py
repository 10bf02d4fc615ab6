"""The reader's in-memory item-factor matrix, kept fresh from Redis incrementally.

MF recall scores *every* item against the user's preference vector, which is one matrix-vector
product in memory but would be thousands of reads from Redis. Workers stamp each item whose
vector changed in a sorted set (item -> time of change); the index loads everything once, then
every ``refresh`` fetches only the items stamped since the last one. Staleness is bounded by the
refresh interval plus one fetch: a served MF score is never older than that.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from redis.asyncio import Redis

from models.keys import Keys
from models.mf import vector_width
from models.vectors import VECTOR_DTYPE

log = logging.getLogger(__name__)

FETCH_CHUNK = 2000
FULL_RELOAD_S = 300.0


class ItemIndex:
    """Implicit-preference factors ``y_i`` and statistics of all known items, one row each.

    Next to each factor row the index keeps the item's decayed occurrence count and
    popularity and its first-seen time, refreshed with the vector (an item's statistics change
    only when it is interacted with, which also changes its vector), so ranking features cost
    no Redis reads per request. A rebase of the decay landmark reloads everything.

    Parameters
    ----------
    redis
        Where the vectors live.
    keys
        The key layout.
    factors
        k: the stored vectors are ``[b, p_1..p_k, y_1..y_k]``; the index keeps ``y``.
    """

    def __init__(self, redis: Redis, keys: Keys, factors: int) -> None:
        self.redis = redis
        self.keys = keys
        self.factors = factors
        self.ids: list[str] = []
        self.rows: dict[str, int] = {}
        self.matrix = np.zeros((0, factors), dtype=np.float32)
        self.stats = np.zeros((0, 3))  # occurrences, popularity, first seen
        self.landmark: bytes | None = None
        self.refreshed_at = 0.0  # server-clock stamp of the newest change applied
        self.last_refresh = 0.0  # wall time the last refresh finished
        self.last_full = 0.0

    def __len__(self) -> int:
        return len(self.ids)

    async def refresh(self) -> int:
        """Apply every change stamped since the previous refresh; returns how many items."""
        landmark = await self.redis.get(self.keys.decay_landmark)
        if time.time() - self.last_full > FULL_RELOAD_S or landmark != self.landmark:
            self.refreshed_at, self.last_full, self.landmark = 0.0, time.time(), landmark
        changed = await self.redis.zrangebyscore(
            self.keys.updated_items, f"({self.refreshed_at!r}", "+inf", withscores=True
        )
        if not changed:
            self.last_refresh = time.time()
            return 0
        items = [m.decode() for m, _ in changed]
        newest = max(score for _, score in changed)
        width = vector_width(self.factors)
        for start in range(0, len(items), FETCH_CHUNK):
            chunk = items[start : start + FETCH_CHUNK]
            pipe = self.redis.pipeline(transaction=False)
            for item in chunk:
                pipe.get(self.keys.item_vector(item))
            pipe.zmscore(self.keys.occurrences, chunk)
            pipe.zmscore(self.keys.popularity, chunk)
            pipe.zmscore(self.keys.item_first_seen, chunk)
            *blobs, occ, pop, first = await pipe.execute()
            for n, (item, blob) in enumerate(zip(chunk, blobs, strict=True)):
                if blob is not None and len(blob) == 4 * width:
                    y = np.frombuffer(blob, dtype=VECTOR_DTYPE)[self.factors + 1 :]
                    self._put(item, y, (occ[n] or 0.0, pop[n] or 0.0, first[n] or 0.0))
        self.refreshed_at = newest
        self.last_refresh = time.time()
        return len(items)

    def _put(self, item: str, y: np.ndarray, stats: tuple[float, float, float]) -> None:
        row = self.rows.get(item)
        if row is None:
            row = len(self.ids)
            if row == len(self.matrix):
                size = max(1024, 2 * len(self.matrix))
                grown = np.zeros((size, self.factors), np.float32)
                grown[:row] = self.matrix[:row]
                self.matrix = grown
                grown_stats = np.zeros((size, 3))
                grown_stats[:row] = self.stats[:row]
                self.stats = grown_stats
            self.rows[item] = row
            self.ids.append(item)
        self.matrix[row] = y
        self.stats[row] = stats

    def lookup(self, items: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Factor rows and statistics rows for ``items`` (zeros where unknown)."""
        rows = np.array([self.rows.get(item, -1) for item in items], dtype=np.int64)
        known = rows >= 0
        if not known.any():
            return (
                np.zeros((len(items), self.factors), np.float32),
                np.zeros((len(items), 3)),
            )
        safe = np.where(known, rows, 0)
        vectors = np.where(known[:, None], self.matrix[safe], 0.0).astype(np.float32)
        stats = np.where(known[:, None], self.stats[safe], 0.0)
        return vectors, stats

    def scores(self, y_user: np.ndarray) -> np.ndarray:
        """``y_i . y_u`` for every item, in row order."""
        # np.dot, not @: the matmul path spins up BLAS threads, 15x slower on two busy cores.
        return np.dot(self.matrix[: len(self.ids)], y_user.astype(np.float32))

    def top(self, y_user: np.ndarray, n: int, exclude: set[str]) -> list[tuple[str, float]]:
        """The ``n`` best items by preference score, skipping ``exclude``."""
        count = len(self.ids)
        if count == 0 or n <= 0:
            return []
        scores = self.scores(y_user)
        want = min(count, n + len(exclude))
        best = np.argpartition(-scores, want - 1)[:want] if want < count else np.arange(count)
        best = best[np.argsort(-scores[best], kind="stable")]
        out = []
        for row in best.tolist():
            item = self.ids[row]
            if item not in exclude:
                out.append((item, float(scores[row])))
                if len(out) == n:
                    break
        return out

    @property
    def staleness_s(self) -> float:
        """How long ago the index last caught up with Redis."""
        return time.time() - self.last_refresh if self.last_refresh else float("inf")
