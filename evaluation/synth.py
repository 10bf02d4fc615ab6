"""A synthetic event stream drawn from an explicit latent-factor model.

The demo, the tests and prequential evaluation run on it because the truth is known: every
parameter of the generating model is returned with the events, so an evaluation can state the
noise floor (no model can beat it) and check that learned factors recover real structure.

The model, all of it in :class:`SynthConfig`:

* user and item factors ``U_u, V_i ~ N(0, s^2 I)`` with ``s = 1/sqrt(factors)``; user and item
  biases ``b_u ~ N(0, user_bias_std^2)``, ``b_i ~ N(0, item_bias_std^2)``; a global mean;
* item popularity Zipf-like, ``pop_i = rank_i^-popularity_exponent`` over a random ranking;
  user activity likewise with ``activity_exponent``;
* items numbered in release order, as a catalogue with auto-increment ids would be: the first
  ``1 - new_item_share`` exist at the start, the rest are released uniformly during the stream;
* event times uniform over the duration (a Poisson process given its count), sorted; each event
  picks a user by activity, then an item among those released by then with probability
  ``∝ pop_i · exp(U_u·V_i / affinity_temperature)``, then a type by its share;
* a rating is ``clip(mu + b_u + b_i + U_u·V_i + N(0, noise_std^2), rating_min, rating_max)``,
  a float (not rounded) so that the noise floor is ``noise_std`` up to clipping: the error of
  the oracle that predicts each rating's expectation, ``E[clip(m + N(0, noise_std^2))]``
  (`clipped_normal_mean`), which near the ends of the scale is not the clipped ``m``.

A concept change can be injected at a known event ``change_at`` (a position in the stream),
so that drift detectors can be scored on when they fire:

* ``rotate_user_share``: from that event on, the factors of a random group of that share of
  users turn by one random rotation ``U_u <- R U_u`` (`quarter_turn`: a quarter turn in
  random planes, so each new taste is orthogonal to the old one): their tastes move, not
  their activity nor the size of their factors, so only a model that keeps learning follows
  them;
* ``cluster_items``: that many new items are released at that event, with factors
  ``c + N(0, (s/4)^2 I)`` around one random centre ``c`` and popularity weights that together
  take ``cluster_share`` of the popularity mass: a new popular cluster.
"""

from __future__ import annotations

import gzip
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["EVENT_TYPES", "SynthConfig", "SynthStream", "generate", "quarter_turn", "write_jsonl"]

EVENT_TYPES = ("rating", "view", "click", "purchase")
# Cells (events x items) scored per vectorised step: about 16 MB of float32 per array, large
# enough to amortise numpy's per-call cost, small enough to stay friendly to the cache.
_CHUNK_CELLS = 4_000_000


