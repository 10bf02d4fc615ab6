r"""Decayed item co-occurrence over each user's recent items: the counts item-CF ranks by."""

from __future__ import annotations

import math
from collections import defaultdict

from freshrec.models.decay import ForwardDecay


class Cooccurrence:
    r"""Forward-decayed co-occurrence of items within each user's window of recent items.

    When user :math:`u` interacts with item :math:`i` at time :math:`t`, the pair of :math:`i`
    and every other item :math:`j` of :math:`u`'s window :math:`W_u` (the ``window`` most
    recent distinct items before this event, most recent first) is counted once each way, with
    the forward-decay weight :math:`g(t) = e^{\lambda (t - L)}` (Cormode et al., 2009):

    .. math::

        c_{ij} \leftarrow c_{ij} + g(t), \quad c_{ji} \leftarrow c_{ji} + g(t)
        \quad (j \in W_u,\ j \ne i), \qquad o_i \leftarrow o_i + g(t)

    then :math:`i` moves to the front of :math:`W_u`. A stored sum :math:`x` is the decayed
    value :math:`x\, e^{-\lambda (t_{now} - L)}` at any later :math:`t_{now}`, the same factor
    for every key, so ratios need no division by it. Items are compared by the cosine of
    item-to-item CF (Linden, Smith & York, 2003), with counts below 1 taken as 1, exactly as
    the reader's recall scores a neighbour (`freshrec.serving.recall`):

    .. math::

        \mathrm{sim}(i, j) = \frac{c_{ij}}{\sqrt{\max(o_i, 1)\, \max(o_j, 1)}}

    Before a weight could overflow, the landmark :math:`L` moves to the event's time and every
    sum is rescaled (`rebase`); decayed values do not change.

    Parameters
    ----------
    window
        How many of a user's most recent distinct items a new item pairs with.
    rate
        :math:`\lambda` in 1/s, e.g. ``ln 2 / half_life``.
    landmark
        :math:`L`, a unix time no later than the events (roughly).
    windows
        Users' windows known already (user -> items, most recent first); taken, not copied.

    Examples
    --------
    >>> cooc = Cooccurrence(window=1, rate=0.0, landmark=0.0)  # no decay: every weight is 1
    >>> for item in ["dune", "heat", "jaws"]:
    ...     cooc.learn_one("ann", item, ts=0.0)
    >>> cooc.learn_one("bob", "dune", ts=0.0)
    >>> cooc.learn_one("bob", "heat", ts=0.0)
    >>> cooc.windows["ann"], dict(cooc.pairs["heat"]), dict(cooc.occurrences)
    (['jaws'], {'dune': 2.0, 'jaws': 1.0}, {'dune': 2.0, 'heat': 2.0, 'jaws': 1.0})
    >>> cooc.similarity("dune", "heat"), cooc.similarity("dune", "jaws")
    (1.0, 0.0)
    """

    def __init__(
        self,
        window: int,
        rate: float,
        landmark: float,
        windows: dict[str, list[str]] | None = None,
    ) -> None:
        self.window = window
        self.decay = ForwardDecay(rate, landmark)
        self.windows: dict[str, list[str]] = windows if windows is not None else {}
        self.pairs: defaultdict[str, defaultdict[str, float]] = defaultdict(
            lambda: defaultdict(float)
        )
        self.occurrences: defaultdict[str, float] = defaultdict(float)

    def learn_one(self, user: str, item: str, ts: float) -> None:
        """Pairs ``item`` with the user's window at weight :math:`g(ts)`, then moves it to the
        window's front."""
        if self.decay.needs_rebase(ts):
            self.rebase(ts)
        weight = self.decay.weight(ts)
        window = self.windows.setdefault(user, [])
        for other in window:
            if other != item:
                self.pairs[item][other] += weight
                self.pairs[other][item] += weight
        if item in window:
            window.remove(item)
        window.insert(0, item)
        del window[self.window :]
        self.occurrences[item] += weight

    def similarity(self, i: str, j: str) -> float:
        r""":math:`c_{ij} / \sqrt{\max(o_i, 1) \max(o_j, 1)}`; 0 for a pair never counted."""
        pair = self.pairs[i].get(j, 0.0) if i in self.pairs else 0.0
        occ_i, occ_j = self.occurrences.get(i, 0.0), self.occurrences.get(j, 0.0)
        return pair / math.sqrt(max(occ_i, 1.0) * max(occ_j, 1.0))

    def rebase(self, landmark: float) -> None:
        """Moves :math:`L` to ``landmark``, rescaling every stored sum by the same factor."""
        factor = self.decay.rebase_factor(landmark)
        for row in self.pairs.values():
            for other in row:
                row[other] *= factor
        for item in self.occurrences:
            self.occurrences[item] *= factor
        self.decay = ForwardDecay(self.decay.rate, landmark)
