r"""The fine ranker: online logistic regression of a click on the features of an impression.

:math:`P(\text{click} \mid x) = \sigma(w^\top x + b)`, learned by FTRL-Proximal (McMahan et al.,
2013) through river's ``linear_model.LogisticRegression``. Features are logged with each
impression exactly as they were served, so learning never sees features the ranker did not.
Every impression is learned at once as a negative; a click that follows is learned as a positive
(the "fake negative" scheme of Ktena et al., 2019), so nothing waits for an attribution window.
The position of the impression is a training feature only (served as 0), which keeps the
ranker from learning position bias as item quality.

Until it has seen ``min_clicks`` clicks the ranker serves a fixed blend of the funnel's scores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
from river import linear_model, optim

FEATURES = (
    "mf",  # preference score y_u . y_i
    "cf",  # cosine co-occurrence with the user's recent items
    "log_popularity",
    "log_age_h",  # hours since the item's first interaction
    "log_user_activity",  # items in the user's history
    "channel_cf",
    "channel_mf",
    "channel_trending",
    "channel_cold",
    "log_position",  # training only; 0 when serving
)
FIXED_BLEND = {"mf": 1.0, "cf": 2.0, "log_popularity": 0.1, "channel_cold": 0.0}


@dataclass
class ClickModel:
    """An FTRL logistic regression whose state survives restarts and moves between processes."""

    alpha: float = 0.05
    beta: float = 1.0
    l1: float = 0.001
    l2: float = 1.0
    min_clicks: int = 50
    clicks: int = 0
    impressions: int = 0
    model: linear_model.LogisticRegression = field(init=False)

    def __post_init__(self) -> None:
        self.model = linear_model.LogisticRegression(
            optimizer=optim.FTRLProximal(alpha=self.alpha, beta=self.beta, l1=self.l1, l2=self.l2)
        )

    def learn_impression(self, features: dict[str, float]) -> None:
        self.model.learn_one(features, False)
        self.impressions += 1

    def learn_click(self, features: dict[str, float]) -> None:
        self.model.learn_one(features, True)
        self.clicks += 1

    def to_json(self) -> str:
        opt = self.model.optimizer
        return json.dumps(
            {
                "z": dict(opt.z),
                "n": dict(opt.n),
                "w": dict(self.model.weights),
                "intercept": self.model.intercept,
                "clicks": self.clicks,
                "impressions": self.impressions,
                "weights": self.serving_weights(),
            }
        )

    @classmethod
    def from_json(cls, raw: str | bytes | None, **params: float) -> ClickModel:
        model = cls(**params)  # type: ignore[arg-type]
        if raw:
            state = json.loads(raw)
            model.model.optimizer.z.update(state["z"])
            model.model.optimizer.n.update(state["n"])
            model.model._weights.update(state["w"])
            model.model.intercept = state["intercept"]
            model.clicks, model.impressions = state["clicks"], state["impressions"]
        return model

    def serving_weights(self) -> dict[str, float]:
        """Exactly the weights river's own prediction uses, plus the intercept."""
        out = dict(self.model.weights)
        out["__intercept__"] = self.model.intercept
        out["__clicks__"] = float(self.clicks)
        return out


class LinearScorer:
    """Scores a feature matrix with served weights, or the fixed blend while feedback is scarce.

    Examples
    --------
    >>> x = np.array([[0.5, 0.0, 1.0, 0, 0, 0, 1, 0, 0, 0], [0.1, 0.3, 2.0, 0, 0, 1, 0, 0, 0, 0]])
    >>> LinearScorer(None, min_clicks=50).scores(x).round(3).tolist()  # fixed blend
    [0.6, 0.9]
    """

    def __init__(self, weights: dict[str, float] | None, min_clicks: int) -> None:
        learned = weights is not None and weights.get("__clicks__", 0.0) >= min_clicks
        source = weights if learned and weights is not None else FIXED_BLEND
        self.learned = learned
        self.vector = np.array([source.get(name, 0.0) for name in FEATURES])
        self.vector[FEATURES.index("log_position")] = 0.0
        self.intercept = source.get("__intercept__", 0.0) if learned else 0.0

    def scores(self, features: np.ndarray) -> np.ndarray:
        z = features @ self.vector + self.intercept
        return 1.0 / (1.0 + np.exp(-z)) if self.learned else z
