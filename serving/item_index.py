"""The reader's in-memory copy of the item state, kept fresh from Redis incrementally.

MF recall needs the best items by the user's preference score over *every* item, and CF recall
reads the neighbour lists of the user's recent items: in memory, one exact search (over k-means
cells that let it skip most items, `freshrec.models.inner_product_search`) and one gather; from
Redis, thousands of reads and the parsing of hundreds of replies per request.
Workers stamp each item whose vector or neighbour list changed in a sorted set (item -> time of
change, on the Redis server's clock); the index loads everything once, then every ``refresh``
fetches only the items stamped since the last one. Staleness is bounded by the refresh interval
plus one fetch: served MF scores and CF neighbours are never older than that. A rebase of the
decay landmark reloads everything (every decayed statistic was rescaled).
"""

from __future__ import annotations

import time

import numpy as np
from redis.asyncio import Redis

from freshrec.models.inner_product_search import CellIndex
from freshrec.models.mf import implicit_part, vector_width
from freshrec.store.keys import Keys
from freshrec.store.server_scripts import ServerScripts
from freshrec.store.vectors import VECTOR_DTYPE

FETCH_CHUNK = 500  # items per round trip: each chunk's parsing holds the event loop briefly
STATS = ("occurrences", "popularity", "first_seen")


