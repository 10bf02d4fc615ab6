"""Prequential metrics: ranks, top-N scores and running errors, against brute-force recounts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from freshrec.evaluation.baselines import BiasedMFRanker, PopularityBaseline
from freshrec.evaluation.ranking_metrics import (
    MISSING,
    ErrorAccumulator,
    TopNAccumulator,
    clip_predictions,
    hit_rate,
    listed_top,
    ndcg,
    pessimistic_rank,
    pessimistic_ranks,
    rank_in_list,
    reciprocal_rank,
    rolling_mean,
)


def test_ties_are_counted_pessimistically() -> None:
    assert pessimistic_rank([0.5, 0.5, 0.5, 0.5], target=0) == 4
    assert pessimistic_rank([0.9, 0.5, 0.5, 0.1], target=2) == 3
    assert rank_in_list(["a", "b", "c", "d"], [0.9, 0.7, 0.7, 0.7], "b") == 4


def test_a_served_list_ranks_by_position_and_ties_never_help_the_target() -> None:
    assert rank_in_list(["a", "b", "c"], [0.2, 0.9, 0.7], "b") == 2  # as the user saw it
    assert rank_in_list(["a", "b", "c"], [0.9, 0.5, 0.5], "b") == 3
    assert rank_in_list(["a", "b", "c", "d"], [0.9, 0.5, 0.8, 0.5], "b") == 3


def test_on_a_sorted_list_the_rank_counts_items_scored_at_least_as_high() -> None:
    rng = np.random.default_rng(5)
    for _ in range(50):
        scores = np.sort(rng.integers(0, 4, 12).astype(float))[::-1]
        items = [f"i{n}" for n in range(12)]
        target = int(rng.integers(12))
        expected = 1 + sum(1 for j in range(12) if j != target and scores[j] >= scores[target])
        assert rank_in_list(items, scores.tolist(), items[target]) == expected


def test_a_constant_model_never_scores_a_hit() -> None:
    ranks = pessimistic_ranks(np.zeros((5, 30)), np.arange(5))
    assert hit_rate(ranks, 10).sum() == 0.0


def test_missing_target_scores_zero() -> None:
    rank = rank_in_list(["a", "b"], [0.9, 0.8], "z")
    assert rank == MISSING
    assert hit_rate(rank, 20) == 0.0 and ndcg(rank, 10) == 0.0 and reciprocal_rank(rank) == 0.0
    unknown = pessimistic_ranks(np.ones((1, 3)), np.array([-1]))
    assert unknown.tolist() == [MISSING]


def test_nan_scores_never_rank_first() -> None:
    nan = math.nan
    assert pessimistic_rank([nan, 0.1, -5.0], target=1) == 1
    assert pessimistic_rank([nan, 0.1, -5.0], target=0) == 3
    assert pessimistic_rank([nan, nan], target=0) == 2
    assert rank_in_list(["a", "b"], [0.2, nan], "a") == 2  # a NaN listed after it ties
    # Its own NaN ties with every candidate, listed or not: last of all, as a baseline's NaN
    # target is (once a list is shorter than the catalogue, a miss).
    assert rank_in_list(["a", "b"], [nan, 0.2], "a") == MISSING


def test_nan_ranks_are_misses() -> None:
    acc = TopNAccumulator()
    acc.update(np.array([math.nan, 1.0]))
    assert acc.hr(10) == 0.5


def test_excluded_items_do_not_compete() -> None:
    scores = [0.9, 0.8, 0.7, 0.6]
    seen = np.array([False, False, True, True])  # the user has seen the two best
    assert pessimistic_rank(scores, target=3, candidates=seen) == 2


def test_vectorised_ranks_equal_a_brute_force_recount() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=(50, 40)).astype(float)  # many ties
    scores[rng.random(scores.shape) < 0.05] = np.nan
    targets = rng.integers(0, 40, size=50)
    candidates = rng.random(scores.shape) < 0.7
    ranks = pessimistic_ranks(scores, targets, candidates)
    for row in range(50):
        clean = np.where(np.isnan(scores[row]), -np.inf, scores[row])
        own = clean[targets[row]]
        ahead = sum(
            1 for j in range(40) if j != targets[row] and candidates[row, j] and clean[j] >= own
        )
        assert ranks[row] == 1 + ahead


def test_ndcg_and_reciprocal_rank_follow_their_formulas() -> None:
    ranks = np.array([1.0, 2.0, 7.0, 10.0, 11.0, 20.0, 21.0])
    expected_ndcg = [1 / math.log2(r + 1) if r <= 10 else 0.0 for r in ranks]
    assert ndcg(ranks, 10).tolist() == pytest.approx(expected_ndcg)
    expected_rr = [1 / r if r <= 20 else 0.0 for r in ranks]
    assert reciprocal_rank(ranks, cutoff=20).tolist() == pytest.approx(expected_rr)


def test_top_n_accumulator_averages_over_events() -> None:
    ranks = np.array([1.0, 3.0, 12.0, 25.0, MISSING])
    acc = TopNAccumulator(list_length=20)
    acc.update(ranks[:2], cold=np.array([True, False]))
    acc.update(ranks[2:], cold=np.array([True, True, False]))
    m = acc.metrics()
    assert m["hr@10"] == pytest.approx(2 / 5)
    assert m["hr@20"] == pytest.approx(3 / 5)
    assert m["ndcg@10"] == pytest.approx((1 + 0.5) / 5)
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 12) / 5, abs=1e-6)
    assert m["cold_hit_share"] == pytest.approx(1 / 2)


def test_coverage_counts_distinct_items_of_the_top_of_each_list() -> None:
    acc = TopNAccumulator(coverage_k=2)
    acc.recommend(["a", "b", "c"])
    acc.recommend(["b", "d"])
    assert acc.coverage(catalog_size=8) == pytest.approx(3 / 8)


def test_a_baselines_list_breaks_ties_by_catalogue_order_as_a_stable_sort_would() -> None:
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 4, size=(300, 40)).astype(np.float64)  # many ties
    scores[rng.random(scores.shape) < 0.3] = -np.inf  # seen: not candidates
    scores[:5, :] = -np.inf  # rows with no candidate at all
    scores[5:40][rng.random((35, 40)) < 0.8] = np.nan  # mostly NaN: fewer than k left
    for k in (1, 10, 40, 60):
        listed = listed_top(scores, k)
        for row, got in zip(scores, listed, strict=True):
            expected = np.zeros(row.size, dtype=bool)
            finite = np.where(np.isnan(row), -np.inf, row)  # NaN is no score
            order = np.argsort(-finite, kind="stable")[: min(k, row.size)]
            expected[order[np.isfinite(finite[order])]] = True
            assert np.array_equal(got, expected)


def test_running_rmse_and_mae_equal_numpy_on_random_data() -> None:
    rng = np.random.default_rng(1)
    truths = rng.uniform(1, 5, 1000)
    predictions = truths + rng.normal(0, 0.7, 1000)
    acc = ErrorAccumulator()
    for start in range(0, 1000, 137):  # uneven chunks
        acc.update(predictions[start : start + 137], truths[start : start + 137])
    assert acc.n == 1000
    assert acc.rmse == pytest.approx(np.sqrt(np.mean((truths - predictions) ** 2)), rel=1e-12)
    assert acc.mae == pytest.approx(np.mean(np.abs(truths - predictions)), rel=1e-12)


def test_non_finite_predictions_are_rejected_not_averaged() -> None:
    acc = ErrorAccumulator()
    acc.update(np.array([np.nan, np.inf, 3.0]), np.array([4.0, 4.0, 4.0]))
    assert (acc.n, acc.rejected, acc.rmse) == (1, 2, 1.0)
    assert math.isnan(ErrorAccumulator().rmse)


def test_predictions_are_clipped_to_the_scale_and_nan_falls_back() -> None:
    clipped = clip_predictions(np.array([-3.0, 2.5, 9.0, np.nan]), 1.0, 5.0, fallback=3.2)
    assert clipped.tolist() == [1.0, 2.5, 5.0, 3.2]


def test_rolling_mean_equals_a_windowed_recount() -> None:
    values = np.random.default_rng(2).random(50)
    expected = [values[max(0, n - 7) : n + 1].mean() for n in range(50)]
    assert rolling_mean(values, 8).tolist() == pytest.approx(expected)


def test_popularity_ranks_by_users_and_predicts_the_item_mean() -> None:
    pop = PopularityBaseline()
    for user, item, rating in [
        ("a", 2, None),
        ("b", 2, 5.0),
        ("c", 2, 3.0),
        ("a", 0, 1.0),
        ("a", 1, None),
        ("a", 1, None),
    ]:
        pop.learn_one(user, item, rating)
    assert pop.scores(4).tolist() == [1.0, 1.0, 3.0, 0.0]
    assert pop.predict_rating(2) == 4.0
    assert pop.predict_rating(1) == pytest.approx(3.0)  # no rating: the global mean
    assert math.isnan(PopularityBaseline().predict_rating(0))


def test_river_ranker_scores_are_its_item_dependent_prediction() -> None:
    mf = BiasedMFRanker(factors=3, lr=0.05, reg=0.01, seed=4)
    rng = np.random.default_rng(4)
    for _ in range(300):
        mf.learn_one(f"u{rng.integers(5)}", int(rng.integers(6)), float(rng.uniform(1, 5)))
    scores = mf.scores(["u1", "u3"], n_items=6)
    for row, user in enumerate(["u1", "u3"]):
        offset = mf.model.global_mean.get() + mf.model.u_biases[user]
        for item in range(6):
            assert scores[row, item] + offset == pytest.approx(mf.predict_rating(user, item))
