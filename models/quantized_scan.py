r"""Exact top-n by inner product from a scan of int8 codes, rescored in float32.

A flat scan for MF recall reads every item vector for every request: 50,000 × 32 float32
factors are 6.4 MB, more than a core's L2 cache, so the scan is bound by memory and slows
further when other processes share the cache. Here each vector :math:`x_i` is kept as int8
codes with a scale of its own,

.. math::

    c_i = \max_f |x_{if}| / 127, \qquad q_{if} = \mathrm{round}(x_{if} / c_i),
    \qquad |x_{if} - c_i q_{if}| \le c_i / 2,

a quarter of the bytes. For a query :math:`y` the scan computes
:math:`\tilde s_i = c_i \sum_f y_f q_{if}`, and by Hölder's inequality

.. math::

    |y \cdot x_i - \tilde s_i| \le \tfrac{1}{2} c_i \lVert y \rVert_1 =: e_i

(with room added for float32 rounding). Let :math:`L` be the n-th largest lower bound
:math:`\tilde s_i - e_i`: at least n items score :math:`L` or more, so an item whose upper bound
:math:`\tilde s_i + e_i` is below :math:`L` cannot be among the n best. The survivors (on learned
ML-100K factors grown to 50,000 items, about 150 for a top 100) are scored again in float32 from
the vectors themselves, and the n best of those are the answer: exactly a float32 scan's, ties to
the lower row. This is the reordering step of quantized search (ScaNN, Guo et al., ICML 2020;
faiss's ``IndexRefine``) with a bound that makes the reorder set provably sufficient, not a
tuned multiple of n.

The codes are laid out one row per factor (``codes[f, i]``), so the scan's inner loop runs over
consecutive items with one multiply-add per code, vectorised by the compiler.
"""

from __future__ import annotations

import numba
import numpy as np

from freshrec.models.top_k import best_first, offer

SCAN_BLOCK = 1024  # items scored per pass of the inner loop: their sums stay in L1
# Below this a scale loses float32 precision (subnormal) and the half-step bound would not hold.
SMALLEST_SCALE = float(np.finfo(np.float32).tiny)
# Past this the scan's float32 sums could overflow: such a query is scored in full instead.
LARGEST_SUM = 1e30
# The codes are this much wider than the rows they hold: laid out again only rarely.
SLACK = 1 / 16