@dataclass(frozen=True)
class SynthConfig:
    """Every parameter of the generating model; the same config and seed give the same stream."""

    users: int = 2000
    items: int = 1000
    factors: int = 8
    events: int = 100_000
    rating_share: float = 0.3
    # Shares of (view, click, purchase) within the implicit, non-rating events.
    implicit_shares: tuple[float, float, float] = (0.5, 0.4, 0.1)
    noise_std: float = 0.5
    # Taste, not only popularity, decides what a user picks: with affinity_temperature 1 and
    # popularity_exponent 1.1 even the generating model itself ranks a user's next item only
    # ~1.15x better than popularity does (HR@10), so no recommender could show a lift.
    popularity_exponent: float = 0.8
    activity_exponent: float = 0.5
    new_item_share: float = 0.2
    start_ts: float = 1_700_000_000.0
    duration_s: float = 14 * 86400.0
    seed: int = 7
    affinity_temperature: float = 0.1
    # Users rate what they picked, and they pick what they like: affinity lifts the observed
    # mean rating by 0.7 to 0.9, so ratings centre below 4 and seldom clip at the top.
    global_mean: float = 3.0
    user_bias_std: float = 0.3
    item_bias_std: float = 0.3
    rating_min: float = 1.0
    rating_max: float = 5.0
    change_at: int | None = None
    rotate_user_share: float = 0.0
    cluster_items: int = 0
    cluster_share: float = 0.3

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be at least 1"
            for name in ("users", "items", "factors")
            if getattr(self, name) < 1
        ]
        if self.events < 0:
            problems.append("events must not be negative")
        for name in ("rating_share", "new_item_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must lie in [0, 1]")
        shares = self.implicit_shares
        if len(shares) != 3 or min(shares) < 0 or not math.isclose(sum(shares), 1.0):
            problems.append("implicit_shares must be three non-negative shares summing to 1")
        for name in ("noise_std", "user_bias_std", "item_bias_std", "activity_exponent"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative")
        if self.popularity_exponent < 0:
            problems.append("popularity_exponent must not be negative")
        for name in ("duration_s", "affinity_temperature"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be positive")
        if not self.rating_min < self.rating_max:
            problems.append("rating_min must be below rating_max")
        changes = self.rotate_user_share > 0 or self.cluster_items > 0
        if changes and (self.change_at is None or not 0 <= self.change_at < self.events):
            problems.append(
                "a change (rotate_user_share, cluster_items) needs 0 <= change_at < events"
            )
        if not 0.0 <= self.rotate_user_share <= 1.0:
            problems.append("rotate_user_share must lie in [0, 1]")
        if self.cluster_items < 0:
            problems.append("cluster_items must not be negative")
        if not 0.0 < self.cluster_share < 1.0:
            problems.append("cluster_share must lie in (0, 1)")
        if problems:
            raise ValueError("invalid SynthConfig: " + "; ".join(problems))


@dataclass
class SynthStream:
    """Generated events together with the ground truth that produced them.

    User ``"u{k}"`` is row ``k`` of the user arrays, item ``"i{k}"`` row ``k`` of the item
    arrays. ``rating_positions`` indexes the rating events in ``events``;
    ``expected_ratings`` holds their noise-free clipped value, in the same order, under the
    factors in effect at each event, and ``oracle_ratings`` their expectation under the noise
    (the best prediction there is, in mean squared error). With a change, ``rotated_users``
    are the users whose factors are ``changed_user_factors`` from event ``config.change_at``
    on, and ``cluster_items`` the items of the new cluster.
    """

    config: SynthConfig
    events: list[dict[str, Any]]
    user_factors: np.ndarray
    item_factors: np.ndarray
    user_bias: np.ndarray
    item_bias: np.ndarray
    global_mean: float
    release_ts: np.ndarray
    item_popularity: np.ndarray
    user_activity: np.ndarray
    user_index: np.ndarray = field(repr=False)
    item_index: np.ndarray = field(repr=False)
    rating_positions: np.ndarray = field(repr=False)
    expected_ratings: np.ndarray = field(repr=False)
    oracle_ratings: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False)
    rotated_users: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64), repr=False)
    changed_user_factors: np.ndarray | None = field(default=None, repr=False)
    cluster_items: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64), repr=False)

    def expected_rating(self, users: Any, items: Any, changed: bool = False) -> np.ndarray:
        """Noise-free rating ``clip(mu + b_u + b_i + U_u·V_i)`` of user and item indices,
        with the users' factors after the change when ``changed``."""
        users = np.asarray(users, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        factors = self.user_factors
        if changed and self.changed_user_factors is not None:
            factors = self.changed_user_factors
        mean = (
            self.global_mean
            + self.user_bias[users]
            + self.item_bias[items]
            + np.einsum("...k,...k->...", factors[users], self.item_factors[items])
        )
        return np.clip(mean, self.config.rating_min, self.config.rating_max)

    def observed_ratings(self) -> np.ndarray:
        """Values of the rating events, in stream order."""
        return np.array([self.events[p]["value"] for p in self.rating_positions.tolist()])

    def noise_floor_rmse(self) -> float:
        """RMSE of the observed ratings against their expectation (``oracle_ratings``).

        The error an oracle knowing the model would make on this very stream: the floor below
        which a lower prequential RMSE means a bug or leakage, not a better model.
        """
        if self.rating_positions.size == 0:
            raise ValueError("the stream has no rating events, so it has no rating noise floor")
        error = self.observed_ratings() - self.oracle_ratings
        return float(np.sqrt(np.mean(error * error)))


def clipped_normal_mean(mean: np.ndarray, std: float, lo: float, hi: float) -> np.ndarray:
    r""":math:`E[\mathrm{clip}(X, lo, hi)]` for :math:`X \sim N(m, \sigma^2)`, elementwise:

    .. math::

        lo\, \Phi(\alpha) + hi\, (1 - \Phi(\beta)) + m\, (\Phi(\beta) - \Phi(\alpha))
        + \sigma\, (\varphi(\alpha) - \varphi(\beta)),
        \qquad \alpha = \tfrac{lo - m}{\sigma},\ \beta = \tfrac{hi - m}{\sigma}

    (the mass below ``lo`` and above ``hi`` sits there, the rest keeps its truncated mean).

    >>> clipped_normal_mean(np.array([3.0, 5.0]), 0.5, 1.0, 5.0).round(4).tolist()
    [3.0, 4.8005]
    """
    m = np.asarray(mean, dtype=np.float64)
    if std <= 0:
        return np.clip(m, lo, hi)
    alpha, beta = (lo - m) / std, (hi - m) / std
    erf = np.frompyfunc(math.erf, 1, 1)

    def cdf(x: np.ndarray) -> np.ndarray:
        return 0.5 * (1.0 + erf(x / math.sqrt(2.0)).astype(np.float64))

    def pdf(x: np.ndarray) -> np.ndarray:
        return np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)

    below, above = cdf(alpha), 1.0 - cdf(beta)
    inside = m * (1.0 - below - above) + std * (pdf(alpha) - pdf(beta))
    return lo * below + hi * above + inside


