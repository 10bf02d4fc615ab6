r"""Recall: every channel's candidates merged into one set, with the item-CF score of each.

A request's candidates come from four channels, each a list of index rows: item-CF neighbours
of the user's recent items, MF top-K, trending and the cold pool. Merging them is set work on a
few hundred rows (de-duplicate, keep each candidate's channels, look up its CF score); done with
numpy it takes some thirty array calls per request, and their fixed cost, not the arithmetic,
is most of the funnel's time. So it is one compiled pass here (numba), over scratch arrays the
size of the catalogue that every call leaves as it found them.

The CF score of a candidate :math:`i` is the cosine of decayed co-occurrence summed over the
seeds (the user's most recent items, :math:`s_1` the latest) whose kept neighbour lists hold
it, each weighted by how recent it is in the user's own sequence:

.. math::

    \mathrm{cf}_i = \sum_{a} e^{-a / \tau}
        \frac{c_{s_{a+1} i}}{\sqrt{\max(o_{s_{a+1}}, f)\, \max(o_i, f)}}

with :math:`a` the seed's age in the user's events (0 for the latest), :math:`c` the decayed,
gap-weighted co-occurrence (`freshrec.models.cooccurrence`), :math:`o` the decayed occurrence
counts and :math:`f` the stored value of one interaction at the state's clock: a count below
one interaction, decayed to now, is taken as one, whatever the decay's landmark. The user's
latest items say most about what comes next (sequence-aware item-CF; on ML-100K
:math:`\tau = 5` events lifts HR@10 from 0.133 for unweighted item-kNN to 0.187). Every kept
neighbour counts toward the score, whichever channel recalls the item; only the ``per_seed``
strongest of each seed are recalled through CF.

:math:`\tau` itself is learned from users' choices (`freshrec.models.choice_ranker`), which
needs each candidate's :math:`\partial \mathrm{cf}_i / \partial \log \tau`: the same sum with
the seed weights :math:`(a / \tau)\, e^{-a/\tau}` (``cf_slope``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numba
import numpy as np

CF, MF, TRENDING, COLD = 1, 2, 4, 8  # channel bits, in the order explanations prefer them


@dataclass
class Recalled:
    """Candidates as index rows, in the order found, with what recall knows of each."""

    rows: np.ndarray  # int64
    channels: np.ndarray  # int64 bit set of CF, MF, TRENDING, COLD
    cf: np.ndarray  # float64 recency-weighted cosine with the seeds; 0 when no list holds it
    because: np.ndarray  # int64 row of the most recent seed that recalled it through CF, or -1
    cold: np.ndarray  # int64 positions in the cold pool of the cold candidates
    cold_slot: np.ndarray  # int64 per candidate: its index into ``cold``, or -1
    cf_slope: np.ndarray = field(default_factory=lambda: np.zeros(0))  # d cf / d log tau


class Scratch:
    """Per-item work arrays of one funnel, grown with the catalogue; all clear between calls.

    Requests run one at a time on the event loop and recall never awaits, so one set serves
    every request of a reader.
    """

    def __init__(self) -> None:
        self.seen_mask = np.zeros(0, dtype=np.bool_)
        self.cf_slot = np.zeros(0, dtype=np.int64)
        self.candidate_slot = np.zeros(0, dtype=np.int64)

    @contextlib.contextmanager
    def seen(self, items: int, rows: np.ndarray) -> Iterator[np.ndarray]:
        """A mask over at least ``items`` rows, True at ``rows`` until the block ends."""
        if len(self.seen_mask) < items:
            size = max(items, 2 * len(self.seen_mask), 1024)
            self.seen_mask = np.zeros(size, dtype=np.bool_)
            self.cf_slot = np.full(size, -1, dtype=np.int64)
            self.candidate_slot = np.full(size, -1, dtype=np.int64)
        self.seen_mask[rows] = True
        try:
            yield self.seen_mask
        finally:
            self.seen_mask[rows] = False


@numba.njit(cache=True, nogil=True)
def merge_channels(
    seen_mask: np.ndarray,
    cf_slot: np.ndarray,
    candidate_slot: np.ndarray,
    seeds: np.ndarray,
    seed_weights: np.ndarray,
    seed_slopes: np.ndarray,
    neighbours: np.ndarray,
    neighbour_weights: np.ndarray,
    occurrences: np.ndarray,
    count_floor: float,
    per_seed: int,
    mf: np.ndarray,
    trending: np.ndarray,
    cold_pool: np.ndarray,
    cold_fresh: np.ndarray,
    recall_cold: int,
    channels: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    r"""Merges the channels' rows, each without the rows ``seen_mask`` marks; CF from ``seeds``.

    ``seed_weights`` are the seeds' recency weights :math:`e^{-a/\tau}` and ``seed_slopes``
    their derivatives in :math:`\log \tau` (module docstring); ``count_floor`` is :math:`f`,
    the least occurrence count a cosine divides by.

    Returns the fields of `Recalled`, in order. ``cf_slot`` and ``candidate_slot`` are a
    `Scratch`'s. ``channels`` is the bit set of channels in use; the CF score of every
    candidate is computed whichever channels are on. The cold channel takes the first
    ``recall_cold`` unseen rows of ``cold_pool`` that are ``cold_fresh``. Candidates are in the
    order found: CF's (most recent seed's neighbours first), then MF's, trending and cold, each
    in its own order.

    Examples
    --------
    Items 0-3; item 0 was seen and is the seed, its list holds items 2 and 1; MF found 3 and 1:

    >>> scratch = Scratch()
    >>> with scratch.seen(4, np.array([0])) as seen:
    ...     out = Recalled(*merge_channels(
    ...         seen, scratch.cf_slot, scratch.candidate_slot, seeds=np.array([0]),
    ...         seed_weights=np.array([1.0]), seed_slopes=np.array([0.0]),
    ...         neighbours=np.array([[2, 1], [-1, -1], [-1, -1], [-1, -1]]),
    ...         neighbour_weights=np.array([[4.0, 1.0], [0, 0], [0, 0], [0, 0]]),
    ...         occurrences=np.array([4.0, 1.0, 4.0, 1.0]), count_floor=1.0, per_seed=1,
    ...         mf=np.array([3, 1]), trending=np.array([0, 2]),
    ...         cold_pool=np.array([1]), cold_fresh=np.array([True]), recall_cold=5,
    ...         channels=CF | MF | TRENDING | COLD))
    >>> out.rows.tolist(), out.channels.tolist(), out.cf.tolist(), out.because.tolist()
    ([2, 3, 1], [5, 2, 10], [1.0, 0.0, 0.5], [0, -1, -1])
    >>> out.cold.tolist(), out.cold_slot.tolist()  # item 1 is the cold pool's first
    ([0], [-1, -1, 0])
    """
    if not channels & COLD:
        recall_cold = 0
    width = neighbours.shape[1]
    # Item-CF: every unseen item of the seeds' lists, in the order found, with its weighted sum.
    cf_rows = np.empty(len(seeds) * width, dtype=np.int64)
    cf_sum = np.empty(len(seeds) * width)
    slope_sum = np.empty(len(seeds) * width)
    cf_because = np.empty(len(seeds) * width, dtype=np.int64)
    cf_recalled = np.zeros(len(seeds) * width, dtype=np.bool_)
    found = 0
    for n in range(len(seeds)):
        seed = seeds[n]
        seed_norm = np.sqrt(max(occurrences[seed], count_floor))
        seed_weight, seed_slope = seed_weights[n] / seed_norm, seed_slopes[n] / seed_norm
        for position in range(width):
            item = neighbours[seed, position]
            if item < 0 or seen_mask[item]:
                continue
            cosine = neighbour_weights[seed, position] / np.sqrt(
                max(occurrences[item], count_floor)
            )
            slot = cf_slot[item]
            if slot < 0:
                slot = cf_slot[item] = found
                cf_rows[slot], cf_because[slot] = item, seed
                cf_sum[slot], slope_sum[slot] = seed_weight * cosine, seed_slope * cosine
                found += 1
            else:
                cf_sum[slot] += seed_weight * cosine
                slope_sum[slot] += seed_slope * cosine
            if position < per_seed:
                cf_recalled[slot] = True
    cold_at = np.empty(min(recall_cold, len(cold_pool)), dtype=np.int64)
    taken = 0
    for n in range(len(cold_pool)):
        if taken == len(cold_at):
            break
        if cold_fresh[n] and not seen_mask[cold_pool[n]]:
            cold_at[taken] = n
            taken += 1
    cold_at = cold_at[:taken]
    cold = cold_pool[cold_at]
    # The channels, merged: each row once, with the bits of every channel that found it.
    room = found + len(mf) + len(trending) + len(cold)
    rows = np.empty(room, dtype=np.int64)
    bits = np.zeros(room, dtype=np.int64)
    cold_slot = np.full(room, -1, dtype=np.int64)
    count = 0
    if channels & 1:
        count = _add(1, cf_rows[:found], cf_recalled, seen_mask, candidate_slot, rows, bits, count)
    if channels & 2:
        count = _add(2, mf, None, seen_mask, candidate_slot, rows, bits, count)
    if channels & 4:
        count = _add(4, trending, None, seen_mask, candidate_slot, rows, bits, count)
    for n in range(len(cold)):  # the cold rows are unseen and distinct
        item = cold[n]
        slot = candidate_slot[item]
        if slot < 0:
            slot = candidate_slot[item] = count
            rows[slot] = item
            count += 1
        bits[slot] |= 8
        cold_slot[slot] = n
    cf = np.zeros(count)
    cf_slope = np.zeros(count)
    because = np.full(count, -1, dtype=np.int64)
    for slot in range(count):
        item = rows[slot]
        at = cf_slot[item]
        if at >= 0:
            cf[slot] = cf_sum[at]
            cf_slope[slot] = slope_sum[at]
            if bits[slot] & 1:
                because[slot] = cf_because[at]
        candidate_slot[item] = -1
    for n in range(found):  # leave the scratch as found
        cf_slot[cf_rows[n]] = -1
    return rows[:count], bits[:count], cf, because, cold_at, cold_slot[:count], cf_slope


@numba.njit(cache=True, nogil=True)
def _add(
    channel: int,
    source: np.ndarray,
    keep: np.ndarray | None,
    seen_mask: np.ndarray,
    candidate_slot: np.ndarray,
    rows: np.ndarray,
    bits: np.ndarray,
    count: int,
) -> int:
    """Adds one channel's unseen rows (those ``keep`` marks, if given); returns the new count."""
    for n in range(len(source)):
        item = source[n]
        if seen_mask[item] or (keep is not None and not keep[n]):
            continue
        slot = candidate_slot[item]
        if slot < 0:
            slot = candidate_slot[item] = count
            rows[slot] = item
            count += 1
        bits[slot] |= channel
    return count
