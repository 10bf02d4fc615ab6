r"""Rating prediction: the biased MF, two item-kNN predictors and session terms, blended online.

A rating is predicted as :math:`\hat r_{ui} = w^\top x_{ui}`, a linear blend of nine signals
(`SIGNALS`), each also multiplied by :math:`\ln(1 + n_u)` and by :math:`\ln(1 + n_i)` (the
user's and the item's numbers of ratings), plus an intercept: 28 entries. The gates let the
blend trust the factors for a well-known user and item and the biases, the neighbours or the
session for a new one (the count-dependent blending of Koren, 2008, learned instead of set).

The signals, all from the state before the rating is learned:

* :math:`\mu, b_u, b_i, p_u^\top q_i`: the `BiasedMF` terms (a side with no rating: bias and
  factor term 0);
* co-rating kNN: :math:`\sum_j s_{ij} \rho_j / \sum_j s_{ij}` over the items :math:`j` the user
  rated, with :math:`s_{ij} = \frac{c_{ij}}{\sqrt{n_i n_j}} \frac{c_{ij}}{c_{ij} + \beta}` and
  :math:`\rho_j = r_{uj} - (\mu + b_u + b_j)`, the user's residual on :math:`j` when it was
  learned (:math:`c_{ij}`: users who rated both);
* adjusted-cosine kNN (Sarwar et al., 2001): the same with
  :math:`s_{ij} = \frac{S_{ij}}{\sqrt{A_{ij} A_{ji}}} \frac{c_{ij}}{c_{ij} + \beta}` and
  :math:`\sum_j |s_{ij}|` below, where :math:`S_{ij} = \sum_v z_{vi} z_{vj}` and
  :math:`A_{ij} = \sum_v z_{vi}^2` run over the co-raters, and :math:`z_{vi}` is
  :math:`r_{vi}` less :math:`v`'s mean rating when it was learned;
* the mean residual of the user's last `RECENT` ratings;
* two session terms: exponential moving averages (rate `SESSION_RATE`, about the last five
  ratings) of the MF's and of the blend's own errors on the user's ratings.

:math:`w` is exponentially weighted least squares (recursive least squares with forgetting
factor :math:`\lambda`, Haykin, *Adaptive Filter Theory*, ch. 10): it minimises
:math:`\lambda^t (w - w_0)^\top (w - w_0) + \sum_s \lambda^{t-s} (r_s - w^\top x_s)^2`, whose
normal equations are :math:`G w = m` with

.. math::

    G \leftarrow \lambda G + x x^\top, \qquad m \leftarrow \lambda m + r x, \qquad
    G_0 = I,\ m_0 = w_0 .

:math:`w_0` is 1 on :math:`\mu, b_u, b_i, p^\top q` and 0 elsewhere, so the blend starts as the
MF and moves only as far as the stream shows it should. The features are in rating units and
the weights have none, so the prior fits any rating scale; every other constant counts ratings,
not seconds, so it holds for any timestamp resolution. :math:`(G, m)` is the whole state, and
one process's batch changes it by amounts that add up, so workers share it like any counter.
"""

from __future__ import annotations

import math
import struct
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numba
import numpy as np

from freshrec.models.biased_mf import BiasedMF
from freshrec.models.learned_pairs import PAIR_FIELDS, LearnedPairs, PairRows
from freshrec.models.mf import rating_count_at, rating_part

SIGNALS = (
    "mean",
    "user_bias",
    "item_bias",
    "factors",
    "corating_knn",
    "user_session",
    "recent_residual",
    "adjusted_cosine_knn",
    "blend_session",
)
WIDTH = 3 * len(SIGNALS) + 1
"""Signals, signals times ln(1 + n_u), signals times ln(1 + n_i), intercept."""
PRIOR = np.array([1.0, 1.0, 1.0, 1.0] + [0.0] * (WIDTH - 4))
"""w_0: the MF's own prediction."""
FORGETTING = 0.9999
"""lambda: the blend weighs about the last 10,000 ratings."""
SIMILARITY_SHRINKAGE = 10.0
"""beta, in co-raters: a similarity from few co-raters counts for less."""
RECENT = 10
SESSION_RATE = 0.2

_RECORD = struct.Struct("<5f")