def quarter_turn(rng: np.random.Generator, k: int) -> np.ndarray:
    r"""A random rotation by a quarter turn: :math:`R = Q J Q^T`, :math:`x \cdot Rx = 0`.

    ``Q`` is a uniformly random orthogonal basis (QR of a Gaussian matrix, signs fixed by
    R's diagonal) and ``J`` turns each consecutive pair of its axes by 90 degrees (an odd
    last axis stays). A uniformly random rotation can come out near the identity, above all
    in few dimensions, and then change nothing; this one moves every vector as far as a
    rotation can without reversing it: in an even number of dimensions, every rotated
    vector is orthogonal to where it was, so a rotated user's old taste says nothing of the
    new one.

    >>> r = quarter_turn(np.random.default_rng(0), 4)
    >>> x = np.arange(1.0, 5.0)
    >>> bool(np.allclose(r @ r.T, np.eye(4))), round(float(x @ (r @ x)), 12) == 0
    (True, True)
    """
    q, upper = np.linalg.qr(rng.normal(size=(k, k)))
    q = q * np.sign(np.diag(upper))
    turn = np.eye(k)
    for a in range(0, k - 1, 2):
        turn[a : a + 2, a : a + 2] = [[0.0, -1.0], [1.0, 0.0]]
    return q @ turn @ q.T


