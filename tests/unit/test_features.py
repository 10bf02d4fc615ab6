"""Ranking features: each column as its formula, computed column-wise by numpy."""

from __future__ import annotations

import numpy as np
import pytest

from freshrec.models.click_model import FEATURES
from freshrec.serving.features import candidate_features
from freshrec.serving.recall import CF, COLD, MF, TRENDING, Recalled


@pytest.mark.parametrize("latest", [None, 5e6])
@pytest.mark.parametrize("with_factors", [True, False])
def test_features_follow_their_formulas(latest: float | None, with_factors: bool) -> None:
    rng = np.random.default_rng(2)
    items, m = 50, 20
    stats = np.column_stack(
        [
            rng.uniform(0, 9, items),
            rng.uniform(0, 1e12, items),
            rng.uniform(0, 4e6, items),
            rng.normal(0, 0.5, items),
        ]
    )
    stats[::7, 2] = 0.0  # never seen: age 0
    y_items = rng.normal(size=(items, 8)).astype(np.float32)
    y_user = rng.normal(size=8).astype(np.float32) if with_factors else None
    rows = rng.choice(items, size=m, replace=False)
    bits = rng.integers(0, 16, m)
    recalled = Recalled(rows, bits, rng.random(m), np.full(m, -1), np.zeros(0, np.int64), bits)
    x = candidate_features(recalled, stats, y_items, y_user, latest, activity=12)

    pop, first = stats[rows, 1], stats[rows, 2]
    newest = latest or first.max()
    expected = {
        "mf": y_items[rows] @ y_user if y_user is not None else np.zeros(m),
        "cf": recalled.cf,
        "log_popularity": np.log1p(1000.0 * pop / pop.max()),
        "log_age_h": np.log1p(np.maximum(newest - np.where(first > 0, first, newest), 0) / 3600),
        "item_bias": stats[rows, 3],
        "log_user_activity": np.full(m, np.log1p(12)),
        "channel_cf": (bits & CF) > 0,
        "channel_mf": (bits & MF) > 0,
        "channel_trending": (bits & TRENDING) > 0,
        "channel_cold": (bits & COLD) > 0,
        "log_position": np.zeros(m),  # training only
    }
    for column, name in enumerate(FEATURES):
        np.testing.assert_allclose(x[:, column], expected[name], rtol=1e-5, err_msg=name)


def test_statistics_without_every_column_are_refused() -> None:
    """The compiled pass reads columns by position and checks no bounds: a matrix short of a
    column would read the next row's values, so it is refused before."""
    recalled = Recalled(
        np.array([0]),
        np.array([CF]),
        np.zeros(1),
        np.full(1, -1),
        np.zeros(0, np.int64),
        np.zeros(1),
    )
    factors = np.zeros((1, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="columns"):
        candidate_features(recalled, np.ones((1, 3)), factors, None, None, activity=1)
