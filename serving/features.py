r"""The ranking features of a request's candidates: one row each, columns as ``FEATURES``.

Coarse rank, fine rank and the impression log (which teaches the click model) all read these
rows, so the features served and the features learned from are the same numbers. One compiled
pass builds them: a dozen numpy calls on a few hundred rows cost more in call overhead than in
arithmetic.

- ``mf``: :math:`y_u \cdot y_i`; 0 for a user without factors.
- ``cf``: summed cosine with the user's recent items (`freshrec.serving.recall`).
- ``log_popularity``: :math:`\log(1 + 1000\, p_i / \max_j p_j)` over the candidates: forward-
  decayed sums share one scale, so their ratio to the largest is comparable across time.
- ``log_age_h``: :math:`\log(1 + a_i / 3600)`, with :math:`a_i` the seconds from the item's
  first interaction to the user's latest event (to the newest first-seen time for a user
  without events).
- ``item_bias``: :math:`b_i`, the item's rating bias (`freshrec.models.biased_mf`): how far
  above or below the mean its ratings run, shrunk toward 0 while it has few; 0 for an item
  without ratings. Choosing is not rating, but people pick what others rate well: on sparse
  streams, where co-occurrence is thin, it is the signal the funnel lacked.
- ``log_user_activity``: :math:`\log(1 + |\mathrm{history}|)`.
- ``channel_*``: 1 where that channel recalled the candidate.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from freshrec.models.click_model import FEATURES
from freshrec.serving.item_index import STATS
from freshrec.serving.recall import CF, COLD, MF, TRENDING, Recalled

_MF, _CF, _POPULARITY, _AGE, _BIAS, _ACTIVITY = (
    FEATURES.index(name)
    for name in ("mf", "cf", "log_popularity", "log_age_h", "item_bias", "log_user_activity")
)
_POPULAR, _FIRST_SEEN, _RATING_BIAS = (
    STATS.index(name) for name in ("popularity", "first_seen", "rating_bias")
)
_CHANNELS = np.array(
    [FEATURES.index(f"channel_{name}") for name in ("cf", "mf", "trending", "cold")],
    dtype=np.int64,
)
_BITS = np.array([CF, MF, TRENDING, COLD], dtype=np.int64)
_NO_FACTORS = np.zeros(0, dtype=np.float32)


def candidate_features(
    recalled: Recalled,
    stats: np.ndarray,
    item_factors: np.ndarray,
    user_factors: np.ndarray | None,
    latest: float | None,
    activity: int,
) -> np.ndarray:
    """The feature matrix of ``recalled``; ``stats`` rows are `freshrec.serving.item_index.STATS`.

    ``item_factors`` rows are the items' ``y_i``, ``user_factors`` the user's ``y_u`` (None for
    a user without factors).

    Examples
    --------
    Two candidates, the first recalled by CF and twice as popular, the second by MF:

    >>> from serving.recall import Recalled
    >>> recalled = Recalled(rows=np.array([0, 1]), channels=np.array([CF, MF]),
    ...                     cf=np.array([0.5, 0.0]), because=np.array([7, -1]),
    ...                     cold=np.empty(0, np.int64), cold_slot=np.array([-1, -1]))
    >>> stats = np.array([[1.0, 2.0, 0.0, 0.3], [1.0, 1.0, 3600.0, -0.2]])
    >>> y_items = np.array([[0.1, 0.0], [0.5, 0.4]], dtype=np.float32)
    >>> y_user = np.array([1.0, 1.0], dtype=np.float32)
    >>> x = candidate_features(recalled, stats, y_items, y_user, latest=7200.0, activity=3)
    >>> dict(zip(FEATURES, x[1].round(3).tolist()))  # doctest: +NORMALIZE_WHITESPACE
    {'mf': 0.9, 'cf': 0.0, 'log_popularity': 6.217, 'log_age_h': 0.693, 'item_bias': -0.2,
     'log_user_activity': 1.386, 'channel_cf': 0.0, 'channel_mf': 1.0,
     'channel_trending': 0.0, 'channel_cold': 0.0, 'log_position': 0.0}
    """
    if stats.ndim != 2 or stats.shape[1] != len(STATS):  # the kernel does not check bounds
        raise ValueError(f"stats must have the {len(STATS)} columns {STATS}, not {stats.shape}")
    return _features(
        recalled.rows,
        recalled.channels,
        recalled.cf,
        stats,
        item_factors,
        _NO_FACTORS if user_factors is None else user_factors.astype(np.float32),
        user_factors is not None,
        latest or 0.0,
        math.log1p(activity),
        _CHANNELS,
        _BITS,
        len(FEATURES),
    )


@numba.njit(cache=True, nogil=True)
def _features(
    rows: np.ndarray,
    channels: np.ndarray,
    cf: np.ndarray,
    stats: np.ndarray,
    item_factors: np.ndarray,
    user_factors: np.ndarray,
    has_mf: bool,
    latest: float,
    log_activity: float,
    channel_columns: np.ndarray,
    channel_bits: np.ndarray,
    width: int,
) -> np.ndarray:
    x = np.zeros((len(rows), width))
    top_popularity = 1e-300
    newest = latest
    for n in range(len(rows)):
        top_popularity = max(top_popularity, stats[rows[n], _POPULAR])
        if latest == 0.0:
            newest = max(newest, stats[rows[n], _FIRST_SEEN])
    for n in range(len(rows)):
        row = rows[n]
        first_seen = stats[row, _FIRST_SEEN]
        if has_mf:
            score = np.float32(0.0)
            for d in range(len(user_factors)):
                score += item_factors[row, d] * user_factors[d]
            x[n, _MF] = score
        x[n, _CF] = cf[n]
        x[n, _POPULARITY] = np.log1p(1000.0 * stats[row, _POPULAR] / top_popularity)
        age = max(newest - (first_seen if first_seen > 0 else newest), 0.0)
        x[n, _AGE] = np.log1p(age / 3600.0)
        x[n, _BIAS] = stats[row, _RATING_BIAS]
        x[n, _ACTIVITY] = log_activity
        for c in range(len(channel_bits)):
            if channels[n] & channel_bits[c]:
                x[n, channel_columns[c]] = 1.0
    return x
