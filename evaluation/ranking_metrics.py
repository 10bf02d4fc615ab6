r"""Prequential metrics: ranks with pessimistic ties, top-N scores, running rating errors.

Pure functions and small accumulators over numpy arrays, no I/O, so that every system an
evaluation compares (freshrec, the baselines) is scored by exactly the same arithmetic.

A *rank* is 1-based; a target that is not ranked at all (absent from a truncated list, or not a
candidate) has rank :data:`MISSING` (``inf``), which every metric below scores as 0. Ties are
counted **pessimistically**: the target is placed after every other candidate whose score is
greater than *or equal to* its own,

.. math::

    \operatorname{rank}(t) = 1 + \lvert \{ j \ne t : s_j \ge s_t \} \rvert,

so a model that scores everything alike (a constant, or all zeros before it has learned) ranks
the target last, not first. A NaN score counts as :math:`-\infty`: it never ranks first, and a
NaN target ties with (and so goes after) every other NaN candidate. In a served list, which
diversification may have reordered, the position the user saw counts and ties still go
against the target (:func:`rank_in_list`). From a rank :math:`r`:

.. math::

    \mathrm{HR@}k = [r \le k], \quad
    \mathrm{NDCG@}k = \frac{[r \le k]}{\log_2(r + 1)}, \quad
    \mathrm{RR@}n = \frac{[r \le n]}{r}

with one relevant item per event, so the ideal DCG is 1. The reciprocal rank is truncated at
the length ``n`` of the list that was ranked (MRR@n), because a served list says nothing about
where an item below its end would have come.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "MISSING",
    "ErrorAccumulator",
    "TopNAccumulator",
    "clip_predictions",
    "hit_rate",
    "ndcg",
    "pessimistic_rank",
    "pessimistic_ranks",
    "rank_in_list",
    "reciprocal_rank",
    "rolling_mean",
]

COLD_BELOW = 5
"""An item with fewer interactions than this before an event is cold at that event."""
MISSING = math.inf
"""The rank of a target that was not ranked: every metric scores it 0."""


def _finite_or_worst(scores: np.ndarray) -> np.ndarray:
    """Scores as float64 with NaN replaced by -inf (a NaN never outranks anything)."""
    out = np.asarray(scores, dtype=np.float64)
    return np.where(np.isnan(out), -np.inf, out)


def pessimistic_rank(
    scores: Sequence[float] | np.ndarray, target: int, candidates: np.ndarray | None = None
) -> float:
    """Rank of ``scores[target]`` among the candidates, ties counted against the target.

    Parameters
    ----------
    scores
        One score per item; higher is better. NaN counts as the lowest possible score.
    target
        Index of the relevant item.
    candidates
        Boolean mask of the items that compete (e.g. not seen by the user); all when omitted.
        The target competes whatever the mask says.

    Returns
    -------
    float
        ``1 + #{j != target, candidate: s_j >= s_target}``.

    Examples
    --------
    >>> pessimistic_rank([0.9, 0.5, 0.5, 0.1], target=1)
    3.0
    >>> pessimistic_rank([0.9, 0.5, 0.5, 0.1], target=1, candidates=[False, True, True, True])
    2.0
    >>> pessimistic_rank([float("nan"), 0.2, 0.1], target=2)
    2.0
    >>> pessimistic_rank([0.0, 0.0, 0.0], target=0)  # all alike: last, not first
    3.0
    """
    row = np.asarray(scores, dtype=np.float64)[None, :]
    mask = None if candidates is None else np.asarray(candidates, dtype=bool)[None, :]
    return float(pessimistic_ranks(row, np.array([target]), mask)[0])


def pessimistic_ranks(
    scores: np.ndarray, targets: np.ndarray, candidates: np.ndarray | None = None
) -> np.ndarray:
    """:func:`pessimistic_rank` of one target per row of a score matrix, vectorised.

    Parameters
    ----------
    scores
        ``(rows, items)`` scores; NaN counts as the lowest possible score.
    targets
        ``(rows,)`` column of each row's relevant item; a negative index means the target is
        not an item of the matrix (unknown so far), and its rank is :data:`MISSING`.
    candidates
        ``(rows, items)`` boolean mask of the competing items; all when omitted.

    Examples
    --------
    >>> s = np.array([[0.1, 0.7, 0.3], [0.5, 0.5, 0.5]])
    >>> pessimistic_ranks(s, np.array([2, 0])).tolist()
    [2.0, 3.0]
    >>> pessimistic_ranks(s, np.array([1, -1])).tolist()
    [1.0, inf]
    """
    s = _finite_or_worst(scores)
    targets = np.asarray(targets, dtype=np.int64)
    known = targets >= 0
    rows = np.arange(s.shape[0])
    own = s[rows, np.where(known, targets, 0)]
    ahead = s >= own[:, None]
    if candidates is not None:
        ahead &= np.asarray(candidates, dtype=bool)
    ahead[rows, np.where(known, targets, 0)] = False
    ranks = 1.0 + ahead.sum(axis=1).astype(np.float64)
    return np.where(known, ranks, MISSING)


def rank_in_list(items: Sequence[str], scores: Sequence[float] | None, target: str) -> float:
    """Rank of ``target`` in a served list: its position, with ties counted against it.

    A served list need not be sorted by its scores (diversification and exploration slots
    reorder it), so the position the user saw is the rank; on top of it, every item listed
    *after* the target with the same score (or a NaN on either side) counts ahead of it, as
    nothing but an arbitrary tie-break put the target first. On a list sorted by score this is
    exactly ``1 + #{other listed items with score >= the target's}``; a list of equal scores
    ranks the target last. A target whose own score is NaN ties with every candidate, listed
    or not, and so ranks as a baseline's NaN does, last of all: :data:`MISSING`.

    Parameters
    ----------
    items
        The list, best first.
    scores
        The score of each listed item; without scores the position is the rank.
    target
        The relevant item.

    Returns
    -------
    float
        The pessimistic rank; :data:`MISSING` when the target is not in the list.

    Examples
    --------
    >>> rank_in_list(["a", "b", "c"], [0.9, 0.4, 0.4], "b")
    3.0
    >>> rank_in_list(["a", "b", "c"], [0.2, 0.9, 0.7], "b")  # reordered: the user saw b second
    2.0
    >>> rank_in_list(["a", "b", "c"], [0.5, float("nan"), 0.7], "a")  # a NaN after: a tie
    2.0
    >>> rank_in_list(["a", "b", "c"], [float("nan"), 0.5, 0.7], "a")
    inf
    >>> rank_in_list(["a", "b", "c"], None, "b")
    2.0
    >>> rank_in_list(["a", "b"], [0.9, 0.4], "z")
    inf
    """
    try:
        position = list(items).index(target)
    except ValueError:
        return MISSING
    if scores is None:
        return float(position + 1)
    own = float(scores[position])
    if math.isnan(own):
        return MISSING
    later = np.asarray(scores, dtype=np.float64)[position + 1 :]
    ties = (later == own) | np.isnan(later)
    return float(position + 1 + int(ties.sum()))


def listed_top(scores: np.ndarray, k: int) -> np.ndarray:
    """Per row of ``scores``, which columns a list of the ``k`` best would hold: finite scores
    only, ties at the cut broken by column order (the catalogue's), as a stable sort would.

    A baseline that scores many items alike (item-kNN's zeros) must not fill its list with
    whichever of them a partial sort happened to pick: coverage would count them.

    Examples
    --------
    >>> listed_top(np.array([[0.0, 3.0, 0.0, 0.0, -np.inf]]), 3).astype(int).tolist()
    [[1, 1, 1, 0, 0]]
    """
    scores = np.asarray(scores, dtype=np.float64)
    scores = np.where(np.isnan(scores), -np.inf, scores)  # NaN is no score: never listed
    k = min(k, scores.shape[1])
    if k <= 0:
        return np.zeros(scores.shape, dtype=bool)
    cut = -np.partition(-scores, k - 1, axis=1)[:, k - 1 : k]  # the k-th largest of each row
    above = scores > cut
    ties = scores == cut
    room = k - above.sum(axis=1, keepdims=True)
    return (above | (ties & (np.cumsum(ties, axis=1) <= room))) & np.isfinite(scores)


def hit_rate(ranks: float | np.ndarray, k: int) -> np.ndarray:
    """``[rank <= k]`` as 0.0 or 1.0.

    Examples
    --------
    >>> hit_rate(np.array([1, 10, 11, np.inf]), 10).tolist()
    [1.0, 1.0, 0.0, 0.0]
    """
    return (np.asarray(ranks, dtype=np.float64) <= k).astype(np.float64)


def ndcg(ranks: float | np.ndarray, k: int) -> np.ndarray:
    """``1 / log2(rank + 1)`` when ``rank <= k``, else 0 (one relevant item per event).

    Examples
    --------
    >>> ndcg(np.array([1, 3, 11, np.inf]), 10).round(4).tolist()
    [1.0, 0.5, 0.0, 0.0]
    """
    r = np.asarray(ranks, dtype=np.float64)
    inside = r <= k
    safe = np.where(inside, r, 1.0)
    return np.where(inside, 1.0 / np.log2(safe + 1.0), 0.0)


def reciprocal_rank(ranks: float | np.ndarray, cutoff: float = MISSING) -> np.ndarray:
    """``1 / rank`` when ``rank <= cutoff``, else 0.

    Examples
    --------
    >>> reciprocal_rank(np.array([1, 4, 25, np.inf]), cutoff=20).tolist()
    [1.0, 0.25, 0.0, 0.0]
    """
    r = np.asarray(ranks, dtype=np.float64)
    inside = r <= cutoff
    return np.where(inside, 1.0 / np.where(inside, r, 1.0), 0.0)


def clip_predictions(
    predictions: float | np.ndarray, low: float, high: float, fallback: float
) -> np.ndarray:
    """Predictions clipped to the rating scale, a NaN replaced by ``fallback`` (also clipped).

    Examples
    --------
    >>> clip_predictions(np.array([0.2, 3.3, 7.0, np.nan, -np.inf]), 1.0, 5.0, 3.0).tolist()
    [1.0, 3.3, 5.0, 3.0, 1.0]
    """
    p = np.asarray(predictions, dtype=np.float64)
    p = np.where(np.isnan(p), fallback, p)
    return np.clip(p, low, high)


@dataclass
class ErrorAccumulator:
    r"""Running MAE and RMSE of rating predictions, in O(1) memory.

    :math:`\mathrm{MAE} = \frac1n \sum |r - \hat r|`,
    :math:`\mathrm{RMSE} = \sqrt{\frac1n \sum (r - \hat r)^2}`. A pair with a non-finite
    prediction or truth is not added; it is counted in ``rejected`` so that it shows.

    Examples
    --------
    >>> acc = ErrorAccumulator()
    >>> acc.update(np.array([3.0, 4.0, np.nan]), np.array([4.0, 2.0, 5.0]))
    >>> acc.n, acc.rejected, acc.mae, round(acc.rmse, 4)
    (2, 1, 1.5, 1.5811)
    """

    n: int = 0
    rejected: int = 0
    abs_sum: float = 0.0
    sq_sum: float = 0.0

    def update(self, predictions: np.ndarray, truths: np.ndarray) -> None:
        p = np.asarray(predictions, dtype=np.float64)
        t = np.asarray(truths, dtype=np.float64)
        ok = np.isfinite(p) & np.isfinite(t)
        err = (t - p)[ok]
        self.n += int(ok.sum())
        self.rejected += int((~ok).sum())
        self.abs_sum += float(np.abs(err).sum())
        self.sq_sum += float((err * err).sum())

    @property
    def mae(self) -> float:
        return self.abs_sum / self.n if self.n else math.nan

    @property
    def rmse(self) -> float:
        return math.sqrt(self.sq_sum / self.n) if self.n else math.nan


@dataclass
class TopNAccumulator:
    """Running HR@k, NDCG@k and truncated MRR over events, plus the items recommended.

    Parameters
    ----------
    hit_ks
        The cut-offs of the hit rates.
    ndcg_k
        The cut-off of NDCG.
    list_length
        Length of the ranked lists: the truncation of MRR and the depth a hit can have.
    coverage_k
        Depth of each list whose items count towards catalog coverage.

    Examples
    --------
    >>> acc = TopNAccumulator()
    >>> acc.update(np.array([1.0, 4.0, np.inf, 15.0]), cold=np.array([True, False, False, True]))
    >>> acc.metrics()["hr@10"], acc.metrics()["hr@20"], acc.metrics()["mrr"]
    (0.5, 0.75, 0.329167)
    >>> acc.cold_hit_share
    0.5
    """

    hit_ks: tuple[int, ...] = (10, 20)
    ndcg_k: int = 10
    list_length: int = 20
    coverage_k: int = 10
    n: int = 0
    hits: dict[int, float] = field(default_factory=dict)
    ndcg_sum: float = 0.0
    rr_sum: float = 0.0
    cold_events: int = 0
    cold_hits: int = 0
    recommended: set[str] = field(default_factory=set)

    def update(self, ranks: np.ndarray, cold: np.ndarray | None = None) -> None:
        """Add events by the rank of their target (``MISSING`` when not ranked)."""
        r = np.asarray(ranks, dtype=np.float64)
        r = np.where(np.isnan(r), MISSING, r)  # an undefined rank is a miss, never a hit
        self.n += r.size
        for k in self.hit_ks:
            self.hits[k] = self.hits.get(k, 0.0) + float(hit_rate(r, k).sum())
        self.ndcg_sum += float(ndcg(r, self.ndcg_k).sum())
        self.rr_sum += float(reciprocal_rank(r, self.list_length).sum())
        if cold is not None:
            c = np.asarray(cold, dtype=bool)
            self.cold_events += int(c.sum())
            self.cold_hits += int((hit_rate(r, self.ndcg_k).astype(bool) & c).sum())

    def recommend(self, items: Sequence[str]) -> None:
        """Note a served list for coverage (its first ``coverage_k`` items)."""
        self.recommended.update(items[: self.coverage_k])

    def hr(self, k: int) -> float:
        return self.hits.get(k, 0.0) / self.n if self.n else math.nan

    @property
    def cold_hit_share(self) -> float:
        """Share of the hits at ``ndcg_k`` whose target was a cold item."""
        hits = self.hits.get(self.ndcg_k, 0.0)
        return self.cold_hits / hits if hits else math.nan

    def coverage(self, catalog_size: int) -> float:
        return len(self.recommended) / catalog_size if catalog_size else math.nan

    def metrics(self, catalog_size: int = 0, digits: int = 6) -> dict[str, float]:
        out = {f"hr@{k}": self.hr(k) for k in self.hit_ks}
        out[f"ndcg@{self.ndcg_k}"] = self.ndcg_sum / self.n if self.n else math.nan
        out["mrr"] = self.rr_sum / self.n if self.n else math.nan
        if catalog_size:
            out["coverage"] = self.coverage(catalog_size)
        out["cold_hit_share"] = self.cold_hit_share
        return {key: round(value, digits) for key, value in out.items()}


def rolling_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last ``window`` values at every position (fewer at the start).

    Examples
    --------
    >>> rolling_mean(np.array([1.0, 3.0, 5.0, 7.0]), 2).tolist()
    [1.0, 2.0, 4.0, 6.0]
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return v
    window = max(1, int(window))
    sums = np.cumsum(np.concatenate([[0.0], v]))
    ends = np.arange(1, v.size + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)