class RatingRecord(NamedTuple):
    """One learned rating, as a user's history keeps it (newest first). A named tuple because
    a worker's batch decodes every rating user's whole history, and a tuple is cheaper to make
    than a frozen dataclass."""

    item: str
    rating: float
    centred: float  # z: the rating less the user's mean rating when it was learned
    residual: float  # rho: the rating less mu + b_u + b_i when it was learned
    mf_error: float  # the MF's error on it, before its step
    blend_error: float  # the blend's error on it, before its update

    def encode(self) -> bytes:
        """Five float32 then the item id in UTF-8: what the history list stores."""
        head = _RECORD.pack(
            self.rating, self.centred, self.residual, self.mf_error, self.blend_error
        )
        return head + self.item.encode()

    @classmethod
    def decode(cls, blob: bytes) -> RatingRecord:
        return cls(blob[RECORD_HEAD:].decode(), *_RECORD.unpack_from(blob))


RECORD_HEAD = _RECORD.size
"""Bytes before the item id in an encoded record."""


def decode_records(blobs: Sequence[bytes]) -> list[RatingRecord]:
    decode = RatingRecord.decode
    return [decode(b) for b in blobs if len(b) > RECORD_HEAD]


_SESSION_WEIGHTS = SESSION_RATE * (1.0 - SESSION_RATE) ** np.arange(1024)
"""The sessions' weights a (1 - a)^k of the k-th newest record: the recursive average, from 0,
unrolled (past 1,024 records they are below 1e-90)."""


def record_columns(records: Sequence[RatingRecord]) -> np.ndarray:
    """What `features` reads of ``records``: one row per record, its ``residual``,
    ``mf_error`` and ``blend_error``."""
    fields = [
        [r.residual for r in records],
        [r.mf_error for r in records],
        [r.blend_error for r in records],
    ]
    return np.array(fields, dtype=np.float64).T.copy()


def features(
    mean: float,
    user_bias: float,
    item_bias: float,
    factors: float,
    user_ratings: float,
    item_ratings: float,
    records: Sequence[RatingRecord] | np.ndarray,
    pairs: np.ndarray,
    partner_ratings: np.ndarray,
) -> np.ndarray:
    """:math:`x_{ui}` (`WIDTH` entries) for an item with ``item_ratings`` ratings and a user
    with ``user_ratings`` and ``records`` (or their `record_columns`). ``pairs`` holds one row
    of `PAIR_FIELDS` per record (zeros where the items were never rated together),
    ``partner_ratings`` the records' items' rating counts."""
    corating = adjusted = recent = user_session = blend_session = 0.0
    columns = records if isinstance(records, np.ndarray) else record_columns(records)
    if len(columns):
        knn = item_ratings > 0
        if knn and not len(columns) == len(pairs) == len(partner_ratings):
            raise ValueError("features needs one row of pairs and one count per record")
        corating, adjusted, recent, user_session, blend_session = _record_signals(
            columns,
            np.asarray(pairs, dtype=np.float64).reshape(-1, PAIR_FIELDS),
            np.asarray(partner_ratings, dtype=np.float64).reshape(-1),
            float(item_ratings) if knn else 0.0,
        )
    signals = [
        mean,
        user_bias,
        item_bias,
        factors,
        corating,
        user_session,
        recent,
        adjusted,
        blend_session,
    ]
    user_gate, item_gate = math.log1p(user_ratings), math.log1p(item_ratings)
    return np.array(
        [*signals, *(s * user_gate for s in signals), *(s * item_gate for s in signals), 1.0],
        dtype=np.float64,
    )


def row_features(
    mean: float,
    user_row: np.ndarray | None,
    item_row: np.ndarray | None,
    factors: int,
    records: Sequence[RatingRecord] | np.ndarray,
    pairs: np.ndarray,
    partner_ratings: np.ndarray,
) -> np.ndarray:
    """`features` from the user's and the item's stored vectors (None: never seen), with the
    MF's terms of a side that has no rating at 0."""
    at = rating_count_at(factors)
    n_user = float(user_row[at]) if user_row is not None else 0.0
    n_item = float(item_row[at]) if item_row is not None else 0.0
    known_user = user_row is not None and n_user > 0
    known_item = item_row is not None and n_item > 0
    dot = 0.0
    if known_user and known_item:
        dot = float(rating_part(user_row, factors)[1:] @ rating_part(item_row, factors)[1:])  # type: ignore[arg-type]
    return features(
        mean,
        float(user_row[0]) if known_user else 0.0,  # type: ignore[index]
        float(item_row[0]) if known_item else 0.0,  # type: ignore[index]
        dot,
        n_user,
        n_item,
        records,
        pairs,
        partner_ratings,
    )


