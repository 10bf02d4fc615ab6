r"""Exact top-n by inner product, with k-means cells that let most of the catalogue be skipped.

MF recall needs the n items with the largest :math:`y_u \cdot y_i`. A flat scan reads every
vector for every request: 50,000 × 32 float32 factors are 6.4 MB, more than a core's L2 cache,
so the scan both costs the most of any stage and evicts what the others need. Items are
grouped into cells by k-means instead; each cell keeps its centroid :math:`c` and radius
:math:`r`, the largest distance of a member from :math:`c`. For every member :math:`i`, by
Cauchy–Schwarz,

.. math::

    y_u \cdot y_i = y_u \cdot c + y_u \cdot (y_i - c) \le y_u \cdot c + \lVert y_u \rVert\, r

(the ball bound of Ram & Gray, *Maximum inner-product search using cone trees*, KDD 2012).
Cells are read in decreasing order of that bound, every member scored exactly, the n best kept;
the search stops at the first cell whose bound is below the n-th best score so far, since no
member of it or of any later cell can enter. The answer is a full scan's, ties to the lower
row. Where tastes cluster (genres, audiences) a request reads a few cells; where they do not it
reads them all, as a flat scan would, and costs the same.

Vectors change as the model learns: a changed vector joins its nearest centroid's cell and that
cell's radius grows to hold it, so the bound stays valid between fits; the centroids are fit
again when the catalogue has doubled or the mean radius has grown by a quarter (the vectors
have drifted and the bound prunes less), on a thread if asked (45 ms at 50,000 items, 0.8 s at
200,000). Rows not yet in a cell are always scored.

The flat scan reads int8 codes of the vectors, a quarter of their bytes, and scores again in
float32 only the rows whose bound can still reach the n best (`freshrec.models.quantized_scan`):
its answer is the float32 scan's.
"""

from __future__ import annotations

import concurrent.futures

import numba
import numpy as np

from freshrec.models.quantized_scan import QuantizedRows
from freshrec.models.top_k import best_first, offer

CELL_SIZE = 256  # members per cell on average when fit: ~sqrt(n) cells for n ~ 65,000
MIN_CELLS = 8  # below CELL_SIZE * MIN_CELLS items a flat scan is as cheap
FIT_SAMPLE = 32  # sampled vectors per cell for the k-means iterations
FIT_ITERATIONS = 10
ASSIGN_CHUNK = 8192  # rows per distance matrix when assigning
FLAT_SHARE = 0.3  # reading more rows than this share cell by cell costs more than a flat scan
REFIT_GROWTH = 1.25  # refit once the mean radius has grown this much: the bound has loosened
PROBE_EVERY = 16  # after MISSES searches in a row the cells did not prune, try them 1 in this
MISSES = 4