def _zipf_weights(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Normalised weights ``rank^-exponent`` over a random ranking of ``n`` entities."""
    weights = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    weights = weights[rng.permutation(n)]
    return weights / weights.sum()


def _choose_items(
    rng: np.random.Generator,
    user_factors: np.ndarray,
    item_factors: np.ndarray,
    log_popularity: np.ndarray,
    released: np.ndarray,
    temperature: float,
    chunk: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Gumbel-max draw per event of one item among the first ``released[e]`` items; the
    drawn items and their perturbed logits (to take the larger of two draws).

    ``argmax(logit + G)`` with ``G = -log(E)``, ``E ~ Exp(1)`` samples the softmax of the
    logits without normalising them; float32 and ``chunk`` events at a time keep it memory-
    and cache-friendly. The draws of a chunk depend only on its events and the items
    released by then, so items released later (a new cluster) leave earlier draws unchanged.
    """
    n_events = user_factors.shape[0]
    n_items = item_factors.shape[0]
    chosen = np.empty(n_events, dtype=np.int64)
    best = np.empty(n_events, dtype=np.float32)
    item_t = (item_factors.T / temperature).astype(np.float32)
    log_pop = log_popularity.astype(np.float32)
    columns = np.arange(n_items)
    tiny = np.finfo(np.float32).tiny
    for start in range(0, n_events, chunk):
        stop = min(start + chunk, n_events)
        # Items are numbered in release order, so only the first max(released) columns matter.
        width = int(released[start:stop].max())
        logits = user_factors[start:stop].astype(np.float32) @ item_t[:, :width]
        logits += log_pop[:width]
        np.copyto(logits, -np.inf, where=columns[:width] >= released[start:stop, None])
        noise = rng.standard_exponential(logits.shape, dtype=np.float32)
        np.maximum(noise, tiny, out=noise)  # Exp(1) draws can be exactly 0; log(0) = -inf
        np.log(noise, out=noise)
        logits -= noise
        chosen[start:stop] = logits.argmax(axis=1)
        best[start:stop] = logits[np.arange(stop - start), chosen[start:stop]]
    return chosen, best


def generate(config: SynthConfig | None = None) -> SynthStream:
    """Draw a time-ordered event stream from the latent-factor model of ``config``.

    The model parameters and the events come from independent random streams spawned from
    ``config.seed``, so changing the number of events does not change the model.

    Parameters
    ----------
    config
        Model and stream parameters; the defaults when omitted.

    Returns
    -------
    SynthStream
        Events as contract dicts (ids ``"u12"``, ``"i345"``; unique ``event_id``; ``value``
        on ratings only), the generating parameters and the noise-free expected ratings.

    Examples
    --------
    >>> stream = generate(SynthConfig(users=100, items=50, events=2000, seed=3))
    >>> len(stream.events)
    2000
    >>> sorted({event["type"] for event in stream.events})
    ['click', 'purchase', 'rating', 'view']
    >>> ts = [event["ts"] for event in stream.events]
    >>> ts == sorted(ts)
    True
    >>> round(stream.noise_floor_rmse(), 1)  # noise_std, a little less where ratings clip
    0.5
    """
    config = config or SynthConfig()
    # A fourth child for the change leaves the first three, so every unchanged draw, as before.
    seeds = np.random.SeedSequence(config.seed).spawn(4)
    model_seed, event_seed, noise_seed, change_seed = seeds
    model_rng = np.random.default_rng(model_seed)
    event_rng = np.random.default_rng(event_seed)
    noise_rng = np.random.default_rng(noise_seed)

    # --- the model --------------------------------------------------------------------------
    scale = 1.0 / math.sqrt(config.factors)
    user_factors = model_rng.normal(0.0, scale, (config.users, config.factors))
    item_factors = model_rng.normal(0.0, scale, (config.items, config.factors))
    user_bias = model_rng.normal(0.0, config.user_bias_std, config.users)
    item_bias = model_rng.normal(0.0, config.item_bias_std, config.items)
    popularity = _zipf_weights(model_rng, config.items, config.popularity_exponent)
    activity = _zipf_weights(model_rng, config.users, config.activity_exponent)
    # At least one item exists from the start, so every event has something to choose.
    n_new = min(round(config.new_item_share * config.items), config.items - 1)
    release_ts = np.full(config.items, config.start_ts)
    release_ts[config.items - n_new :] = np.sort(
        model_rng.uniform(config.start_ts, config.start_ts + config.duration_s, n_new)
    )

    # --- the events -------------------------------------------------------------------------
    n = config.events
    ts = np.sort(event_rng.uniform(config.start_ts, config.start_ts + config.duration_s, n))

    # --- the change -------------------------------------------------------------------------
    change_rng = np.random.default_rng(change_seed)
    changed_user_factors = None
    rotated_users = np.empty(0, dtype=np.int64)
    cluster = np.empty(0, dtype=np.int64)
    if config.rotate_user_share > 0:
        size = round(config.rotate_user_share * config.users)
        rotated_users = np.sort(change_rng.choice(config.users, size=size, replace=False))
        rotation = quarter_turn(change_rng, config.factors)
        changed_user_factors = user_factors.copy()
        changed_user_factors[rotated_users] = user_factors[rotated_users] @ rotation.T
    if config.cluster_items > 0:
        centre = change_rng.normal(0.0, scale, config.factors)
        cluster_factors = centre + change_rng.normal(
            0.0, scale / 4, (config.cluster_items, config.factors)
        )
        cluster_weights = (
            np.full(config.cluster_items, config.cluster_share / (1 - config.cluster_share))
            / config.cluster_items
        )
        all_factors = np.vstack([item_factors, cluster_factors])
        all_bias = np.concatenate(
            [item_bias, change_rng.normal(0.0, config.item_bias_std, config.cluster_items)]
        )
        all_popularity = np.concatenate([popularity, cluster_weights])
        all_release_ts = np.concatenate(
            [release_ts, np.full(config.cluster_items, ts[config.change_at])]
        )
        # Items stay numbered in release order: the cluster slots in at its release time.
        order = np.argsort(all_release_ts, kind="stable")
        number = np.empty_like(order)
        number[order] = np.arange(order.size)
        cluster = np.sort(number[config.items :])

    users = event_rng.choice(config.users, size=n, p=activity)
    view, click, purchase = config.implicit_shares
    implicit = 1.0 - config.rating_share
    type_p = [config.rating_share, implicit * view, implicit * click, implicit * purchase]
    types = event_rng.choice(len(EVENT_TYPES), size=n, p=type_p)
    released = np.searchsorted(release_ts, ts, side="right")
    event_user_factors = user_factors[users]
    after = np.arange(n) >= (config.change_at if config.change_at is not None else n)
    if changed_user_factors is not None:
        event_user_factors[after] = changed_user_factors[users[after]]
    chunk = max(1, _CHUNK_CELLS // config.items)
    items, best = _choose_items(
        event_rng,
        event_user_factors,
        item_factors,
        np.log(popularity),
        released,
        config.affinity_temperature,
        chunk,
    )
    if config.cluster_items > 0:
        # The Gumbel-max over all items is the larger of the maxima over the catalogue and
        # over the cluster, each with noise of its own generator: the catalogue's draws, and
        # so every event before the change, are those of the stream without a cluster.
        late, late_best = _choose_items(
            change_rng,
            event_user_factors[after],
            cluster_factors,
            np.log(cluster_weights),
            np.full(int(after.sum()), config.cluster_items),
            config.affinity_temperature,
            chunk,
        )
        picked = items[after]
        wins = late_best > best[after]
        picked[wins] = config.items + late[wins]
        items[after] = picked
        items = number[items]
        item_factors, item_bias = all_factors[order], all_bias[order]
        popularity, release_ts = all_popularity[order], all_release_ts[order]

    stream = SynthStream(
        config=config,
        events=[],
        user_factors=user_factors,
        item_factors=item_factors,
        user_bias=user_bias,
        item_bias=item_bias,
        global_mean=config.global_mean,
        release_ts=release_ts,
        item_popularity=popularity / popularity.sum(),
        user_activity=activity,
        user_index=users,
        item_index=items,
        rating_positions=np.flatnonzero(types == 0),
        expected_ratings=np.empty(0),
        rotated_users=rotated_users,
        changed_user_factors=changed_user_factors,
        cluster_items=cluster,
    )
    rated_users = users[stream.rating_positions]
    rated_items = items[stream.rating_positions]
    noise_free = (
        config.global_mean
        + user_bias[rated_users]
        + item_bias[rated_items]
        + np.einsum(
            "ek,ek->e", event_user_factors[stream.rating_positions], item_factors[rated_items]
        )
    )
    stream.expected_ratings = np.clip(noise_free, config.rating_min, config.rating_max)
    stream.oracle_ratings = clipped_normal_mean(
        noise_free, config.noise_std, config.rating_min, config.rating_max
    )
    noisy = noise_free + noise_rng.normal(0.0, config.noise_std, rated_users.size)
    values = np.full(n, np.nan)
    values[stream.rating_positions] = np.clip(noisy, config.rating_min, config.rating_max)
    stream.events = _event_dicts(config.seed, ts, users, items, types, values)
    return stream


def _event_dicts(
    seed: int,
    ts: np.ndarray,
    users: np.ndarray,
    items: np.ndarray,
    types: np.ndarray,
    values: np.ndarray,
) -> list[dict[str, Any]]:
    """Contract dicts; built from plain Python lists, the one unavoidable per-event step."""
    user_ids = [f"u{k}" for k in range(int(users.max(initial=0)) + 1)]
    item_ids = [f"i{k}" for k in range(int(items.max(initial=0)) + 1)]
    events: list[dict[str, Any]] = []
    append = events.append
    for position, (t, u, i, kind, value) in enumerate(
        zip(
            ts.tolist(),
            users.tolist(),
            items.tolist(),
            types.tolist(),
            values.tolist(),
            strict=True,
        )
    ):
        event_id = f"synth-{seed}-{position}"
        if kind == 0:
            append(
                {
                    "event_id": event_id,
                    "type": "rating",
                    "user_id": user_ids[u],
                    "item_id": item_ids[i],
                    "value": value,
                    "ts": t,
                }
            )
        else:
            append(
                {
                    "event_id": event_id,
                    "type": EVENT_TYPES[kind],
                    "user_id": user_ids[u],
                    "item_id": item_ids[i],
                    "ts": t,
                }
            )
    return events


def write_jsonl(events: Any, path: str | os.PathLike[str]) -> int:
    """Write one compact JSON event per line (gzip when ``path`` ends in ``.gz``); count them.

    The output is the ``jsonl`` format :func:`freshrec.evaluation.datasets.read_events` replays.
    """
    opener = gzip.open if os.fspath(path).endswith(".gz") else open
    count = 0
    with opener(path, "wt", encoding="utf-8") as out:
        for event in events:
            out.write(json.dumps(event, separators=(",", ":"), allow_nan=False))
            out.write("\n")
            count += 1
    return count