@numba.njit(cache=True, nogil=True)
def _record_signals(
    columns: np.ndarray, pairs: np.ndarray, partner_ratings: np.ndarray, item_ratings: float
) -> tuple[float, float, float, float, float]:
    """The signals `features` takes from a user's records (``columns``: `record_columns`):
    the co-rating and adjusted-cosine kNN (0 when ``item_ratings`` is 0), the mean residual of
    the `RECENT` newest and the two sessions. One pass over the records rather than some twenty
    array operations, each costing more than its arithmetic on a couple of hundred records."""
    n = columns.shape[0]
    recent = 0.0
    for k in range(min(n, RECENT)):
        recent += columns[k, 0]
    recent /= min(n, RECENT)
    user_session = blend_session = 0.0
    for k in range(min(n, _SESSION_WEIGHTS.size)):
        user_session += _SESSION_WEIGHTS[k] * columns[k, 1]
        blend_session += _SESSION_WEIGHTS[k] * columns[k, 2]
    corating = adjusted = 0.0
    if item_ratings > 0:
        weighted = mass = weighted_adjusted = mass_adjusted = 0.0
        for k in range(n):
            count, cross, own, other = pairs[k, 0], pairs[k, 1], pairs[k, 2], pairs[k, 3]
            confidence = count / (count + SIMILARITY_SHRINKAGE)
            sim = count / math.sqrt(item_ratings * max(partner_ratings[k], 1.0)) * confidence
            weighted += sim * columns[k, 0]
            mass += sim
            sim = cross / (math.sqrt(own * other) + 1e-9) * confidence
            weighted_adjusted += sim * columns[k, 0]
            mass_adjusted += abs(sim)
        corating = weighted / mass if mass > 0 else 0.0
        adjusted = weighted_adjusted / mass_adjusted if mass_adjusted > 0 else 0.0
    return corating, adjusted, recent, user_session, blend_session


class Blend:
    r"""Recursive least squares over the normal equations :math:`G w = m` (module docstring).

    ``learn`` keeps :math:`P = G^{-1}` and :math:`w` by the Sherman-Morrison update and
    records :math:`(x, r)`; `state` folds the records into :math:`G, m` in one product,
    :math:`G_n = \lambda^n G_0 + X^\top \mathrm{diag}(\lambda^{n-t}) X`, so a batch's change
    of the shared state is the difference.

    Parameters
    ----------
    state
        :math:`G` row by row then :math:`m` (`state_size` numbers); `prior_state` when new.
    forgetting
        :math:`\lambda`.

    Examples
    --------
    >>> blend = Blend(Blend.prior_state(np.array([0.0, 0.0])), forgetting=1.0)
    >>> for x, y in [([1.0, 0.0], 2.0), ([0.0, 1.0], 3.0)] * 50:
    ...     _ = blend.learn(np.array(x), y)
    >>> blend.weights.round(2).tolist()  # ridge with one prior pseudo-observation per weight
    [1.96, 2.94]
    """

    def __init__(self, state: np.ndarray, forgetting: float = FORGETTING) -> None:
        width = self.width_of(state.size)
        self.forgetting = forgetting
        self.gram = state[: width * width].reshape(width, width).copy()
        self.moment = state[width * width :].copy()
        self.inverse = np.linalg.inv(self.gram)
        self.weights = self.inverse @ self.moment
        self.inputs: list[np.ndarray] = []
        self.targets: list[float] = []

    @staticmethod
    def width_of(size: int) -> int:
        width = int((math.sqrt(1 + 4 * size) - 1) / 2)
        if width * width + width != size:
            raise ValueError(f"a blend state of {size} numbers is not G and m of one width")
        return width

    @staticmethod
    def state_size(width: int = WIDTH) -> int:
        return width * width + width

    @staticmethod
    def prior_state(prior: np.ndarray = PRIOR) -> np.ndarray:
        """:math:`G_0 = I, m_0 = w_0`."""
        return np.concatenate([np.eye(prior.size).ravel(), prior])

    @property
    def state(self) -> np.ndarray:
        """:math:`G` row by row then :math:`m`, with every record learned."""
        if self.inputs:
            n = len(self.inputs)
            inputs = np.array(self.inputs)
            weights = self.forgetting ** np.arange(n - 1, -1, -1, dtype=np.float64)
            self.gram = self.forgetting**n * self.gram + (inputs.T * weights) @ inputs
            self.moment = self.forgetting**n * self.moment + inputs.T @ (weights * self.targets)
            self.inputs, self.targets = [], []
        return np.concatenate([self.gram.ravel(), self.moment])

    def predict(self, x: np.ndarray) -> float:
        return float(self.weights @ x)

    def learn(self, x: np.ndarray, target: float) -> float:
        """One RLS step; returns the error before it, ``target - w.x``."""
        lam = self.forgetting
        error = target - float(self.weights @ x)
        px = self.inverse @ x
        gain = px / (lam + float(x @ px))
        self.weights = self.weights + gain * error
        self.inverse = (self.inverse - np.outer(gain, px)) / lam
        self.inputs.append(x)
        self.targets.append(target)
        return error


