"""Exact top-n by a sampled threshold against a full stable sort."""

from __future__ import annotations

import numpy as np
import pytest

from freshrec.models.top_k import top_n


@pytest.mark.parametrize("size", [1, 7, 300, 5000, 60000])
@pytest.mark.parametrize("n", [1, 10, 120])
def test_top_n_equals_a_stable_full_sort(size: int, n: int) -> None:
    rng = np.random.default_rng(size * 1000 + n)
    for trial in range(20):
        scores = rng.normal(size=size).astype(np.float32)
        if trial % 3 == 1:
            scores = np.round(scores, 1)  # many ties at the threshold
        if trial % 4 == 2:
            scores[rng.integers(size, size=size // 2)] = -np.inf  # masked-out rows
        if trial % 5 == 3:  # a feature gone NaN: those rows last, never dropping the others
            scores[rng.integers(size, size=max(1, size // (1 + trial)))] = np.nan
        expected = np.argsort(-scores, kind="stable")[:n]
        assert top_n(scores, n).tolist() == expected.tolist()


def test_nan_scores_come_last_and_finite_ones_are_all_kept() -> None:
    assert top_n(np.array([0.5, np.nan, 0.9, np.nan, 0.1]), 4).tolist() == [2, 0, 4, 1]
    scores = np.full(3010, np.nan)
    scores[3000:] = np.arange(10.0)
    assert top_n(scores, 3).tolist() == [3009, 3008, 3007]


def test_top_n_of_nothing() -> None:
    assert top_n(np.array([1.0, 2.0]), 0).tolist() == []
    assert top_n(np.array([]), 5).tolist() == []
