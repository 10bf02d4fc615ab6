"""The reader's in-memory copy of the item state, kept fresh from Redis incrementally.

MF recall needs the best items by the user's preference score over *every* item, and CF recall
reads the neighbour lists of the user's recent items: in memory, one exact search (over k-means
cells that let it skip most items, `freshrec.models.inner_product_search`) and one gather; from
Redis, thousands of reads and the parsing of hundreds of replies per request.
Workers stamp each item whose vector or statistics changed in one sorted set, and each item
whose neighbour list changed in another (item -> time of change, on the Redis server's clock);
the index loads every vector once, then every ``refresh`` fetches the vectors and statistics of
the items stamped in the first since the last one, and marks stale the neighbour lists of the
items stamped in either. A list is read again when a request first needs it
(``load_neighbours``, for the user's recent items): one event changes the lists of every item
it pairs with, up to a hundred, and the row of its own item only, while a request reads a few
lists. Staleness is bounded by the refresh interval plus one fetch: served MF scores and CF
neighbours are never older than that. A rebase of the decay landmark reloads everything (every
decayed statistic was rescaled).

Items retired by retention (`freshrec.store.retention`) are read from their own sorted set on
each refresh: a retired row is emptied and marked ``dead`` (the funnel never serves it) and its
id forgotten, so an item that comes back gets a new row. Records are kept for the item TTL; an
index that went that long without a refresh sees the horizon of forgotten records pass what it
has read, and loads again. Once dead rows outnumber live ones (or every row is dead)
the index is built again from Redis and swapped in whole, so its memory follows the catalogue
down as well as up (`rebuilt`); rows change then, and ``epoch`` counts such rebuilds.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numba
import numpy as np
from redis.asyncio import Redis

from freshrec.models.inner_product_search import CellIndex
from freshrec.models.mf import implicit_part, vector_width
from freshrec.serving.multiplexed_redis import ClusterCalls, MultiplexedRedis
from freshrec.store.cluster import item_rows, per_key
from freshrec.store.keys import Keys
from freshrec.store.server_scripts import NEIGHBOUR_LISTS, ServerScripts
from freshrec.store.vectors import VECTOR_DTYPE

FETCH_CHUNK = 1000  # items per round trip: each chunk's parsing holds the event loop briefly
COMPACT_MIN_DEAD = 1024  # dead rows below this never trigger a rebuild
WARM_CHUNK = 64  # neighbour lists per command while warming: a few ms of the server's time
STORED_STATS = ("occurrences", "popularity", "first_seen")  # kept in Redis, in this order
STATS = (*STORED_STATS, "rating_bias")  # and the rating bias, read from the item's vector


class ItemIndex:
    """Factors ``y_i``, statistics and CF neighbours of all known items, one row each.

    Next to each factor row the index keeps the item's decayed occurrence count and popularity,
    its first-seen time, its rating bias (from its vector) and its strongest co-occurring items
    (as rows, with their weights). All
    of them change only when the item's vector or neighbour list does, which is what workers
    stamp, so ranking features cost no Redis reads per request, and CF recall one read only
    when a recent item of the user has gained neighbours since its list was last read.

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
    refit_in_background
        MF recall's cells refit on a thread and are adopted when it finishes (a reader); False:
        at once, so the cells depend on the state alone (a replay).
    """

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        factors: int,
        neighbours: int = 50,
        refit_in_background: bool = True,
    ) -> None:
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
        # A row's neighbour list is current when the change it was read after is its latest.
        self.generation = np.zeros(0, dtype=np.int64)  # changes stamped and seen, per row
        self.loaded = np.zeros(0, dtype=np.int64)  # the generation its list was read at
        self.dead = np.zeros(0, dtype=bool)  # rows of retired items
        self.dead_rows = 0
        self.epoch = 0  # rebuilds so far: rows from an earlier epoch mean other items
        self.landmark: bytes | None = None
        self.decay_rate: bytes | None = None  # the state's own (`Keys.decay_rate`)
        self.refreshed_at = 0.0  # newest row stamp applied
        self.relisted_at = 0.0  # newest list stamp applied
        self.retired_at = 0.0  # newest retirement stamp applied
        self.missed_retirements = False  # idle for longer than retirement records are kept
        self.last_refresh = 0.0  # wall time the last refresh finished
        self.cells = CellIndex(factors, background=refit_in_background)  # MF recall's search

    def __len__(self) -> int:
        """Rows, dead ones included: the length of every per-row array the funnel builds."""
        return len(self.ids)

    @property
    def live(self) -> int:
        """Items the index serves: rows less the retired ones."""
        return len(self.ids) - self.dead_rows

    async def refresh(self) -> int:
        """Apply every change and retirement stamped since the previous refresh; returns how
        many rows were fetched again."""
        keys = self.keys
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(keys.decay_landmark)
        pipe.get(keys.decay_rate)
        pipe.get(keys.retired_horizon)
        pipe.zrangebyscore(keys.retired_items, f"({self.retired_at!r}", "+inf", withscores=True)
        pipe.zrangebyscore(keys.updated_items, f"({self.refreshed_at!r}", "+inf", withscores=True)
        pipe.zrangebyscore(keys.relisted_items, f"({self.relisted_at!r}", "+inf", withscores=True)
        landmark, self.decay_rate, horizon, retired, changed, relisted = await pipe.execute()
        forgotten = float(horizon or 0.0)
        if not self.last_refresh:  # the first load has nothing to retire that it could miss
            self.retired_at = max(self.retired_at, forgotten)
        elif forgotten > self.retired_at:  # records this index never saw are gone
            self.missed_retirements = True
        if retired:
            self._retire([m.decode() for m, _ in retired])
            self.retired_at = max(self.retired_at, max(score for _, score in retired))
        if landmark != self.landmark:  # a rebase rescaled every decayed statistic
            self.refreshed_at, self.landmark = 0.0, landmark
            changed = await self.redis.zrangebyscore(
                keys.updated_items, "-inf", "+inf", withscores=True
            )
        # Stamps come from the Redis server's clock and a later batch's script runs later, so
        # nothing is stamped at or before a stamp already seen once this read has happened.
        items = [m.decode() for m, _ in changed]
        for start in range(0, len(items), FETCH_CHUNK):
            await self._fetch(items[start : start + FETCH_CHUNK])
        if changed:
            self.refreshed_at = max(score for _, score in changed)
        if relisted:  # each set has its own cursor: a batch may land between the two reads
            rows = self.row_of([m.decode() for m, _ in relisted])
            self.generation[rows[rows >= 0]] += 1
            self.relisted_at = max(score for _, score in relisted)
        self.last_refresh = time.time()
        return len(items)

    def _retire(self, items: list[str]) -> None:
        """Empties the rows of ``items`` and forgets their ids (an item that comes back is new)."""
        rows = np.array([self.rows.pop(item) for item in items if item in self.rows], np.int64)
        if not rows.size:
            return
        self.dead[rows] = True
        self.dead_rows += len(rows)
        self.matrix[rows] = 0.0
        self.stats[rows] = 0.0
        self.neighbours[rows] = -1
        self.neighbour_weights[rows] = 0.0
        self.generation[rows] += 1
        self.cells.place(self.matrix, len(self.ids), rows)

    @property
    def needs_rebuild(self) -> bool:
        """Dead rows outnumber live ones (and are many), nothing is live any more, or
        retirements went unseen: time for `rebuilt`."""
        if self.missed_retirements or (self.dead_rows and not self.live):
            return True
        return self.dead_rows >= max(COMPACT_MIN_DEAD, self.live)

    async def rebuilt(self) -> ItemIndex:
        """A new index loaded from Redis, holding only live items, in the next epoch; the
        caller swaps it in, with everything it holds as rows, in one step."""
        fresh = ItemIndex(self.redis, self.keys, self.factors, self.width)
        await fresh.refresh()
        fresh.epoch = self.epoch + 1
        return fresh

    async def _fetch(self, chunk: list[str]) -> None:
        """Loads the vectors and statistics of ``chunk``; their neighbour lists go stale."""
        stat_keys = [self.keys.occurrences, self.keys.popularity, self.keys.item_first_seen]
        if self.scripts.cluster:
            rows_of = item_rows(self.redis, stat_keys, chunk, *self.keys.item_key_parts("mf"))
        else:
            rows_of = self.scripts.item_rows(
                keys=stat_keys, args=[*self.keys.item_key_parts("mf"), "\n".join(chunk)]
            )
        blobs, lengths, stats = await rows_of
        lengths = np.frombuffer(lengths, "<i4")
        stats = np.frombuffer(stats, "<f8").reshape(-1, len(STORED_STATS))
        if len(lengths) != len(chunk):
            raise ValueError(f"{len(chunk)} items asked for, {len(lengths)} answered")
        width = vector_width(self.factors)
        ends = np.cumsum(lengths)
        whole = np.flatnonzero(lengths == 4 * width)
        rows = np.array([self._row(chunk[n]) for n in whole.tolist()], dtype=np.int64)
        if rows.size:
            starts = (ends[whole] - lengths[whole]) // 4
            flat = np.frombuffer(blobs, dtype=VECTOR_DTYPE)
            vectors = flat[starts[:, None] + np.arange(width)]
            self.matrix[rows] = implicit_part(vectors.T, self.factors).T
            self.stats[rows, : len(STORED_STATS)] = stats[whole]
            self.stats[rows, STATS.index("rating_bias")] = vectors[:, 0]
            self.generation[rows] += 1
        # Before the next await: a request never sees a vector its cell's bound does not hold.
        self.cells.place(self.matrix, len(self.ids), rows)

    async def load_neighbours(
        self, rows: np.ndarray, client: MultiplexedRedis | ClusterCalls | None = None
    ) -> None:
        """Makes the neighbour lists of ``rows`` current: fetches those that changed since read.

        Lists are read when a request needs them (its user's recent items), not on every
        refresh: one event changes the lists of every item it pairs with, a request reads a few.
        ``client``, when given, runs the read (a request's own connection); else the index's.
        """
        stale = rows[self.loaded[rows] != self.generation[rows]]
        if not stale.size:
            return
        rows = np.unique(stale)
        generation = self.generation[rows]
        keys = [self.keys.neighbours(self.ids[row]) for row in rows.tolist()]
        if self.scripts.cluster:  # one list per key, each in its item's slot
            lists = await per_key(self.redis, NEIGHBOUR_LISTS, keys, [self.width])
        elif client is None:
            lists = await self.scripts.neighbour_lists(keys=keys, args=[self.width])
        else:
            lists = await client.run_script(NEIGHBOUR_LISTS, keys, [self.width])
        # All lists parsed at once: one split and one lookup of every name, then a scatter.
        counts = np.array([len(weights) // 8 for _, weights in lists], dtype=np.int64)
        names = b"\n".join(joined for joined, _ in lists if joined).decode()
        found = self.row_of(names.split("\n")) if names else np.empty(0, np.int64)
        weights = np.frombuffer(b"".join(w for _, w in lists), "<f8")
        fill_lists(rows, generation, counts, found, weights,
                   self.neighbours, self.neighbour_weights, self.loaded)  # fmt: skip

    async def warm_lists(self, keep_going: Callable[[], bool] = lambda: True) -> int:
        """Reads the neighbour list of every live row never read, ``WARM_CHUNK`` lists a
        command, while ``keep_going()``; returns how many it read. A reader that has just
        loaded its snapshot would otherwise read the lists of a request's recent items on the
        request's own path, one more round trip for most requests for as long as it takes to
        have met every item; once warm, a request reads only the lists changed since."""
        rows = len(self.ids)
        cold = np.flatnonzero((self.loaded[:rows] < 0) & ~self.dead[:rows])
        for start in range(0, len(cold), WARM_CHUNK):
            if not keep_going():
                return start
            await self.load_neighbours(cold[start : start + WARM_CHUNK])
        return len(cold)

    def _row(self, item: str) -> int:
        row = self.rows.get(item)
        if row is None:
            row = len(self.ids)
            if row == len(self.matrix):
                self._grow(max(1024, 2 * len(self.matrix)))
            self.rows[item] = row
            self.ids.append(item)
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
        self.generation = grown(self.generation, 0)
        self.loaded = grown(self.loaded, -1)
        self.dead = grown(self.dead, False)

    def row_of(self, items: list[str]) -> np.ndarray:
        """Rows of ``items``; -1 where the index does not know the item (yet)."""
        get = self.rows.get
        return np.array([get(item, -1) for item in items], dtype=np.int64)

    def top_rows(
        self,
        y_user: np.ndarray,
        n: int,
        excluded: np.ndarray,
        read_share: float = 1.0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows and scores of the ``n`` best items by ``y_i . y_u``, best first: exactly, or
        among at most ``read_share`` of the rows (`FunnelConfig.mf_read_share`).

        ``excluded`` is a boolean mask over rows (at least as long as the index) to skip.
        """
        return self.cells.top(y_user, n, self.matrix, len(self.ids), excluded, read_share)

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


@numba.njit(cache=True, nogil=True)
def fill_lists(
    rows: np.ndarray,
    generation: np.ndarray,
    counts: np.ndarray,
    found: np.ndarray,
    weights: np.ndarray,
    neighbours: np.ndarray,
    neighbour_weights: np.ndarray,
    loaded: np.ndarray,
) -> None:
    """Writes the lists read for ``rows`` (distinct) into their rows of ``neighbours`` and
    ``neighbour_weights``: list ``i`` is the next ``counts[i]`` entries of ``found`` (rows, -1
    for an item the index does not hold) and ``weights``, strongest first. Unknown items are
    left out, the known ones keep their order. A list that named no unknown item is current as
    of ``generation[i]`` (``loaded``); one that did is read again next time.

    Examples
    --------
    >>> neighbours, weights = np.full((3, 2), -1), np.zeros((3, 2))
    >>> loaded = np.full(3, -1)
    >>> fill_lists(np.array([0, 2]), np.array([1, 4]), np.array([2, 1]), np.array([-1, 1, 0]),
    ...            np.array([3.0, 2.0, 5.0]), neighbours, weights, loaded)
    >>> neighbours.tolist(), weights.tolist(), loaded.tolist()
    ([[1, -1], [-1, -1], [0, -1]], [[2.0, 0.0], [0.0, 0.0], [5.0, 0.0]], [-1, -1, 4])
    """
    width = neighbours.shape[1]
    at = 0
    for i in range(len(rows)):
        row = rows[i]
        neighbours[row, :] = -1
        neighbour_weights[row, :] = 0.0
        slot = 0
        complete = True
        for _ in range(counts[i]):
            if found[at] < 0:
                complete = False
            elif slot < width:
                neighbours[row, slot] = found[at]
                neighbour_weights[row, slot] = weights[at]
                slot += 1
            at += 1
        if complete:
            loaded[row] = max(loaded[row], generation[i])
