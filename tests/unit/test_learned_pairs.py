"""`LearnedPairs` against sums kept in plain dicts, through the table's growth."""

from __future__ import annotations

import numpy as np
import pytest

from freshrec.models.learned_pairs import PAIR_FIELDS, LearnedPairs


def _reference(steps: list[tuple[str, list[str], np.ndarray, float, np.ndarray]]) -> dict:
    sums: dict[str, dict[str, list[float]]] = {}
    for item, partners, cross, own, theirs in steps:
        sums.setdefault(item, {})
        for partner, c, t in zip(partners, cross.tolist(), theirs.tolist(), strict=True):
            if partner == item:
                continue
            for a, b, mine, yours in ((item, partner, own, t), (partner, item, t, own)):
                row = sums.setdefault(a, {}).setdefault(b, [0.0, 0.0, 0.0, 0.0])
                for f, amount in enumerate((1.0, c, mine, yours)):
                    row[f] += amount
    return sums


@pytest.mark.parametrize("capacity", [1, 4, 1024])
def test_sums_partners_and_order_equal_plain_dicts_whatever_the_capacity(capacity: int) -> None:
    rng = np.random.default_rng(7)
    names = [f"item {n}" for n in range(60)]
    steps = []
    for _ in range(400):
        item = names[rng.integers(len(names))]
        partners = [names[n] for n in rng.integers(len(names), size=rng.integers(0, 12))]
        cross, theirs = rng.normal(size=len(partners)), rng.random(len(partners))
        steps.append((item, partners, cross, float(rng.random()), theirs))
    pairs = LearnedPairs(capacity)
    for item, partners, cross, own, theirs in steps:
        numbers = pairs.ids_of([item, *partners])
        pairs.add(int(numbers[0]), numbers[1:], cross, own, theirs)

    expected = _reference(steps)
    rows = pairs.rows()
    assert list(rows) == list(expected)  # items in the order first met
    for item, row in rows.items():
        assert row.partners == list(expected[item])  # partners in the order first met
        assert row.stats.tolist() == list(expected[item].values())  # the same doubles
        assert pairs.partners_of(item) == row.partners
        asked = [*row.partners, "never met"]
        out = pairs.read(int(pairs.ids_of([item])[0]), pairs.ids_of(asked))
        assert out[:-1].tolist() == row.stats.tolist()
        assert out[-1].tolist() == [0.0] * PAIR_FIELDS


def test_an_item_met_only_with_itself_is_touched_with_no_pairs() -> None:
    pairs = LearnedPairs()
    a = int(pairs.ids_of(["a"])[0])
    pairs.add(a, np.array([a]), np.array([1.0]), 1.0, np.array([1.0]))
    rows = pairs.rows()
    assert list(rows) == ["a"]
    assert rows["a"].partners == []
    assert rows["a"].stats.shape == (0, PAIR_FIELDS)


@pytest.mark.parametrize("capacity", [1, 1024])
def test_reads_are_the_stored_statistics_plus_the_learned(capacity: int) -> None:
    rng = np.random.default_rng(11)
    names = [f"item {n}" for n in range(30)]
    pairs = LearnedPairs(capacity)
    numbers = pairs.ids_of(names)
    stored: dict[tuple[int, int], np.ndarray] = {}
    for _ in range(3):  # a pair put again keeps the newest statistics
        for item in rng.choice(numbers, size=20):
            partners = rng.choice(numbers, size=8, replace=False)
            values = rng.normal(size=(8, PAIR_FIELDS)).astype(np.float32).astype(np.float64)
            pairs.put(int(item), partners, values)
            stored.update({(int(item), int(p)): v for p, v in zip(partners, values, strict=True)})
    learned: dict[tuple[int, int], np.ndarray] = {}
    for _ in range(200):
        item, partners = int(rng.choice(numbers)), rng.choice(numbers, size=5)
        cross, own, theirs = rng.normal(size=5), float(rng.random()), rng.random(5)
        pairs.add(item, partners, cross, own, theirs)
        for k, p in enumerate(partners.tolist()):
            if p != item:
                for key, row in (((item, p), (cross[k], own, theirs[k])),
                                 ((p, item), (cross[k], theirs[k], own))):  # fmt: skip
                    learned[key] = learned.get(key, np.zeros(PAIR_FIELDS)) + np.array([1.0, *row])
    for item in numbers.tolist():
        expected = [
            stored.get((item, p), np.zeros(PAIR_FIELDS)) + learned.get((item, p), 0.0)
            for p in numbers.tolist()
        ]
        np.testing.assert_allclose(pairs.read(item, numbers), expected, rtol=0, atol=1e-12)
