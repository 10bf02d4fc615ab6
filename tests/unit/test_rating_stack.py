"""The rating stack against a brute-force recount: pair statistics recounted from every user's
records, sessions as recursive averages, and the blend as the solution of its weighted normal
equations."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest

from freshrec.models.biased_mf import BiasedMF
from freshrec.models.learned_pairs import PAIR_FIELDS, PairRows
from freshrec.models.mf import VectorTable, rating_count_at
from freshrec.models.rating_stack import (
    FORGETTING,
    PRIOR,
    RECENT,
    SESSION_RATE,
    SIMILARITY_SHRINKAGE,
    Blend,
    RatingRecord,
    RatingStack,
    solve_weights,
)

FACTORS = 4


def _stream(n: int = 400, seed: int = 3) -> list[tuple[str, str, float]]:
    rng = np.random.default_rng(seed)
    taste = rng.normal(size=(12, 2))
    kind = rng.normal(size=(20, 2))
    out = []
    for _ in range(n):
        u, i = int(rng.integers(12)), int(rng.integers(20))
        r = float(np.clip(np.rint(3 + taste[u] @ kind[i] + rng.normal(0, 0.5)), 1, 5))
        out.append((f"u{u}", f"i{i}", r))
    return out


def _mf() -> BiasedMF:
    return BiasedMF(VectorTable(FACTORS, 0.1, 7), lr=0.05, reg=0.02)


class Reference:
    """Everything recomputed from the full record lists at each step."""

    def __init__(self, history: int, window: int) -> None:
        self.mf = _mf()
        self.history = history
        self.window = window
        self.records: dict[str, list[RatingRecord]] = defaultdict(list)  # newest first
        self.pair_log: list[tuple[str, str, float, float]] = []  # (item, partner, z, z_partner)
        self.counts: dict[str, float] = defaultdict(float)
        self.xs: list[np.ndarray] = []
        self.ys: list[float] = []

    def pair(self, item: str, partner: str) -> tuple[float, float, float, float]:
        c = s = own = other = 0.0  # (item, partner, z_item, z_partner) in either order
        for a, b, za, zb in self.pair_log:
            if (a, b) == (item, partner):
                c, s, own, other = c + 1, s + za * zb, own + za * za, other + zb * zb
            elif (b, a) == (item, partner):
                c, s, own, other = c + 1, s + za * zb, own + zb * zb, other + za * za
        return c, s, own, other

    def features(self, user: str, item: str) -> np.ndarray:
        table, at = self.mf.table, rating_count_at(FACTORS)
        u, i = table["u:" + user], table["i:" + item]
        nu, ni = u[at], i[at]
        bu = u[0] if nu else 0.0
        bi = i[0] if ni else 0.0
        dot = float(u[1 : FACTORS + 1] @ i[1 : FACTORS + 1]) if nu and ni else 0.0
        records = self.records[user]
        corating = adjusted = recent = 0.0
        if records:
            recent = sum(r.residual for r in records[:RECENT]) / len(records[:RECENT])
        if records and ni:
            num = den = num_a = den_a = 0.0
            for r in records:
                c, s, own, other = self.pair(item, r.item)
                shrink = c / (c + SIMILARITY_SHRINKAGE)
                sim = c / math.sqrt(ni * max(self.counts[r.item], 1.0)) * shrink
                num, den = num + sim * r.residual, den + sim
                sim = s / (math.sqrt(own * other) + 1e-9) * shrink
                num_a, den_a = num_a + sim * r.residual, den_a + abs(sim)
            corating = num / den if den > 0 else 0.0
            adjusted = num_a / den_a if den_a > 0 else 0.0
        # The sessions: the recursive averages over the records kept, oldest first, from 0.
        mf_session = blend_session = 0.0
        for r in reversed(records):
            mf_session += SESSION_RATE * (r.mf_error - mf_session)
            blend_session += SESSION_RATE * (r.blend_error - blend_session)
        signals = [
            self.mf.mean,
            bu,
            bi,
            dot,
            corating,
            mf_session,
            recent,
            adjusted,
            blend_session,
        ]
        x = np.array(signals)
        return np.concatenate([x, x * math.log1p(nu), x * math.log1p(ni), [1.0]])

    def weights(self) -> np.ndarray:
        t = len(self.ys)
        gram = FORGETTING**t * np.eye(PRIOR.size)
        moment = FORGETTING**t * PRIOR
        for s, (x, y) in enumerate(zip(self.xs, self.ys, strict=True)):
            gram += FORGETTING ** (t - 1 - s) * np.outer(x, x)
            moment += FORGETTING ** (t - 1 - s) * y * x
        return np.linalg.solve(gram, moment)

    def learn(self, user: str, item: str, rating: float) -> float:
        x = self.features(user, item)
        error = rating - float(self.weights() @ x)
        self.xs.append(x)
        self.ys.append(rating)
        table = self.mf.table
        baseline = self.mf.mean + table["u:" + user][0] + table["i:" + item][0]
        mf_error = self.mf.learn_one(user, item, rating)
        records = self.records[user]
        centred = rating - (sum(r.rating for r in records) + rating) / (len(records) + 1)
        for r in records[: self.window]:
            if r.item != item:
                self.pair_log.append((item, r.item, centred, r.centred))
        records.insert(0, RatingRecord(item, rating, centred, rating - baseline, mf_error, error))
        del records[self.history :]
        self.counts[item] += 1
        return error


@pytest.mark.parametrize(("history", "window"), [(500, 500), (7, 7), (30, 4)])
def test_predictions_errors_and_state_equal_a_brute_force_recount(
    history: int, window: int
) -> None:
    stream = _stream()
    stack = RatingStack(_mf(), {}, {}, {}, Blend.prior_state(), history, window)
    reference = Reference(history, window)
    for n, (user, item, rating) in enumerate(stream):
        if n % 50 == 0:
            expected = float(reference.weights() @ reference.features(user, item))
            assert stack.predict_one(user, item) == pytest.approx(expected, abs=1e-6)
        assert stack.learn_one(user, item, rating) == pytest.approx(
            reference.learn(user, item, rating), abs=1e-6
        )
    assert stack.histories.keys() == reference.records.keys()
    for user, records in stack.histories.items():
        assert [_fields(r) for r in records] == [
            pytest.approx(_fields(r), abs=1e-9) for r in reference.records[user]
        ]
    for item in stack.pair_changes:
        for partner, stats in stack.pairs(item).items():
            assert stats == pytest.approx(reference.pair(item, partner), abs=1e-9)
    assert solve_weights(Blend.prior_state() + stack.blend_change()) == pytest.approx(
        reference.weights(), abs=1e-6
    )


def test_a_batch_continued_from_a_stored_state_learns_as_one_pass() -> None:
    """Learning a stream in two batches, the second from what the first changed, gives the
    errors of one pass: every change is an amount to add."""
    stream = _stream(300)
    one = RatingStack(_mf(), {}, {}, {}, Blend.prior_state(), 50)
    whole = [one.learn_one(*event) for event in stream]
    first = RatingStack(_mf(), {}, {}, {}, Blend.prior_state(), 50)
    errors = [first.learn_one(*event) for event in stream[:120]]
    pairs = {
        i: PairRows(list(row), np.array(list(row.values())).reshape(-1, PAIR_FIELDS))
        for i in first.pair_changes
        if (row := first.pairs(i))
    }
    counts = dict(first.rating_increments)
    histories = {u: list(reversed(r))[:50] for u, r in first.new_records.items()}
    second = RatingStack(
        first.mf, histories, pairs, counts, Blend.prior_state() + first.blend_change(), 50
    )
    errors += [second.learn_one(*event) for event in stream[120:]]
    assert errors == pytest.approx(whole, abs=1e-6)


def _fields(record: RatingRecord) -> tuple[object, ...]:
    return (
        record.item,
        record.rating,
        record.centred,
        record.residual,
        record.mf_error,
        record.blend_error,
    )


def test_records_round_trip_through_their_stored_form() -> None:
    record = RatingRecord("döner 42", 4.0, 0.5, -0.25, 0.125, -1.5)
    assert RatingRecord.decode(record.encode()) == record
