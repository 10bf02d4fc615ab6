"""The reader's funnel over the fresh Redis state: recall → coarse rank → fine rank → rerank.

- **Recall** merges channels, each candidate keeping the channels that found it: item-CF
  neighbours of the user's recent items (cosine of decayed co-occurrence), MF top-K over every
  item (``y_u·y_i`` against the in-memory `ItemIndex`), trending (decayed popularity), and a
  cold pool of new items that have had few impressions. An unknown user gets trending and cold.
- **Coarse rank** keeps the best few hundred by a fixed blend of those scores.
- **Fine rank** scores them with the click model learned online from impressions and clicks
  (`models.click_model`), or the fixed blend until it has enough clicks.
- **Rerank** drops what the user has interacted with, unavailable items and whatever the
  business rules drop, applies their boosts, diversifies by MMR and fills the exploration slots
  with cold items chosen by UCB on their impressions and clicks.

Three pipelined round trips per request whatever the number of candidates.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import Histogram
from redis.asyncio import Redis

from models.click_model import FEATURES, FIXED_BLEND, LinearScorer
from models.diversity import mmr
from models.keys import Keys
from models.mf import implicit_part, predict_rating, rating_part, vector_width
from models.ucb import ucb_scores
from models.vectors import decode_vector
from serving.funnel_config import CHANNELS, FunnelConfig
from serving.item_index import ItemIndex

__all__ = ["CHANNELS", "Candidate", "Funnel", "FunnelConfig", "Served", "UnknownItem"]

STAGE_SECONDS = Histogram(
    "freshrec_funnel_stage_seconds",
    "Time spent in each funnel stage",
    ["stage"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05),
)
EXPLANATIONS = {
    "cf": "because you interacted with {because}",
    "mf": "picked for your taste",
    "trending": "trending now",
    "cold": "new",
    "explore": "new",
}
FEATURE_COLUMNS = {name: n for n, name in enumerate(FEATURES)}
BLEND = np.array([FIXED_BLEND.get(name, 0.0) for name in FEATURES])
BusinessRule = Callable[[str, list[str]], Awaitable[np.ndarray]]
"""``rule(user_id, items)`` -> a multiplier per item: 0 drops it, 1 keeps it, more boosts it."""


@dataclass
class Candidate:
    item_id: str
    channels: list[str] = field(default_factory=list)
    because: str | None = None
    score: float = 0.0

    @property
    def explanation(self) -> str:
        channel = self.channels[0] if self.channels else "trending"
        return EXPLANATIONS[channel].format(because=self.because)

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "item_id": self.item_id,
            "score": round(self.score, 6),
            "channels": self.channels,
            "explanation": self.explanation,
        }
        if self.because is not None:
            out["because"] = self.because
        return out


@dataclass
class Served:
    """A ranked list with what produced it: freshness, features for the impression log, timings."""

    items: list[Candidate]
    latest_event_ts: float | None
    features: np.ndarray
    timings_ms: dict[str, float]


class UnknownItem(LookupError):
    """The item has never been seen by the worker."""


class Funnel:
    """Serves recommendations, similar items and rating predictions from Redis.

    Parameters
    ----------
    index
        The in-memory item matrix; refreshed here whenever it is older than ``max_staleness_s``
        (a reader also refreshes it in the background).
    rules
        Business rules applied in rerank, in order.
    """

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        config: FunnelConfig,
        index: ItemIndex | None = None,
        rules: Sequence[BusinessRule] = (),
        max_staleness_s: float = 1.0,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.config = config
        self.index = index or ItemIndex(redis, keys, config.factors)
        self.rules = list(rules)
        self.max_staleness_s = max_staleness_s
        self.scorer = LinearScorer(None, config.min_clicks)
        self.unavailable: set[str] = set()

    async def refresh(self) -> None:
        """Catch up with Redis now: item matrix and statistics, unavailable items, ranker."""
        await self.index.refresh()
        self.unavailable = {m.decode() for m in await self.redis.smembers(self.keys.unavailable)}
        raw = await self.redis.get(self.keys.click_model_weights)
        weights = None if raw is None else json.loads(raw)
        self.scorer = LinearScorer(weights, self.config.min_clicks)

    async def recommend(
        self, user_id: str, k: int, config: FunnelConfig | None = None
    ) -> list[Candidate]:
        return (await self.serve(user_id, k, config)).items

    async def serve(self, user_id: str, k: int, config: FunnelConfig | None = None) -> Served:
        cfg = config or self.config
        if self.index.staleness_s > self.max_staleness_s:
            await self.refresh()  # also reloads the ranker's weights and unavailable items
        clock = _Clock()
        recall = await self._recall(user_id, k, cfg)
        clock.lap("recall")
        if not recall.candidates:
            return Served([], recall.latest, np.zeros((0, len(FEATURES))), clock.laps)
        features, vectors = self._features(recall)
        clock.lap("features")
        keep = _top(np.dot(features, BLEND), cfg.coarse_keep)
        clock.lap("coarse")
        fine = self.scorer.scores(features[keep])
        clock.lap("fine")
        items = [recall.order[i] for i in keep]
        ranked, rows = await self._rerank(
            user_id, items, features[keep], vectors[keep], fine, recall, k, cfg
        )
        clock.lap("rerank")
        for stage, ms in clock.laps.items():
            STAGE_SECONDS.labels(stage).observe(ms / 1000.0)
        return Served(ranked, recall.latest, rows, clock.laps)

    # --- recall --------------------------------------------------------------------------------
    async def _recall(self, user_id: str, k: int, cfg: FunnelConfig) -> _Recall:
        keys = self.keys
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrevrange(keys.history(user_id), 0, cfg.history_cap - 1, withscores=True)
        pipe.get(keys.user_vector(user_id))
        pipe.zrevrange(keys.popularity, 0, cfg.recall_popular + k - 1)
        pipe.zrevrange(keys.item_first_seen, 0, 2 * cfg.recall_cold - 1)
        history, user_blob, popular, newest = await pipe.execute()
        recall = _Recall(latest=history[0][1] if history else None)
        recall.seen = {m.decode() for m, _ in history}
        recall.activity = len(history)
        seeds = [m.decode() for m, _ in history[: cfg.history_window]]
        newest_unseen = [i for i in (m.decode() for m in newest) if i not in recall.seen]

        pipe = self.redis.pipeline(transaction=False)
        use_cf = "cf" in cfg.channels and seeds
        if use_cf:
            for seed in seeds:
                pipe.zrevrange(keys.neighbours(seed), 0, cfg.recall_per_seed - 1, withscores=True)
        use_cold = "cold" in cfg.channels and newest_unseen
        if use_cold:
            pipe.zmscore(keys.impressions, newest_unseen)
            pipe.zmscore(keys.clicks, newest_unseen)
            pipe.get(keys.impressions_total)
        replies = await pipe.execute() if (use_cf or use_cold) else []

        if use_cf:
            for seed, row in zip(seeds, replies[: len(seeds)], strict=True):
                for member, weight in row:
                    item = member.decode()
                    if item not in recall.seen:
                        recall.add(item, "cf", because=seed)
                        recall.cf_raw[item] = recall.cf_raw.get(item, 0.0) + weight
        width = vector_width(cfg.factors)
        if user_blob is not None and len(user_blob) == 4 * width:
            recall.y_user = implicit_part(decode_vector(user_blob), cfg.factors)
            if "mf" in cfg.channels:
                for item, _ in self.index.top(recall.y_user, cfg.recall_mf, recall.seen):
                    recall.add(item, "mf")
        if "trending" in cfg.channels or recall.y_user is None:
            for member in popular:
                item = member.decode()
                if item not in recall.seen:
                    recall.add(item, "trending")
        if use_cold:
            shown, clicked, total = replies[-3:]
            recall.impressions_total = float(total or 0.0)
            for item, count, clicks in zip(newest_unseen, shown, clicked, strict=True):
                if (count or 0.0) < cfg.cold_max_impressions and len(recall.cold) < cfg.recall_cold:
                    recall.add(item, "cold")
                    recall.cold.append(item)
                    recall.cold_impressions[item] = count or 0.0
                    recall.cold_clicks[item] = clicks or 0.0
        recall.seeds = seeds
        return recall

    def _features(self, recall: _Recall) -> tuple[np.ndarray, np.ndarray]:
        """One row per candidate, columns as `models.click_model.FEATURES`; and their factors."""
        items = recall.order
        vectors, stats = self.index.lookup(items)
        occ, pop, first = stats[:, 0], stats[:, 1], stats[:, 2]
        x = np.zeros((len(items), len(FEATURES)))
        col = FEATURE_COLUMNS
        # Forward-decayed sums share one scale; a ratio to the largest makes them comparable.
        x[:, col["log_popularity"]] = np.log1p(1000.0 * pop / max(pop.max(), 1e-300))
        seed_norm = {
            seed: math.sqrt(self.index.stats[row, 0] or 1.0)
            for seed in recall.seeds
            if (row := self.index.rows.get(seed)) is not None
        }
        for n, item in enumerate(items):
            raw = recall.cf_raw.get(item)
            if raw is not None:
                because = recall.candidates[item].because
                x[n, col["cf"]] = raw / (seed_norm.get(because, 1.0) * math.sqrt(occ[n] or 1.0))
            for channel in recall.candidates[item].channels:
                x[n, col[f"channel_{channel}"]] = 1.0
        newest = recall.latest or float(first.max(initial=0.0))
        age = np.maximum(newest - np.where(first > 0, first, newest), 0.0)
        x[:, col["log_age_h"]] = np.log1p(age / 3600.0)
        x[:, col["log_user_activity"]] = math.log1p(recall.activity)
        if recall.y_user is not None:
            x[:, col["mf"]] = np.dot(vectors, recall.y_user.astype(np.float32))
        return x, vectors

    # --- rerank --------------------------------------------------------------------------------
    async def _rerank(
        self,
        user_id: str,
        items: list[str],
        features: np.ndarray,
        vectors: np.ndarray,
        fine: np.ndarray,
        recall: _Recall,
        k: int,
        cfg: FunnelConfig,
    ) -> tuple[list[Candidate], np.ndarray]:
        multiplier = np.array([0.0 if i in self.unavailable else 1.0 for i in items])
        for rule in self.rules:
            multiplier *= await rule(user_id, items)
        allowed = multiplier > 0
        # Relevance in (0, 1], then boosts: a boost raises an item whatever the sign of scores.
        ranks = np.empty(len(items))
        ranks[np.argsort(-fine, kind="stable")] = np.arange(len(items))
        relevance = (1.0 - ranks / max(len(items), 1)) * np.where(allowed, multiplier, 0.0)
        # Exploration first: the cold items with the best UCB take the reserved slots.
        cold = set(recall.cold)
        pool = [n for n, item in enumerate(items) if allowed[n] and item in cold]
        explore: list[int] = []
        if pool and cfg.exploration_slots > 0:  # pool is empty without the cold channel
            ucb = ucb_scores(
                np.array([recall.cold_clicks[items[n]] for n in pool]),
                np.array([recall.cold_impressions[items[n]] for n in pool]),
                recall.impressions_total,
                cfg.ucb_beta,
            )
            best = np.argsort(-ucb, kind="stable")[: min(cfg.exploration_slots, k)]
            explore = [pool[i] for i in best]
            for n in explore:
                recall.candidates[items[n]].channels.insert(0, "explore")
        eligible = [n for n in range(len(items)) if allowed[n] and n not in explore]
        chosen = mmr(relevance[eligible], vectors[eligible], k - len(explore), cfg.diversity)
        picked = [eligible[c] for c in chosen] + explore
        ranked = []
        for n in picked:
            cand = recall.candidates[items[n]]
            cand.score = float(fine[n])
            ranked.append(cand)
        return ranked, features[picked]

    # --- other routes ----------------------------------------------------------------------------
    async def similar(self, item_id: str, k: int) -> list[dict[str, object]]:
        """Items most similar to ``item_id`` by cosine of decayed co-occurrence."""
        keys = self.keys
        pipe = self.redis.pipeline(transaction=False)
        pipe.zscore(keys.occurrences, item_id)
        pipe.zrevrange(keys.neighbours(item_id), 0, max(4 * k, 50) - 1, withscores=True)
        own, row = await pipe.execute()
        if own is None:
            raise UnknownItem(item_id)
        if not row:
            return []
        members = [m.decode() for m, _ in row]
        counts = await self.redis.zmscore(keys.occurrences, members)
        scored = [
            (weight / math.sqrt(own * (count or 1.0)), member)
            for (_, weight), member, count in zip(row, members, counts, strict=True)
        ]
        scored.sort(reverse=True)
        return [{"item_id": m, "score": round(s, 6)} for s, m in scored[:k]]

    async def predict(self, user_id: str, item_id: str) -> dict[str, object]:
        """The MF rating prediction; an unknown user gets mu + b_i."""
        keys = self.keys
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(keys.user_vector(user_id))
        pipe.get(keys.item_vector(item_id))
        pipe.hmget(keys.rating_mean, "sum", "n")
        user_blob, item_blob, mean_raw = await pipe.execute()
        k = self.config.factors
        width = vector_width(k)
        if item_blob is None or len(item_blob) != 4 * width:
            raise UnknownItem(item_id)
        item = rating_part(decode_vector(item_blob), k)
        known_user = user_blob is not None and len(user_blob) == 4 * width
        mean = _mean(mean_raw)
        if known_user:
            prediction = predict_rating(rating_part(decode_vector(user_blob), k), item, mean)
        else:
            prediction = mean + item[0]
        return {
            "user_id": user_id,
            "item_id": item_id,
            "prediction": round(float(prediction), 6),
            "known_user": known_user,
        }


@dataclass
class _Recall:
    latest: float | None
    candidates: dict[str, Candidate] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    cf_raw: dict[str, float] = field(default_factory=dict)
    cold: list[str] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    seeds: list[str] = field(default_factory=list)
    cold_impressions: dict[str, float] = field(default_factory=dict)
    cold_clicks: dict[str, float] = field(default_factory=dict)
    impressions_total: float = 0.0
    activity: int = 0
    y_user: np.ndarray | None = None

    def add(self, item: str, channel: str, because: str | None = None) -> None:
        cand = self.candidates.get(item)
        if cand is None:
            self.candidates[item] = Candidate(item, [channel], because=because)
            self.order.append(item)
        elif channel not in cand.channels:
            cand.channels.append(channel)
            if because is not None and cand.because is None:
                cand.because = because


class _Clock:
    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage] = round(1000.0 * (now - self.last), 3)
        self.last = now


def _top(scores: np.ndarray, n: int) -> np.ndarray:
    if len(scores) <= n:
        return np.argsort(-scores, kind="stable")
    best = np.argpartition(-scores, n - 1)[:n]
    return best[np.argsort(-scores[best], kind="stable")]


def _mean(raw: list[bytes | None]) -> float:
    total, n = raw
    if not n or int(n) == 0:
        return 0.0
    return float(total) / int(n)
