r"""Decayed, type-weighted item popularity: what the trending channel ranks by."""

from __future__ import annotations

from collections import defaultdict

from freshrec.models.decay import ForwardDecay


class Popularity:
    r"""Each item's interactions, weighted by their type's strength and decayed by their age.

    An interaction with item :math:`i` at time :math:`t` whose event type has strength
    :math:`f` (a purchase more than a view) adds to a forward-decayed sum (Cormode et al.,
    2009) with :math:`g(t) = e^{\lambda (t - L)}`:

    .. math::

        s_i \leftarrow s_i + f\, g(t), \qquad
        \mathrm{score}_i(t_{now}) = s_i\, e^{-\lambda (t_{now} - L)}
        = \textstyle\sum_{\text{events of } i} f\, e^{-\lambda (t_{now} - t)}

    The stored :math:`s_i` rank items as their scores do at any time. Before a weight could
    overflow, the landmark :math:`L` moves to the event's time and every sum is rescaled
    (`rebase`); scores do not change.

    Parameters
    ----------
    rate
        :math:`\lambda` in 1/s, e.g. ``ln 2 / half_life``.
    landmark
        :math:`L`, a unix time no later than the events (roughly).

    Examples
    --------
    >>> import math
    >>> pop = Popularity(rate=math.log(2) / 100.0, landmark=0.0)  # a half-life of 100 s
    >>> pop.learn_one("dune", ts=0.0, strength=3.0)  # a purchase
    >>> pop.learn_one("heat", ts=100.0, strength=1.0)  # a click, one half-life later
    >>> round(pop.score("dune", now=100.0), 6), round(pop.score("heat", now=100.0), 6)
    (1.5, 1.0)
    """

    def __init__(self, rate: float, landmark: float) -> None:
        self.decay = ForwardDecay(rate, landmark)
        self.scores: defaultdict[str, float] = defaultdict(float)

    def learn_one(self, item: str, ts: float, strength: float = 1.0) -> None:
        """Adds :math:`f\\, g(ts)` to the item's sum."""
        if self.decay.needs_rebase(ts):
            self.rebase(ts)
        self.scores[item] += self.decay.weight(ts) * strength

    def score(self, item: str, now: float) -> float:
        """The item's decayed popularity at ``now`` (0 for an item never seen)."""
        return float(self.decay.decayed(self.scores.get(item, 0.0), now))

    def rebase(self, landmark: float) -> None:
        """Moves :math:`L` to ``landmark``, rescaling every stored sum by the same factor."""
        factor = self.decay.rebase_factor(landmark)
        for item in self.scores:
            self.scores[item] *= factor
        self.decay = ForwardDecay(self.decay.rate, landmark)
