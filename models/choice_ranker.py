r"""The fine ranker learned from what users choose: a conditional logit over the candidates.

Every interaction is a choice: when a user picked item :math:`c`, the funnel held a candidate
set :math:`C` for them. The conditional logit (McFadden, 1974; the first place of
Plackett-Luce) models it as

.. math::

    P(c \mid C) = \frac{\exp(w^\top \phi(x_c))}{\sum_{j \in C} \exp(w^\top \phi(x_j))}

and one online step on its log-likelihood is the listwise top-one gradient (ListNet, Cao et
al., 2007), taken with AdaGrad's per-weight steps (Duchi et al., 2011):

.. math::

    g = \phi(x_c) - \sum_{j \in C} P(j \mid C)\, \phi(x_j), \qquad
    G \leftarrow G + g^2, \qquad w \leftarrow w + \eta\, g / \sqrt{G}

It needs no impressions and has no selection bias beyond recall's: a choice outside
:math:`C` teaches nothing. :math:`\phi` is the funnel's features (`FEATURES`, less the two that
are the same for every candidate of a request) and their products with the user's log history
length, so the blend can lean on popularity for a user with little history and on the user's
own signals for a long one. :math:`w` starts at its prior (`prior_weights`): the fixed blend
for a user with `PRIOR_HISTORY` interactions, popularity rather than item-CF for a shorter
history. That is what it serves until it has learned, and on a sparse stream, where few
choices fall among a list's candidates, that is most of the time.

The same likelihood also learns how far back in a user's history item-CF should look. The
``cf`` feature weighs the seed :math:`a` events back by :math:`e^{-a/\tau}`
(`freshrec.serving.recall`); how fast a user's next item stops depending on older items is a
property of the stream (sessions of a few minutes, or tastes stable for months), so
:math:`\theta = \log \tau` takes the same AdaGrad steps, on

.. math::

    \frac{\partial \log P(c \mid C)}{\partial \theta} = s_c - \sum_{j \in C} P(j \mid C)\, s_j,
    \qquad s_j = (w_{\mathrm{cf}} + w_{\mathrm{cf} \times \mathrm{act}}\, \mathrm{act})\,
    \frac{\partial \mathrm{cf}_j}{\partial \theta},

where :math:`\partial \mathrm{cf}_j / \partial \theta` is recall's ``cf_slope``. It starts at
the configured :math:`\tau_0`.

State merges like the click model's: :math:`w - w_0`, :math:`\theta - \theta_0` and
:math:`G - G_0` are sums of per-step terms, so each process adds the terms it learned since its
last merge to one shared hash and continues from the sum; no process's learning overwrites
another's.
"""

from __future__ import annotations

import math

import numpy as np

from freshrec.models.click_model import FEATURES, FIXED_BLEND

_PER_USER = ("log_user_activity", "log_position")  # equal across one request's candidates
_CROSSED = ("mf", "cf", "log_popularity", "log_age_h", "item_bias")
COLUMNS = tuple(name for name in FEATURES if name not in _PER_USER) + tuple(
    f"{name}*log_user_activity" for name in _CROSSED
)
_BASE = np.array([FEATURES.index(name) for name in COLUMNS[: len(COLUMNS) - len(_CROSSED)]])
_CROSS = np.array([FEATURES.index(name) for name in _CROSSED])
_ACTIVITY = FEATURES.index("log_user_activity")
_CF = COLUMNS.index("cf")
_CF_CROSSED = COLUMNS.index("cf*log_user_activity")
PRIOR_HISTORY = 100
"""Interactions at which the ranker's prior is the fixed blend (`prior_weights`)."""
PRIOR_POPULARITY = 0.5
"""The prior's weight on log popularity for a user with no history (the fixed blend's: 0.1)."""
RECENCY = "log_cf_recency"
r"""The name of :math:`\theta = \log \tau` in the merged state."""
RECENCY_RANGE = (0.5, 1000.0)
r"""The :math:`\tau` served stays within these (events): below, only the latest item counts;
above, every seed of the window counts alike."""


