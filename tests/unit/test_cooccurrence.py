"""Decayed, gap-weighted co-occurrence over users' histories, against a brute-force recount."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest

from freshrec.evaluation.synth import SynthConfig, generate
from freshrec.models.cooccurrence import Cooccurrence
from freshrec.models.decay import REBASE_EXPONENT
from freshrec.serving.recall import CF, Recalled, Scratch, merge_channels

Event = tuple[str, str, float]  # user, item, time


def _stream(seed: int, events: int = 2_000) -> list[Event]:
    stream = generate(SynthConfig(users=40, items=60, events=events, duration_s=86400, seed=seed))
    return [(e["user_id"], e["item_id"], e["ts"]) for e in stream.events]


def _learn(
    events: list[Event], cap: int, rate: float, landmark: float, gap_exponent: float = 0.5
) -> Cooccurrence:
    cooc = Cooccurrence(cap, rate, landmark, gap_exponent=gap_exponent)
    for user, item, ts in events:
        cooc.learn_one(user, item, ts)
    return cooc


def _recount(
    events: list[Event], cap: int, rate: float, now: float, gap_exponent: float
) -> tuple[dict[tuple[str, str], float], dict[str, float]]:
    """An event whose item is not among the ``cap`` most recent distinct items its user had
    before it pairs with each of them, the g-th most recent at ``g^-gap_exponent``, times
    ``exp(-rate (now - t))``, and counts once; from the whole past, with no state carried
    along."""
    pairs: defaultdict[tuple[str, str], float] = defaultdict(float)
    occurrences: defaultdict[str, float] = defaultdict(float)
    past: defaultdict[str, list[str]] = defaultdict(list)
    for user, item, ts in events:
        last_seen = {other: n for n, other in enumerate(past[user])}
        recent = sorted(last_seen, key=last_seen.__getitem__, reverse=True)[:cap]
        weight = math.exp(-rate * (now - ts))
        if item not in recent:
            for gap, other in enumerate(recent, start=1):
                pairs[item, other] += gap**-gap_exponent * weight
                pairs[other, item] += gap**-gap_exponent * weight
            occurrences[item] += weight
        past[user].append(item)
    return pairs, occurrences


def _decayed_pairs(cooc: Cooccurrence, now: float) -> dict[tuple[str, str], float]:
    return {
        (item, other): float(cooc.decay.decayed(value, now))
        for item, row in cooc.pairs.items()
        for other, value in row.items()
    }


def _assert_equal_to_the_recount(cooc: Cooccurrence, events: list[Event], now: float) -> None:
    pairs, occurrences = _recount(events, cooc.history_cap, cooc.decay.rate, now, cooc.gap_exponent)
    assert _decayed_pairs(cooc, now) == pytest.approx(pairs, rel=1e-9)
    decayed = {item: float(cooc.decay.decayed(v, now)) for item, v in cooc.occurrences.items()}
    assert decayed == pytest.approx(occurrences, rel=1e-9)
    assert len(pairs) > 500


def test_pairs_are_counted_once_each_way_weighted_by_their_gap() -> None:
    events = [("ann", "a", 0.0), ("ann", "b", 0.0), ("ann", "c", 0.0)]
    cooc = _learn(events, 3, 0.0, 0.0, gap_exponent=1.0)
    assert {(i, j): v for i, row in cooc.pairs.items() for j, v in row.items()} == {
        ("b", "a"): 1.0,
        ("a", "b"): 1.0,
        ("c", "b"): 1.0,
        ("b", "c"): 1.0,
        ("c", "a"): 0.5,  # a is c's second most recent item: gap 2
        ("a", "c"): 0.5,
    }
    assert cooc.occurrences == {"a": 1.0, "b": 1.0, "c": 1.0}


def test_a_gap_exponent_of_zero_counts_every_pair_of_the_history_alike() -> None:
    cooc = _learn([("ann", item, 0.0) for item in "abcdef"], 10, 0.0, 0.0, gap_exponent=0.0)
    assert cooc.pairs["f"] == dict.fromkeys("abcde", 1.0)


def test_a_repeated_item_neither_pairs_nor_counts_again() -> None:
    """The cosine's norm counts the users of an item as its pairs do: a user who comes back to
    an item adds to neither, else the items users return to would look less similar."""
    cooc = _learn([("ann", "a", 0.0), ("ann", "b", 0.0), ("ann", "a", 0.0)], 3, 0.0, 0.0)
    assert cooc.pairs["a"] == {"b": 1.0} and cooc.pairs["b"] == {"a": 1.0}
    assert cooc.occurrences == {"a": 1.0, "b": 1.0}
    assert cooc.similarity("a", "b") == 1.0
    assert cooc.histories["ann"] == ["a", "b"]  # moved to the front, held once


def test_items_beyond_the_history_cap_do_not_pair_with_a_new_one() -> None:
    events = [("ann", item, 0.0) for item in "abcd"]
    cooc = _learn(events, 2, 0.0, 0.0)
    assert set(cooc.pairs["d"]) == {"b", "c"}
    assert cooc.histories["ann"] == ["d", "c"]


def test_items_of_different_users_never_pair() -> None:
    cooc = _learn([("ann", "a", 0.0), ("bob", "b", 0.0)], 3, 0.0, 0.0)
    assert not cooc.pairs


@pytest.mark.parametrize(("cap", "gap_exponent"), [(500, 0.5), (8, 0.5), (500, 1.0)])
def test_decayed_counts_equal_a_brute_force_recount(cap: int, gap_exponent: float) -> None:
    events = _stream(seed=1)
    rate = math.log(2) / 3600.0
    cooc = _learn(events, cap, rate, landmark=events[0][2], gap_exponent=gap_exponent)
    _assert_equal_to_the_recount(cooc, events, now=events[-1][2])


def test_counts_stay_equal_to_the_recount_across_automatic_rebases() -> None:
    events = _stream(seed=2)
    span = events[-1][2] - events[0][2]
    rate = 2.5 * REBASE_EXPONENT / span  # the weight's exponent passes the threshold twice
    cooc = _learn(events, 500, rate, landmark=events[0][2])
    assert cooc.decay.landmark > events[0][2] + 2 * REBASE_EXPONENT / rate
    _assert_equal_to_the_recount(cooc, events, now=events[-1][2])


def test_a_rebase_leaves_every_decayed_count_unchanged() -> None:
    events = _stream(seed=3)
    rate, landmark, now = math.log(2) / 3600.0, events[0][2], events[-1][2]
    half = len(events) // 2
    rebased = _learn(events[:half], 500, rate, landmark)
    rebased.rebase(events[half][2])
    for user, item, ts in events[half:]:
        rebased.learn_one(user, item, ts)
    plain = _learn(events, 500, rate, landmark)
    assert rebased.decay.landmark == events[half][2]
    assert _decayed_pairs(rebased, now) == pytest.approx(_decayed_pairs(plain, now), rel=1e-12)


def test_similarity_is_the_cosine_the_readers_recall_scores() -> None:
    events = _stream(seed=4, events=500)
    # A landmark after the events: weights below 1, so a floor fixed at 1 would be wrong.
    cooc = _learn(events, 500, math.log(2) / 21600.0, landmark=events[-1][2] + 21600.0)
    floor = cooc.decay.weight(cooc.clock)  # one interaction at the newest event, as stored
    assert floor == pytest.approx(0.5)
    assert min(cooc.occurrences.values()) < floor < max(cooc.occurrences.values())
    items = sorted(cooc.occurrences)
    row = {item: n for n, item in enumerate(items)}
    width = max(len(r) for r in cooc.pairs.values())
    neighbours = np.full((len(items), width), -1, dtype=np.int64)
    weights = np.zeros((len(items), width))
    for item, pairs in cooc.pairs.items():
        neighbours[row[item], : len(pairs)] = [row[other] for other in pairs]
        weights[row[item], : len(pairs)] = list(pairs.values())
    occurrences = np.array([cooc.occurrences[item] for item in items])
    scratch, none = Scratch(), np.zeros(0, dtype=np.int64)
    checked = 0
    for seed in items[:20]:
        with scratch.seen(len(items), np.array([row[seed]])) as seen:
            recalled = merge_channels(
                seen,
                scratch.cf_slot,
                scratch.candidate_slot,
                seeds=np.array([row[seed]]),
                seed_weights=np.ones(1),
                seed_slopes=np.zeros(1),
                neighbours=neighbours,
                neighbour_weights=weights,
                occurrences=occurrences,
                count_floor=floor,
                per_seed=width,
                mf=none,
                trending=none,
                cold_pool=none,
                cold_fresh=np.zeros(0, dtype=np.bool_),
                recall_cold=0,
                channels=CF,
            )
        out = Recalled(*recalled)
        for candidate, cf in zip(out.rows.tolist(), out.cf.tolist(), strict=True):
            assert cooc.similarity(seed, items[candidate]) == pytest.approx(cf, rel=1e-12)
            assert cooc.similarity(items[candidate], seed) == pytest.approx(cf, rel=1e-12)
            checked += 1
    assert checked > 100
    assert cooc.similarity("never-seen", items[0]) == 0.0


def test_similarity_does_not_depend_on_the_landmark() -> None:
    events = _stream(seed=5, events=500)
    rate = math.log(2) / 3600.0
    early = _learn(events, 500, rate, landmark=events[0][2] - 2 * 86400.0)
    late = _learn(events, 500, rate, landmark=events[-1][2] + 2 * 86400.0)
    assert max(late.occurrences.values()) < 1.0 < min(early.occurrences.values())
    items = sorted(early.occurrences)
    pairs = [(i, j) for i in items[:30] for j in items if i != j]
    sims = [early.similarity(i, j) for i, j in pairs]
    assert sum(s > 0 for s in sims) > 100
    assert [late.similarity(i, j) for i, j in pairs] == pytest.approx(sims, rel=1e-9)
