r"""The fine ranker: online logistic regression of a click on the features of an impression.

:math:`q(x) = \sigma(w^\top x + b)`, learned by FTRL-Proximal (McMahan et al., 2013) as river's
``linear_model.LogisticRegression`` with ``optim.FTRLProximal`` learns it, one example after
another, here in one compiled pass per batch (the unit tests hold it to river). Features are
logged with each impression exactly as they were served, so learning never sees features the
ranker did not.
Every impression is learned at once as a negative; a click that follows is learned as a positive
(the "fake negative" scheme of Ktena et al., 2019), so nothing waits for an attribution window.
A clicked impression is so learned twice, once each way, and :math:`q` converges to
:math:`p / (1 + p)` of the click probability :math:`p`, not to :math:`p` (Ktena et al. weight
the loss, or calibrate :math:`p = q / (1 - q)`). :math:`q` is increasing in :math:`p`, so the
order the fine stage serves is the one :math:`p` would give; a reader of the probability itself
must calibrate it.
The position of the impression is a training feature only (served as 0), which keeps the
ranker from learning position bias as item quality.

Every worker learns from its own partitions and, every two seconds, adds what it learned since
the last merge to one shared state in Redis (`ClickModel.state`: FTRL's per-feature sums, which
merge by addition) and continues from the sum, so no worker's learning overwrites another's.
Readers compute the serving weights from that state. Until it has seen ``min_clicks`` clicks
the ranker serves a fixed blend of the funnel's scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

FEATURES = (
    "mf",  # preference score y_u . y_i
    "cf",  # cosine co-occurrence with the user's recent items
    "log_popularity",
    "log_age_h",  # hours since the item's first interaction
    "item_bias",  # the item's rating bias b_i: how much better than average it is rated
    "log_user_activity",  # items in the user's history
    "channel_cf",
    "channel_mf",
    "channel_trending",
    "channel_cold",
    "log_position",  # training only; 0 when serving
)
FIXED_BLEND = {"mf": 1.0, "cf": 2.0, "log_popularity": 0.1, "channel_cold": 0.0}


@dataclass(eq=False)
class ClickModel:
    """An FTRL logistic regression whose state survives restarts and moves between processes.

    Per feature name (any name an impression carries, in order of first sight) it holds FTRL's
    ``z`` and ``n`` and the weight the last step of that feature left, which the next
    prediction uses: river sets a weight from ``z`` only when its feature is next learned.
    """

    alpha: float = 0.05
    beta: float = 1.0
    l1: float = 0.001
    l2: float = 1.0
    min_clicks: int = 50
    clicks: int = 0
    impressions: int = 0
    intercept: float = 0.0
    names: list[str] = field(default_factory=list)
    z: np.ndarray = field(default_factory=lambda: np.zeros(0))
    n: np.ndarray = field(default_factory=lambda: np.zeros(0))
    w: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __post_init__(self) -> None:
        self._column = {name: j for j, name in enumerate(self.names)}

    def learn_impression(self, features: dict[str, float]) -> None:
        self.learn_many([features], [False])

    def learn_click(self, features: dict[str, float]) -> None:
        self.learn_many([features], [True])

    def predict_proba(self, features: dict[str, float]) -> float:
        """sigma(w . x + b) as the next step sees it (with the lagging weights, as river
        predicts): q = p / (1 + p) of the click probability p (see the module docstring)."""
        column = self._column
        score = self.intercept + sum(
            self.w[column[name]] * value for name, value in features.items() if name in column
        )
        return 1.0 / (1.0 + math.exp(-score))

    def learn_many(self, rows: Sequence[dict[str, float]], clicked: Sequence[bool]) -> None:
        """Learn each example in order: ``rows[e]`` shown, clicked or not."""
        if not rows:
            return
        where: list[int] = []
        columns: list[int] = []
        values: list[float] = []
        for e, features in enumerate(rows):
            for name, value in features.items():
                where.append(e)
                columns.append(self._column_of(name))
                values.append(value)
        x = np.zeros((len(rows), len(self.names)))
        present = np.zeros(x.shape, dtype=np.bool_)
        x[where, columns] = values
        present[where, columns] = True
        # Imported here, not at the top: every command reads FEATURES through the settings, and
        # importing numba costs half a second of start-up that only a learner needs.
        from freshrec.models.ftrl import ftrl_logistic_steps

        labels = np.asarray(clicked, dtype=np.bool_)
        self.intercept = ftrl_logistic_steps(
            x, present, labels, self.z, self.n, self.w, self.intercept,
            self.alpha, self.beta, self.l1, self.l2,
        )  # fmt: skip
        positives = int(labels.sum())
        self.clicks += positives
        self.impressions += len(rows) - positives

    def _column_of(self, name: str) -> int:
        j = self._column.get(name)
        if j is None:
            j = self._column[name] = len(self.names)
            self.names.append(name)
            self.z, self.n, self.w = (np.append(a, 0.0) for a in (self.z, self.n, self.w))
        return j

    def state(self) -> dict[str, float]:
        """Everything learned, as sums of per-example terms: FTRL's ``z`` and ``n`` per
        feature, the intercept, the counts. Sums merge by addition, so workers that learn from
        different partitions can each add what they learned since they last merged, and none
        is lost (the asynchronous, parameter-server way FTRL-Proximal is run at scale)."""
        out = {f"z:{name}": float(v) for name, v in zip(self.names, self.z, strict=True)}
        out.update({f"n:{name}": float(v) for name, v in zip(self.names, self.n, strict=True)})
        out["intercept"] = self.intercept
        out["clicks"] = float(self.clicks)
        out["impressions"] = float(self.impressions)
        return out

    def load_state(self, state: dict[str, float]) -> None:
        """Replace what was learned with ``state`` (as from `state`, possibly merged)."""
        sums: dict[str, dict[str, float]] = {"z": {}, "n": {}}
        for key, value in state.items():
            kind, _, name = key.partition(":")
            if kind in sums:
                sums[kind][name] = value
        self.names = list(dict.fromkeys([*sums["z"], *sums["n"]]))
        self._column = {name: j for j, name in enumerate(self.names)}
        self.z = np.array([sums["z"].get(name, 0.0) for name in self.names])
        self.n = np.array([sums["n"].get(name, 0.0) for name in self.names])
        self.w = self._weight_array()
        self.intercept = state.get("intercept", 0.0)
        self.clicks = int(state.get("clicks", 0.0))
        self.impressions = int(state.get("impressions", 0.0))

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

        (the weights a prediction uses lag by one update of their feature, as in river.)
        """
        return dict(zip(self.names, self._weight_array().tolist(), strict=True))

    def _weight_array(self) -> np.ndarray:
        shrunk = self.z - np.sign(self.z) * self.l1
        out = -shrunk / ((self.beta + np.sqrt(self.n)) / self.alpha + self.l2)
        return np.where(np.abs(self.z) > self.l1, out, 0.0)

    def serving_weights(self) -> dict[str, float]:
        """The weights, plus the intercept and the click count the reader needs."""
        out = self.weights()
        out["__intercept__"] = self.intercept
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
    >>> x = np.zeros((2, len(FEATURES)))
    >>> scored = [FEATURES.index(name) for name in ("mf", "cf", "log_popularity")]
    >>> x[:, scored] = [[0.5, 0.0, 1.0], [0.1, 0.3, 2.0]]
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
