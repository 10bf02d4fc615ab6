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
        out = pairs.add_into(
            int(pairs.ids_of([item])[0]), pairs.ids_of(asked), np.ones((len(asked), PAIR_FIELDS))
        )
        assert out[:-1].tolist() == (row.stats + 1.0).tolist()
        assert out[-1].tolist() == [1.0] * PAIR_FIELDS


def test_an_item_met_only_with_itself_is_touched_with_no_pairs() -> None:
    pairs = LearnedPairs()
    a = int(pairs.ids_of(["a"])[0])
    pairs.add(a, np.array([a]), np.array([1.0]), 1.0, np.array([1.0]))
    rows = pairs.rows()
    assert list(rows) == ["a"]
    assert rows["a"].partners == []
    assert rows["a"].stats.shape == (0, PAIR_FIELDS)