PRIOR_BYTES = Blend.prior_state().astype("<f8").tobytes()
"""The prior state as stored: what a missing blend key starts from."""


def encode_state(state: np.ndarray) -> bytes:
    """A blend state (or a change of one) as stored: packed little-endian float64."""
    return state.astype("<f8").tobytes()


def decode_state(blob: bytes | None) -> np.ndarray | None:
    """A stored blend state; None where there is none of this width."""
    if blob is None or len(blob) != 8 * Blend.state_size():
        return None
    return np.frombuffer(blob, "<f8").copy()


def solve_weights(state: np.ndarray) -> np.ndarray:
    """:math:`w = G^{-1} m` of a stored state."""
    width = Blend.width_of(state.size)
    gram = state[: width * width].reshape(width, width)
    return np.linalg.solve(gram, state[width * width :])


class _History:
    """A user's records, newest first, and what learning reads of them on every rating kept
    alongside: their items' `LearnedPairs` numbers, their `record_columns`, their ``centred``
    values and the sum of their ratings."""

    __slots__ = ("centred", "columns", "ids", "rating_sum", "records")

    def __init__(self, records: list[RatingRecord], ids: np.ndarray) -> None:
        self.records = records
        self.ids = ids
        self.columns = record_columns(records)
        self.centred = np.array([r.centred for r in records], dtype=np.float64)
        self.rating_sum = sum(r.rating for r in records)

    def mean_with(self, rating: float) -> float:
        """The user's mean rating over the history kept and ``rating``: what ``z`` centres by."""
        return (self.rating_sum + rating) / (len(self.records) + 1)

    def push(self, record: RatingRecord, number: int, keep: int) -> None:
        """``record`` (of item ``number``) as the newest, then only the ``keep`` newest kept."""
        self.records.insert(0, record)
        self.rating_sum += record.rating
        newest = [(record.residual, record.mf_error, record.blend_error)]
        self.columns = np.concatenate((newest, self.columns))[:keep]
        self.ids = np.concatenate(([number], self.ids))[:keep]
        self.centred = np.concatenate(([record.centred], self.centred))[:keep]
        for dropped in self.records[keep:]:
            self.rating_sum -= dropped.rating
        del self.records[keep:]


