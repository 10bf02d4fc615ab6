r"""Reference learners an evaluation runs side by side with freshrec, over integer item indices.

Items are numbered ``0, 1, 2, ...`` in the order they first appear (the caller keeps that
catalog), so that a learner scores the whole catalog as one vector and a ranking is one numpy
comparison, not a loop over items.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from river import optim, reco

__all__ = ["BiasedMFRanker", "ItemKNN", "PopularityBaseline"]


def _grown(array: np.ndarray, size: int) -> np.ndarray:
    """``array`` zero-padded along its first axis to at least ``size`` rows (doubling)."""
    if size <= array.shape[0]:
        return array
    rows = max(size, 2 * array.shape[0], 64)
    out = np.zeros((rows, *array.shape[1:]), dtype=array.dtype)
    out[: array.shape[0]] = array
    return out


def _grown_square(array: np.ndarray, size: int) -> np.ndarray:
    """A square ``array`` zero-padded on both axes to at least ``size`` (doubling)."""
    if size <= array.shape[0]:
        return array
    side = max(size, 2 * array.shape[0], 64)
    out = np.zeros((side, side), dtype=array.dtype)
    out[: array.shape[0], : array.shape[1]] = array
    return out


class PopularityBaseline:
    r"""Most-popular ranker and item-mean rating predictor: the floor a personal model must beat.

    It ranks every item by how many users have interacted with it so far, the same list for
    every user (minus what the user has seen), and predicts a rating as the item's mean rating
    so far, falling back on the global mean for an item without ratings:

    .. math::

        s_i = |U_i|, \qquad \hat r_{ui} = \frac{\sum_{u'} r_{u'i}}{m_i} \ (m_i > 0), \quad
        \hat r_{ui} = \mu \ (m_i = 0)

    Users, not events: every target is an item new to its user, so the question is how many
    users come to an item, and a few users returning to an item over and over would otherwise
    rank it above items many users came to once. (The same count as item-kNN's norm.)

    Examples
    --------
    >>> pop = PopularityBaseline()
    >>> for user, item, rating in [("a", 0, 4.0), ("b", 0, None), ("a", 1, 2.0), ("a", 1, None)]:
    ...     pop.learn_one(user, item, rating)
    >>> pop.scores(3).tolist()
    [2.0, 1.0, 0.0]
    >>> pop.predict_rating(0), pop.predict_rating(2)
    (4.0, 3.0)
    """

    def __init__(self) -> None:
        self.counts = np.zeros(0)
        self.rating_sums = np.zeros(0)
        self.rating_counts = np.zeros(0)
        self.total = 0.0
        self.rated = 0
        self._seen: dict[str, set[int]] = {}

    def learn_one(self, user: str, item: int, rating: float | None = None) -> None:
        """Count ``user`` for ``item`` unless counted before; a rating also updates its mean."""
        self.counts = _grown(self.counts, item + 1)
        seen = self._seen.setdefault(user, set())
        if item not in seen:
            seen.add(item)
            self.counts[item] += 1.0
        if rating is not None:
            self.rating_sums = _grown(self.rating_sums, item + 1)
            self.rating_counts = _grown(self.rating_counts, item + 1)
            self.rating_sums[item] += rating
            self.rating_counts[item] += 1.0
            self.total += rating
            self.rated += 1

    def scores(self, n_items: int) -> np.ndarray:
        """Distinct users of items ``0 .. n_items - 1``."""
        return _grown(self.counts, n_items)[:n_items].copy()

    def predict_rating(self, item: int) -> float:
        """The item's mean rating, else the global mean, else NaN (no rating yet)."""
        if 0 <= item < self.rating_counts.shape[0] and self.rating_counts[item] > 0:
            return float(self.rating_sums[item] / self.rating_counts[item])
        return self.total / self.rated if self.rated else math.nan


class ItemKNN:
    r"""Incremental item-kNN: cosine of co-occurrence counts over each user's full history.

    The classic neighbourhood recommender, kept exact online: every item a user interacts
    with for the first time co-occurs once with every item already in that user's history,
    and a user's candidates are scored by their summed cosine similarity to the whole
    history. It is the strong, non-personalised-parameter baseline a streaming recommender
    must beat; the research protocol behind ``freshrec eval`` defines it exactly so.

    On a learned interaction :math:`(u, i)` with :math:`i \notin H_u`, :math:`n_i \mathrel{+}= 1`
    and :math:`C_{ih} \mathrel{+}= 1,\ C_{hi} \mathrel{+}= 1` for every :math:`h \in H_u`, then
    :math:`H_u \leftarrow H_u \cup \{i\}`; a repeated interaction changes nothing. :math:`n_i`
    is the number of users of :math:`i` and :math:`C_{hj}` of users of both, so the weight below
    is the cosine of the items' binary user vectors. The score of item :math:`j` for user
    :math:`u` is

    .. math::

        s_{uj} = \sum_{h \in H_u} \frac{C_{hj}}{\sqrt{n_h\, n_j}}

    (0 for an item without interactions). ``C`` is a dense ``float32`` matrix of
    ``n_items^2`` counts (exact up to :math:`2^{24}` per pair; 11 MB for ML-100K's 1,682
    items), so a user's scores are one single-precision vector-matrix product over the rows
    of the history: relative error about ``1e-7``, as in the research that defined it.

    Examples
    --------
    >>> knn = ItemKNN()
    >>> for user, item in [("ann", 0), ("ann", 1), ("bob", 0), ("bob", 1), ("bob", 2)]:
    ...     knn.learn_one(user, item)
    >>> knn.scores(["ann", "cat"], n_items=3).round(4).tolist()
    [[1.0, 1.0, 1.4142], [0.0, 0.0, 0.0]]
    """

    def __init__(self) -> None:
        self.cooccurrence = np.zeros((0, 0), dtype=np.float32)
        self.counts = np.zeros(0)
        self.history: dict[str, list[int]] = {}
        self._seen: dict[str, set[int]] = {}

    def learn_one(self, user: str, item: int) -> None:
        """One interaction of ``user`` with ``item``."""
        seen = self._seen.setdefault(user, set())
        if item in seen:
            return
        self.counts = _grown(self.counts, item + 1)
        self.counts[item] += 1.0
        history = self.history.setdefault(user, [])
        if history:
            self.cooccurrence = _grown_square(self.cooccurrence, max(item, *history) + 1)
            rows = np.asarray(history)
            self.cooccurrence[item, rows] += 1.0
            self.cooccurrence[rows, item] += 1.0
        history.append(item)
        seen.add(item)

    def scores(self, users: Sequence[str], n_items: int) -> np.ndarray:
        """``(len(users), n_items)`` matrix of :math:`s_{uj}`."""
        counts = _grown(self.counts, n_items)[:n_items]
        norm = np.sqrt(counts)
        inverse = np.divide(1.0, norm, out=np.zeros_like(norm), where=norm > 0)
        weights = inverse.astype(np.float32)
        self.cooccurrence = matrix = _grown_square(self.cooccurrence, n_items)
        out = np.zeros((len(users), n_items))
        for row, user in enumerate(users):
            history = self.history.get(user)
            if history:
                rows = np.asarray(history)
                out[row] = (weights[rows] @ matrix[rows])[:n_items]  # float32 throughout
        return out * inverse[None, :]


class BiasedMFRanker:
    r"""river's ``reco.BiasedMF`` as a rating predictor and as a ranker of a catalog.

    The model is river's own, configured with freshrec's factor settings: its factor update is
    freshrec's (:mod:`freshrec.models.mf`), ``lr = gamma / 2`` and ``l2 = 2 lambda``, initial
    factors ``N(0, init_std^2)``. Its biases take the same constant step and penalty, which
    river can express, not freshrec's own bias step (:mod:`freshrec.models.biased_mf`: a step
    that shrinks with the item's rating count, no penalty), which it cannot. Ratings are
    river's ``predict_one``; a ranking scores every item by the part of the prediction that
    depends on the item,

    .. math::

        s_{ui} = b_i + p_u^\top q_i,

    from dense copies of river's item biases and factors, refreshed for the items each call
    to :meth:`learn_one` touched. An item that has no rating yet scores 0 (no evidence), and
    a user without ratings is ranked by item bias alone.

    Parameters
    ----------
    factors
        Latent factors per user and item.
    lr
        freshrec's SGD learning rate gamma.
    reg
        freshrec's L2 penalty lambda.
    init_std
        Standard deviation of the initial factors.
    seed
        Seed of river's initializer.

    Examples
    --------
    >>> mf = BiasedMFRanker(factors=4, lr=0.1, reg=0.0, seed=1)
    >>> for _ in range(50):
    ...     mf.learn_one("ann", 0, 5.0)
    ...     mf.learn_one("ann", 1, 1.0)
    >>> mf.predict_rating("ann", 0) > 4.0 > 2.0 > mf.predict_rating("ann", 1)
    True
    >>> scores = mf.scores(["ann", "bob"], n_items=3)
    >>> scores.shape, bool(scores[0, 0] > scores[0, 2] > scores[0, 1])
    ((2, 3), True)
    """

    def __init__(
        self, factors: int, lr: float, reg: float, init_std: float = 0.1, seed: int | None = None
    ) -> None:
        self.factors = factors
        self.model = reco.BiasedMF(
            n_factors=factors,
            bias_optimizer=optim.SGD(lr / 2),
            latent_optimizer=optim.SGD(lr / 2),
            l2_bias=2 * reg,
            l2_latent=2 * reg,
            latent_initializer=optim.initializers.Normal(mu=0.0, sigma=init_std, seed=seed),
        )
        self._bias = np.zeros(0)
        self._latent = np.zeros((0, factors))
        self._touched: set[int] = set()

    @classmethod
    def river_documented(cls, seed: int = 73) -> BiasedMFRanker:
        """river's ``BiasedMF`` exactly as river's own MovieLens 100K tutorial configures it.

        Ten factors, ``SGD(0.025)`` on the biases and ``SGD(0.05)`` on the factors, no L2,
        biases from zero and factors from ``Normal(0, 0.1)`` with the tutorial's seed 73
        (river's documentation reports RMSE 0.9479 and MAE 0.7486 over ML-100K, one rating at a
        time: the reference any personal rating model is held to).
        """
        ranker = cls(factors=10, lr=0.05, reg=0.0, init_std=0.1, seed=seed)
        ranker.model = reco.BiasedMF(
            n_factors=10,
            bias_optimizer=optim.SGD(0.025),
            latent_optimizer=optim.SGD(0.05),
            l2_bias=0.0,
            l2_latent=0.0,
            weight_initializer=optim.initializers.Zeros(),
            latent_initializer=optim.initializers.Normal(mu=0.0, sigma=0.1, seed=seed),
        )
        return ranker

    def learn_one(self, user: str, item: int, rating: float) -> None:
        self.model.learn_one(user, item, rating)
        self._touched.add(item)

    def predict_rating(self, user: str, item: int) -> float:
        """river's prediction ``mu + b_u + b_i + p_u.q_i`` (unclipped); NaN before any rating.

        Before its first rating river's mean is 0, which is no prediction on a rating scale.
        """
        if self.model.global_mean.n == 0:
            return math.nan
        return float(self.model.predict_one(user, item))

    def _refresh(self) -> None:
        if not self._touched:
            return
        top = max(self._touched) + 1
        self._bias = _grown(self._bias, top)
        self._latent = _grown(self._latent, top)
        for item in self._touched:
            self._bias[item] = self.model.i_biases[item]
            self._latent[item] = self.model.i_latents[item]
        self._touched.clear()

    def scores(self, users: Sequence[str], n_items: int) -> np.ndarray:
        """``(len(users), n_items)`` matrix of ``b_i + p_u.q_i``."""
        self._refresh()
        bias = _grown(self._bias, n_items)[:n_items]
        latent = _grown(self._latent, n_items)[:n_items]
        zeros = np.zeros(self.factors)
        users_latent = np.array(
            [self.model.u_latents.get(u, zeros) for u in users], dtype=np.float64
        ).reshape(len(users), self.factors)
        return bias[None, :] + users_latent @ latent.T
