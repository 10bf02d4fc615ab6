r"""UCB exploration for cold items: an optimistic bonus that shrinks as an item is shown.

Each item's reward estimate :math:`\hat r_i` (its click-through rate) gets the bonus of UCB1
(Auer, Cesa-Bianchi & Fischer, 2002):

.. math::

    \mathrm{ucb}_i = \hat r_i + \beta \sqrt{\frac{\ln N}{n_i}}

with :math:`N` all impressions and :math:`n_i` the item's. An item never shown has
:math:`n_i = 0`; it is counted as :math:`n_i = 1` so the bonus stays finite and comparable
(the largest any item gets). :math:`\hat r_i` is smoothed toward the catalogue CTR with a
Beta prior of ``prior_strength`` impressions, so one lucky click does not make a winner.
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


@numba.njit(cache=True, nogil=True)
def ucb_scores(
    clicks: np.ndarray,
    impressions: np.ndarray,
    total_impressions: float,
    beta: float,
    prior_strength: float = 10.0,
) -> np.ndarray:
    """Smoothed CTR plus the UCB bonus: what the exploration slots rank cold items by."""
    total_clicks = np.sum(clicks)
    prior = total_clicks / total_impressions if total_impressions > 0 else 0.0
    return smoothed_ctr(clicks, impressions, prior, prior_strength) + ucb_bonus(
        impressions, total_impressions, beta
    )
