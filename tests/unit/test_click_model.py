"""The fine ranker learns clicks online and serves what it learned, in any process."""

from __future__ import annotations

import numpy as np
import pytest
from river import linear_model, optim

from freshrec.models.click_model import FEATURES, ClickModel, LinearScorer


def _features(rng: np.random.Generator, good: bool) -> dict[str, float]:
    x = {name: float(rng.normal()) for name in FEATURES}
    x["mf"] = float(rng.normal(1.0 if good else -1.0, 0.5))
    x["log_position"] = float(rng.uniform(0, 2))
    return x


def _train(
    model: ClickModel, rng: np.random.Generator, n: int, good_share: float, click_share: float
) -> None:
    """Impressions of good and bad items; a share of the good ones is clicked."""
    for _ in range(n):
        good = rng.random() < good_share
        x = _features(rng, good)
        model.learn_impression(x)
        if good and rng.random() < click_share:
            model.learn_click(x)


def _river_model(model: ClickModel) -> linear_model.LogisticRegression:
    return linear_model.LogisticRegression(
        optimizer=optim.FTRLProximal(alpha=model.alpha, beta=model.beta, l1=model.l1, l2=model.l2)
    )


def test_it_learns_as_rivers_ftrl_logistic_regression() -> None:
    """3,000 examples one at a time and in batches, with features missing from some, names
    other than the funnel's, clicks and impressions mixed: the same predictions, sums and
    intercept as river's ``LogisticRegression`` on ``FTRLProximal``."""
    rng = np.random.default_rng(4)
    one, batched = ClickModel(), ClickModel()
    river = _river_model(one)
    rows, labels = [], []
    for n in range(3000):
        x = _features(rng, good=rng.random() < 0.4)
        for name in list(x):
            if rng.random() < 0.15:
                del x[name]
        if rng.random() < 0.05:
            x[f"extra_{n % 3}"] = float(rng.normal())
        rows.append(x)
        labels.append(bool(rng.random() < (0.5 if x.get("mf", 0.0) > 0 else 0.05)))
    for x, y in zip(rows[:500], labels[:500], strict=True):
        assert one.predict_proba(x) == pytest.approx(river.predict_proba_one(x)[True], rel=1e-9)
        river.learn_one(x, y)
        (one.learn_click if y else one.learn_impression)(x)
    for x, y in zip(rows[500:], labels[500:], strict=True):
        river.learn_one(x, y)
    one.learn_many(rows[500:], labels[500:])
    for start in range(0, 3000, 700):
        batched.learn_many(rows[start : start + 700], labels[start : start + 700])
    optimizer = river.optimizer
    for model in (one, batched):
        state = model.state()
        assert state["intercept"] == pytest.approx(river.intercept, rel=1e-9)
        assert {k for k in state if k[:2] in ("z:", "n:")} == {
            *(f"z:{name}" for name in optimizer.z),
            *(f"n:{name}" for name in optimizer.n),
        }
        for name in optimizer.z:
            assert state[f"z:{name}"] == pytest.approx(optimizer.z[name], rel=1e-9, abs=1e-12)
            assert state[f"n:{name}"] == pytest.approx(optimizer.n[name], rel=1e-9)
        assert model.clicks == sum(labels) and model.impressions == 3000 - sum(labels)
    probe = rows[-1]
    assert one.predict_proba(probe) == pytest.approx(river.predict_proba_one(probe)[True], rel=1e-9)


def test_served_scores_are_ftrl_proximal_predictions_after_a_round_trip() -> None:
    rng = np.random.default_rng(1)
    model = ClickModel(min_clicks=1)
    _train(model, rng, 2000, good_share=0.3, click_share=0.5)
    restored = ClickModel.from_state(model.state(), min_clicks=1)
    scorer = LinearScorer(restored.serving_weights(), min_clicks=1)
    assert scorer.learned
    # The reference: river's own FTRL step computes each weight from z and n; a zero gradient
    # leaves z and n as they are.
    optimizer = optim.FTRLProximal(alpha=model.alpha, beta=model.beta, l1=model.l1, l2=model.l2)
    for name, value in model.state().items():
        kind, _, feature = name.partition(":")
        if kind in ("z", "n"):
            getattr(optimizer, kind)[feature] = value
    reference: dict[str, float] = {}
    optimizer._step_with_dict(reference, dict.fromkeys(list(optimizer.z), 0.0))
    probe = _features(rng, True)
    probe["log_position"] = 0.0
    z = sum(reference.get(name, 0.0) * value for name, value in probe.items())
    expected = 1.0 / (1.0 + np.exp(-(z + model.intercept)))
    row = np.array([[probe[name] for name in FEATURES]])
    assert scorer.scores(row)[0] == pytest.approx(expected, rel=1e-12)
    assert restored.state() == pytest.approx(model.state(), rel=1e-15)


def test_clicked_features_earn_positive_weight() -> None:
    rng = np.random.default_rng(2)
    model = ClickModel()
    _train(model, rng, 3000, good_share=0.5, click_share=0.4)
    assert model.serving_weights()["mf"] > 0.1


def test_the_fixed_blend_serves_until_enough_clicks() -> None:
    model = ClickModel(min_clicks=50)
    model.learn_click({"mf": 1.0})
    assert not LinearScorer(model.serving_weights(), min_clicks=50).learned


def test_the_learned_ranker_serves_only_where_a_configuration_opts_in() -> None:
    model = ClickModel()
    for _ in range(100):
        model.learn_click({"mf": 1.0})
    assert not LinearScorer(model.serving_weights(), min_clicks=0).learned
    assert LinearScorer(model.serving_weights(), min_clicks=100).learned
