"""The item pairs' rating statistics a batch reads and learns, in tables compiled code reads.

Every rating adds to the statistics of its item with each of the user's newest rated items,
both ways, and the features of the next rating read them back for every record the user keeps
(`freshrec.models.rating_stack`): on a real stream about a hundred additions and two hundred
reads a rating. Items are numbered, each pair ``(item, partner)`` is a row of a float64 array,
and an open-addressing hash table (linear probing, Knuth's multiplicative hash) maps the pair
to its row, so a rating's additions are one compiled call and its reads another, in the order
and with the doubles of a loop over nested dicts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np

PAIR_FIELDS = 4
"""A pair's statistics from one item's side: c_ij, S_ij, A_ij, A_ji."""
_EMPTY = -1
_HASH = np.uint64(11400714819323198485)  # 2^64 / the golden ratio (Knuth, TAOCP vol. 3, 6.4)


@dataclass(frozen=True)
class PairRows:
    """One item's pairs (stored, or learned by a batch): its partners and their statistics,
    one row of `PAIR_FIELDS` each."""

    partners: list[str]
    stats: np.ndarray


@numba.njit(cache=True, nogil=True, inline="always")
def _slot(slots: np.ndarray, owner: np.ndarray, partner: np.ndarray, item: int, other: int) -> int:
    """The slot of ``(item, other)``: where it is, or the empty slot where it would go
    (``slots.size`` is a power of two)."""
    mask = slots.size - 1
    key = np.uint64(item) << np.uint64(32) | np.uint64(other)
    at = int((key * _HASH) >> np.uint64(32)) & mask
    while True:
        row = slots[at]
        if row == _EMPTY or (owner[row] == item and partner[row] == other):
            return at
        at = (at + 1) & mask


@numba.njit(cache=True, nogil=True)
def _add(slots: np.ndarray, owner: np.ndarray, partner: np.ndarray, stats: np.ndarray,
         counts: np.ndarray, touched: np.ndarray, touches: np.ndarray, item: int,
         partners: np.ndarray, cross: np.ndarray, own: float,
         theirs: np.ndarray) -> None:  # fmt: skip
    """``(item, p) += (1, cross, own, theirs)`` and ``(p, item) += (1, cross, theirs, own)``
    for each partner ``p`` other than ``item``; items are marked touched in that order.
    ``counts``: rows used; ``touches``: items touched (both updated in place)."""
    if touched[item] == _EMPTY:
        touched[item] = touches[0]
        touches[0] += 1
    for k in range(partners.size):
        other = partners[k]
        if other == item:
            continue
        if touched[other] == _EMPTY:
            touched[other] = touches[0]
            touches[0] += 1
        _bump(slots, owner, partner, stats, counts, item, other, cross[k], own, theirs[k])
        _bump(slots, owner, partner, stats, counts, other, item, cross[k], theirs[k], own)


@numba.njit(cache=True, nogil=True, inline="always")
def _row(slots: np.ndarray, owner: np.ndarray, partner: np.ndarray, counts: np.ndarray,
         item: int, other: int) -> tuple[int, bool]:  # fmt: skip
    """The row of ``(item, other)`` and whether it is new (taken from ``counts[0]``)."""
    at = _slot(slots, owner, partner, item, other)
    row = slots[at]
    if row != _EMPTY:
        return row, False
    row = counts[0]
    counts[0] += 1
    slots[at] = row
    owner[row] = item
    partner[row] = other
    return row, True


@numba.njit(cache=True, nogil=True, inline="always")
def _bump(slots: np.ndarray, owner: np.ndarray, partner: np.ndarray, stats: np.ndarray,
          counts: np.ndarray, item: int, other: int, cross: float, own: float,
          theirs: float) -> None:  # fmt: skip
    row, new = _row(slots, owner, partner, counts, item, other)
    if new:
        stats[row, 0] = 1.0
        stats[row, 1] = cross
        stats[row, 2] = own
        stats[row, 3] = theirs
    else:
        stats[row, 0] += 1.0
        stats[row, 1] += cross
        stats[row, 2] += own
        stats[row, 3] += theirs


@numba.njit(cache=True, nogil=True)
def _into(slots: np.ndarray, owner: np.ndarray, partner: np.ndarray, stats: np.ndarray,
          item: int, partners: np.ndarray, out: np.ndarray, add: bool) -> None:  # fmt: skip
    """``out[k]`` set to (or, with ``add``, plus) ``(item, partners[k])``'s statistics, where
    the pair has any."""
    for k in range(partners.size):
        row = slots[_slot(slots, owner, partner, item, partners[k])]
        if row != _EMPTY:
            for f in range(PAIR_FIELDS):
                out[k, f] = out[k, f] + stats[row, f] if add else stats[row, f]


@numba.njit(cache=True, nogil=True)
def _put(slots: np.ndarray, owner: np.ndarray, partner: np.ndarray, stats: np.ndarray,
         counts: np.ndarray, item: int, partners: np.ndarray,
         values: np.ndarray) -> None:  # fmt: skip
    """``(item, partners[k])``'s statistics set to ``values[k]``."""
    for k in range(partners.size):
        row, _ = _row(slots, owner, partner, counts, item, partners[k])
        for f in range(PAIR_FIELDS):
            stats[row, f] = values[k, f]