def prior_weights() -> np.ndarray:
    r""":math:`w_0`, in `COLUMNS`: the fixed blend at `PRIOR_HISTORY` interactions, popularity
    rather than item-CF below.

    A user's item-CF score comes from the few items of a short history, where what many users
    take is the safer guess, so with :math:`a = \log(1 + n)` for a history of :math:`n` and
    :math:`a_N = \log(1 + N)`, :math:`N` = `PRIOR_HISTORY`:

    .. math::

        w_{\mathrm{cf}}(a) = w^{\mathrm{blend}}_{\mathrm{cf}}\, \frac{a}{a_N}, \qquad
        w_{\mathrm{pop}}(a) = p_0 + (w^{\mathrm{blend}}_{\mathrm{pop}} - p_0)\, \frac{a}{a_N}

    with :math:`p_0` = `PRIOR_POPULARITY`: a base weight and a weight on the feature's product
    with :math:`a`, which the ranker learns from there. Every other weight is the blend's. The
    prior matters where choices are few: on a sparse stream a list's candidates hold a few
    hundred of them in all, too few to move the weights far (README, *Sparse streams*).

    >>> w = prior_weights()
    >>> act = np.log1p([0, PRIOR_HISTORY])
    >>> cf = w[COLUMNS.index("cf")] + w[COLUMNS.index("cf*log_user_activity")] * act
    >>> pop = w[COLUMNS.index("log_popularity")]
    >>> pop = pop + w[COLUMNS.index("log_popularity*log_user_activity")] * act
    >>> cf.round(6).tolist(), pop.round(6).tolist()
    ([0.0, 2.0], [0.5, 0.1])
    """
    w = np.array([FIXED_BLEND.get(name, 0.0) for name in COLUMNS])
    full = math.log1p(PRIOR_HISTORY)
    blend_pop = FIXED_BLEND["log_popularity"]
    w[_CF] = 0.0
    w[_CF_CROSSED] = FIXED_BLEND["cf"] / full
    w[COLUMNS.index("log_popularity")] = PRIOR_POPULARITY
    w[COLUMNS.index("log_popularity*log_user_activity")] = (blend_pop - PRIOR_POPULARITY) / full
    return w


def expand(features: np.ndarray) -> np.ndarray:
    """:math:`\\phi`: the feature rows (columns as `FEATURES`) to the ranker's `COLUMNS`."""
    activity = features[:, _ACTIVITY : _ACTIVITY + 1]
    return np.hstack([features[:, _BASE], features[:, _CROSS] * activity])


