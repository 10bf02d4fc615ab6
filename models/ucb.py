r"""UCB exploration for cold items: an optimistic bonus that shrinks as an item is shown.

Each item's reward estimate :math:`\hat r_i` (its click-through rate) gets the bonus of UCB1
(Auer, Cesa-Bianchi & Fischer, 2002):

.. math::

    \mathrm{ucb}_i = \hat r_i + \beta \sqrt{\frac{\ln N}{n_i}}

with :math:`N` all impressions and :math:`n_i` the item's. An item never shown has
:math:`n_i = 0`; it is counted as :math:`n_i = 1` so the bonus stays finite and comparable
(the largest any item gets). :math:`\hat r_i` is smoothed toward the click-through rate of
the cold pool as a whole (`pool_ctr`) with a Beta prior worth ``prior_strength`` impressions, so
one lucky click does not make a winner: the empirical-Bayes prior of a new item is what new
items earn, counted in the same clicks and impressions as its own.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def ucb_bonus(impressions: np.ndarray, total_impressions: float, beta: float) -> np.ndarray:
    r"""The exploration term :math:`\beta \sqrt{\ln N / \max(n_i, 1)}`.

    Examples
    --------
    >>> ucb_bonus(np.array([0.0, 1.0, 100.0]), total_impressions=1000.0, beta=1.0).round(3)
    array([2.628, 2.628, 0.263])
    """
    log_total = np.log(max(total_impressions, 1.0))
    return beta * np.sqrt(log_total / np.maximum(impressions, 1.0))


@numba.njit(cache=True, nogil=True)
def smoothed_ctr(
    clicks: np.ndarray, impressions: np.ndarray, prior_ctr: float, prior_strength: float = 10.0
) -> np.ndarray:
    """CTR with a Beta prior worth ``prior_strength`` impressions at ``prior_ctr``.

    Examples
    --------
    >>> smoothed_ctr(np.array([0.0, 1.0, 30.0]), np.array([0.0, 1.0, 100.0]), 0.1).round(3)
    array([0.1  , 0.182, 0.282])
    """
    return (clicks + prior_ctr * prior_strength) / (impressions + prior_strength)


def pool_ctr(clicks: np.ndarray, impressions: np.ndarray) -> float:
    """Clicks per impression over a whole pool of items, 0 for a pool never shown.

    Examples
    --------
    >>> pool_ctr(np.array([0.0, 1.0, 40.0]), np.array([0.0, 100.0, 100.0]))
    0.205
    """
    shown = float(np.sum(impressions))
    return float(np.sum(clicks)) / shown if shown > 0 else 0.0


@numba.njit(cache=True, nogil=True)
def ucb_scores(
    clicks: np.ndarray,
    impressions: np.ndarray,
    total_impressions: float,
    beta: float,
    prior_ctr: float,
    prior_strength: float = 10.0,
) -> np.ndarray:
    """Smoothed CTR plus the UCB bonus: what the exploration slots rank cold items by.

    ``prior_ctr`` is the cold pool's (`pool_ctr`), not one taken from ``clicks``: a request's
    few cold candidates would make a different prior for every request.
    """
    return smoothed_ctr(clicks, impressions, prior_ctr, prior_strength) + ucb_bonus(
        impressions, total_impressions, beta
    )