class CellIndex:
    """k-means cells over the rows of a vector matrix, for `top_inner_products`.

    The matrix itself stays its owner's; ``place`` is told which rows changed.

    Parameters
    ----------
    factors
        The vectors' width.
    seed
        Seed of the k-means sampling, so fits are repeatable.
    background
        Refit on a thread (the reader) rather than in ``place``.
    read_share
        1 for the exact answer. Below 1, an approximate one: each search reads the cells in
        order of their bound until it has read this share of the rows (and holds n), never
        flat, like an inverted-file index probing a fixed share of its lists.

    Examples
    --------
    Two clusters of items; a query near one of them needs only that cluster's cells:

    >>> rng = np.random.default_rng(0)
    >>> centres = np.repeat(np.array([[4.0, 0.0], [0.0, 4.0]]), 2048, axis=0)
    >>> vectors = (centres + rng.normal(0, 0.3, centres.shape)).astype(np.float32)
    >>> cells = CellIndex(2)
    >>> cells.place(vectors, len(vectors), np.arange(len(vectors)))
    >>> rows, scores = cells.top(np.array([1.0, 0.1], np.float32), 5, vectors, len(vectors),
    ...                          np.zeros(len(vectors), bool))
    >>> exact = np.argsort(-(vectors @ np.array([1.0, 0.1], np.float32)), kind="stable")[:5]
    >>> rows.tolist() == exact.tolist(), cells.last_scanned < len(vectors) // 2
    (True, True)
    """

    def __init__(
        self, factors: int, seed: int = 0, background: bool = False, read_share: float = 1.0
    ) -> None:
        self.rng = np.random.default_rng(seed)
        self.background = background
        self.read_share = read_share
        self._fitting: concurrent.futures.Future[tuple[np.ndarray, ...]] | None = None
        self._fit_count = 0  # rows the running fit was given
        self._since_fit: list[np.ndarray] = []  # rows placed while it runs
        self.centroids = np.zeros((0, factors), dtype=np.float32)
        self.radius = np.zeros(0)
        self.cell_of = np.full(0, -1, dtype=np.int64)  # per row; -1 until placed
        self.order = np.zeros(0, dtype=np.int64)  # rows grouped by cell
        self.start = np.zeros(1, dtype=np.int64)  # cell c holds order[start[c]:start[c + 1]]
        # The vectors in that order: a cell is read from contiguous memory, not row by row
        # from all over the matrix (on a busy core that alone cost 3x).
        self.grouped = np.zeros((0, factors), dtype=np.float32)
        self.position = np.full(0, -1, dtype=np.int64)
        self.flat = QuantizedRows(factors)  # for the flat scan
        self.covered = 0  # rows below this are in cells; the rest are scored always
        self.fit_for = 0  # rows when the centroids were last fit
        self.fit_radius = 0.0  # the mean radius then
        self.last_scanned = 0  # rows scored by the latest search
        self.misses = 0  # searches in a row where the bound did not prune
        self.searches = 0

    def place(self, vectors: np.ndarray, count: int, rows: np.ndarray) -> None:
        """Puts ``rows`` (changed or new, below ``count``) in cells and in the flat scan's
        codes; refits when it is due.

        The first fit runs here. With ``background``, later refits run on a thread over a copy
        of the vectors while this goes on placing rows in the current cells (so the bound
        holds throughout); the next call after the refit finishes adopts it and places again
        the rows that changed meanwhile.
        """
        rows = np.asarray(rows, dtype=np.int64)
        self.flat.place(vectors, count, rows)
        if count < CELL_SIZE * MIN_CELLS:
            return  # a flat scan: every row stays uncovered
        self._adopt(vectors, count)
        if count >= 2 * self.fit_for or self.radius.mean() > REFIT_GROWTH * self.fit_radius:
            if not self.background or not len(self.centroids):
                self._fit(vectors, count)
                return
            if self._fitting is None:
                self._fit_count, self._since_fit = count, []
                self._fitting = _REFITS.submit(_fitted, vectors[:count].copy(), count, self.rng)
        if self._fitting is not None:
            self._since_fit.append(rows)
        self._place(vectors, count, rows)

    def wait(self, vectors: np.ndarray, count: int) -> None:
        """Finishes a refit running in the background and adopts it (for tests and shutdown)."""
        if self._fitting is not None:
            concurrent.futures.wait([self._fitting])
            self._adopt(vectors, count)

    def _adopt(self, vectors: np.ndarray, count: int) -> None:
        if self._fitting is None or not self._fitting.done():
            return
        fitting, self._fitting = self._fitting, None
        self._install(vectors, count, self._fit_count, *fitting.result())
        changed = [r for r in self._since_fit if len(r)]
        self._since_fit = []
        if changed:  # placed in the old cells while the fit ran: their vectors moved since
            self._place(vectors, count, np.unique(np.concatenate(changed)))

    def _place(self, vectors: np.ndarray, count: int, rows: np.ndarray) -> None:
        if len(self.cell_of) < count:
            grown = np.full(max(count, 2 * len(self.cell_of)), -1, dtype=np.int64)
            grown[: len(self.cell_of)] = self.cell_of
            self.cell_of = grown
        moved = vectors[rows]
        cells = _nearest(moved, self.centroids)
        _widen(self.radius, cells, np.linalg.norm(moved - self.centroids[cells], axis=1))
        if (rows < self.covered).all() and (self.cell_of[rows] == cells).all():
            # The common case as a model learns: each vector moved within its cell. Only
            # its copy in cell order changes; the grouping stays.
            self.grouped[self.position[rows]] = moved
            return
        self.cell_of[rows] = cells
        self.covered = _covered(self.cell_of, self.covered, count)
        self._group(vectors, len(self.centroids))

    def top(
        self,
        query: np.ndarray,
        n: int,
        vectors: np.ndarray,
        count: int,
        excluded: np.ndarray,
        read_share: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """`top_inner_products` over these cells, or a flat scan where they do not prune.

        ``read_share`` overrides this index's own for one search (a funnel configuration's).
        Where the bound has stopped pruning (factors without cluster structure), searches go
        flat at once (`QuantizedRows`) and try the cells again only now and then, so such a
        catalogue costs what a flat scan costs.
        """
        self._adopt(vectors, count)
        query = np.ascontiguousarray(query, dtype=np.float32)
        n = min(n, count)
        self.searches += 1
        share = self.read_share if read_share is None else read_share
        approximate = share < 1.0
        if len(self.radius) and (
            approximate or self.misses < MISSES or self.searches % PROBE_EVERY == 0
        ):
            rows, scores, scanned = top_inner_products(
                query,
                n,
                vectors,
                count,
                excluded,
                self.centroids,
                self.radius,
                self.order,
                self.grouped,
                self.start,
                min(self.covered, count),
                count if approximate else int(FLAT_SHARE * count),
                int(share * count) if approximate else -1,
            )
            if scanned >= 0:
                self.misses, self.last_scanned = 0, scanned
                return rows, scores
            self.misses += 1
        if self.flat.coded < count:  # vectors never placed here
            self.flat.place(vectors, count, np.arange(count))
        self.last_scanned = count
        return self.flat.top(query, n, vectors, count, excluded)

    def _fit(self, vectors: np.ndarray, count: int) -> None:
        self._install(vectors, count, count, *_fitted(vectors, count, self.rng))

    def _install(
        self,
        vectors: np.ndarray,
        count: int,
        fit_count: int,
        centroids: np.ndarray,
        cell_of: np.ndarray,
        radius: np.ndarray,
    ) -> None:
        """Cells fit over the first ``fit_count`` rows replace the current ones."""
        self.centroids, self.radius = centroids, radius
        self.cell_of = np.full(max(len(self.cell_of), count), -1, dtype=np.int64)
        self.cell_of[:fit_count] = cell_of
        self.covered = fit_count
        self._group(vectors, len(centroids))
        self.fit_for, self.fit_radius = fit_count, float(radius.mean())

    def _group(self, vectors: np.ndarray, cells: int) -> None:
        self.order, self.start = _grouped(self.cell_of[: self.covered], cells)
        self.position = np.full(len(self.cell_of), -1, dtype=np.int64)  # row -> place in order
        self.position[self.order] = np.arange(len(self.order))
        if len(self.grouped) < len(self.order) or self.grouped.shape[1] != vectors.shape[1]:
            self.grouped = np.empty((max(len(self.order), 2 * len(self.grouped)), vectors.shape[1]),
                                    dtype=np.float32)  # fmt: skip
        np.take(vectors, self.order, axis=0, out=self.grouped[: len(self.order)])


_REFITS = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="freshrec-cells")