class QuantizedRows:
    """int8 codes of the rows of a vector matrix, for `top_quantized`.

    The matrix stays its owner's; ``place`` is told which rows changed, and the rescoring
    reads the matrix itself, so it must hold the vectors the codes were made from. Searches
    share scratch buffers: one at a time (the reader runs them on its event loop).
    """

    def __init__(self, factors: int) -> None:
        self.codes = np.zeros((factors, 0), dtype=np.int8)
        self.scale = np.zeros(0, dtype=np.float32)
        self.coded = 0  # rows below this hold codes
        self.largest_scale = 0.0  # at least every coded row's scale
        self.last_rescored = 0  # rows the latest search scored again in float32
        # Scratch for the survivors of a scan: one slot per row, reused by every search.
        self._rows = np.zeros(0, dtype=np.int64)
        self._upper = np.zeros(0, dtype=np.float32)

    def place(self, vectors: np.ndarray, count: int, rows: np.ndarray) -> None:
        """Codes for ``rows`` (changed or new, below ``count``). All rows are coded again from
        ``vectors`` when rows arrive past the codes' width, or when rows below ``count`` that
        were never coded are not among ``rows``."""
        rows = np.asarray(rows, dtype=np.int64)
        unseen = count > self.coded and not np.isin(np.arange(self.coded, count), rows).all()
        if count > self.codes.shape[1] or unseen:
            width = count + int(SLACK * count) + 64
            self.codes = np.zeros((vectors.shape[1], width), dtype=np.int8)
            self.scale = np.zeros(width, dtype=np.float32)
            self._rows = np.zeros(width, dtype=np.int64)
            self._upper = np.zeros(width, dtype=np.float32)
            self.largest_scale = 0.0
            rows = np.arange(count)
        rows = rows[rows < count]
        if len(rows):
            scale, codes = quantized(vectors[rows])
            self.scale[rows] = scale
            self.codes[:, rows] = codes.T
            self.largest_scale = max(self.largest_scale, float(scale.max()))
        self.coded = max(self.coded, count)

    def top(
        self, query: np.ndarray, n: int, vectors: np.ndarray, count: int, excluded: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows and float32 scores of the ``n`` largest ``vectors[:count] @ query`` where
        ``excluded`` is False, best first, ties to the lower row. A query or rows so large that
        the scan's float32 sums could overflow (or not finite) are scored in full instead."""
        rows, scores, self.last_rescored = top_quantized(
            np.ascontiguousarray(query, dtype=np.float32),
            min(n, count),
            self.codes,
            self.scale,
            vectors,
            count,
            excluded,
            self._rows,
            self._upper,
            self.largest_scale,
        )
        return rows, scores


def quantized(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's scale :math:`c_i` and int8 codes; a zero row gets scale 0 and codes 0, and no
    other row a scale below `SMALLEST_SCALE`."""
    largest = np.abs(vectors).max(axis=1)
    scale = np.where(largest > 0, np.maximum(largest / 127.0, SMALLEST_SCALE), 0.0)
    scale = scale.astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0)
    codes = np.clip(np.rint(vectors / safe[:, None]), -127, 127).astype(np.int8)
    return scale, codes


@numba.njit(cache=True, nogil=True)
def top_quantized(
    query: np.ndarray,
    n: int,
    codes: np.ndarray,
    scale: np.ndarray,
    vectors: np.ndarray,
    count: int,
    excluded: np.ndarray,
    survivors: np.ndarray,
    upper: np.ndarray,
    largest_scale: float,
) -> tuple[np.ndarray, np.ndarray, int]:
    """The scan of the module docstring, and how many rows it scored again. ``survivors`` and
    ``upper`` are scratch of at least ``count`` slots; ``largest_scale`` is at least every
    row's scale: where the scan's sums could overflow (or the query is not finite) every row
    not excluded is scored instead."""
    if n <= 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32), 0
    factors = len(query)
    norm1 = 0.0
    for f in range(factors):
        norm1 += abs(float(query[f]))
    # Hölder's half, plus room for float32 rounding: a sum of F products in any order is off by
    # at most F 2^-24 of the sum of their sizes, at most 127 c_i |y|_1; the scan and the
    # rescoring each round, and the room is twice theirs.
    half = np.float32(norm1 * (0.5 + 4.0 * factors * 127.0 / 2.0**24))
    prune = 127.0 * norm1 * max(largest_scale, 1.0) < LARGEST_SUM  # False for NaN too
    lowest = np.empty(n, dtype=np.float32)  # a heap of the n largest lower bounds
    lowest_rows = np.empty(n, dtype=np.int64)
    kept, found = 0, 0
    floor = np.float32(-np.inf)  # the n-th largest lower bound so far
    sums = np.empty(SCAN_BLOCK, dtype=np.float32)
    if not prune:
        for row in range(count):
            if not excluded[row]:
                survivors[found], upper[found] = row, np.inf
                found += 1
    for start in range(0, count if prune else 0, SCAN_BLOCK):
        size = min(SCAN_BLOCK, count - start)
        _scan(query, codes, start, size, sums)
        for j in range(size):
            c = scale[start + j]
            sums[j] = sums[j] * c + c * half  # the upper bound
        for j in range(size):
            up = sums[j]
            if up < floor:
                continue
            row = start + j
            if excluded[row]:
                continue
            survivors[found], upper[found] = row, up
            found += 1
            low = up - np.float32(2.0) * scale[row] * half
            if kept < n or low > lowest[0]:
                kept = offer(lowest, lowest_rows, kept, low, row)
                if kept == n:
                    floor = lowest[0]
    best = np.empty(n, dtype=np.float32)
    best_rows = np.empty(n, dtype=np.int64)
    kept, rescored = 0, 0
    for k in range(found):
        if upper[k] < floor:
            continue
        rescored += 1
        row = survivors[k]
        score = np.float32(0.0)
        for f in range(factors):
            score += vectors[row, f] * query[f]
        if kept < n or score >= best[0]:
            kept = offer(best, best_rows, kept, score, row)
    rows, scores = best_first(best, best_rows, kept)
    return rows, scores, rescored


@numba.njit(cache=True, nogil=True, fastmath=True, inline="never")
def _scan(query: np.ndarray, codes: np.ndarray, start: int, size: int, sums: np.ndarray) -> None:
    """``sums[j] = sum_f query[f] * codes[f, start + j]``, eight factors per pass over ``sums``."""
    factors = codes.shape[0]
    for j in range(size):
        sums[j] = 0.0
    f = 0
    while f + 8 <= factors:
        y0, y1, y2, y3 = query[f], query[f + 1], query[f + 2], query[f + 3]
        y4, y5, y6, y7 = query[f + 4], query[f + 5], query[f + 6], query[f + 7]
        r0, r1 = codes[f, start : start + size], codes[f + 1, start : start + size]
        r2, r3 = codes[f + 2, start : start + size], codes[f + 3, start : start + size]
        r4, r5 = codes[f + 4, start : start + size], codes[f + 5, start : start + size]
        r6, r7 = codes[f + 6, start : start + size], codes[f + 7, start : start + size]
        for j in range(size):
            sums[j] += (
                y0 * np.float32(r0[j]) + y1 * np.float32(r1[j])
                + y2 * np.float32(r2[j]) + y3 * np.float32(r3[j])
                + y4 * np.float32(r4[j]) + y5 * np.float32(r5[j])
                + y6 * np.float32(r6[j]) + y7 * np.float32(r7[j])
            )  # fmt: skip
        f += 8
    while f < factors:
        y = query[f]
        r = codes[f, start : start + size]
        for j in range(size):
            sums[j] += y * np.float32(r[j])
        f += 1