@numba.njit(cache=True, nogil=True)
def _rehash(slots: np.ndarray, owner: np.ndarray, partner: np.ndarray, rows: int) -> None:
    for row in range(rows):
        slots[_slot(slots, owner, partner, owner[row], partner[row])] = row


class _Rows:
    """Rows of `PAIR_FIELDS` statistics, one per ``(item, partner)``, and the table to them."""

    def __init__(self, capacity: int) -> None:
        self.counts = np.zeros(1, dtype=np.int64)  # rows used
        self.slots = np.full(2 * capacity, _EMPTY, dtype=np.int64)
        self.owner = np.empty(capacity, dtype=np.int64)
        self.partner = np.empty(capacity, dtype=np.int64)
        self.stats = np.empty((capacity, PAIR_FIELDS), dtype=np.float64)

    @property
    def used(self) -> int:
        return int(self.counts[0])

    def reserve(self, more: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Room for ``more`` rows; the arrays a kernel takes."""
        rows = self.used + more
        if rows > len(self.owner):
            size = max(rows, 2 * len(self.owner))
            self.owner = np.resize(self.owner, size)
            self.partner = np.resize(self.partner, size)
            self.stats = np.resize(self.stats, (size, PAIR_FIELDS))
        if 2 * rows > self.slots.size:  # at most half full: short probes
            self.slots = np.full(1 << (4 * rows - 1).bit_length(), _EMPTY, dtype=np.int64)
            _rehash(self.slots, self.owner, self.partner, self.used)
        return self.slots, self.owner, self.partner, self.stats


class LearnedPairs:
    """Pair statistics of a batch by item name: those stored before it, and those it learns.

    Examples
    --------
    >>> pairs = LearnedPairs()
    >>> a, b = pairs.ids_of(["a", "b"])
    >>> pairs.add(a, np.array([b]), np.array([0.5]), 1.0, np.array([0.25]))
    >>> pairs.add(b, np.array([a, b]), np.array([2.0, 9.0]), 4.0, np.array([1.0, 9.0]))
    >>> pairs.rows()["a"].stats.tolist()  # (a, b): 1 + 1 co-ratings, 0.5 + 2, 1 + 1, 0.25 + 4
    [[2.0, 2.5, 2.0, 4.25]]
    >>> pairs.put(a, np.array([b]), np.array([[3.0, 1.0, 1.0, 1.0]]))  # stored before
    >>> pairs.read(a, np.array([b, a])).tolist()  # stored plus learned; none with itself
    [[5.0, 3.5, 3.0, 5.25], [0.0, 0.0, 0.0, 0.0]]
    """

    def __init__(self, capacity: int = 1024) -> None:
        self.names: list[str] = []
        self._ids: dict[str, int] = {}
        self._touched = np.full(64, _EMPTY, dtype=np.int64)  # when `add` first met each item
        self._touches = np.zeros(1, dtype=np.int64)  # items `add` has met
        self._learned = _Rows(capacity)
        self._stored = _Rows(capacity)

    def ids_of(self, names: Sequence[str]) -> np.ndarray:
        """Each name's number, numbering names met for the first time."""
        ids = self._ids
        found = [ids.get(name, _EMPTY) for name in names]
        if _EMPTY in found:
            for k, number in enumerate(found):
                if number == _EMPTY:
                    found[k] = self.id_of(names[k])
        return np.array(found, dtype=np.int64)

    def id_of(self, name: str) -> int:
        """``name``'s number, numbering it if it is new."""
        number = self._ids.get(name)
        if number is None:
            number = self._ids[name] = len(self.names)
            self.names.append(name)
            if number == self._touched.size:
                self._touched = np.concatenate(
                    (self._touched, np.full(number, _EMPTY, dtype=np.int64))
                )
        return number

    def add(
        self, item: int, partners: np.ndarray, cross: np.ndarray, own: float, theirs: np.ndarray
    ) -> None:
        """``item``'s learned statistics with each partner (and theirs with it) grow by one
        co-rating, ``cross``, ``own`` and ``theirs``; a partner that is ``item`` is skipped."""
        rows = self._learned
        _add(*rows.reserve(2 * partners.size), rows.counts, self._touched, self._touches,
             item, partners, cross, own, theirs)  # fmt: skip

    def put(self, item: int, partners: np.ndarray, stats: np.ndarray) -> None:
        """``item``'s stored statistics with each partner (one row each), as read before the
        batch; a pair put twice keeps the second."""
        rows = self._stored
        _put(*rows.reserve(partners.size), rows.counts, item, partners, stats)

    def read(self, item: int, partners: np.ndarray) -> np.ndarray:
        """``item``'s statistics with each partner, stored plus learned (zeros for none)."""
        out = np.zeros((partners.size, PAIR_FIELDS))
        for rows, add in ((self._stored, False), (self._learned, True)):
            _into(rows.slots, rows.owner, rows.partner, rows.stats, item, partners, out, add)
        return out

    def partners_of(self, item: str) -> list[str]:
        """``item``'s learned partners, in the order first met."""
        number = self._ids.get(item)
        if number is None:
            return []
        rows = self._learned
        mine = rows.owner[: rows.used] == number
        return [self.names[p] for p in rows.partner[: rows.used][mine].tolist()]

    def touched(self) -> list[str]:
        """Every item an `add` met, as item or partner, in the order first met."""
        touched = self._touched[: len(self.names)]
        ids = np.flatnonzero(touched != _EMPTY)
        return [self.names[i] for i in ids[np.argsort(touched[ids], kind="stable")].tolist()]

    def rows(self) -> dict[str, PairRows]:
        """Each touched item's learned pairs (none for an item met only with itself)."""
        used = self._learned.used
        owner = self._learned.owner[:used]
        order = np.lexsort((np.arange(used), self._touched[owner]))
        ends = np.flatnonzero(np.diff(owner[order])) + 1
        names = self.names
        partners = [names[p] for p in self._learned.partner[order].tolist()]
        stats = self._learned.stats[order]
        out = {name: PairRows([], np.empty((0, PAIR_FIELDS))) for name in self.touched()}
        for start, end in zip([0, *ends.tolist()], [*ends.tolist(), used], strict=True):
            if end > start:
                out[names[int(owner[order[start]])]] = PairRows(
                    partners[start:end], stats[start:end]
                )
        return out
