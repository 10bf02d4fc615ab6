"""The lag protocol: which state predicts each event, which events are top-N targets."""

from __future__ import annotations

import numpy as np
import pytest

from freshrec.evaluation.prequential import (
    Evaluation,
    IndexedStream,
    chunked_upto,
    learned_upto,
    prediction_groups,
)
from freshrec.evaluation.report import SYSTEMS
from freshrec.settings import Settings
from freshrec.streams.events import Event


def _events(rows: list[tuple[str, str, float, str]]) -> list[Event]:
    return [
        Event(type=kind, user_id=u, item_id=i, ts=t, value=4.0 if kind == "rating" else None)
        for u, i, t, kind in rows
    ]


def test_the_state_holds_exactly_the_events_at_least_the_lag_older() -> None:
    rng = np.random.default_rng(3)
    ts = np.sort(rng.integers(0, 50, size=300).astype(float))
    for lag in (0.5, 1.0, 7.0, 60.0):
        upto = learned_upto(ts, lag)
        for e in range(ts.size):
            assert upto[e] == int((ts <= ts[e] - lag).sum())  # brute force
            assert upto[e] <= e  # never the event itself or a later one


def test_events_of_the_same_second_are_not_in_each_others_state() -> None:
    upto = learned_upto(np.array([10.0, 10.0, 10.0, 11.0, 11.5]), 1.0)
    assert upto.tolist() == [0, 0, 0, 3, 3]


@pytest.mark.parametrize("lag", [0.0, -1.0, float("nan")])
def test_a_lag_that_is_not_positive_is_refused(lag: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        learned_upto(np.array([1.0, 2.0]), lag)


def test_groups_share_one_state_and_cover_the_stream_in_order() -> None:
    upto = learned_upto(np.array([0.0, 0.0, 1.0, 1.0, 1.2, 5.0, 9.0, 9.0]), 1.0)
    groups = prediction_groups(upto)
    assert [g for g in groups] == [(0, 2), (2, 5), (5, 6), (6, 8)]
    for start, stop in groups:
        assert len(set(upto[start:stop].tolist())) == 1
        assert upto[start] <= start  # the group's state is learned before any of it


def test_chunks_are_predicted_from_the_state_before_them() -> None:
    assert chunked_upto(7, 3).tolist() == [0, 0, 0, 3, 3, 3, 6]
    assert prediction_groups(chunked_upto(7, 3)) == [(0, 3), (3, 6), (6, 7)]
    assert prediction_groups(chunked_upto(3, 1)) == [(0, 1), (1, 2), (2, 3)]


def test_a_target_is_a_first_interaction_of_a_user_with_a_learned_event() -> None:
    stream = IndexedStream.build(
        _events(
            [
                ("ann", "a", 0.0, "rating"),  # ann has nothing learned: not a target
                ("ann", "b", 0.0, "rating"),  # same second: still nothing learned
                ("ann", "c", 2.0, "click"),  # ann's first two are learned: a target
                ("ann", "a", 3.0, "rating"),  # ann has seen a: not new to her
                ("bob", "a", 3.0, "impression"),  # not an interaction
                ("bob", "c", 3.5, "view"),  # bob has no learned interaction
                ("bob", "d", 5.0, "view"),  # bob's view is learned by now: a target
            ]
        )
    )
    targets = stream.topn_targets(learned_upto(stream.ts, 1.0))
    assert targets.tolist() == [False, False, True, False, False, False, True]


def test_items_are_known_to_a_state_in_order_of_first_interaction() -> None:
    stream = IndexedStream.build(
        _events(
            [
                ("ann", "a", 0.0, "rating"),
                ("bob", "z", 0.5, "impression"),  # an impression does not make an item known
                ("bob", "b", 1.0, "click"),
                ("ann", "a", 2.0, "click"),
                ("cat", "c", 3.0, "view"),
            ]
        )
    )
    assert stream.item_ids == ["a", "b", "c"]
    assert stream.item.tolist() == [0, -1, 1, 0, 2]
    assert stream.known_items.tolist() == [0, 1, 1, 2, 2, 3]
    assert stream.prior_interactions.tolist() == [0, 0, 0, 1, 0]


def test_a_users_learned_history_counts_their_interactions_in_the_predicting_state() -> None:
    rng = np.random.default_rng(11)
    kinds = ("rating", "view", "click", "impression")
    rows = [
        (f"u{rng.integers(6)}", f"i{rng.integers(9)}", float(t), kinds[rng.integers(4)])
        for t in np.sort(rng.integers(0, 40, size=200))
    ]
    stream = IndexedStream.build(_events(rows))
    upto = learned_upto(stream.ts, 3.0)
    every = np.arange(len(rows))
    sizes = stream.learned_interactions(every, upto)
    for e in every.tolist():  # brute force: the user's interactions among [0, upto[e])
        user = rows[e][0]
        held = rows[: upto[e]]
        assert sizes[e] == sum(u == user and kind != "impression" for u, _, _, kind in held)


def test_targets_are_scored_in_the_segment_of_their_users_learned_history() -> None:
    # ann rates a new item every 2 s, bob every 3 s: by lag 1 s, each target is predicted from
    # a state holding every earlier event of its user.
    rows = [("ann", f"a{n}", 2.0 * n, "rating") for n in range(30)]
    rows += [("bob", f"b{n}", 3.0 * n + 0.5, "view") for n in range(8)]
    rows.sort(key=lambda row: row[2])
    stream = IndexedStream.build(_events(rows))
    walk = Evaluation(Settings(), backend=None, stream=stream, upto=learned_upto(stream.ts, 1.0))
    targets = np.flatnonzero(walk.targets)
    before = [sum(r[0] == rows[e][0] for r in rows[:e]) for e in targets.tolist()]
    walk.topn_positions = targets.tolist()
    hit = {"freshrec": lambda h: h < 5, "popularity": lambda h: h >= 5}  # the others never hit
    for name in SYSTEMS:
        ranks = np.array([1.0 if hit.get(name, lambda h: False)(h) else 50.0 for h in before])
        walk.scores[name].add_ranks(ranks, np.zeros(ranks.size, dtype=bool))
    segments = walk.by_history()
    assert list(segments) == ["1-4", "5-19", "20-99", "100+"]
    assert [s["targets"] for s in segments.values()] == [
        sum(lo <= h < hi for h in before) for lo, hi in ((1, 5), (5, 20), (20, 100), (100, 10**9))
    ]
    assert segments["1-4"]["freshrec"]["hr@10"] == 1.0
    assert segments["1-4"]["popularity"]["hr@10"] == 0.0
    assert segments["5-19"]["freshrec"]["hr@10"] == 0.0
    assert segments["20-99"]["popularity"]["hr@10"] == 1.0
    assert segments["20-99"]["item_knn"] == {"hr@10": 0.0, "ndcg@10": 0.0}
    assert set(segments["100+"]) == {"targets"}  # nobody has 100 interactions yet
