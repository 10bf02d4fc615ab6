"""The serving bench's learned state: vectors as the learner leaves them, grown without new
structure."""

from __future__ import annotations

import numpy as np

from freshrec.bench.serve import GROWTH_NOISE, grown, learned_vectors
from freshrec.models.config import ModelConfig
from freshrec.models.interaction_learner import InteractionLearner, Snapshot
from freshrec.models.mf import initial_vector
from freshrec.streams.events import Event


def test_grown_vectors_start_with_the_learned_ones_and_copy_their_spread() -> None:
    rng = np.random.default_rng(0)
    learned = rng.normal(0, [0.1, 0.5, 2.0, 0.0], (300, 4)) + np.array([0, 0, 0, 7])
    out = grown(learned, 30_000, np.random.default_rng(1))
    assert out.shape == (30_000, 4)
    np.testing.assert_array_equal(out[:300], learned)
    # Each copy is a learned vector moved by noise: a parent plus GROWTH_NOISE of the spread.
    spread = learned.std(axis=0)
    np.testing.assert_allclose(
        out[300:, :3].std(axis=0), spread[:3] * np.sqrt(1 + GROWTH_NOISE**2), rtol=0.05
    )
    nearest = np.min(
        np.abs(out[300:400, None, :3] - learned[None, :, :3]).max(axis=2) / spread[:3].max(), 1
    )
    assert (nearest < 5 * GROWTH_NOISE).all()
    assert (out[:, 3] == 7).all()  # the count is copied, not blurred


def test_fewer_vectors_than_learned_are_the_first_ones() -> None:
    learned = np.arange(12.0).reshape(6, 2)
    np.testing.assert_array_equal(grown(learned, 4, np.random.default_rng(0)), learned[:4])


def test_learned_vectors_are_the_learners_after_the_same_batches() -> None:
    config = ModelConfig(factors=4)
    events = [
        Event("rating", f"u{n % 7}", f"i{(3 * n) % 11}", 1000.0 + n, float(1 + n % 5))
        for n in range(50)
    ]
    users, items = learned_vectors(events, config, batch=20)
    # The reference: one learner, batches of 20, the vectors carried by hand.
    learner, vectors, total, count = InteractionLearner(config), {}, 0.0, 0
    for start in range(0, 50, 20):
        part = events[start : start + 20]
        changes = learner.learn_many(part, Snapshot(part[0].ts, total, count, dict(vectors)))
        for name, delta in changes.deltas.items():
            vectors[name] = changes.bases[name] + delta
        total, count = total + changes.mean_sum, count + changes.mean_n
    assert users.shape == (7, 10) and items.shape == (11, 10)
    np.testing.assert_allclose(users[0], vectors["u:u0"])
    np.testing.assert_allclose(items[1], vectors["i:i3"])  # second item to appear
    assert not np.allclose(items[1], initial_vector("i3", "i", 4, config.init_std, config.seed))
