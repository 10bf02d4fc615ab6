"""Baselines of ``freshrec eval``: popularity and item-kNN against brute-force recounts, river's
settings."""

from __future__ import annotations

import numpy as np

from freshrec.evaluation.baselines import BiasedMFRanker, ItemKNN, PopularityBaseline


def _recount(interactions: list[tuple[str, int]], users: list[str], n_items: int) -> np.ndarray:
    """s_uj = sum over h in H_u of C_hj / sqrt(n_h n_j), everything counted from scratch: the
    cosine of the items' binary user vectors, n_i the users of i and C_hj the users of both."""
    histories: dict[str, set[int]] = {}
    counts = np.zeros(n_items)
    for user, item in interactions:
        histories.setdefault(user, set()).add(item)
    for items in histories.values():
        for item in items:
            counts[item] += 1  # users of the item, however often each came back
    together = np.zeros((n_items, n_items))
    for items in histories.values():
        for h in items:
            for j in items:
                if h != j:
                    together[h, j] += 1  # every pair of a user's items co-occurs once
    out = np.zeros((len(users), n_items))
    for row, user in enumerate(users):
        for j in range(n_items):
            if counts[j] == 0:
                continue
            for h in histories.get(user, ()):
                out[row, j] += together[h, j] / np.sqrt(counts[h] * counts[j])
    return out


def test_item_knn_scores_equal_a_brute_force_recount_after_every_event() -> None:
    rng = np.random.default_rng(11)
    users = [f"u{n}" for n in range(12)]
    knn = ItemKNN()
    seen: list[tuple[str, int]] = []
    for step in range(300):
        event = (users[int(rng.integers(len(users)))], int(rng.integers(40)))
        knn.learn_one(*event)  # repeats included: they count in neither n nor C
        seen.append(event)
        if step % 37 == 0 or step == 299:
            n_items = 45  # more than the items seen: the unseen ones score 0
            expected = _recount(seen, [*users, "nobody"], n_items)
            got = knn.scores([*users, "nobody"], n_items)
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)  # float32 sums


def test_popularity_counts_the_users_of_an_item_after_every_event() -> None:
    """Users who come back to an item count once: a recount of distinct (user, item) pairs."""
    rng = np.random.default_rng(5)
    pop = PopularityBaseline()
    seen: list[tuple[str, int]] = []
    for _ in range(400):
        user, item = f"u{rng.integers(6)}", int(rng.integers(10))  # many repeats
        pop.learn_one(user, item)
        seen.append((user, item))
        expected = np.bincount([i for _, i in set(seen)], minlength=10).astype(float)
        np.testing.assert_array_equal(pop.scores(10), expected)
    assert len(seen) > 2 * len(set(seen))  # the stream did repeat its pairs


def test_item_knn_of_a_user_without_history_is_all_zero() -> None:
    knn = ItemKNN()
    knn.learn_one("ann", 0)
    knn.learn_one("ann", 1)
    assert knn.scores(["bob"], 2).tolist() == [[0.0, 0.0]]


def test_river_documented_is_river_biased_mf_at_its_tutorial_settings() -> None:
    ranker = BiasedMFRanker.river_documented()
    model = ranker.model
    assert model.n_factors == 10
    assert model.u_bias_optimizer.learning_rate == 0.025
    assert model.u_latent_optimizer.learning_rate == 0.05
    assert model.l2_bias == 0.0 and model.l2_latent == 0.0
    assert type(model.weight_initializer).__name__ == "Zeros"
    latent = model.latent_initializer
    assert (latent.mu, latent.sigma, latent.seed) == (0.0, 0.1, 73)
