"""Learning a batch from a snapshot: what every model's own learner, or a plain recount, gives."""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict

import numpy as np
import pytest

from freshrec.evaluation.synth import SynthConfig, generate
from freshrec.models.biased_mf import BiasedMF
from freshrec.models.config import ModelConfig
from freshrec.models.decay import REBASE_EXPONENT
from freshrec.models.implicit_mf import ImplicitMF, draw_negatives
from freshrec.models.interaction_learner import (
    INTERACTIONS,
    Changes,
    InteractionLearner,
    Snapshot,
)
from freshrec.models.mf import VectorTable, initial_vector
from freshrec.models.rating_stack import Blend, RatingStack
from freshrec.streams.events import Event

CONFIG = ModelConfig(factors=4, cooccurrence_history=6)


def _batch(seed: int = 1, events: int = 400) -> list[Event]:
    """Every event type; impressions between the interactions, also of items never learned;
    some events twice in a row."""
    stream = generate(SynthConfig(users=15, items=25, events=events, duration_s=3600, seed=seed))
    rng = np.random.default_rng(seed)
    out = []
    for e in stream.events:
        out.append(Event(e["type"], e["user_id"], e["item_id"], e["ts"], e.get("value")))
        if rng.random() < 0.2:
            out.append(Event("impression", e["user_id"], f"i{rng.integers(40)}", e["ts"]))
        if rng.random() < 0.1:
            out.append(dataclasses.replace(out[-1], ts=e["ts"] + 1.0))
    assert {e.type for e in out} == INTERACTIONS | {"impression"}
    return out


def _snapshot(events: list[Event]) -> Snapshot:
    """State as a store reads it: learned rows, histories of earlier items, a rating mean."""
    rng = np.random.default_rng(0)
    learned = [e for e in events if e.type in INTERACTIONS]
    names = sorted({"u:" + e.user_id for e in learned} | {"i:" + e.item_id for e in learned})
    table = VectorTable(CONFIG.factors, CONFIG.init_std, CONFIG.seed)
    vectors = {}
    for name in names:  # moved parameters, and some ratings learned already
        vectors[name] = table.initial(name) + np.append(rng.normal(0, 0.05, 9), rng.integers(5))
    histories = {
        name[2:]: [f"i{n}" for n in rng.choice(25, CONFIG.cooccurrence_history, replace=False)]
        for name in names
        if name.startswith("u:")
    }
    return Snapshot(events[0].ts - 3600.0, 700.0, 200, vectors, histories)


def _learn(events: list[Event], snapshot: Snapshot) -> Changes:
    return InteractionLearner(CONFIG).learn_many(events, snapshot)


def _one_model_at_a_time(events: list[Event], snapshot: Snapshot) -> tuple[VectorTable, list]:
    """Each rating through the rating stack (BiasedMF inside), each interaction through
    ImplicitMF with the negatives a generator seeded by the config draws for the batch; the
    rating errors, predicted first."""
    table = VectorTable(CONFIG.factors, CONFIG.init_std, CONFIG.seed)
    table.update({name: vec.copy() for name, vec in snapshot.vectors.items()})
    ratings = BiasedMF(
        table,
        CONFIG.lr,
        CONFIG.reg,
        snapshot.mean_sum,
        snapshot.mean_n,
        CONFIG.bias_lr,
        CONFIG.bias_shrinkage,
    )
    stack = RatingStack(ratings, {}, {}, {}, Blend.prior_state(), CONFIG.rating_history)
    implicit = ImplicitMF(table, CONFIG.implicit_lr, CONFIG.reg, CONFIG.implicit_alpha)
    pool = sorted({e.item_id for e in events if e.type in INTERACTIONS})
    rng = np.random.default_rng(CONFIG.seed)
    picks = draw_negatives(rng, len(pool), len(events), CONFIG.implicit_negatives)
    errors = []
    for e, row in zip(events, picks, strict=True):
        if e.type == "impression":
            continue
        if e.type == "rating":
            errors.append(e.value - stack.predict_one(e.user_id, e.item_id))
            stack.learn_one(e.user_id, e.item_id, e.value)
        strength = CONFIG.strengths[e.type]
        implicit.learn_one(e.user_id, e.item_id, strength, [pool[p] for p in row])
    return table, errors


