"""Decayed, type-weighted popularity against a brute-force recount of the events."""

from __future__ import annotations

import math
from collections import defaultdict

import pytest

from freshrec.evaluation.synth import SynthConfig, generate
from freshrec.models.decay import REBASE_EXPONENT
from freshrec.models.popularity import Popularity

STRENGTHS = {"view": 0.5, "click": 1.0, "purchase": 3.0, "rating": 1.0}

Event = tuple[str, float, float]  # item, time, strength


def _stream(seed: int) -> list[Event]:
    stream = generate(SynthConfig(users=40, items=60, events=2_000, duration_s=86400, seed=seed))
    return [(e["item_id"], e["ts"], STRENGTHS[e["type"]]) for e in stream.events]


def _learn(events: list[Event], rate: float, landmark: float) -> Popularity:
    pop = Popularity(rate, landmark)
    for item, ts, strength in events:
        pop.learn_one(item, ts, strength)
    return pop


def _recount(events: list[Event], rate: float, now: float) -> dict[str, float]:
    """The sum over each item's events of strength times exp(-rate (now - t))."""
    scores: defaultdict[str, float] = defaultdict(float)
    for item, ts, strength in events:
        scores[item] += strength * math.exp(-rate * (now - ts))
    return scores


def _scores(pop: Popularity, now: float) -> dict[str, float]:
    return {item: pop.score(item, now) for item in pop.scores}


def test_scores_equal_a_brute_force_recount_of_strength_weighted_decayed_events() -> None:
    events = _stream(seed=1)
    rate, now = math.log(2) / 3600.0, events[-1][1]
    pop = _learn(events, rate, landmark=events[0][1])
    assert _scores(pop, now) == pytest.approx(_recount(events, rate, now), rel=1e-9)
    assert len({strength for _, _, strength in events}) == 3


def test_scores_stay_equal_to_the_recount_across_automatic_rebases() -> None:
    events = _stream(seed=2)
    now = events[-1][1]
    rate = 2.5 * REBASE_EXPONENT / (now - events[0][1])  # the exponent passes the threshold twice
    pop = _learn(events, rate, landmark=events[0][1])
    assert pop.decay.landmark > events[0][1] + 2 * REBASE_EXPONENT / rate
    assert _scores(pop, now) == pytest.approx(_recount(events, rate, now), rel=1e-9)


def test_a_rebase_leaves_every_score_unchanged() -> None:
    events = _stream(seed=3)
    rate, now = math.log(2) / 3600.0, events[-1][1]
    pop = _learn(events, rate, landmark=events[0][1])
    before = _scores(pop, now)
    pop.rebase(now)
    assert pop.decay.landmark == now
    assert _scores(pop, now) == pytest.approx(before, rel=1e-12)


def test_an_item_never_seen_scores_zero() -> None:
    assert Popularity(rate=1e-6, landmark=0.0).score("never-seen", now=100.0) == 0.0
