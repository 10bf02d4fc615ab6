"""The reader's funnel over the fresh Redis state: recall → coarse rank → fine rank → rerank.

- **Recall** merges channels, each candidate keeping the channels that found it: item-CF
  neighbours of the user's recent items (summed cosine of decayed co-occurrence), MF top-K
  over every item (``y_u·y_i`` against the in-memory `ItemIndex`), trending (decayed
  popularity), and a cold pool of new items that have had few impressions. An unknown user
  gets trending and cold.
- **Coarse rank** keeps the best few hundred by a fixed blend of those scores.
- **Fine rank** scores them with the click model learned online from impressions and clicks
  (`models.click_model`), or the fixed blend until it has enough clicks.
- **Rerank** drops what the user has interacted with, unavailable items and whatever the
  business rules drop, applies their boosts, diversifies by MMR and fills the exploration slots
  with cold items chosen by UCB on their impressions and clicks.

One round trip to Redis per request (the user's history and vector) whatever the number of
candidates: the item side is an in-memory snapshot, refreshed in the background, and every stage
works on arrays of index rows; strings and objects are made only for the k items served.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import Histogram
from redis.asyncio import Redis

from models.click_model import (
    FEATURES,
    FIXED_BLEND,
    ClickModel,
    LinearScorer,
    state_from_hash,
)
from models.diversity import mmr
from models.keys import Keys
from models.mf import implicit_part, predict_rating, rating_part, vector_width
from models.server_scripts import USER_STATE, ServerScripts
from models.top_k import top_n
from models.ucb import ucb_scores
from models.vectors import decode_vector
from serving.funnel_config import CHANNELS, FunnelConfig
from serving.item_index import ItemIndex
from serving.multiplexed_redis import MultiplexedRedis

log = logging.getLogger(__name__)

__all__ = ["CHANNELS", "Candidate", "Funnel", "FunnelConfig", "Served", "UnknownItem"]

STAGE_SECONDS = Histogram(
    "freshrec_funnel_stage_seconds",
    "Time spent in each funnel stage",
    ["stage"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05),
)
_STAGES: dict[str, Histogram] = {}


def _stage_histogram(stage: str) -> Histogram:
    """The stage's child, looked up once: ``labels()`` costs more than ``observe()``."""
    child = _STAGES.get(stage)
    if child is None:
        child = _STAGES[stage] = STAGE_SECONDS.labels(stage)
    return child