def test_vectors_change_by_what_each_models_learner_moves_them() -> None:
    events = _batch()
    snapshot = _snapshot(events)
    changes = _learn(events, snapshot)
    table, _ = _one_model_at_a_time(events, snapshot)
    moved = {name for name, vec in table.items() if not np.array_equal(vec, snapshot.vectors[name])}
    assert set(changes.deltas) == moved == set(changes.bases)
    for name in moved:
        assert changes.bases[name] is snapshot.vectors[name]
        assert np.array_equal(changes.deltas[name], table[name] - snapshot.vectors[name]), name


def test_each_rating_error_is_predicted_before_the_rating_is_learned() -> None:
    events = _batch()
    snapshot = _snapshot(events)
    _, errors = _one_model_at_a_time(events, snapshot)
    assert _learn(events, snapshot).rating_errors == pytest.approx(errors, abs=1e-12)
    assert len(errors) == sum(e.type == "rating" for e in events) > 50


def test_the_mean_moves_by_the_sum_and_count_of_the_ratings() -> None:
    events = _batch()
    changes = _learn(events, _snapshot(events))
    ratings = [e.value for e in events if e.type == "rating"]
    assert changes.mean_n == len(ratings)
    assert changes.mean_sum == pytest.approx(sum(ratings), rel=1e-12)


def test_decayed_sums_equal_a_recount_from_the_snapshots_histories() -> None:
    events = _batch()
    snapshot = _snapshot(events)
    changes = _learn(events, snapshot)
    pairs: defaultdict[tuple[str, str], float] = defaultdict(float)
    occurrences: defaultdict[str, float] = defaultdict(float)
    popularity: defaultdict[str, float] = defaultdict(float)
    past = {user: history[::-1] for user, history in snapshot.histories.items()}  # oldest first
    gamma = CONFIG.cooccurrence_gap_exponent
    for e in events:
        if e.type == "impression":
            continue
        last_seen = {item: n for n, item in enumerate(past[e.user_id])}
        history = sorted(last_seen, key=last_seen.__getitem__, reverse=True)
        weight = math.exp(CONFIG.decay_rate * (e.ts - snapshot.landmark))  # at the landmark
        if e.item_id not in history[: CONFIG.cooccurrence_history]:
            for gap, other in enumerate(history[: CONFIG.cooccurrence_history], start=1):
                pairs[e.item_id, other] += gap**-gamma * weight
                pairs[other, e.item_id] += gap**-gamma * weight
            occurrences[e.item_id] += weight
        popularity[e.item_id] += weight * CONFIG.strengths[e.type]
        past[e.user_id].append(e.item_id)
    learned = {(i, j): v for i, row in changes.pairs.items() for j, v in row.items()}
    assert learned == pytest.approx(pairs, rel=1e-12)
    assert changes.occurrences == pytest.approx(occurrences, rel=1e-12)
    assert changes.popularity == pytest.approx(popularity, rel=1e-12)


def test_impressions_and_clicks_are_counted_per_item_without_decay() -> None:
    events = _batch()
    changes = _learn(events, _snapshot(events))
    for kind, counted in (("impression", changes.impressions), ("click", changes.clicks)):
        expected: defaultdict[str, float] = defaultdict(float)
        for e in events:
            if e.type == kind:
                expected[e.item_id] += 1.0
        assert counted == expected


def test_history_keeps_each_users_latest_time_and_first_seen_each_items_earliest() -> None:
    events = _batch()
    changes = _learn(events, _snapshot(events))
    learned = [e for e in events if e.type in INTERACTIONS]
    assert changes.history == {
        user: {
            item: max(e.ts for e in learned if (e.user_id, e.item_id) == (user, item))
            for item in {e.item_id for e in learned if e.user_id == user}
        }
        for user in {e.user_id for e in learned}
    }
    assert changes.first_seen == {
        item: min(e.ts for e in learned if e.item_id == item)
        for item in {e.item_id for e in learned}
    }


