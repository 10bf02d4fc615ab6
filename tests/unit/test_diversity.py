"""MMR: zero diversity keeps the relevance order; more diversity, less similar lists."""

from __future__ import annotations

import numpy as np

from freshrec.models.diversity import intra_list_similarity, mmr


def _clustered(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    centres = rng.normal(size=(4, 8))
    vectors = np.vstack([c + 0.1 * rng.normal(size=(25, 8)) for c in centres])
    relevance = np.concatenate([rng.uniform(0.8, 1.0, 25), rng.uniform(0.0, 0.6, 75)])
    return relevance, vectors


def test_zero_diversity_keeps_the_relevance_order() -> None:
    relevance, vectors = _clustered(np.random.default_rng(0))
    assert mmr(relevance, vectors, 10, 0.0) == np.argsort(-relevance)[:10].tolist()


def test_raising_lambda_raises_intra_list_diversity() -> None:
    relevance, vectors = _clustered(np.random.default_rng(1))
    similarity = [
        intra_list_similarity(vectors[mmr(relevance, vectors, 10, lam)]) for lam in (0.0, 0.3, 0.7)
    ]
    assert similarity[0] > similarity[1] > similarity[2]


def test_picks_are_distinct_and_nan_relevance_goes_last() -> None:
    relevance = np.array([0.2, np.nan, 0.9, 0.5])
    picks = mmr(relevance, np.eye(4), 4, 0.3)
    assert sorted(picks) == [0, 1, 2, 3] and picks[-1] == 1
