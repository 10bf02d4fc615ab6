"""The choice ranker: its step against the log-likelihood's numeric gradient, merging (and
giving back a failed merge), learning, and which items count as choices."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from freshrec.models.choice_ranker import (
    COLUMNS,
    PRIOR_HISTORY,
    PRIOR_POPULARITY,
    RECENCY,
    ChoiceRanker,
    expand,
)
from freshrec.models.click_model import FEATURES, FIXED_BLEND
from freshrec.serving.funnel import choices_since


def _candidates(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.normal(size=(n, len(FEATURES)))
    x[:, FEATURES.index("log_user_activity")] = rng.uniform(0.0, 5.0)  # one user per set
    x[:, FEATURES.index("log_position")] = 0.0
    return x


def _log_likelihood(w: np.ndarray, x: np.ndarray, chosen: int) -> float:
    z = expand(x) @ w
    return float(z[chosen] - np.log(np.exp(z).sum()))


def test_starts_at_the_fixed_blend_for_a_long_history_and_at_popularity_for_none() -> None:
    x = _candidates(np.random.default_rng(0), 20)
    activity = FEATURES.index("log_user_activity")
    x[:, activity] = np.log1p(PRIOR_HISTORY)
    fixed = x @ np.array([FIXED_BLEND.get(name, 0.0) for name in FEATURES])
    assert np.allclose(ChoiceRanker().scores(x), fixed)
    x[:, activity] = 0.0
    cf, popularity = FEATURES.index("cf"), FEATURES.index("log_popularity")
    blend = {**FIXED_BLEND, "cf": 0.0, "log_popularity": PRIOR_POPULARITY}
    assert np.allclose(
        ChoiceRanker().scores(x), x @ np.array([blend.get(name, 0.0) for name in FEATURES])
    )
    before = ChoiceRanker().scores(x)
    x[:, cf] += 1.0  # item-CF weighs nothing in the prior of a user with no history
    assert np.allclose(ChoiceRanker().scores(x), before)
    x[:, popularity] += 1.0
    assert np.allclose(ChoiceRanker().scores(x) - before, PRIOR_POPULARITY)


def test_scores_are_the_expanded_rows_times_the_weights() -> None:
    """Scored in feature space (the crossed weights times the set's activity), as expanded."""
    rng = np.random.default_rng(5)
    ranker = ChoiceRanker(step=0.5)
    for _ in range(30):
        x = _candidates(rng, 15)
        ranker.learn(x, int(rng.integers(15)))
    crossed = [n for n, name in enumerate(COLUMNS) if name.endswith("*log_user_activity")]
    assert len(crossed) == 5 and np.abs(ranker.w[crossed]).min() > 0  # all were learned
    for _ in range(5):
        x = _candidates(rng, 40)
        np.testing.assert_allclose(ranker.scores(x), expand(x) @ ranker.w, rtol=1e-12, atol=1e-12)
    assert ranker.scores(x[:0]).shape == (0,)


def test_step_follows_the_numeric_gradient_of_the_log_likelihood() -> None:
    rng = np.random.default_rng(1)
    x = _candidates(rng, 30)
    ranker = ChoiceRanker(step=0.1)
    w = ranker.w.copy()
    numeric = np.zeros(len(COLUMNS))
    for d in range(len(COLUMNS)):
        e = np.zeros(len(COLUMNS))
        e[d] = 1e-6
        numeric[d] = (_log_likelihood(w + e, x, 7) - _log_likelihood(w - e, x, 7)) / 2e-6
    ranker.learn(x, 7)
    g = ranker.g0 + numeric**2
    assert np.allclose(ranker.w - w, 0.1 * numeric / np.sqrt(g), atol=1e-6)
    assert _log_likelihood(ranker.w, x, 7) > _log_likelihood(w, x, 7)


def test_processes_merge_by_adding_what_each_learned() -> None:
    rng = np.random.default_rng(2)
    sets = [(_candidates(rng, 10), int(rng.integers(10))) for _ in range(40)]
    a, b = ChoiceRanker(), ChoiceRanker()
    shared: Counter[str] = Counter()  # the Redis hash, which HINCRBYFLOAT adds to
    for n, (x, chosen) in enumerate(sets):
        (a if n % 2 else b).learn(x, chosen)
    w0, learned_w = a.w0, (a.w - a.w0) + (b.w - b.w0)
    g0, learned_g = a.g0, (a.g - a.g0) + (b.g - b.g0)
    shared.update(a.take_pending())
    a.learn(*sets[0])  # learned after its merge was sent: kept on top of the sum
    after_w = a.w - (a.w0 + a._merged_w)
    shared.update(b.take_pending())
    a.load_merged(dict(shared))
    b.load_merged(dict(shared))
    assert b.choices == 40 and a.choices == 41
    assert np.allclose(b.w, w0 + learned_w) and np.allclose(b.g, g0 + learned_g)
    assert np.allclose(a.w, w0 + learned_w + after_w)
    assert b.take_pending() == {}


def test_terms_given_back_after_a_failed_merge_are_sent_with_the_next() -> None:
    rng = np.random.default_rng(4)
    sets = [(_candidates(rng, 10), int(rng.integers(10))) for _ in range(20)]
    failing, steady = ChoiceRanker(), ChoiceRanker()
    for x, chosen in sets[:10]:
        failing.learn(x, chosen)
        steady.learn(x, chosen)
    served = failing.w.copy()
    failing.restore_pending(failing.take_pending())  # the merge's pipeline raised
    assert np.array_equal(failing.w, served) and failing.choices == 10
    for x, chosen in sets[10:]:
        failing.learn(x, chosen)
        steady.learn(x, chosen)
    shared: Counter[str] = Counter()
    shared.update(failing.take_pending())
    assert shared["choices"] == 20
    failing.load_merged(dict(shared))
    assert np.allclose(failing.w, steady.w) and np.allclose(failing.g, steady.g)
    assert failing.take_pending() == {}


def test_a_part_given_back_is_sent_again_alone() -> None:
    rng = np.random.default_rng(5)
    ranker = ChoiceRanker()
    ranker.learn(_candidates(rng, 10), 3)
    taken = ranker.take_pending()
    lost = {name: taken[name] for name in ("w:mf", "g:mf")}  # only these increments failed
    ranker.restore_pending(lost)
    assert ranker.take_pending() == {**dict.fromkeys(taken, 0.0), **lost, "choices": 0.0}


def test_choices_are_the_items_newer_than_the_last_lists_newest() -> None:
    history = np.array([5, -1, 7, 3, 9])
    assert choices_since(history, 7).tolist() == [5, -1]
    assert choices_since(history, None).tolist() == history.tolist()  # the history was empty
    assert choices_since(history, 4).tolist() == []  # left the capped history


def test_an_item_missing_from_the_snapshot_never_passes_for_another() -> None:
    """Both unknown items are row -1; the boundary is unknown, so nothing is taken as chosen."""
    assert choices_since(np.array([5, -1, 7, -1, 3]), -1).tolist() == []


def test_learns_the_preference_users_choose_by() -> None:
    """Choices drawn from a logit that prefers popular items for short histories and the MF
    score for long ones: the ranker ends up ranking the chosen item higher than it started."""
    rng = np.random.default_rng(3)
    true = np.zeros(len(COLUMNS))
    true[COLUMNS.index("log_popularity")] = 1.0
    true[COLUMNS.index("mf*log_user_activity")] = 0.8
    true[COLUMNS.index("log_popularity*log_user_activity")] = -0.4
    ranker, start = ChoiceRanker(), ChoiceRanker()

    def hit_rate(model: ChoiceRanker, sets: list[tuple[np.ndarray, int]]) -> float:
        return float(np.mean([np.argmax(model.scores(x)) == c for x, c in sets]))

    def draw(count: int) -> list[tuple[np.ndarray, int]]:
        out = []
        for _ in range(count):
            x = _candidates(rng, 20)
            p = np.exp(expand(x) @ true)
            out.append((x, int(rng.choice(20, p=p / p.sum()))))
        return out

    for x, chosen in draw(3000):
        ranker.learn(x, chosen)
    held_out = draw(1000)
    assert hit_rate(ranker, held_out) > hit_rate(start, held_out) + 0.05
    assert ranker.w[COLUMNS.index("mf*log_user_activity")] > 0.3


def _recency_sets(
    rng: np.random.Generator, count: int, tau: float, seeds: int = 30
) -> list[tuple[np.ndarray, int, np.ndarray]]:
    """Candidate sets whose item-CF evidence comes from seeds of every age: per candidate, the
    cosine with each seed (``sims``, candidates by ages). The chosen item is drawn from a logit
    on the CF score at the true recency scale ``tau``."""
    out = []
    for _ in range(count):
        sims = rng.exponential(0.05, size=(20, seeds)) * (rng.random((20, seeds)) < 0.3)
        cf = sims @ np.exp(-np.arange(seeds) / tau)
        p = np.exp(8.0 * cf)
        out.append((_candidates(rng, 20), int(rng.choice(20, p=p / p.sum())), sims))
    return out


def _at_recency(x: np.ndarray, sims: np.ndarray, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """The candidates' features with CF at recency scale e^theta, and their CF slopes."""
    ages = np.arange(sims.shape[1]) / np.exp(theta)
    x = x.copy()
    x[:, FEATURES.index("cf")] = sims @ np.exp(-ages)
    return x, sims @ (ages * np.exp(-ages))


def test_the_recency_step_follows_the_numeric_gradient_of_the_log_likelihood() -> None:
    rng = np.random.default_rng(8)
    x, chosen, sims = _recency_sets(rng, 1, tau=12.0)[0]
    ranker = ChoiceRanker(step=0.1, cf_recency=5.0)
    theta, w = ranker.theta, ranker.w.copy()

    def likelihood(at: float) -> float:
        return _log_likelihood(w, _at_recency(x, sims, at)[0], chosen)

    numeric = (likelihood(theta + 1e-6) - likelihood(theta - 1e-6)) / 2e-6
    assert abs(numeric) > 1e-3  # the set does depend on the scale
    features, slopes = _at_recency(x, sims, theta)
    ranker.learn(features, chosen, slopes)
    expected = 0.1 * numeric / np.sqrt(ranker.theta_g0 + numeric**2)
    assert ranker.theta - theta == pytest.approx(expected, rel=1e-5)
    assert ranker.cf_recency == pytest.approx(np.exp(ranker.theta))


@pytest.mark.parametrize(("true_tau", "start"), [(20.0, 5.0), (1.5, 5.0)])
def test_learns_the_recency_scale_users_choose_by(true_tau: float, start: float) -> None:
    """Choices that follow older seeds than the starting scale gives weight to move it up;
    choices that follow only the latest items move it down. (Item-CF's weight, and so the
    scale's slope, is small in the prior of a short history: it takes some thousands.)"""
    rng = np.random.default_rng(9)
    ranker = ChoiceRanker(cf_recency=start)
    for x, chosen, sims in _recency_sets(rng, 6000, true_tau):
        features, slopes = _at_recency(x, sims, ranker.theta)
        ranker.learn(features, chosen, slopes)
    assert abs(np.log(ranker.cf_recency / true_tau)) < 0.8 * abs(np.log(start / true_tau))


def test_the_recency_scale_merges_like_the_weights() -> None:
    rng = np.random.default_rng(10)
    a, b = ChoiceRanker(), ChoiceRanker()
    for n, (x, chosen, sims) in enumerate(_recency_sets(rng, 20, tau=20.0)):
        learner = a if n % 2 else b
        features, slopes = _at_recency(x, sims, learner.theta)
        learner.learn(features, chosen, slopes)
    learned = (a.theta - a.theta0) + (b.theta - b.theta0)
    shared: Counter[str] = Counter()
    shared.update(a.take_pending())
    b.restore_pending(b.take_pending())  # a failed merge gives its terms back
    shared.update(b.take_pending())
    a.load_merged(dict(shared))
    assert a.theta == pytest.approx(a.theta0 + learned)
    assert shared[f"w:{RECENCY}"] == pytest.approx(learned)