def test_the_snapshot_is_left_as_it_was_read() -> None:
    events = _batch()
    snapshot = _snapshot(events)
    copy = dataclasses.replace(
        snapshot,
        vectors={name: vec.copy() for name, vec in snapshot.vectors.items()},
        histories={user: list(items) for user, items in snapshot.histories.items()},
    )
    _learn(events, snapshot)
    assert snapshot.histories == copy.histories
    assert all(np.array_equal(vec, copy.vectors[name]) for name, vec in snapshot.vectors.items())


def test_a_batch_learns_as_its_events_one_batch_each_would() -> None:
    config = dataclasses.replace(CONFIG, implicit_negatives=0)  # negatives depend on the batch
    events = _batch(events=60)
    snapshot = _snapshot(events)
    whole = InteractionLearner(config).learn_many(events, snapshot)
    vectors = dict(snapshot.vectors)
    single = InteractionLearner(config)
    for e in events:
        step = Snapshot(snapshot.landmark, snapshot.mean_sum, snapshot.mean_n, vectors)
        changes = single.learn_many([e], step)
        vectors.update({name: changes.bases[name] + d for name, d in changes.deltas.items()})
        snapshot.mean_sum += changes.mean_sum
        snapshot.mean_n += changes.mean_n
    for name, delta in whole.deltas.items():
        np.testing.assert_allclose(whole.bases[name] + delta, vectors[name], rtol=0, atol=1e-12)


def test_negatives_are_one_draw_per_batch_from_a_generator_seeded_by_the_config() -> None:
    learner, reference = InteractionLearner(CONFIG), np.random.default_rng(CONFIG.seed)
    for seed in (1, 2):
        events = _batch(seed, events=100)
        learner.learn_many(events, _snapshot(events))
        pool = {e.item_id for e in events if e.type in INTERACTIONS}
        reference.integers(0, len(pool), (len(events), CONFIG.implicit_negatives))
    assert learner.rng.bit_generator.state == reference.bit_generator.state


def test_rows_missing_from_the_snapshot_start_at_their_initial_vectors() -> None:
    events = [Event("click", "ann", "dune", 100.0), Event("view", "ann", "heat", 100.0)]
    changes = _learn(events, Snapshot(landmark=100.0))
    assert set(changes.bases) == {"u:ann", "i:dune", "i:heat"}
    for name, base in changes.bases.items():
        kind, entity = name.split(":")
        assert np.array_equal(base, initial_vector(entity, kind, 4, CONFIG.init_std, CONFIG.seed))


def test_events_past_the_landmarks_forward_decay_range_are_refused() -> None:
    too_late = 100.0 + 1.01 * REBASE_EXPONENT / CONFIG.decay_rate
    with pytest.raises(ValueError, match="rebase"):
        _learn([Event("click", "ann", "dune", too_late)], Snapshot(landmark=100.0))


def test_ratings_on_a_wide_scale_are_learned_without_diverging() -> None:
    """The default step on ratings of 1 to 100 (errors of tens): the factor step is capped
    (`freshrec.models.mf.rating_step`), so every error, vector and blend amount stays finite
    and the model predicts better than the ratings' mean by the end."""
    config = ModelConfig()
    stream = generate(SynthConfig(users=50, items=80, events=10_000, duration_s=86400, seed=11))
    events = [
        Event("rating", e["user_id"], e["item_id"], e["ts"], 1.0 + (e["value"] - 1.0) * 99 / 4)
        for e in stream.events
        if e["type"] == "rating"
    ]
    assert len(events) > 2_000
    names = {"u:" + e.user_id for e in events} | {"i:" + e.item_id for e in events}
    table = VectorTable(config.factors, config.init_std, config.seed)
    snapshot = Snapshot(events[0].ts, 0.0, 0, {name: table.initial(name) for name in names}, {})
    changes = InteractionLearner(config).learn_many(events, snapshot)
    errors = np.asarray(changes.rating_errors)
    assert np.isfinite(errors).all()
    assert all(np.isfinite(delta).all() for delta in changes.deltas.values())
    assert changes.blend is not None and np.isfinite(changes.blend).all()
    values = np.array([e.value for e in events])
    tail = slice(3 * len(events) // 4, None)
    assert np.sqrt(np.mean(errors[tail] ** 2)) < values[tail].std()
