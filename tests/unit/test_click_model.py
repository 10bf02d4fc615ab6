"""The fine ranker learns clicks online and serves what it learned, in any process."""

from __future__ import annotations

import numpy as np
import pytest

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


def test_served_scores_are_ftrl_proximal_predictions_after_a_round_trip() -> None:
    rng = np.random.default_rng(1)
    model = ClickModel(min_clicks=1)
    _train(model, rng, 2000, good_share=0.3, click_share=0.5)
    restored = ClickModel.from_state(model.state(), min_clicks=1)
    scorer = LinearScorer(restored.serving_weights(), min_clicks=1)
    assert scorer.learned
    # The reference: river's own FTRL step computes each weight from z and n; a zero gradient
    # leaves z and n as they are.
    optimizer = model.model.optimizer
    reference: dict[str, float] = {}
    optimizer._step_with_dict(reference, dict.fromkeys(list(optimizer.z), 0.0))
    probe = _features(rng, True)
    probe["log_position"] = 0.0
    z = sum(reference.get(name, 0.0) * value for name, value in probe.items())
    expected = 1.0 / (1.0 + np.exp(-(z + model.model.intercept)))
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
