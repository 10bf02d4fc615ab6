r"""The fine ranker: online logistic regression of a click on the features of an impression.

:math:`P(\text{click} \mid x) = \sigma(w^\top x + b)`, learned by FTRL-Proximal (McMahan et al.,
2013) through river's ``linear_model.LogisticRegression``. Features are logged with each
impression exactly as they were served, so learning never sees features the ranker did not.
Every impression is learned at once as a negative; a click that follows is learned as a positive
(the "fake negative" scheme of Ktena et al., 2019), so nothing waits for an attribution window.
The position of the impression is a training feature only (served as 0), which keeps the
ranker from learning position bias as item quality.

Every worker learns from its own partitions and, every two seconds, adds what it learned since
the last merge to one shared state in Redis (`ClickModel.state`: FTRL's per-feature sums, which
merge by addition) and continues from the sum, so no worker's learning overwrites another's.
Readers compute the serving weights from that state. Until it has seen ``min_clicks`` clicks
the ranker serves a fixed blend of the funnel's scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from river import linear_model

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
        # river is imported here, not at the top: every command reads FEATURES through the
        # settings, and importing river costs seconds of start-up that only a learner needs.
        from river import linear_model, optim

        self.model = linear_model.LogisticRegression(
            optimizer=optim.FTRLProximal(alpha=self.alpha, beta=self.beta, l1=self.l1, l2=self.l2)
        )

    def learn_impression(self, features: dict[str, float]) -> None:
        self.model.learn_one(features, False)
        self.impressions += 1

    def learn_click(self, features: dict[str, float]) -> None:
        self.model.learn_one(features, True)
        self.clicks += 1

    def state(self) -> dict[str, float]:
        """Everything learned, as sums of per-example terms: FTRL's ``z`` and ``n`` per
        feature, the intercept, the counts. Sums merge by addition, so workers that learn from
        different partitions can each add what they learned since they last merged, and none
        is lost (the asynchronous, parameter-server way FTRL-Proximal is run at scale)."""
        opt = self.model.optimizer
        out = {f"z:{name}": value for name, value in opt.z.items()}
        out.update({f"n:{name}": value for name, value in opt.n.items()})
        out["intercept"] = self.model.intercept
        out["clicks"] = float(self.clicks)
        out["impressions"] = float(self.impressions)
        return out

    def load_state(self, state: dict[str, float]) -> None:
        """Replace what was learned with ``state`` (as from `state`, possibly merged)."""
        opt = self.model.optimizer
        opt.z.clear()
        opt.n.clear()
        for key, value in state.items():
            kind, _, name = key.partition(":")
            if kind == "z":
                opt.z[name] = value
            elif kind == "n":
                opt.n[name] = value
        self.model.intercept = state.get("intercept", 0.0)
        self.clicks = int(state.get("clicks", 0.0))
        self.impressions = int(state.get("impressions", 0.0))
        self.model._weights.clear()
        self.model._weights.update(self.weights())

    @classmethod
    def from_state(cls, state: dict[str, float] | None, **params: float) -> ClickModel:
        model = cls(**params)  # type: ignore[arg-type]
        if state:
            model.load_state(state)
        return model

    def weights(self) -> dict[str, float]:
        r"""FTRL-Proximal's weights from ``z`` and ``n`` as they are now (McMahan et al., 2013):

        .. math::

            w_i = 0 \text{ if } |z_i| \le \lambda_1, \text{ else }
            -\frac{z_i - \operatorname{sgn}(z_i) \lambda_1}{(\beta + \sqrt{n_i})/\alpha + \lambda_2}

        (river sets a weight from ``z`` only when its feature is next learned, so its own
        predictions lag by one update.)
        """
        out = {}
        for name, z in self.model.optimizer.z.items():
            if abs(z) > self.l1:
                n = self.model.optimizer.n[name]
                shrunk = z - np.sign(z) * self.l1
                out[name] = float(-shrunk / ((self.beta + n**0.5) / self.alpha + self.l2))
            else:
                out[name] = 0.0
        return out

    def serving_weights(self) -> dict[str, float]:
        """The weights, plus the intercept and the click count the reader needs."""
        out = self.weights()
        out["__intercept__"] = self.model.intercept
        out["__clicks__"] = float(self.clicks)
        return out


def state_from_hash(raw: dict[bytes, bytes]) -> dict[str, float]:
    """A `ClickModel.state` as read back from the Redis hash that holds it."""
    return {key.decode(): float(value) for key, value in raw.items()}


class LinearScorer:
    """Scores a feature matrix with served weights, or the fixed blend while feedback is scarce.

    ``min_clicks`` 0 never serves the learned weights (the model still learns): a ranker learned
    only from the lists a fixed policy chose sees no candidate that policy ranked low, and on
    freshrec's synthetic stream it ranked worse than the blend that chose them. It is for an
    A/B variant to serve it and show it wins.

    Examples
    --------
    >>> x = np.array([[0.5, 0.0, 1.0, 0, 0, 0, 1, 0, 0, 0], [0.1, 0.3, 2.0, 0, 0, 1, 0, 0, 0, 0]])
    >>> LinearScorer(None, min_clicks=50).scores(x).round(3).tolist()  # fixed blend
    [0.6, 0.9]
    """

    def __init__(self, weights: dict[str, float] | None, min_clicks: int) -> None:
        clicks = weights.get("__clicks__", 0.0) if weights is not None else 0.0
        learned = min_clicks > 0 and clicks >= min_clicks
        source = weights if learned and weights is not None else FIXED_BLEND
        self.learned = learned
        self.vector = np.array([source.get(name, 0.0) for name in FEATURES])
        self.vector[FEATURES.index("log_position")] = 0.0
        self.intercept = source.get("__intercept__", 0.0) if learned else 0.0

    def scores(self, features: np.ndarray) -> np.ndarray:
        z = features @ self.vector + self.intercept
        return 1.0 / (1.0 + np.exp(-z)) if self.learned else z