class ChoiceRanker:
    """Online conditional-logit ranker over candidate sets.

    Parameters
    ----------
    step
        AdaGrad's :math:`\\eta`.
    adagrad_floor
        :math:`G_0`, the squared-gradient sum before any choice; it bounds the first steps.
    cf_recency
        :math:`\\tau_0`, item-CF's recency scale before any choice (events).

    Examples
    --------
    Two candidates that differ only in popularity; users keep choosing the popular one:

    >>> x = np.zeros((2, len(FEATURES)))
    >>> x[:, FEATURES.index("log_popularity")] = [1.0, 0.0]
    >>> ranker = ChoiceRanker()
    >>> before = ranker.scores(x)
    >>> for _ in range(50):
    ...     ranker.learn(x, 0)
    >>> bool(ranker.scores(x)[0] - ranker.scores(x)[1] > before[0] - before[1]), ranker.choices
    (True, 50)
    """

    def __init__(
        self, step: float = 0.05, adagrad_floor: float = 0.01, cf_recency: float = 5.0
    ) -> None:
        self.step = step
        self.w0 = prior_weights()
        self.g0 = np.full(len(COLUMNS), adagrad_floor)
        self.theta0 = math.log(cf_recency)
        self.theta_g0 = adagrad_floor
        self._merged_theta = self._merged_theta_g = 0.0
        self._pending_theta = self._pending_theta_g = 0.0
        self.choices = 0
        self._merged_w = np.zeros(len(COLUMNS))  # what the shared state held at the last merge
        self._merged_g = np.zeros(len(COLUMNS))
        self._merged_choices = 0
        self._pending_w = np.zeros(len(COLUMNS))  # learned here since then
        self._pending_g = np.zeros(len(COLUMNS))
        self._pending_choices = 0
        self._sync()

    def _sync(self) -> None:
        self.w = self.w0 + self._merged_w + self._pending_w
        self.g = self.g0 + self._merged_g + self._pending_g
        self.theta = self.theta0 + self._merged_theta + self._pending_theta
        self.theta_g = self.theta_g0 + self._merged_theta_g + self._pending_theta_g
        self.choices = self._merged_choices + self._pending_choices

    @property
    def cf_recency(self) -> float:
        r""":math:`\tau = e^\theta`, within `RECENCY_RANGE`."""
        low, high = RECENCY_RANGE
        return min(max(math.exp(min(self.theta, 50.0)), low), high)

    def scores(self, features: np.ndarray) -> np.ndarray:
        """:math:`w^\\top \\phi(x)` per row of ``features`` (columns as `FEATURES`), for one
        user's candidates: the crossed columns are a feature times the user's activity, equal
        on every row, so the weights are moved into feature space once and the rows are scored
        with one product instead of being expanded."""
        if not len(features):
            return np.zeros(0)
        weights = np.zeros(features.shape[1])
        weights[_BASE] = self.w[: len(_BASE)]
        weights[_CROSS] += self.w[len(_BASE) :] * features[0, _ACTIVITY]
        return np.dot(features, weights)

    def learn(self, features: np.ndarray, chosen: int, cf_slope: np.ndarray | None = None) -> None:
        r"""One step on the choice of row ``chosen`` among the rows of ``features``; with each
        row's ``cf_slope`` (:math:`\partial \mathrm{cf} / \partial \theta`), of
        :math:`\theta` too."""
        phi = expand(features)
        z = phi @ self.w
        p = np.exp(z - z.max())
        p /= p.sum()
        if cf_slope is not None:
            slope = (self.w[_CF] + self.w[_CF_CROSSED] * features[0, _ACTIVITY]) * cf_slope
            step = float(slope[chosen] - p @ slope)
            self._pending_theta_g += step * step
            self.theta_g += step * step
            change = self.step * step / math.sqrt(self.theta_g)
            self._pending_theta += change
            self.theta += change
        grad = phi[chosen] - p @ phi
        square = grad * grad
        self._pending_g += square
        self.g += square
        change = self.step * grad / np.sqrt(self.g)
        self._pending_w += change
        self.w += change
        self._pending_choices += 1
        self.choices += 1

    def take_pending(self) -> dict[str, float]:
        """The terms learned since the last merge, as hash fields to add; forgets them (a failed
        merge gives them back with `restore_pending`)."""
        if not (self._pending_choices or self._pending_w.any() or self._pending_g.any()):
            return {}
        out = {}
        for kind, terms in (("w", self._pending_w), ("g", self._pending_g)):
            out.update({f"{kind}:{name}": float(v) for name, v in zip(COLUMNS, terms, strict=True)})
        out[f"w:{RECENCY}"] = self._pending_theta
        out[f"g:{RECENCY}"] = self._pending_theta_g
        out["choices"] = float(self._pending_choices)
        self._merged_w += self._pending_w
        self._merged_g += self._pending_g
        self._merged_theta += self._pending_theta
        self._merged_theta_g += self._pending_theta_g
        self._merged_choices += self._pending_choices
        self._pending_w = np.zeros(len(COLUMNS))
        self._pending_g = np.zeros(len(COLUMNS))
        self._pending_theta = self._pending_theta_g = 0.0
        self._pending_choices = 0
        return out

    def restore_pending(self, terms: dict[str, float]) -> None:
        """Give back ``terms`` from `take_pending` that never reached the shared state (their
        merge failed): the next `take_pending` sends them again, with what was learned since.
        ``terms`` may be any subset of the fields taken; the weights served do not move."""
        w = np.array([terms.get(f"w:{name}", 0.0) for name in COLUMNS])
        g = np.array([terms.get(f"g:{name}", 0.0) for name in COLUMNS])
        theta, theta_g = terms.get(f"w:{RECENCY}", 0.0), terms.get(f"g:{RECENCY}", 0.0)
        choices = int(terms.get("choices", 0.0))
        self._merged_w -= w
        self._merged_g -= g
        self._merged_theta -= theta
        self._merged_theta_g -= theta_g
        self._merged_choices -= choices
        self._pending_w += w
        self._pending_g += g
        self._pending_theta += theta
        self._pending_theta_g += theta_g
        self._pending_choices += choices

    def load_merged(self, state: dict[str, float]) -> None:
        """Continue from the shared sums ``state`` (hash fields as `take_pending` writes them),
        keeping what was learned here since `take_pending`."""
        self._merged_w = np.array([state.get(f"w:{name}", 0.0) for name in COLUMNS])
        self._merged_g = np.array([state.get(f"g:{name}", 0.0) for name in COLUMNS])
        self._merged_theta = state.get(f"w:{RECENCY}", 0.0)
        self._merged_theta_g = state.get(f"g:{RECENCY}", 0.0)
        self._merged_choices = int(state.get("choices", 0.0))
        self._sync()

    def weights(self) -> dict[str, float]:
        """The current weights by column name."""
        return {name: float(v) for name, v in zip(COLUMNS, self.w, strict=True)}
