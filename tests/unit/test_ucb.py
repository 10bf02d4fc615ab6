"""UCB exploration: unseen items first, the bonus fades with exposure, clicks keep an item up."""

from __future__ import annotations

import itertools

import numpy as np

from freshrec.models.ucb import pool_ctr, ucb_bonus, ucb_scores


def test_an_item_never_shown_gets_the_largest_bonus() -> None:
    bonus = ucb_bonus(np.array([0.0, 5.0, 50.0]), 1000.0, beta=0.5)
    assert bonus[0] == bonus.max() and bonus[0] > bonus[1] > bonus[2]


def test_the_bonus_fades_as_impressions_grow_without_clicks() -> None:
    shown = np.array([1.0, 10.0, 100.0, 1000.0])
    scores = [ucb_scores(np.zeros(1), np.array([n]), 10_000.0, 0.3, 0.05)[0] for n in shown]
    assert all(a > b for a, b in itertools.pairwise(scores))


def test_an_item_that_gets_clicks_outranks_an_equally_shown_item_without() -> None:
    scores = ucb_scores(np.array([30.0, 0.0]), np.array([100.0, 100.0]), 10_000.0, 0.3, 0.05)
    assert scores[0] > scores[1]


def test_the_bonus_equals_the_ucb1_formula() -> None:
    n = np.array([3.0, 7.0, 40.0])
    np.testing.assert_allclose(ucb_bonus(n, 500.0, 0.8), 0.8 * np.sqrt(np.log(500.0) / n))


def test_an_item_never_shown_is_estimated_at_the_pools_click_through_rate() -> None:
    clicks, shown = np.array([0.0, 1.0, 40.0]), np.array([0.0, 100.0, 100.0])
    scores = ucb_scores(clicks, shown, 200.0, 0.0, pool_ctr(clicks, shown))
    assert scores[0] == 41.0 / 200.0
    assert pool_ctr(np.zeros(2), np.zeros(2)) == 0.0
