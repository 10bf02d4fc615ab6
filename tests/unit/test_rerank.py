"""Rerank: what may not be shown never is; exploration slots go to the best UCB; boosts lift."""

from __future__ import annotations

import numpy as np

from freshrec.models.ucb import pool_ctr, ucb_scores
from freshrec.serving.rerank import rerank

N = 30


def _call(**overrides: object) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng(5)
    args: dict[str, object] = {
        "rows": np.arange(N),
        "fine": rng.normal(size=N),
        "multiplier": np.ones(N),
        "unavailable": np.zeros(N, dtype=bool),
        "cold_slot": np.full(N, -1),
        "cold_clicks": np.zeros(0),
        "cold_impressions": np.zeros(0),
        "impressions_total": 1000.0,
        "cold_ctr": 0.05,
        "ucb_beta": 0.2,
        "exploration_slots": 0,
        "vectors": rng.normal(size=(N, 4)).astype(np.float32),
        "diversity": 0.2,
        "k": 10,
    }
    args.update(overrides)
    return rerank(**args)  # type: ignore[arg-type]


def test_unavailable_and_dropped_items_are_never_picked() -> None:
    unavailable = np.zeros(N, dtype=bool)
    unavailable[::3] = True
    multiplier = np.ones(N)
    multiplier[1::3] = 0.0
    picked, _ = _call(unavailable=unavailable, multiplier=multiplier, k=N)
    assert sorted(picked.tolist()) == list(range(2, N, 3))  # all that may be shown, once each


def test_exploration_slots_go_to_the_cold_items_with_the_best_ucb() -> None:
    cold_slot = np.full(N, -1)
    cold_slot[[4, 9, 17]] = [0, 1, 2]
    clicks, shown = np.array([0.0, 5.0, 0.0]), np.array([50.0, 20.0, 400.0])
    picked, explored = _call(
        cold_slot=cold_slot, cold_clicks=clicks, cold_impressions=shown, exploration_slots=2
    )
    best = np.array([4, 9, 17])[np.argsort(-ucb_scores(clicks, shown, 1000.0, 0.2, 0.05))[:2]]
    assert explored == 2 and picked[-2:].tolist() == best.tolist()
    assert len(set(picked.tolist())) == len(picked) == 10


def test_a_boost_lifts_an_item_above_better_ranked_ones() -> None:
    fine = np.linspace(1.0, 0.0, N)
    multiplier = np.ones(N)
    multiplier[15] = 2.5  # relevance (1 - 15/30) * 2.5 beats the best's 1.0
    picked, _ = _call(fine=fine, multiplier=multiplier, diversity=0.0)
    assert picked.tolist() == [15, *range(9)]


def test_an_unshown_cold_item_is_judged_against_the_whole_cold_pool() -> None:
    """The pool's items have earned 41 clicks in 200 impressions; of the two candidates, one was
    never shown, the other had 1 click in 100. Without the bonus the unshown one is worth the
    pool's rate, well above the other's: it gets the slot. A prior taken from the candidates'
    clicks alone (1 in the 1,000 impressions of the catalogue) would have given it to the other."""
    cold_slot = np.full(N, -1)
    cold_slot[[4, 9]] = [0, 1]
    pool_clicks, pool_shown = np.array([0.0, 1.0, 40.0]), np.array([0.0, 100.0, 100.0])
    picked, explored = _call(
        cold_slot=cold_slot,
        cold_clicks=pool_clicks,
        cold_impressions=pool_shown,
        cold_ctr=pool_ctr(pool_clicks, pool_shown),
        ucb_beta=0.0,
        exploration_slots=1,
    )
    assert explored == 1 and picked[-1] == 4
