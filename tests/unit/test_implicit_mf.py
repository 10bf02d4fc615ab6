"""The implicit-feedback learner: one capped step per event on its item and sampled negatives."""

from __future__ import annotations

import numpy as np

from freshrec.models.implicit_mf import ImplicitMF, draw_negatives
from freshrec.models.mf import (
    VectorTable,
    implicit_part,
    implicit_step,
    implicit_steps,
    rating_part,
)

K = 8


def _learner(lr: float = 1.0, **kwargs: object) -> ImplicitMF:
    return ImplicitMF(VectorTable(K, 0.1, seed=0), lr=lr, reg=0.01, alpha=2.0, **kwargs)


def test_an_event_is_one_step_on_its_item_and_its_distinct_negatives() -> None:
    mf = _learner()
    reference = {name: mf.table[name].copy() for name in ("u:ann", "i:a", "i:b", "i:c")}
    mf.learn_one("ann", "a", strength=3.0, negatives=["b", "a", "c", "b"])
    rows = [implicit_part(reference[f"i:{x}"], K) for x in "abc"]
    implicit_step(
        implicit_part(reference["u:ann"], K),
        rows,
        preferences=np.array([1.0, 0.0, 0.0]),
        confidences=np.array([1.0 + 2.0 * 3.0, 1.0, 1.0]),  # c = 1 + alpha f for the event
        lr=1.0,
        reg=0.01,
    )
    for name, vec in reference.items():
        np.testing.assert_allclose(mf.table[name], vec, rtol=1e-12, atol=1e-15, err_msg=name)


def test_the_compiled_steps_are_implicit_step_event_after_event() -> None:
    """2,000 events over 30 users and 40 items (repeated and missing negatives, users seen
    again while their rows moved), at a rate the cap binds on and one it does not."""
    rng = np.random.default_rng(11)
    for lr, reg in ((1.0, 0.01), (0.02, 0.1)):
        rows = rng.normal(0.0, 0.3, (70, K))
        users = rng.integers(0, 30, 2000)
        items = 30 + rng.integers(0, 40, (2000, 6))
        items[rng.random((2000, 6)) < 0.1] = -1
        items[:, 0] = 30 + rng.integers(0, 40, 2000)  # every event has its item
        confidences = 1.0 + 2.0 * rng.random(2000)
        expected = rows.copy()
        for e in range(2000):
            distinct = list(dict.fromkeys(int(r) for r in items[e] if r >= 0))
            views = [expected[r] for r in distinct]
            prefs = np.zeros(len(distinct))
            prefs[0] = 1.0
            confs = np.ones(len(distinct))
            confs[0] = confidences[e]
            implicit_step(expected[users[e]], views, prefs, confs, lr, reg)
        implicit_steps(rows, users, items, confidences, lr, reg)
        np.testing.assert_allclose(rows, expected, rtol=1e-10, atol=1e-12)


def test_learning_moves_only_the_implicit_factors() -> None:
    mf = _learner()
    before = {name: rating_part(mf.table[name], K).copy() for name in ("u:ann", "i:a", "i:b")}
    for _ in range(10):
        mf.learn_one("ann", "a", strength=1.0, negatives=["b"])
    for name, part in before.items():
        assert np.array_equal(rating_part(mf.table[name], K), part)


def test_the_item_rises_and_its_negatives_fall_toward_zero() -> None:
    mf = _learner()
    for _ in range(30):
        mf.learn_one("ann", "a", strength=1.0, negatives=["b"])
    assert abs(mf.predict_one("ann", "a") - 1.0) < 0.05
    assert abs(mf.predict_one("ann", "b")) < 0.05


def test_below_the_cap_a_stronger_interaction_moves_the_score_further() -> None:
    scores = {}
    for strength in (0.5, 3.0):
        mf = _learner(lr=0.05)
        before = mf.predict_one("ann", "a")
        mf.learn_one("ann", "a", strength=strength)
        scores[strength] = mf.predict_one("ann", "a") - before
    assert 0.0 < scores[0.5] < scores[3.0]


def test_a_batch_draws_each_events_negatives_from_the_batchs_items() -> None:
    users, items, strengths = ["ann", "bob", "ann", "cy"], ["c", "a", "b", "a"], [1.0, 0.5, 3, 1]
    batch = _learner(negatives=3, seed=7)
    batch.learn_many(users, items, strengths)

    one_by_one = _learner()
    pool = ["a", "b", "c"]
    picks = draw_negatives(np.random.default_rng(7), len(pool), rows=4, per_row=3)
    for user, item, strength, row in zip(users, items, strengths, picks, strict=True):
        one_by_one.learn_one(user, item, strength, [pool[p] for p in row])
    assert batch.table.keys() == one_by_one.table.keys()
    for name, vec in batch.table.items():
        assert np.array_equal(vec, one_by_one.table[name]), name


def test_negatives_of_a_batch_are_one_draw_whatever_the_pool() -> None:
    rng, reference = np.random.default_rng(3), np.random.default_rng(3)
    assert draw_negatives(rng, pool_size=0, rows=2, per_row=4).tolist() == [[0] * 4] * 2
    reference.integers(0, 1, (2, 4))
    assert rng.bit_generator.state == reference.bit_generator.state
