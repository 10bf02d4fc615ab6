r"""Forward exponential decay: old evidence fades without rewriting every key.

Backward decay weighs an event at time :math:`t` by :math:`w(t) = e^{-\lambda (t_{now} - t)}`,
which changes every stored count whenever time moves. Forward decay (Cormode et al., 2009)
stores :math:`g(t) = e^{\lambda (t - L)}` for a fixed landmark :math:`L` instead; the decayed
value at any :math:`t_{now}` is the stored sum divided by :math:`g(t_{now})`, the same for every
key, so rankings and ratios (cosine similarity) never need the division at all.

:math:`g` grows with event time; before it could overflow a double, the landmark moves forward
and every stored sum is multiplied by :math:`e^{-\lambda (L' - L)}` (a *rebase*).
"""

from __future__ import annotations

import math

import numpy as np

# e^500 ~ 1.4e217 leaves ~1e90 of headroom below the largest double for sums of many weights.
REBASE_EXPONENT = 500.0


def rate_from_half_life(half_life_s: float) -> float:
    r""":math:`\lambda = \ln 2 / t_{1/2}` in 1/s: evidence weighs half as much every half-life."""
    return math.log(2.0) / half_life_s


class ForwardDecay:
    r"""Forward-decay weights for one landmark.

    Parameters
    ----------
    rate
        :math:`\lambda` in 1/s, e.g. ``ln 2 / half_life``.
    landmark
        :math:`L`, a unix time no later than the events it weighs (roughly).

    Examples
    --------
    >>> d = ForwardDecay(rate=math.log(2) / 10.0, landmark=1000.0)
    >>> float(d.weight(1010.0))  # one half-life after the landmark
    2.0
    >>> float(d.decayed(d.weight(1000.0) + d.weight(1010.0), now=1010.0))  # 0.5 + 1
    1.5
    """

    def __init__(self, rate: float, landmark: float) -> None:
        self.rate = rate
        self.landmark = landmark

    def weight(self, ts: float) -> float:
        r""":math:`g(t) = e^{\lambda (t - L)}`; scalar, as it is taken once per event."""
        return math.exp(self.rate * (ts - self.landmark))

    def decayed(self, stored: float | np.ndarray, now: float) -> np.ndarray:
        """A stored forward-decayed sum, expressed as a backward-decayed value at ``now``."""
        return np.asarray(stored, dtype=np.float64) * math.exp(-self.rate * (now - self.landmark))

    def needs_rebase(self, ts: float) -> bool:
        return self.rate * (ts - self.landmark) > REBASE_EXPONENT

    def rebase_factor(self, new_landmark: float) -> float:
        """Multiply every stored sum by this when the landmark moves to ``new_landmark``."""
        return math.exp(-self.rate * (new_landmark - self.landmark))