def _fitted(
    vectors: np.ndarray, count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """k-means centroids of ``vectors[:count]`` (Lloyd's iterations on a sample), each row's
    nearest, and each cell's radius. BLAS and the compiled sums release the GIL, so this can
    run beside the event loop."""
    cells = max(MIN_CELLS, count // CELL_SIZE)
    sample = vectors[rng.choice(count, min(count, FIT_SAMPLE * cells), replace=False)]
    centroids = sample[rng.choice(len(sample), cells, replace=False)].copy()
    for _ in range(FIT_ITERATIONS):
        sums, sizes = _sums(sample, _nearest(sample, centroids), cells)
        empty = sizes == 0
        centroids[~empty] = sums[~empty] / sizes[~empty, None]
        centroids[empty] = sample[rng.choice(len(sample), int(empty.sum()))]
    centroids = centroids.astype(np.float32)
    cell_of = _nearest(vectors[:count], centroids)
    radius = np.zeros(cells)
    _widen(radius, cell_of, np.linalg.norm(vectors[:count] - centroids[cell_of], axis=1))
    return centroids, cell_of, radius


def _nearest(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Each point's nearest centroid (squared L2), in chunks that bound the distance matrix."""
    squared = np.einsum("ij,ij->i", centroids, centroids)
    out = np.empty(len(points), dtype=np.int64)
    for begin in range(0, len(points), ASSIGN_CHUNK):
        chunk = points[begin : begin + ASSIGN_CHUNK]
        # np.dot, not @: the matmul path spins up BLAS threads, 15x slower on two busy cores.
        out[begin : begin + len(chunk)] = np.argmin(squared - 2.0 * np.dot(chunk, centroids.T), 1)
    return out


@numba.njit(cache=True, nogil=True)
def _sums(points: np.ndarray, cell_of: np.ndarray, cells: int) -> tuple[np.ndarray, np.ndarray]:
    sums = np.zeros((cells, points.shape[1]))
    sizes = np.zeros(cells, dtype=np.int64)
    for row in range(len(points)):
        sizes[cell_of[row]] += 1
        for d in range(points.shape[1]):
            sums[cell_of[row], d] += points[row, d]
    return sums, sizes


@numba.njit(cache=True, nogil=True)
def _widen(radius: np.ndarray, cell_of: np.ndarray, distance: np.ndarray) -> None:
    """Each cell's radius grown to hold its new members' distances."""
    for n in range(len(cell_of)):
        radius[cell_of[n]] = max(radius[cell_of[n]], distance[n])


@numba.njit(cache=True, nogil=True)
def _covered(cell_of: np.ndarray, covered: int, count: int) -> int:
    while covered < count and cell_of[covered] >= 0:
        covered += 1
    return covered


@numba.njit(cache=True, nogil=True)
def _grouped(cell_of: np.ndarray, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows grouped by cell (a counting sort), with each cell's start."""
    start = np.zeros(cells + 1, dtype=np.int64)
    for cell in cell_of:
        start[cell + 1] += 1
    for cell in range(cells):
        start[cell + 1] += start[cell]
    fill = start[:-1].copy()
    order = np.empty(len(cell_of), dtype=np.int64)
    for row in range(len(cell_of)):
        order[fill[cell_of[row]]] = row
        fill[cell_of[row]] += 1
    return order, start


@numba.njit(cache=True, nogil=True)
def top_inner_products(
    query: np.ndarray,
    n: int,
    vectors: np.ndarray,
    count: int,
    excluded: np.ndarray,
    centroids: np.ndarray,
    radius: np.ndarray,
    order: np.ndarray,
    grouped: np.ndarray,
    start: np.ndarray,
    covered: int,
    give_up: int,
    budget: int = -1,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Rows and scores of the ``n`` largest ``vectors[:count] @ query``, and how many were read.

    Best first, ties to the lower row; rows where ``excluded`` is True are skipped. Rows from
    ``covered`` to ``count`` are read always, the cells' members (``grouped``: their vectors in
    ``order``) by their bound. Once n rows
    are kept, if the cells whose bound still reaches the n-th best hold more than ``give_up``
    rows, it stops and returns -1 as the count: the bound is not pruning, and a flat scan
    costs less than reading them cell by cell. With a ``budget`` of rows (not -1), it also
    stops before the next cell once n rows are kept and that many were read: the answer is then
    approximate, the best of the cells with the highest bounds.
    """
    if n <= 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32), 0
    width = len(query)
    query_norm = 0.0
    for d in range(width):
        query_norm += float(query[d]) ** 2
    query_norm = np.sqrt(query_norm)
    bound = np.empty(len(radius))
    for cell in range(len(radius)):
        toward, centre_norm = 0.0, 0.0
        for d in range(width):
            toward += float(query[d]) * centroids[cell, d]
            centre_norm += float(centroids[cell, d]) ** 2
        # Room for float32 rounding in the scores the bound is compared with.
        slack = 1e-5 * query_norm * (np.sqrt(centre_norm) + radius[cell]) + 1e-7
        bound[cell] = toward + query_norm * radius[cell] + slack
    best_scores = np.empty(n, dtype=np.float32)  # a heap: the worst kept at the root
    best_rows = np.empty(n, dtype=np.int64)
    kept, scanned = 0, 0
    for row in range(covered, count):
        if not excluded[row]:
            score = _dot(vectors, row, query)
            if kept < n or score >= best_scores[0]:
                kept = offer(best_scores, best_rows, kept, score, row)
            scanned += 1
    cells = np.argsort(-bound)
    judged = False
    for position, cell in enumerate(cells):
        if kept == n and bound[cell] < best_scores[0]:
            break  # no member of this cell, or of any after it, can enter
        if kept == n and 0 <= budget <= scanned:
            break
        if kept == n and not judged:  # how much could still be read, at most?
            judged = True
            ahead = 0
            for later in cells[position:]:
                if bound[later] >= best_scores[0]:
                    ahead += start[later + 1] - start[later]
            if scanned + ahead > give_up:
                return best_rows[:0], best_scores[:0], -1
        for at in range(start[cell], start[cell + 1]):
            row = order[at]
            if row < count and not excluded[row]:
                score = _dot(grouped, at, query)
                if kept < n or score >= best_scores[0]:
                    kept = offer(best_scores, best_rows, kept, score, row)
                scanned += 1
    rows, scores = best_first(best_scores, best_rows, kept)
    return rows, scores, scanned


@numba.njit(cache=True, nogil=True, fastmath=True, inline="always")
def _dot(vectors: np.ndarray, row: int, query: np.ndarray) -> np.float32:
    total = np.float32(0.0)
    for d in range(len(query)):
        total += vectors[row, d] * query[d]
    return total