class RatingStack:
    """Learns ratings one at a time into the MF, the users' rating histories, the item pairs'
    statistics and the blend, and predicts them with `features` and the blend.

    Parameters
    ----------
    mf
        The biased MF (its table holds the rows the batch touches).
    histories
        Users' `RatingRecord` lists, newest first (a user not in it has none).
    pairs
        Item -> its stored pairs: partners and their `PAIR_FIELDS` statistics from the
        item's side.
    item_ratings
        Rating counts of the items in ``histories`` and of the items to learn.
    blend_state
        The shared :math:`(G, m)`.
    history
        Records kept per user.
    pair_window
        A new rating updates its pairs with the user's this many newest records (all of them
        feed the features).
    """

    def __init__(
        self,
        mf: BiasedMF,
        histories: dict[str, list[RatingRecord]],
        pairs: Mapping[str, PairRows],
        item_ratings: dict[str, float],
        blend_state: np.ndarray,
        history: int,
        pair_window: int | None = None,
    ) -> None:
        self.mf = mf
        self.pair_window = history if pair_window is None else pair_window
        self.stored_histories = histories
        self.stored_pairs = pairs
        self.item_ratings = item_ratings  # as stored: `_counts` holds them with the learned
        self.blend = Blend(blend_state)
        self.history = history
        self.initial_state = blend_state
        self._learned = LearnedPairs()  # (c, S, A_own, A_partner) per pair, stored and learned
        self._stored_read: set[str] = set()  # items whose stored pairs are in _learned
        self._counts = np.empty(0)  # item_ratings by `LearnedPairs` number
        self.new_records: defaultdict[str, list[RatingRecord]] = defaultdict(list)
        self.rating_increments: defaultdict[str, float] = defaultdict(float)
        self._histories: dict[str, _History] = {}

    @property
    def histories(self) -> dict[str, list[RatingRecord]]:
        """Every user's records, newest first: as stored, with what was learned here."""
        learned = {user: history.records for user, history in self._histories.items()}
        return {**self.stored_histories, **learned}

    @property
    def pair_changes(self) -> dict[str, PairRows]:
        """What learning changed in the pairs' statistics, per item met: amounts to add."""
        return self._learned.rows()

    def _history(self, user: str) -> _History:
        """The user's `_History`, from a copy of their stored records when the stack first
        meets them (the snapshot's lists stay as they are)."""
        history = self._histories.get(user)
        if history is None:
            records = list(self.stored_histories.get(user, []))
            history = _History(records, self._numbers([r.item for r in records]))
            self._histories[user] = history
        return history

    def _numbers(self, items: Sequence[str]) -> np.ndarray:
        """The items' `LearnedPairs` numbers; a newly numbered item's rating count joins
        ``_counts``."""
        numbers = self._learned.ids_of(items)
        self._count_new()
        return numbers

    def _count_new(self) -> None:
        known, names = len(self._counts), self._learned.names
        if len(names) > known:
            new = [self.item_ratings.get(name, 0.0) for name in names[known:]]
            self._counts = np.concatenate((self._counts, new))

    def _number(self, item: str) -> int:
        """``item``'s number, its stored pairs put in the table when first met."""
        number = self._learned.id_of(item)
        self._count_new()
        if item not in self._stored_read:
            self._stored_read.add(item)
            stored = self.stored_pairs.get(item)
            if stored is not None:
                self._learned.put(number, self._numbers(stored.partners), stored.stats)
        return number

    def features(self, user: str, item: str) -> np.ndarray:
        return self._features(self._history(user), user, item, self._number(item))

    def _features(self, history: _History, user: str, item: str, number: int) -> np.ndarray:
        table = self.mf.table
        pairs = self._learned.read(number, history.ids)
        return row_features(
            self.mf.mean,
            table["u:" + user],
            table["i:" + item],
            table.factors,
            history.columns,
            pairs,
            self._counts[history.ids],
        )

    def predict_one(self, user: str, item: str) -> float:
        return self.blend.predict(self.features(user, item))

    def learn_one(self, user: str, item: str, rating: float) -> float:
        """Learns ``rating``; returns the blend's error on it before learning it."""
        mf = self.mf
        history, number = self._history(user), self._number(item)
        x = self._features(history, user, item, number)
        baseline = mf.mean + float(mf.table["u:" + user][0]) + float(mf.table["i:" + item][0])
        blend_error = self.blend.learn(x, rating)
        mf_error = mf.learn_one(user, item, rating)
        centred = rating - history.mean_with(rating)
        others = history.centred[: self.pair_window]
        partners = history.ids[: self.pair_window]
        self._learned.add(number, partners, centred * others, centred * centred, others * others)
        record = RatingRecord(item, rating, centred, rating - baseline, mf_error, blend_error)
        history.push(record, number, self.history)
        self.new_records[user].append(record)
        self._counts[number] += 1.0
        self.rating_increments[item] += 1.0
        return blend_error

    def pairs(self, item: str) -> dict[str, np.ndarray]:
        """Every partner's statistics with ``item``, stored plus learned here."""
        stored = self.stored_pairs.get(item)
        partners = [*(stored.partners if stored else []), *self._learned.partners_of(item)]
        partners = list(dict.fromkeys(partners))
        rows = self._learned.read(self._number(item), self._numbers(partners))
        return dict(zip(partners, rows, strict=True))

    def blend_change(self) -> np.ndarray:
        """What learning changed in :math:`(G, m)`: the amounts to add to the shared state."""
        return self.blend.state - self.initial_state