EXPLANATIONS = {
    "cf": "because you interacted with {because}",
    "mf": "picked for your taste",
    "trending": "trending now",
    "cold": "new",
    "explore": "new",
}
FEATURE_COLUMNS = {name: n for n, name in enumerate(FEATURES)}
BLEND = np.array([FIXED_BLEND.get(name, 0.0) for name in FEATURES])
CF, MF, TRENDING, COLD = 1, 2, 4, 8
CHANNEL_BITS = {"cf": CF, "mf": MF, "trending": TRENDING, "cold": COLD}  # explanation order
CHANNEL_COLUMNS = [FEATURE_COLUMNS[f"channel_{name}"] for name in CHANNEL_BITS]
CHANNEL_MASKS = np.array(list(CHANNEL_BITS.values()), dtype=np.int64)
NEIGHBOURS_KEPT = 50  # per item in memory; a variant's recall_per_seed may ask up to this
POOL_SIZE = 300  # trending and newest items kept per refresh: recall_popular plus the largest k
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

    Per request the funnel reads only the user's state from Redis (history and vector, one
    script call); the item side (factors, statistics, neighbours, trending and cold pools,
    unavailable items, the ranker's weights) is the in-memory snapshot that ``refresh`` keeps
    caught up. Past ``max_staleness_s`` a request starts a refresh in the background and is
    served from the snapshot it has; only the very first request waits for one.

    Parameters
    ----------
    index
        The in-memory item state (a reader refreshes it on a timer too).
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
        self.index = index or ItemIndex(
            redis, keys, config.factors, max(NEIGHBOURS_KEPT, config.recall_per_seed)
        )
        self.rules = list(rules)
        self.max_staleness_s = max_staleness_s
        self.scorer = LinearScorer(None, config.min_clicks)
        self.pools = _Pools()
        self.scripts = ServerScripts(redis)
        self.user_state = MultiplexedRedis.like(redis)  # the per-request read
        self._refreshing: asyncio.Future[None] | None = None

    async def refresh(self) -> None:
        """Catch up with Redis now: item state, trending and cold pools, unavailable, ranker.

        Single-flight: a call while a refresh runs waits for that one instead of starting
        another, so a slow refresh never multiplies under load.
        """
        await asyncio.shield(self._start_refresh())

    def _start_refresh(self) -> asyncio.Future[None]:
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._refresh())
            self._refreshing.add_done_callback(_log_failure)
        return self._refreshing

    async def _refresh(self) -> None:
        await self.index.refresh()
        keys, cfg = self.keys, self.config
        pipe = self.redis.pipeline(transaction=False)
        pipe.smembers(keys.unavailable)
        pipe.hgetall(keys.click_model_state)
        pipe.zrevrange(keys.popularity, 0, max(POOL_SIZE, cfg.recall_popular) - 1)
        pipe.zrevrange(keys.item_first_seen, 0, max(POOL_SIZE, 2 * cfg.recall_cold) - 1)
        pipe.get(keys.impressions_total)
        unavailable, ranker_state, popular, newest, total = await pipe.execute()
        newest_ids = [m.decode() for m in newest]
        shown: list[float | None] = []
        clicked: list[float | None] = []
        if newest_ids:
            pipe = self.redis.pipeline(transaction=False)
            pipe.zmscore(keys.impressions, newest_ids)
            pipe.zmscore(keys.clicks, newest_ids)
            shown, clicked = await pipe.execute()
        index = self.index
        trending = index.row_of([m.decode() for m in popular])
        cold = index.row_of(newest_ids)
        known = cold >= 0
        blocked = np.zeros(len(index), dtype=bool)
        rows = index.row_of([m.decode() for m in unavailable])
        blocked[rows[rows >= 0]] = True
        self.pools = _Pools(
            trending=trending[trending >= 0],
            cold=cold[known],
            cold_impressions=np.array([c or 0.0 for c in shown], dtype=float)[known],
            cold_clicks=np.array([c or 0.0 for c in clicked], dtype=float)[known],
            impressions_total=float(total or 0.0),
            unavailable=blocked,
        )
        ranker = ClickModel.from_state(state_from_hash(ranker_state))
        self.scorer = LinearScorer(ranker.serving_weights(), cfg.min_clicks)

    async def aclose(self) -> None:
        """Closes the per-request connection; the Redis client given stays the caller's."""
        await self.user_state.aclose()

    async def recommend(
        self, user_id: str, k: int, config: FunnelConfig | None = None
    ) -> list[Candidate]:
        return (await self.serve(user_id, k, config)).items

    async def serve(self, user_id: str, k: int, config: FunnelConfig | None = None) -> Served:
        cfg = config or self.config
        if self.index.staleness_s > self.max_staleness_s:
            if self.index.last_refresh:  # serve the snapshot; catch up in the background
                self._start_refresh()
            else:
                await self.refresh()
        clock = _Clock()
        user = await self._user(user_id, cfg)
        clock.lap("user")
        recall = await self._recall(user, k, cfg)
        clock.lap("recall")
        if not len(recall.rows):
            return Served([], user.latest, np.zeros((0, len(FEATURES))), clock.laps)
        features = self._features(user, recall)
        clock.lap("features")
        blend = _blend(cfg.blend)
        keep = top_n(np.dot(features, blend), cfg.coarse_keep)
        clock.lap("coarse")
        if self.scorer.learned or not cfg.blend:
            fine = self.scorer.scores(features[keep])
        else:  # the configuration's own fixed blend
            fine = np.dot(features[keep], blend)
        clock.lap("fine")
        ranked, rows = await self._rerank(user_id, recall, keep, features[keep], fine, k, cfg)
        clock.lap("rerank")
        for stage, ms in clock.laps.items():
            _stage_histogram(stage).observe(ms / 1000.0)
        return Served(ranked, user.latest, rows, clock.laps)

    # --- recall --------------------------------------------------------------------------------
    async def _user(self, user_id: str, cfg: FunnelConfig) -> _User:
        keys = self.keys
        joined, latest, blob = await self.user_state.run_script(
            USER_STATE, [keys.history(user_id), keys.user_vector(user_id)], [cfg.history_cap]
        )
        history = joined.decode().split("\n") if joined else []
        rows = self.index.row_of(history)
        y_user = None
        if blob is not None and len(blob) == 4 * vector_width(cfg.factors):
            y_user = implicit_part(decode_vector(blob), cfg.factors)
        seeds = rows[: cfg.history_window]
        return _User(
            latest=float(latest) if latest else None,
            seeds=seeds[seeds >= 0],
            seen=rows[rows >= 0],
            activity=len(history),
            y=y_user,
        )

    async def _recall(self, user: _User, k: int, cfg: FunnelConfig) -> _Recall:
        """Every channel's candidates as index rows, merged; each keeps its channels."""
        mf_scores = None
        if user.y is not None:  # first: nothing below waits, so the index stays as scanned
            mf_scores = await self.index.shared_scores(user.y)  # fresh: safe to mask in place
        index, pools = self.index, self.pools
        seen = np.zeros(len(index), dtype=bool)
        seen[user.seen] = True
        parts: list[tuple[np.ndarray, int]] = []
        item_cf = None
        if len(user.seeds):
            item_cf = self._item_cf(user.seeds, seen, cfg.recall_per_seed)
            if "cf" in cfg.channels:
                parts.append((item_cf.recalled, CF))
        if mf_scores is not None:
            mf_scores[user.seen] = -np.inf  # candidates are never seen items, so keep theirs
            if "mf" in cfg.channels:
                best = top_n(mf_scores, cfg.recall_mf)
                parts.append((best[mf_scores[best] > -np.inf], MF))
        if "trending" in cfg.channels or user.y is None:
            popular = pools.trending[: cfg.recall_popular + k]
            parts.append((popular[~seen[popular]], TRENDING))
        cold = np.empty(0, dtype=np.int64)
        if "cold" in cfg.channels:
            fresh = (~seen[pools.cold]) & (pools.cold_impressions < cfg.cold_max_impressions)
            cold = np.flatnonzero(fresh)[: cfg.recall_cold]  # positions in the cold pool
            parts.append((pools.cold[cold], COLD))
        if not parts:
            return _Recall(np.empty(0, dtype=np.int64))
        found = np.concatenate([rows for rows, _ in parts])
        bits = np.concatenate([np.full(len(rows), bit, dtype=np.int64) for rows, bit in parts])
        unique, first, inverse = np.unique(found, return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")  # candidates in the order they were found
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        slot = rank[inverse]
        channels = np.zeros(len(unique), dtype=np.int64)
        np.bitwise_or.at(channels, slot, bits)
        rows = unique[order]
        cf = np.zeros(len(rows))
        because = np.full(len(rows), -1, dtype=np.int64)
        if item_cf is not None and len(item_cf.rows):  # the CF score of every candidate
            at = np.minimum(np.searchsorted(item_cf.rows, rows), len(item_cf.rows) - 1)
            held = item_cf.rows[at] == rows
            cf[held] = item_cf.scores[at[held]]
            via_cf = (channels & CF) > 0
            because[via_cf] = item_cf.because[at[via_cf]]
        return _Recall(
            rows=rows,
            channels=channels,
            cf=cf,
            because=because,
            mf=None if mf_scores is None else mf_scores[rows],
            cold=pools.cold[cold],
            cold_impressions=pools.cold_impressions[cold],
            cold_clicks=pools.cold_clicks[cold],
        )

    def _item_cf(self, seeds: np.ndarray, seen: np.ndarray, per_seed: int) -> _ItemCF:
        r"""Item-based CF over the seeds' neighbour lists, as kept in the index.

        An item's score is its cosine of decayed co-occurrence, :math:`c_{ij} / \sqrt{o_i o_j}`,
        summed over the seeds (most recent first) whose lists hold it. Every kept neighbour
        counts toward the score, whichever channel recalls the item; only the ``per_seed``
        strongest of each seed are recalled through CF.
        """
        index = self.index
        width = index.width
        neighbours = np.take(index.neighbours, seeds, axis=0).ravel()
        weights = np.take(index.neighbour_weights, seeds, axis=0).ravel()
        seed_of = np.repeat(seeds, width)
        strong = _leading(width, per_seed, len(seeds))
        valid = neighbours >= 0
        valid[valid] = ~seen[neighbours[valid]]
        neighbours, weights, seed_of, strong = (
            neighbours[valid],
            weights[valid],
            seed_of[valid],
            strong[valid],
        )
        occurrences = index.stats[:, 0]
        cosine = weights / np.sqrt(
            np.maximum(occurrences[seed_of], 1.0) * np.maximum(occurrences[neighbours], 1.0)
        )
        rows, first, inverse = np.unique(neighbours, return_index=True, return_inverse=True)
        recalled = np.bincount(inverse, weights=strong, minlength=len(rows)) > 0
        order = np.argsort(first, kind="stable")  # as found: the most recent seed's first
        return _ItemCF(
            rows=rows,
            scores=np.bincount(inverse, weights=cosine, minlength=len(rows)),
            because=seed_of[first],
            recalled=rows[order[recalled[order]]],
        )

    def _features(self, user: _User, recall: _Recall) -> np.ndarray:
        """One row per candidate, columns as `models.click_model.FEATURES`."""
        rows = recall.rows
        stats = np.take(self.index.stats, rows, axis=0)
        pop, first = stats[:, 1], stats[:, 2]
        x = np.zeros((len(rows), len(FEATURES)))
        col = FEATURE_COLUMNS
        # Forward-decayed sums share one scale; a ratio to the largest makes them comparable.
        x[:, col["log_popularity"]] = np.log1p(1000.0 * pop / max(pop.max(), 1e-300))
        x[:, col["cf"]] = recall.cf
        x[:, CHANNEL_COLUMNS] = (recall.channels[:, None] & CHANNEL_MASKS) > 0
        newest = user.latest or float(first.max(initial=0.0))
        age = np.maximum(newest - np.where(first > 0, first, newest), 0.0)
        x[:, col["log_age_h"]] = np.log1p(age / 3600.0)
        x[:, col["log_user_activity"]] = math.log1p(user.activity)
        if recall.mf is not None:
            x[:, col["mf"]] = recall.mf
        return x

    # --- rerank --------------------------------------------------------------------------------
    async def _rerank(
        self,
        user_id: str,
        recall: _Recall,
        keep: np.ndarray,
        features: np.ndarray,
        fine: np.ndarray,
        k: int,
        cfg: FunnelConfig,
    ) -> tuple[list[Candidate], np.ndarray]:
        index = self.index
        rows = recall.rows[keep]
        unavailable = self.pools.unavailable
        blocked = rows < len(unavailable)
        blocked[blocked] = unavailable[rows[blocked]]
        multiplier = np.where(blocked, 0.0, 1.0)
        if self.rules:
            items = [index.ids[r] for r in rows.tolist()]
            for rule in self.rules:
                multiplier *= await rule(user_id, items)
        allowed = multiplier > 0
        # Relevance in (0, 1], then boosts: a boost raises an item whatever the sign of scores.
        ranks = np.empty(len(rows))
        ranks[np.argsort(-fine, kind="stable")] = np.arange(len(rows))
        relevance = (1.0 - ranks / max(len(rows), 1)) * np.where(allowed, multiplier, 0.0)
        # Exploration first: the cold items with the best UCB take the reserved slots.
        explore = np.empty(0, dtype=np.int64)
        pool = np.flatnonzero(allowed & ((recall.channels[keep] & COLD) > 0))
        if len(pool) and cfg.exploration_slots > 0:
            at = {r: n for n, r in enumerate(recall.cold.tolist())}
            where = np.array([at[r] for r in rows[pool].tolist()], dtype=np.int64)
            ucb = ucb_scores(
                recall.cold_clicks[where],
                recall.cold_impressions[where],
                self.pools.impressions_total,
                cfg.ucb_beta,
            )
            explore = pool[np.argsort(-ucb, kind="stable")[: min(cfg.exploration_slots, k)]]
        eligible = allowed.copy()
        eligible[explore] = False
        eligible_at = np.flatnonzero(eligible)
        vectors = np.take(index.matrix, rows[eligible_at], axis=0)
        chosen = mmr(relevance[eligible_at], vectors, k - len(explore), cfg.diversity)
        picked = eligible_at[chosen].tolist() + explore.tolist()
        explored = set(explore.tolist())
        ids = index.ids
        ranked = []
        for n, row, bits, seed, score in zip(
            picked,
            rows[picked].tolist(),
            recall.channels[keep[picked]].tolist(),
            recall.because[keep[picked]].tolist(),
            fine[picked].tolist(),
            strict=True,
        ):
            names = [name for name, bit in CHANNEL_BITS.items() if bits & bit]
            if n in explored:
                names.insert(0, "explore")
            ranked.append(Candidate(ids[row], names, ids[seed] if seed >= 0 else None, score))
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
class _User:
    latest: float | None  # time of the user's latest interaction
    seeds: np.ndarray  # index rows of the most recent items, newest first
    seen: np.ndarray  # index rows of every item in the history
    activity: int
    y: np.ndarray | None  # preference factors; None for an unknown user


@dataclass
class _ItemCF:
    rows: np.ndarray  # every unseen item in the seeds' kept lists, ascending
    scores: np.ndarray  # their summed cosine
    because: np.ndarray  # the most recent seed holding each
    recalled: np.ndarray  # the rows recalled through CF, in the order found


@dataclass
class _Recall:
    """Candidates as index rows, in the order found, with what each channel knows of them."""

    rows: np.ndarray
    channels: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    cf: np.ndarray = field(default_factory=lambda: np.empty(0))
    because: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    mf: np.ndarray | None = None
    cold: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    cold_impressions: np.ndarray = field(default_factory=lambda: np.empty(0))
    cold_clicks: np.ndarray = field(default_factory=lambda: np.empty(0))


@dataclass
class _Pools:
    """The per-refresh, user-independent part of recall and rerank."""

    trending: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    cold: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    cold_impressions: np.ndarray = field(default_factory=lambda: np.empty(0))
    cold_clicks: np.ndarray = field(default_factory=lambda: np.empty(0))
    impressions_total: float = 0.0
    unavailable: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=bool))


class _Clock:
    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage] = round(1000.0 * (now - self.last), 3)
        self.last = now


@functools.lru_cache(maxsize=64)
def _leading(width: int, first: int, lists: int) -> np.ndarray:
    """For ``lists`` rows of ``width`` flattened: True at each row's ``first`` positions."""
    mask = np.tile(np.arange(width) < first, lists)
    mask.flags.writeable = False
    return mask


@functools.lru_cache(maxsize=64)
def _blend(weights: tuple[tuple[str, float], ...]) -> np.ndarray:
    if not weights:
        return BLEND
    named = dict(weights)
    return np.array([named.get(name, 0.0) for name in FEATURES])


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("snapshot refresh failed: %s", task.exception())


def _mean(raw: list[bytes | None]) -> float:
    total, n = raw
    if not n or int(n) == 0:
        return 0.0
    return float(total) / int(n)
