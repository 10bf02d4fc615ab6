r"""Maximal marginal relevance (Carbonell & Goldstein, 1998): relevant *and* varied lists.

Items are picked greedily; each pick maximises

.. math::

    (1 - \lambda)\, \mathrm{rel}_i - \lambda \max_{j \in S} \mathrm{sim}(i, j)

over the items not yet picked, where :math:`S` is the list so far, relevance is rescaled to
[0, 1] and similarity is the cosine of item factor vectors. :math:`\lambda = 0` keeps the
relevance order; raising :math:`\lambda` trades relevance for variety.
"""

from __future__ import annotations

import numba
import numpy as np


def mmr(relevance: np.ndarray, vectors: np.ndarray, k: int, diversity: float) -> list[int]:
    """Indices of the ``k`` picks, in order.

    Examples
    --------
    Two near-duplicates and one different item; with diversity the different one moves up:

    >>> rel = np.array([1.0, 0.95, 0.5])
    >>> vecs = np.array([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0]])
    >>> mmr(rel, vecs, 2, diversity=0.0), mmr(rel, vecs, 2, diversity=0.5)
    ([0, 1], [0, 2])
    """
    relevance = np.asarray(relevance, dtype=np.float64)
    return mmr_picks(relevance, np.asarray(vectors), k, diversity).tolist()


@numba.njit(cache=True, nogil=True)
def mmr_picks(relevance: np.ndarray, vectors: np.ndarray, k: int, diversity: float) -> np.ndarray:
    """`mmr`, compiled and callable from compiled code: k passes over n cost no array calls."""
    n, width = vectors.shape
    k = min(k, n)
    # Relevance rescaled to [0, 1] over its finite values; NaN or infinite ones count as 0.
    lo, hi = np.inf, -np.inf
    for i in range(n):
        if np.isfinite(relevance[i]):
            lo, hi = min(lo, relevance[i]), max(hi, relevance[i])
    rel = np.zeros(n)
    for i in range(n):
        if np.isfinite(relevance[i]):
            rel[i] = (relevance[i] - lo) / (hi - lo) if hi > lo else 1.0
    if diversity <= 0.0:
        return np.argsort(-rel, kind="mergesort")[:k]
    unit = np.empty((n, width))
    for i in range(n):
        norm = 0.0
        for d in range(width):
            norm += float(vectors[i, d]) ** 2
        scale = 1.0 / np.sqrt(norm) if norm > 0 else 1.0
        for d in range(width):
            unit[i, d] = vectors[i, d] * scale
    base = (1.0 - diversity) * rel
    penalty = np.zeros(n)  # lambda * the largest similarity to the picks so far
    taken = np.zeros(n, dtype=np.bool_)
    picked = np.empty(k, dtype=np.int64)
    for step in range(k):
        best, best_value = -1, -np.inf
        for i in range(n):
            if not taken[i] and (best < 0 or base[i] - penalty[i] > best_value):
                best, best_value = i, base[i] - penalty[i]
        picked[step], taken[best] = best, True
        for i in range(n):
            similarity = 0.0
            for d in range(width):
                similarity += unit[i, d] * unit[best, d]
            similarity *= diversity
            penalty[i] = similarity if step == 0 else max(penalty[i], similarity)
    return picked


def intra_list_similarity(vectors: np.ndarray) -> float:
    """Mean pairwise cosine similarity of a list's items: lower is more diverse."""
    if len(vectors) < 2:
        return 0.0
    norms = np.linalg.norm(vectors, axis=1)
    unit = vectors / np.where(norms > 0, norms, 1.0)[:, None]
    sims = unit @ unit.T
    n = len(vectors)
    return float((sims.sum() - np.trace(sims)) / (n * (n - 1)))
