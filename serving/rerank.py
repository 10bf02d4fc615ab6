r"""Rerank: what may be shown, exploration slots for cold items, then a diverse list.

From the fine-ranked candidates it drops unavailable items and those the business rules drop
(multiplier 0), turns the fine order into relevance :math:`(1 - \mathrm{rank}/n)\, m_i` (so a
boost :math:`m_i > 1` raises an item whatever the sign of the scores), gives the reserved
exploration slots to the allowed cold candidates with the best UCB
(`freshrec.models.ucb.ucb_scores`), and fills the other positions by MMR
(`freshrec.models.diversity`). One compiled call: done with numpy it was some thirty array
calls per request on a few hundred candidates.
"""

from __future__ import annotations

import numba
import numpy as np

from freshrec.models.diversity import mmr_picks
from freshrec.models.ucb import ucb_scores


@numba.njit(cache=True, nogil=True)
def rerank(
    rows: np.ndarray,
    fine: np.ndarray,
    multiplier: np.ndarray,
    unavailable: np.ndarray,
    cold_slot: np.ndarray,
    cold_clicks: np.ndarray,
    cold_impressions: np.ndarray,
    impressions_total: float,
    cold_ctr: float,
    ucb_beta: float,
    exploration_slots: int,
    vectors: np.ndarray,
    diversity: float,
    k: int,
) -> tuple[np.ndarray, int]:
    """Positions in ``rows`` of the list, in order, and how many of the last are explorations.

    ``multiplier`` is the business rules' (1 keeps, 0 drops, more boosts); ``unavailable`` a
    mask over all rows; ``cold_slot`` each candidate's index into ``cold_clicks`` and
    ``cold_impressions``, -1 for one that is not cold; ``cold_ctr`` the cold pool's click-through
    rate, toward which each cold item's own is smoothed.

    Examples
    --------
    Four candidates: the best is unavailable, the last is cold and gets the exploration slot:

    >>> picked, explored = rerank(
    ...     rows=np.array([0, 1, 2, 3]), fine=np.array([0.9, 0.8, 0.7, 0.1]),
    ...     multiplier=np.ones(4), unavailable=np.array([True, False, False, False]),
    ...     cold_slot=np.array([-1, -1, -1, 0]), cold_clicks=np.zeros(1),
    ...     cold_impressions=np.zeros(1), impressions_total=100.0, cold_ctr=0.0, ucb_beta=0.2,
    ...     exploration_slots=1, vectors=np.eye(4, dtype=np.float32), diversity=0.0, k=3)
    >>> picked.tolist(), explored
    ([1, 2, 3], 1)
    """
    n = len(rows)
    allowed = np.empty(n, dtype=np.bool_)
    for i in range(n):
        blocked = rows[i] < len(unavailable) and unavailable[rows[i]]
        allowed[i] = multiplier[i] > 0 and not blocked
    rank = np.empty(n)
    rank[np.argsort(-fine, kind="mergesort")] = np.arange(n)
    relevance = np.zeros(n)
    pool = np.empty(n, dtype=np.int64)
    cold = 0
    for i in range(n):
        if allowed[i]:
            relevance[i] = (1.0 - rank[i] / n) * multiplier[i]
            if cold_slot[i] >= 0:
                pool[cold] = i
                cold += 1
    explore = np.empty(0, dtype=np.int64)
    if cold and exploration_slots > 0:
        at = cold_slot[pool[:cold]]
        ucb = ucb_scores(
            cold_clicks[at], cold_impressions[at], impressions_total, ucb_beta, cold_ctr
        )
        explore = pool[:cold][np.argsort(-ucb, kind="mergesort")[: min(exploration_slots, k)]]
        for i in explore:
            allowed[i] = False
    eligible = np.flatnonzero(allowed)
    chosen = mmr_picks(relevance[eligible], vectors[rows[eligible]], k - len(explore), diversity)
    return np.concatenate((eligible[chosen], explore)), len(explore)
