"""The reader's funnel over the fresh Redis state: recall, rank, filter.

Recall gathers candidates from two channels — the co-occurrence neighbours of the user's most
recent items (item-CF, cosine-normalised by decayed item counts) and the decayed-popularity
head — then ranks them by the implicit-preference MF score and drops everything the user has
interacted with.
Three pipelined round trips per request, whatever the number of candidates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from redis.asyncio import Redis

from models.keys import Keys
from models.mf import implicit_part, predict_rating, rating_part, vector_width
from models.vectors import decode_matrix, decode_vector


@dataclass(frozen=True)
class FunnelConfig:
    history_window: int = 10
    history_cap: int = 500
    recall_per_seed: int = 50
    recall_popular: int = 100
    factors: int = 32


@dataclass
class Candidate:
    item_id: str
    channels: list[str] = field(default_factory=list)
    cf_score: float = 0.0
    because: str | None = None
    score: float = 0.0

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "item_id": self.item_id,
            "score": round(self.score, 6),
            "channels": self.channels,
        }
        if self.because is not None:
            out["because"] = self.because
        return out


class UnknownItem(LookupError):
    """The item has never been seen by the worker."""


class Funnel:
    """Serves recommendations, similar items and rating predictions from Redis."""

    def __init__(self, redis: Redis, keys: Keys, config: FunnelConfig) -> None:
        self.redis = redis
        self.keys = keys
        self.config = config

    async def recommend(self, user_id: str, k: int) -> list[Candidate]:
        ranked, _ = await self.recommend_with_state(user_id, k)
        return ranked

    async def recommend_with_state(
        self, user_id: str, k: int
    ) -> tuple[list[Candidate], float | None]:
        """The ranked list, and the time of the newest event it reflects (None: none yet)."""
        cfg, keys = self.config, self.keys
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrevrange(keys.history(user_id), 0, cfg.history_cap - 1, withscores=True)
        pipe.get(keys.user_vector(user_id))
        pipe.zrevrange(keys.popularity, 0, cfg.recall_popular + k - 1)
        history_raw, user_blob, popular_raw = await pipe.execute()
        latest = history_raw[0][1] if history_raw else None
        seen = {m.decode() for m, _ in history_raw}
        seeds = [m.decode() for m, _ in history_raw[: cfg.history_window]]

        # --- recall: item-CF neighbours of recent items, then the popular head --------------
        candidates: dict[str, Candidate] = {}
        if seeds:
            pipe = self.redis.pipeline(transaction=False)
            for seed in seeds:
                pipe.zrevrange(keys.neighbours(seed), 0, cfg.recall_per_seed - 1, withscores=True)
            pipe.zmscore(keys.occurrences, seeds)
            *rows, seed_counts = await pipe.execute()
            raw: dict[str, float] = {}
            for seed, seed_count, row in zip(seeds, seed_counts, rows, strict=True):
                for member, weight in row:
                    item = member.decode()
                    if item in seen:
                        continue
                    cand = candidates.get(item)
                    if cand is None:
                        cand = candidates[item] = Candidate(item, ["cf"], because=seed)
                    raw[item] = raw.get(item, 0.0) + weight / math.sqrt(seed_count or 1.0)
            if candidates:
                counts = await self.redis.zmscore(keys.occurrences, list(candidates))
                for (item, cand), count in zip(candidates.items(), counts, strict=True):
                    cand.cf_score = raw[item] / math.sqrt(count or 1.0)
        for member in popular_raw:
            item = member.decode()
            if item in seen:
                continue
            cand = candidates.get(item)
            if cand is None:
                candidates[item] = Candidate(item, ["popular"])
            elif "popular" not in cand.channels:
                cand.channels.append("popular")
        if not candidates:
            return [], latest

        # --- rank by the implicit-preference MF score; CF score breaks ties ----------------------
        items = list(candidates)
        k_f = cfg.factors
        width = vector_width(k_f)
        pipe = self.redis.pipeline(transaction=False)  # GETs, not MGET: keys span cluster slots
        for item in items:
            pipe.get(keys.item_vector(item))
        blobs = await pipe.execute()
        matrix, present = decode_matrix(blobs, width)
        cf = np.array([candidates[i].cf_score for i in items])
        if user_blob is not None and len(user_blob) == 4 * width:
            y_user = implicit_part(decode_vector(user_blob), k_f).astype(np.float32)
            scores = (matrix[:, k_f + 1 :] @ y_user).astype(np.float64)
            scores = np.where(present, scores, -np.inf)
        else:
            scores = cf.copy()  # unknown user: co-occurrence, then the popular order
        order = np.lexsort((-cf, -scores))[:k]
        ranked = []
        for idx in order:
            cand = candidates[items[idx]]
            cand.score = float(scores[idx]) if np.isfinite(scores[idx]) else 0.0
            ranked.append(cand)
        return ranked, latest

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
        if known_user:
            prediction = predict_rating(
                rating_part(decode_vector(user_blob), k), item, _mean(mean_raw)
            )
        else:
            prediction = _mean(mean_raw) + item[0]
        return {
            "user_id": user_id,
            "item_id": item_id,
            "prediction": round(float(prediction), 6),
            "known_user": known_user,
        }


def _mean(raw: list[bytes | None]) -> float:
    total, n = raw
    if not n or int(n) == 0:
        return 0.0
    return float(total) / int(n)
