r"""Maximal marginal relevance (Carbonell & Goldstein, 1998): relevant *and* varied lists.

Items are picked greedily; each pick maximises

.. math::

    (1 - \lambda)\, \mathrm{rel}_i - \lambda \max_{j \in S} \mathrm{sim}(i, j)

over the items not yet picked, where :math:`S` is the list so far, relevance is rescaled to
[0, 1] and similarity is the cosine of item factor vectors. :math:`\lambda = 0` keeps the
relevance order; raising :math:`\lambda` trades relevance for variety.
"""

from __future__ import annotations

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
    n = len(relevance)
    k = min(k, n)
    if k == 0:
        return []
    # Relevance rescaled to [0, 1] over its finite values; NaN or infinite ones count as 0.
    rel = np.array(relevance, dtype=np.float64)
    finite = np.isfinite(rel)
    every = bool(finite.all())
    if every or finite.any():
        lo, hi = (rel.min(), rel.max()) if every else (rel[finite].min(), rel[finite].max())
        rel = (rel - lo) / (hi - lo) if hi > lo else np.ones(n)
        if not every:
            rel[~finite] = 0.0
    else:
        rel = np.zeros(n)
    if diversity <= 0.0:
        return np.argsort(-rel, kind="stable")[:k].tolist()
    norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors))
    unit = vectors / np.where(norms > 0, norms, 1.0)[:, None]
    weighted = diversity * unit  # so a dot product gives lambda * sim at once
    base = (1.0 - diversity) * rel  # a picked item's base becomes -inf: never picked again
    best = int(np.argmax(base))
    picked = [best]
    base[best] = -np.inf
    penalty = np.dot(unit, weighted[best])  # lambda * max similarity to the picks so far
    for _ in range(k - 1):
        best = int(np.argmax(base - penalty))
        picked.append(best)
        base[best] = -np.inf
        penalty = np.maximum(penalty, np.dot(unit, weighted[best]))
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
