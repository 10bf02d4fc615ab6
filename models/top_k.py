"""Exact top-n of a large score vector without sorting or partitioning all of it.

MF recall ranks every item of the catalogue for every request. A full ``argpartition`` over
50,000 scores costs several times the dot product that made them. Instead, the n-th largest of
a strided sample of ``n``-ish scores gives a threshold that at least ``n`` scores reach (they
are in the sample); only the scores at or above it are sorted. The result is exact: every
score above the n-th largest is at or above the threshold, and ties are broken by position, as
a stable sort of the whole vector would. When the sample happens to give too few, a threshold
from a full partition is used instead.

Compiled searches that score rows one at a time keep their best in `offer`'s bounded heap
instead, and `best_first` puts the heap in the same order: higher score first, ties to the
lower row.
"""

from __future__ import annotations

import numba
import numpy as np

SAMPLE_STRIDE = 16


def top_n(scores: np.ndarray, n: int) -> np.ndarray:
    """Positions of the ``n`` largest scores, largest first; ties in position order.

    Equals ``np.argsort(-scores, kind="stable")[:n]``.

    Examples
    --------
    >>> top_n(np.array([0.2, 0.9, 0.1, 0.9, 0.5]), 3).tolist()
    [1, 3, 4]
    """
    size = len(scores)
    n = min(n, size)
    if n <= 0:
        return np.empty(0, dtype=np.int64)
    if n == size:
        return np.argsort(-scores, kind="stable")
    above = None
    if size >= 8 * SAMPLE_STRIDE * n:
        sample = scores[::SAMPLE_STRIDE]
        # About twice n scores are expected at or above the sample's m-th largest.
        m = min(len(sample), 2 * n // SAMPLE_STRIDE + 1)
        threshold = np.partition(sample, len(sample) - m)[len(sample) - m]
        above = np.flatnonzero(scores >= threshold)
    if above is None or len(above) < n:
        threshold = np.partition(scores, size - n)[size - n]
        above = np.flatnonzero(scores >= threshold)
        if len(above) < n:  # NaN scores, which compare with nothing: last, as argsort puts them
            return np.argsort(-scores, kind="stable")[:n]
    return above[np.argsort(-scores[above], kind="stable")[:n]]


@numba.njit(cache=True, nogil=True, inline="always")
def _worse(score_a: float, row_a: int, score_b: float, row_b: int) -> bool:
    return score_a < score_b or (score_a == score_b and row_a > row_b)


@numba.njit(cache=True, nogil=True)
def offer(scores: np.ndarray, rows: np.ndarray, kept: int, score: float, row: int) -> int:
    """Keeps (score, row) among the best ``len(scores)`` in a heap whose root is the worst
    kept (lower score, then higher row); returns how many are kept."""
    if kept < len(scores):  # sift up
        at = kept
        while at > 0:
            parent = (at - 1) // 2
            if not _worse(score, row, scores[parent], rows[parent]):
                break
            scores[at], rows[at] = scores[parent], rows[parent]
            at = parent
        scores[at], rows[at] = score, row
        return kept + 1
    if not _worse(scores[0], rows[0], score, row):
        return kept
    at = 0  # replace the worst, sift down
    while True:
        child = 2 * at + 1
        if child >= kept:
            break
        if child + 1 < kept and _worse(
            scores[child + 1], rows[child + 1], scores[child], rows[child]
        ):
            child += 1
        if not _worse(scores[child], rows[child], score, row):
            break
        scores[at], rows[at] = scores[child], rows[child]
        at = child
    scores[at], rows[at] = score, row
    return kept


@numba.njit(cache=True, nogil=True)
def best_first(scores: np.ndarray, rows: np.ndarray, kept: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``kept`` rows of an `offer` heap and their scores, best first, ties to the lower row."""
    rows, scores = rows[:kept], scores[:kept]
    by_row = np.argsort(rows)
    rows, scores = rows[by_row], scores[by_row]
    ranked = np.argsort(-scores, kind="mergesort")
    return rows[ranked], scores[ranked]