class ItemIndex:
    """Factors ``y_i``, statistics and CF neighbours of all known items, one row each.

    Next to each factor row the index keeps the item's decayed occurrence count and popularity,
    its first-seen time and its strongest co-occurring items (as rows, with their weights). All
    of them change only when the item's vector or neighbour list does, which is what workers
    stamp, so ranking features and CF recall cost no Redis reads per request.

    Parameters
    ----------
    redis
        Where the state lives.
    keys
        The key layout.
    factors
        k: the stored vectors are ``[b, p_1..p_k, y_1..y_k, n]``; the index keeps ``y``.
    neighbours
        How many of each item's strongest neighbours to keep.
    """

    def __init__(self, redis: Redis, keys: Keys, factors: int, neighbours: int = 50) -> None:
        self.redis = redis
        self.keys = keys
        self.scripts = ServerScripts(redis)
        self.factors = factors
        self.width = neighbours
        self.ids: list[str] = []
        self.rows: dict[str, int] = {}
        self.matrix = np.zeros((0, factors), dtype=np.float32)
        self.stats = np.zeros((0, len(STATS)))
        self.neighbours = np.full((0, neighbours), -1, dtype=np.int64)  # rows; -1 is none
        self.neighbour_weights = np.zeros((0, neighbours))
        self.landmark: bytes | None = None
        self.refreshed_at = 0.0  # newest change stamp applied
        self.last_refresh = 0.0  # wall time the last refresh finished
        self.cells = CellIndex(factors, background=True)  # MF recall's search over the matrix

    def __len__(self) -> int:
        return len(self.ids)

    async def refresh(self) -> int:
        """Apply every change stamped since the previous refresh; returns how many items."""
        landmark = await self.redis.get(self.keys.decay_landmark)
        if landmark != self.landmark:  # a rebase rescaled every decayed statistic
            self.refreshed_at, self.landmark = 0.0, landmark
        # Stamps come from the Redis server's clock and a later batch's script runs later, so
        # nothing is stamped at or before a stamp already seen once this read has happened.
        changed = await self.redis.zrangebyscore(
            self.keys.updated_items, f"({self.refreshed_at!r}", "+inf", withscores=True
        )
        items = [m.decode() for m, _ in changed]
        lists: list[tuple[int, bytes, bytes]] = []
        for start in range(0, len(items), FETCH_CHUNK):
            lists += await self._fetch(items[start : start + FETCH_CHUNK])
        # Neighbours last: a neighbour first seen in this refresh has its row by now.
        for row, names, weights in lists:
            found = self.row_of(names.decode().split("\n")) if names else np.empty(0, np.int64)
            known = found >= 0
            count = int(known.sum())
            self.neighbours[row] = -1
            self.neighbour_weights[row] = 0.0
            self.neighbours[row, :count] = found[known]
            self.neighbour_weights[row, :count] = np.frombuffer(weights, "<f8")[known]
        if changed:
            self.refreshed_at = max(score for _, score in changed)
        self.last_refresh = time.time()
        return len(items)

    async def _fetch(self, chunk: list[str]) -> list[tuple[int, bytes, bytes]]:
        """Loads the vectors and statistics of ``chunk``; returns their packed neighbour lists."""
        keys = self.keys
        pipe = self.redis.pipeline(transaction=False)
        pipe.mget([keys.item_vector(item) for item in chunk])
        await self.scripts.neighbour_lists(
            keys=[keys.neighbours(item) for item in chunk], args=[self.width], client=pipe
        )
        pipe.zmscore(keys.occurrences, chunk)
        pipe.zmscore(keys.popularity, chunk)
        pipe.zmscore(keys.item_first_seen, chunk)
        blobs, neighbours, occ, pop, first = await pipe.execute()
        size = 4 * vector_width(self.factors)
        lists = []
        for n, (item, blob) in enumerate(zip(chunk, blobs, strict=True)):
            if blob is not None and len(blob) == size:
                y = implicit_part(np.frombuffer(blob, dtype=VECTOR_DTYPE), self.factors)
                row = self._put(item, y, (occ[n] or 0.0, pop[n] or 0.0, first[n] or 0.0))
                lists.append((row, *neighbours[n]))
        # Before the next await: a request never sees a vector its cell's bound does not hold.
        self.cells.place(self.matrix, len(self.ids), np.array([row for row, *_ in lists]))
        return lists

    def _put(self, item: str, y: np.ndarray, stats: tuple[float, float, float]) -> int:
        row = self.rows.get(item)
        if row is None:
            row = len(self.ids)
            if row == len(self.matrix):
                self._grow(max(1024, 2 * len(self.matrix)))
            self.rows[item] = row
            self.ids.append(item)
        self.matrix[row] = y
        self.stats[row] = stats
        return row

    def _grow(self, size: int) -> None:
        def grown(old: np.ndarray, fill: float) -> np.ndarray:
            new = np.full((size, *old.shape[1:]), fill, dtype=old.dtype)
            new[: len(old)] = old
            return new

        self.matrix = grown(self.matrix, 0.0)
        self.stats = grown(self.stats, 0.0)
        self.neighbours = grown(self.neighbours, -1)
        self.neighbour_weights = grown(self.neighbour_weights, 0.0)

    def row_of(self, items: list[str]) -> np.ndarray:
        """Rows of ``items``; -1 where the index does not know the item (yet)."""
        get = self.rows.get
        return np.array([get(item, -1) for item in items], dtype=np.int64)

    def top_rows(
        self,
        y_user: np.ndarray,
        n: int,
        excluded: np.ndarray,
        excluded_rows: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows and scores of the ``n`` best items by ``y_i . y_u``, exactly, best first.

        ``excluded`` is a boolean mask over rows (at least as long as the index) to skip;
        ``excluded_rows``, if known, the rows it marks.
        """
        return self.cells.top(y_user, n, self.matrix, len(self.ids), excluded, excluded_rows)

    def top(self, y_user: np.ndarray, n: int, exclude: set[str]) -> list[tuple[str, float]]:
        """The ``n`` best items by preference score, skipping ``exclude``."""
        if not self.ids or n <= 0:
            return []
        excluded = np.zeros(len(self.ids), dtype=bool)
        rows = self.row_of(list(exclude))
        excluded[rows[rows >= 0]] = True
        best, scores = self.top_rows(y_user, n, excluded)
        ids = self.ids
        return [(ids[r], float(s)) for r, s in zip(best.tolist(), scores.tolist(), strict=True)]

    @property
    def staleness_s(self) -> float:
        """How long ago the index last caught up with Redis."""
        return time.time() - self.last_refresh if self.last_refresh else float("inf")
