"""The fine ranker learns clicks online and serves what it learned, in any process."""

from __future__ import annotations

import numpy as np
import pytest

from models.click_model import FEATURES, ClickModel, LinearScorer


def _features(rng: np.random.Generator, good: bool) -> dict[str, float]:
    x = {name: float(rng.normal()) for name in FEATURES}
    x["mf"] = float(rng.normal(1.0 if good else -1.0, 0.5))
    x["log_position"] = float(rng.uniform(0, 2))
    return x


def test_served_scores_equal_rivers_own_predictions_after_a_round_trip() -> None:
    rng = np.random.default_rng(1)
    model = ClickModel(min_clicks=1)
    for _ in range(2000):
        good = rng.random() < 0.3
        x = _features(rng, good)
        model.learn_impression(x)
        if good and rng.random() < 0.5:
            model.learn_click(x)
    restored = ClickModel.from_json(model.to_json(), min_clicks=1)
    scorer = LinearScorer(restored.serving_weights(), min_clicks=1)
    assert scorer.learned
    probe = _features(rng, True)
    probe["log_position"] = 0.0
    row = np.array([[probe[name] for name in FEATURES]])
    assert scorer.scores(row)[0] == pytest.approx(model.model.predict_proba_one(probe)[True])


def test_clicked_features_earn_positive_weight() -> None:
    rng = np.random.default_rng(2)
    model = ClickModel()
    for _ in range(3000):
        good = rng.random() < 0.5
        x = _features(rng, good)
        model.learn_impression(x)
        if good and rng.random() < 0.4:
            model.learn_click(x)
    assert model.serving_weights()["mf"] > 0.1


def test_the_fixed_blend_serves_until_enough_clicks() -> None:
    model = ClickModel(min_clicks=50)
    model.learn_click({"mf": 1.0})
    assert not LinearScorer(model.serving_weights(), min_clicks=50).learned
