"""The reader's funnel over the fresh Redis state: recall → coarse rank → fine rank → rerank.

- **Recall** merges channels, each candidate keeping the channels that found it: item-CF
  neighbours of the user's recent items (cosine of decayed, gap-weighted co-occurrence, summed
  with the seeds' recency weights), MF top-K
  over every item (``y_u·y_i`` against the in-memory `ItemIndex`), trending (decayed
  popularity), and a cold pool of new items that have had few impressions. An unknown user
  gets trending and cold.
- **Coarse rank** keeps the best few hundred by a fixed blend of those scores.
- **Fine rank** scores them with the click model learned online from impressions and clicks
  (`freshrec.models.click_model`) once it has enough clicks; until then with the ranker learned
  from users' choices among the candidates the funnel held for them
  (`freshrec.models.choice_ranker`), which starts at the fixed blend.
- **Rerank** drops what the user has interacted with, unavailable items and whatever the
  business rules drop, applies their boosts, diversifies by MMR and fills the exploration slots
  with cold items chosen by UCB on their impressions and clicks.

One round trip to Redis per request (the user's history and vector) whatever the number of
candidates, and a second on the same connection when some of the user's recent items have
neighbour lists changed since read: the item side is an in-memory snapshot, refreshed in the
background, and every stage works on arrays of index rows; strings and objects are made only
for the k items served.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import Counter, Gauge, Histogram
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ResponseError

from freshrec.models.choice_ranker import ChoiceRanker
from freshrec.models.click_model import (
    FEATURES,
    FIXED_BLEND,
    ClickModel,
    LinearScorer,
    state_from_hash,
)
from freshrec.models.mf import implicit_part, vector_width
from freshrec.models.rating_stack import (
    PAIR_FIELDS,
    Blend,
    RatingRecord,
    decode_records,
    decode_state,
    row_features,
    solve_weights,
)
from freshrec.models.top_k import top_n
from freshrec.models.ucb import pool_ctr
from freshrec.serving.features import candidate_features
from freshrec.serving.funnel_config import CHANNELS, FunnelConfig
from freshrec.serving.item_index import ItemIndex
from freshrec.serving.multiplexed_redis import ClusterCalls, MultiplexedRedis
from freshrec.serving.recall import CF, COLD, MF, TRENDING, Recalled, Scratch, merge_channels
from freshrec.serving.rerank import rerank
from freshrec.store.cluster import rating_states
from freshrec.store.keys import Keys
from freshrec.store.script_pipeline import script_pipeline
from freshrec.store.server_scripts import USER_STATE, ServerScripts
from freshrec.store.vectors import decode_vector

log = logging.getLogger(__name__)

__all__ = ["CHANNELS", "Candidate", "Funnel", "FunnelConfig", "Served", "UnknownItem"]

STAGE_SECONDS = Histogram(
    "freshrec_funnel_stage_seconds",
    "Time spent in each funnel stage",
    ["stage"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05),
)
_STAGES: dict[str, Histogram] = {}
CHOICES = Counter(
    "freshrec_choices_total",
    "Items users interacted with after a list was served to them, by whether the funnel's "
    "ranked candidates held the item (recall's hit rate on real choices)",
    ["recalled"],
)
_CHOSEN_RECALLED = CHOICES.labels("yes")  # looked up once: ``labels()`` costs more than ``inc()``
_CHOSEN_MISSED = CHOICES.labels("no")
CF_RECENCY = Gauge(
    "freshrec_cf_recency_events",
    "Item-CF's recency scale tau learned from users' choices: a seed a events back in the "
    "user's history weighs exp(-a / tau)",
)
MF_SHARE_READ = Histogram(
    "freshrec_mf_recall_share_read",
    "Share of the catalogue MF recall read to find its exact top-n (1: no cell was skipped)",
    buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0),
)


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
BLEND = np.array([FIXED_BLEND.get(name, 0.0) for name in FEATURES])
CHANNEL_BITS = {"cf": CF, "mf": MF, "trending": TRENDING, "cold": COLD}  # explanation order
_NO_ROWS = np.empty(0, dtype=np.int64)
_EXPONENT_BOUND = 700.0  # e^709 is the largest double
NEIGHBOURS_KEPT = 50  # per item in memory; a variant's recall_per_seed may ask up to this
POOL_SIZE = 300  # trending and newest items kept per refresh: recall_popular plus the largest k
CHOICES_PER_LIST = 10  # most new items learned as choices among one served list's candidates
CHOICE_MERGE_S = 1.0  # how often the choice ranker adds what it learned to the shared state
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
    mf_items_read: int = 0  # items MF recall scored to find its exact top-n


class UnknownItem(LookupError):
    """The item has never been seen by the worker."""


class Funnel:
    """Serves recommendations, similar items and rating predictions from Redis.

    Per request the funnel reads only the user's state from Redis (history and vector, one
    script call); the item side (factors, statistics, neighbours, trending and cold pools,
    unavailable items, the ranker's weights) is the in-memory snapshot that ``refresh`` keeps
    caught up, and the neighbour lists a request needs are read on its path when they changed
    since they were read. Once an index is loaded (at the first refresh, and after each
    rebuild) every list in it is read in the background (`ItemIndex.warm_lists`), so that
    only changed lists cost a request a round trip. Past ``max_staleness_s`` a request starts
    a refresh in the background and is served from the snapshot it has; only the very first
    request waits for one. A request whose user has an event newer than the snapshot's event
    clock waits for a refresh (single-flight, shared with any running): a user's own latest
    event is in their list.

    Parameters
    ----------
    index
        The in-memory item state (a reader refreshes it on a timer too).
    rules
        Business rules applied in rerank, in order.
    remembered_users
        Users whose last ranked candidates (and their features) are kept, to learn the choice
        ranker from what each does next; least recently served forgotten first.
    deterministic
        For a replay that refreshes at fixed points of its stream (``freshrec eval``'s direct
        mode): no request starts a refresh on the wall clock (only the first waits for one),
        every refresh adds what the choice ranker learned to the shared state (a reader does so
        every `CHOICE_MERGE_S`), MF recall's cells refit in the foreground, and no list is
        read in the background. Then the same stream gives the same lists however fast the
        machine runs.
    read_timeout_s
        How long a request waits for its user's state before it fails: a reader's deadline.
    """

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        config: FunnelConfig,
        index: ItemIndex | None = None,
        rules: Sequence[BusinessRule] = (),
        max_staleness_s: float = 1.0,
        remembered_users: int = 10_000,
        deterministic: bool = False,
        read_timeout_s: float = 2.0,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.config = config
        self.index = index or ItemIndex(
            redis,
            keys,
            config.factors,
            max(NEIGHBOURS_KEPT, config.recall_per_seed),
            refit_in_background=not deterministic,
        )
        self.rules = list(rules)
        self.max_staleness_s = max_staleness_s
        self.ranker_weights: dict[str, float] | None = None  # as the workers learned them
        self._scorers: dict[int, LinearScorer] = {}
        self._ranker_state: dict[bytes, bytes] | None = None
        self.pools = _Pools()
        self.event_clock: float | None = None  # the newest event time the state has applied
        self.scratch = Scratch()
        self.scripts = ServerScripts(redis)
        self.user_state: MultiplexedRedis | ClusterCalls = (  # the per-request read
            ClusterCalls(redis, read_timeout_s)
            if self.scripts.cluster
            else MultiplexedRedis.like(redis, read_timeout_s)
        )
        self._refreshing: asyncio.Future[None] | None = None
        self.choice_ranker = ChoiceRanker(cf_recency=config.cf_recency)
        self._offered: OrderedDict[str, _Offered] = OrderedDict()
        self.remembered_users = remembered_users
        self.deterministic = deterministic
        self._choices_merged_at = -math.inf
        self._warmed: ItemIndex | None = None  # the index whose lists were read in the background
        self._warming: asyncio.Future[int] | None = None

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
        keys, cfg = self.keys, self.config
        pipe = script_pipeline(self.redis)
        pipe.smembers(keys.unavailable)
        pipe.hgetall(keys.click_model_state)
        pipe.zrevrange(keys.popularity, 0, max(POOL_SIZE, cfg.recall_popular) - 1)
        await self.scripts.newest_items(
            keys=[keys.item_first_seen, keys.impressions, keys.clicks],
            args=[max(POOL_SIZE, 2 * cfg.recall_cold)],
            client=pipe,
        )
        pipe.get(keys.impressions_total)
        pipe.get(keys.event_clock)
        merging = self.deterministic or time.monotonic() - self._choices_merged_at >= CHOICE_MERGE_S
        taken: dict[str, float] | None = None
        if merging:
            self._choices_merged_at = time.monotonic()
            taken = self.choice_ranker.take_pending()
            await self.scripts.merge_terms(
                keys=[keys.choice_ranker_state],
                args=[part for term in taken.items() for part in term],
                client=pipe,
            )
        _, replies = await asyncio.gather(self.index.refresh(), self._execute_merging(pipe, taken))
        unavailable, ranker_state, popular, (newest, shown, clicked), total, clock = replies[:6]
        if merging:
            self.choice_ranker.load_merged(state_from_hash(replies[-1]))
            CF_RECENCY.set(self.choice_ranker.cf_recency)
        self.event_clock = float(clock) if clock is not None else None
        index = self.index
        if index.needs_rebuild:  # requests go on with the old index and pools meanwhile
            index = await index.rebuilt()
        trending = index.row_of([m.decode() for m in popular])
        cold = index.row_of(newest.decode().split("\n") if newest else [])
        known = cold >= 0
        shown_counts, click_counts = np.frombuffer(shown, "<f8"), np.frombuffer(clicked, "<f8")
        blocked = index.dead[: len(index)].copy()  # retired items are never served
        rows = index.row_of([m.decode() for m in unavailable])
        blocked[rows[rows >= 0]] = True
        if index is not self.index:  # swapped with its pools in one step; rows changed
            self.index = index
            self._offered.clear()
        self.pools = _Pools(
            trending=trending[trending >= 0],
            cold=cold[known],
            cold_impressions=shown_counts[known],
            cold_clicks=click_counts[known],
            impressions_total=float(total or 0.0),
            cold_ctr=pool_ctr(click_counts, shown_counts),
            unavailable=blocked,
            count_floor=count_floor(index.decay_rate, index.landmark, self.event_clock),
        )
        if ranker_state != self._ranker_state:  # rebuilt only when the workers' model moved
            ranker = ClickModel.from_state(state_from_hash(ranker_state))
            self.ranker_weights, self._scorers = ranker.serving_weights(), {}
            self._ranker_state = ranker_state
        if not self.deterministic and self._warmed is not self.index:
            self._warm(self.index)

    def _warm(self, index: ItemIndex) -> None:
        """Reads ``index``'s neighbour lists in the background while it is the one served; a
        failure is logged, and the next refresh starts again."""
        self._warmed = index
        self._warming = asyncio.ensure_future(index.warm_lists(lambda: self.index is index))

        def done(task: asyncio.Future[int]) -> None:
            if task.cancelled() or task.exception() is not None:
                self._warmed = None
                _log_failure(task, "neighbour lists not read ahead")

        self._warming.add_done_callback(done)

    async def _execute_merging(self, pipe: Pipeline, taken: dict[str, float] | None) -> list[Any]:
        """The pipeline's replies; with ``taken`` (the choice ranker's terms, which the merge
        script last in the pipeline adds to the shared sums) the last is the merged hash.
        Terms that did not reach Redis go back to the ranker for the next merge, so a failed
        refresh loses nothing learned; terms whose increment was applied are not given back,
        which would count them twice. When the whole call fails, all go back."""
        try:
            replies = await pipe.execute(raise_on_error=False)
        except BaseException:
            if taken:
                self.choice_ranker.restore_pending(taken)
            raise
        if taken is not None:
            replies[-1] = self._merged(replies[-1], taken)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    def _merged(self, reply: Any, taken: dict[str, float]) -> Any:
        """The merge script's reply as the hash it read (`MERGE_TERMS`), or the error to raise
        once the terms it did not apply are given back to the ranker."""
        if isinstance(reply, Exception):
            self.choice_ranker.restore_pending(taken)
            return reply
        fields, failed, messages = reply
        if failed:
            names = list(taken)
            self.choice_ranker.restore_pending({names[n - 1]: taken[names[n - 1]] for n in failed})
            first = messages[0].decode(errors="replace")
            return ResponseError(f"{len(failed)} choice ranker terms not merged: {first}")
        return dict(zip(fields[::2], fields[1::2], strict=True))

    def scorer(self, config: FunnelConfig | None = None) -> LinearScorer:
        """The fine ranker a configuration serves: learned once it has its ``min_clicks``."""
        min_clicks = (config or self.config).min_clicks
        scorer = self._scorers.get(min_clicks)
        if scorer is None:
            scorer = self._scorers[min_clicks] = LinearScorer(self.ranker_weights, min_clicks)
        return scorer

    async def aclose(self) -> None:
        """Stops reading lists ahead and closes the per-request connection; the Redis client
        given stays the caller's."""
        if self._warming is not None:
            self._warming.cancel()
            await asyncio.gather(self._warming, return_exceptions=True)
        await self.user_state.aclose()

    async def recommend(
        self, user_id: str, k: int, config: FunnelConfig | None = None, learn: bool = False
    ) -> list[Candidate]:
        return (await self.serve(user_id, k, config, learn)).items

    async def serve(
        self, user_id: str, k: int, config: FunnelConfig | None = None, learn: bool = False
    ) -> Served:
        """The user's list of ``k``. With ``learn``, the items the user has interacted with
        since their last list that learned too teach the choice ranker, and this list's
        candidates are kept for their next choices (for requests; not for lists a process
        makes on its own, which would teach it twice).

        A request works on the index and pools current when it reads the user (`_user`) to
        the end, even if a refresh swaps in a rebuilt index meanwhile: rows mean the items of
        one index only."""
        cfg = config or self.config
        if not self.index.last_refresh:
            await self.refresh()
        elif self.index.staleness_s > self.max_staleness_s and not self.deterministic:
            self._start_refresh()  # serve the snapshot; catch up in the background
        clock = _Clock()
        user = await self._user(user_id, cfg)
        if learn:
            self._learn_choices(user_id, user)
        if "cf" in cfg.channels:
            await user.index.load_neighbours(user.seeds, self.user_state)
        clock.lap("user")
        recall = self._recall(user, k, cfg)
        clock.lap("recall")
        if not len(recall.rows):
            return Served(
                [], user.latest, np.zeros((0, len(FEATURES))), clock.laps, recall.mf_items_read
            )
        features = candidate_features(
            recall.recalled, user.index.stats, user.index.matrix, user.y, user.latest, user.activity
        )
        clock.lap("features")
        blend = _blend(cfg.blend)
        keep = top_n(np.dot(features, blend), cfg.coarse_keep)
        clock.lap("coarse")
        scorer = self.scorer(cfg)
        if scorer.learned:
            fine = scorer.scores(features[keep])
        elif cfg.blend:  # the configuration's own fixed blend
            fine = np.dot(features[keep], blend)
        elif cfg.choice_ranker:
            fine = self.choice_ranker.scores(features[keep])
        else:
            fine = scorer.scores(features[keep])
        if learn:
            slopes = recall.recalled.cf_slope[keep]
            self._remember(user_id, user, recall.rows[keep], features[keep], slopes)
        clock.lap("fine")
        ranked, rows = await self._rerank(user_id, user, recall, keep, features[keep], fine, k, cfg)
        clock.lap("rerank")
        for stage, ms in clock.laps.items():
            _stage_histogram(stage).observe(ms / 1000.0)
        return Served(ranked, user.latest, rows, clock.laps, recall.mf_items_read)

    # --- the choice ranker's examples -------------------------------------------------------------
    def _remember(
        self,
        user_id: str,
        user: _User,
        rows: np.ndarray,
        features: np.ndarray,
        cf_slopes: np.ndarray,
    ) -> None:
        offered = self._offered
        history = user.history
        newest = int(history[0]) if len(history) else None
        offered[user_id] = _Offered(newest, rows, features, cf_slopes, user.index.epoch)
        offered.move_to_end(user_id)
        while len(offered) > self.remembered_users:
            offered.popitem(last=False)

    def _learn_choices(self, user_id: str, user: _User) -> None:
        """Each item newer in the user's history (index rows, newest first) than their last
        list is a choice among that list's candidates, oldest first; a chosen item leaves the
        set. A list whose rows belong to an index since rebuilt teaches nothing."""
        offered = self._offered.pop(user_id, None)
        if offered is None or offered.epoch != user.index.epoch:
            return
        new = choices_since(user.history, offered.newest)
        available = np.ones(len(offered.rows), dtype=bool)
        for row in new[:CHOICES_PER_LIST][::-1].tolist():
            where = np.flatnonzero((offered.rows == row) & available)
            (_CHOSEN_RECALLED if len(where) else _CHOSEN_MISSED).inc()
            if len(where):
                kept = np.flatnonzero(available)
                self.choice_ranker.learn(
                    offered.features[kept],
                    int(np.searchsorted(kept, where[0])),
                    offered.cf_slopes[kept],
                )
                available[where[0]] = False

    # --- recall --------------------------------------------------------------------------------
    async def _user(self, user_id: str, cfg: FunnelConfig) -> _User:
        keys = self.keys
        joined, latest, blob = await self.user_state.run_script(
            USER_STATE, [keys.history(user_id), keys.user_vector(user_id)], [cfg.history_cap]
        )
        latest_ts = float(latest) if latest else None
        if latest_ts is not None and self.event_clock is not None and latest_ts > self.event_clock:
            await self.refresh()  # the user's newest event is past the snapshot: catch up first
        index, pools = self.index, self.pools  # the request's from here on (see `serve`)
        history = joined.decode().split("\n") if joined else []
        rows = index.row_of(history)
        y_user = None
        if blob is not None and len(blob) == 4 * vector_width(cfg.factors):
            y_user = implicit_part(decode_vector(blob), cfg.factors)
        seeds = rows[: cfg.history_window]
        known = seeds >= 0
        # The recency scale learned from users' choices, where the configuration serves what
        # they teach; else its own.
        tau = self.choice_ranker.cf_recency if cfg.choice_ranker else cfg.cf_recency
        weights, slopes = _recency_weights(len(seeds), tau)
        return _User(
            latest=latest_ts,
            history=rows,
            seeds=seeds[known],
            seed_weights=weights[known],
            seed_slopes=slopes[known],
            seen=rows[rows >= 0],
            activity=len(history),
            y=y_user,
            index=index,
            pools=pools,
        )

    def _recall(self, user: _User, k: int, cfg: FunnelConfig) -> _Recall:
        """Every channel's candidates as index rows, merged; each keeps its channels."""
        index, pools = user.index, user.pools
        channels = _channel_bits(cfg.channels)
        if user.y is None:
            channels |= TRENDING
        with self.scratch.seen(len(index.matrix), user.seen) as seen:
            mf, read = _NO_ROWS, 0
            if user.y is not None and channels & MF:
                mf, _ = index.top_rows(user.y, cfg.recall_mf, seen, cfg.mf_read_share)
                read = index.cells.last_scanned
                MF_SHARE_READ.observe(read / max(len(index), 1))
            scratch = self.scratch
            recalled = Recalled(
                *merge_channels(
                    seen,
                    scratch.cf_slot,
                    scratch.candidate_slot,
                    user.seeds,
                    user.seed_weights,
                    user.seed_slopes,
                    index.neighbours,
                    index.neighbour_weights,
                    index.stats[:, 0],
                    pools.count_floor,
                    cfg.recall_per_seed,
                    mf,
                    pools.trending[: cfg.recall_popular + k],
                    pools.cold,
                    pools.cold_impressions < cfg.cold_max_impressions,
                    cfg.recall_cold,
                    channels,
                )
            )
        return _Recall(
            recalled=recalled,
            mf_items_read=read,
            cold_impressions=pools.cold_impressions[recalled.cold],
            cold_clicks=pools.cold_clicks[recalled.cold],
        )

    # --- rerank --------------------------------------------------------------------------------
    async def _rerank(
        self,
        user_id: str,
        user: _User,
        recall: _Recall,
        keep: np.ndarray,
        features: np.ndarray,
        fine: np.ndarray,
        k: int,
        cfg: FunnelConfig,
    ) -> tuple[list[Candidate], np.ndarray]:
        index, pools = user.index, user.pools
        rows = recall.rows[keep]
        multiplier = np.ones(len(rows))
        if self.rules:
            items = [index.ids[r] for r in rows.tolist()]
            for rule in self.rules:
                multiplier *= await rule(user_id, items)
        picked, explored = rerank(
            rows,
            fine,
            multiplier,
            pools.unavailable,
            recall.recalled.cold_slot[keep],
            recall.cold_clicks,
            recall.cold_impressions,
            pools.impressions_total,
            pools.cold_ctr,
            cfg.ucb_beta,
            cfg.exploration_slots,
            index.matrix,
            cfg.diversity,
            k,
        )
        ids = index.ids
        ranked = []
        first_explored = len(picked) - explored
        for n, row, bits, seed, score in zip(
            range(len(picked)),
            rows[picked].tolist(),
            recall.channels[keep[picked]].tolist(),
            recall.because[keep[picked]].tolist(),
            fine[picked].tolist(),
            strict=True,
        ):
            names = list(_channel_names(bits, n >= first_explored))
            ranked.append(Candidate(ids[row], names, ids[seed] if seed >= 0 else None, score))
        return ranked, features[picked]

    # --- other routes ----------------------------------------------------------------------------
    async def similar(self, item_id: str, k: int) -> list[dict[str, object]]:
        """Items most similar to ``item_id`` by cosine of decayed co-occurrence."""
        keys = self.keys
        pipe = self.redis.pipeline(transaction=False)
        pipe.zscore(keys.occurrences, item_id)
        pipe.zrevrange(keys.neighbours(item_id), 0, max(4 * k, 50) - 1, withscores=True)
        pipe.get(keys.decay_rate)
        pipe.get(keys.decay_landmark)
        pipe.get(keys.event_clock)
        own, row, rate, landmark, clock = await pipe.execute()
        if own is None:
            raise UnknownItem(item_id)
        if not row:
            return []
        members = [m.decode() for m, _ in row]
        counts = await self.redis.zmscore(keys.occurrences, members)
        floor = count_floor(rate, landmark, clock)  # the sums' own moment
        scored = [
            (weight / math.sqrt(max(own, floor) * max(count or 0.0, floor)), member)
            for (_, weight), member, count in zip(row, members, counts, strict=True)
        ]
        scored.sort(reverse=True)
        return [{"item_id": m, "score": round(s, 6)} for s, m in scored[:k]]

    async def predict(self, user_id: str, item_id: str) -> dict[str, object]:
        """The rating prediction of `freshrec.models.rating_stack`: the blend of the MF, the
        item-kNN predictors and the user's session terms, learned from the stream.

        A side no rating has reached yet contributes no bias and no factor term, so an item
        no event has mentioned gets what the blend makes of ``mu``, the user's terms and
        neighbours; before any rating is learned the blend is ``mu + b_u + b_i + p_u . q_i``,
        with ``mu`` the midpoint of the rating scale (no evidence either way). The answer is
        clipped to the scale: a linear blend can overshoot it, and a rating outside it is never
        nearer the truth than the bound; a blend that is not finite (a corrupt stored state)
        answers ``mu``.
        """
        return (await self.predict_many([(user_id, item_id)]))[0]

    async def predict_many(self, pairs: Sequence[tuple[str, str]]) -> list[dict[str, object]]:
        """``predict`` of every (user, item) pair, from one read: the vectors, the blend, and
        per user a script returning their rating records with what the features need of them
        (`freshrec.store.server_scripts.RATING_STATE`)."""
        keys = self.keys
        users = list(dict.fromkeys(u for u, _ in pairs))
        items = list(dict.fromkeys(i for _, i in pairs))
        asked: dict[str, list[str]] = {u: [] for u in users}
        for user_id, item_id in dict.fromkeys(pairs):
            asked[user_id].append(item_id)
        vector_keys = [keys.user_vector(u) for u in users] + [keys.item_vector(i) for i in items]
        pipe = script_pipeline(self.redis)
        pipe.hmget(keys.rating_mean, "sum", "n")
        pipe.get(keys.rating_blend)
        if self.scripts.cluster:  # each vector in its own slot, each user's state in three
            for key in vector_keys:
                pipe.get(key)
            replies, states = await asyncio.gather(
                pipe.execute(), rating_states(self.redis, keys, asked)
            )
            mean_raw, blend, *blobs = replies
        else:
            pipe.mget(vector_keys)
            for user in users:
                state_keys = [keys.rating_history(user), keys.item_ratings]
                state_keys += [keys.rating_pairs(i) for i in asked[user]]
                await self.scripts.rating_state(keys=state_keys, client=pipe)
            mean_raw, blend, blobs, *states = await pipe.execute()
        low, high = self.config.rating_scale
        mean = _mean(mean_raw, (low + high) / 2)
        k = self.config.factors
        size = 4 * vector_width(k)
        rows = [decode_vector(b) if _sized(b, size) else None for b in blobs]
        by_user = dict(zip(users, rows[: len(users)], strict=True))
        by_item = dict(zip(items, rows[len(users) :], strict=True))
        state = decode_state(blend)
        weights = solve_weights(Blend.prior_state() if state is None else state)
        known: dict[tuple[str, str], tuple[list[RatingRecord], np.ndarray, np.ndarray]] = {}
        for user, (raw, counts, stats) in zip(users, states, strict=True):
            records = decode_records(raw)
            partners = np.frombuffer(counts, "<f8")
            for item, packed in zip(asked[user], stats or [b""] * len(asked[user]), strict=True):
                rows_of = np.frombuffer(packed, "<f4").reshape(-1, PAIR_FIELDS)
                known[(user, item)] = (records, rows_of, partners)
        answers = []
        for user_id, item_id in pairs:
            user, item = by_user[user_id], by_item[item_id]
            history, pair_stats, partners = known[(user_id, item_id)]
            x = row_features(mean, user, item, k, history, pair_stats, partners)
            answers.append(
                {
                    "user_id": user_id,
                    "item_id": item_id,
                    "prediction": round(_on_scale(float(weights @ x), mean, low, high), 6),
                    "known_user": user is not None,
                    "known_item": item is not None,
                }
            )
        return answers


def _sized(blob: bytes | None, size: int) -> bool:
    return blob is not None and len(blob) == size


@dataclass
class _User:
    latest: float | None  # time of the user's latest interaction
    history: np.ndarray  # index rows of the history, newest first (-1: not in the snapshot)
    seeds: np.ndarray  # index rows of the most recent items, newest first
    seed_weights: np.ndarray  # their recency weights exp(-age / tau), age in the user's events
    seed_slopes: np.ndarray  # the weights' derivatives in log tau: (age / tau) exp(-age / tau)
    seen: np.ndarray  # index rows of every item in the history
    activity: int
    y: np.ndarray | None  # preference factors; None for an unknown user
    index: ItemIndex  # what the rows above mean
    pools: _Pools  # made for that index


def choices_since(history: np.ndarray, newest: int | None) -> np.ndarray:
    """The rows of ``history`` (index rows, newest first) newer than ``newest``, its newest row
    when the user's last list was made; all of it when that history was empty (``None``).

    Empty when the boundary is unknown: ``newest`` is -1 (an item the snapshot lacked, which
    any other such item's -1 would match) or has left the capped history.
    """
    if newest is None:
        return history
    at = np.flatnonzero(history == newest) if newest >= 0 else _NO_ROWS
    return history[: at[0]] if len(at) else _NO_ROWS


@dataclass
class _Offered:
    """A user's last ranked candidates, as index rows and feature rows."""

    newest: int | None  # the history's newest row then (-1: not in the snapshot; None: empty)
    rows: np.ndarray
    features: np.ndarray
    cf_slopes: np.ndarray  # d cf / d log tau of each row, for learning tau
    epoch: int  # of the index the rows are of


@dataclass
class _Recall:
    """The merged candidates, with what the funnel's later stages need of the channels."""

    recalled: Recalled
    mf_items_read: int
    cold_impressions: np.ndarray  # of the cold candidates, as `Recalled.cold_slot` indexes
    cold_clicks: np.ndarray

    @property
    def rows(self) -> np.ndarray:
        return self.recalled.rows

    @property
    def channels(self) -> np.ndarray:
        return self.recalled.channels

    @property
    def because(self) -> np.ndarray:
        return self.recalled.because


@dataclass
class _Pools:
    """The per-refresh, user-independent part of recall and rerank."""

    trending: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    cold: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    cold_impressions: np.ndarray = field(default_factory=lambda: np.empty(0))
    cold_clicks: np.ndarray = field(default_factory=lambda: np.empty(0))
    impressions_total: float = 0.0
    cold_ctr: float = 0.0  # the whole cold pool's click-through rate (`pool_ctr`)
    unavailable: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=bool))
    count_floor: float = 1.0  # one interaction at the state's clock, as the sums store it


class _Clock:
    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage] = round(1000.0 * (now - self.last), 3)
        self.last = now


@functools.cache
def _channel_names(bits: int, explored: bool) -> tuple[str, ...]:
    """A candidate's channel names in explanation order, "explore" first for an exploration."""
    names = tuple(name for name, bit in CHANNEL_BITS.items() if bits & bit)
    return ("explore", *names) if explored else names


@functools.lru_cache(maxsize=64)
def _channel_bits(channels: tuple[str, ...]) -> int:
    return sum(bit for name, bit in CHANNEL_BITS.items() if name in channels)


@functools.lru_cache(maxsize=64)
def _recency_weights(count: int, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """``exp(-a / tau)`` for ages ``a = 0 .. count - 1``, and their derivatives in ``log tau``,
    ``(a / tau) exp(-a / tau)`` (read-only: cached; tau moves only when the ranker merges)."""
    ages = np.arange(count) / tau
    weights = np.exp(-ages)
    slopes = ages * weights
    weights.flags.writeable = slopes.flags.writeable = False
    return weights, slopes


@functools.lru_cache(maxsize=64)
def _blend(weights: tuple[tuple[str, float], ...]) -> np.ndarray:
    if not weights:
        return BLEND
    named = dict(weights)
    return np.array([named.get(name, 0.0) for name in FEATURES])


def count_floor(
    rate: bytes | float | None, landmark: bytes | None, clock: bytes | float | None
) -> float:
    r"""What one interaction at the event ``clock`` adds to a forward-decayed sum of ``landmark``
    growing at ``rate`` (:math:`e^{\lambda (t - L)}`, the state's own :math:`\lambda`): the
    least occurrence count an item-CF cosine divides by, so that the floor is one interaction
    decayed to now, not a number whose meaning drifts with the landmark. 1 before the state has
    a rate, a landmark and a clock. The exponent is held within what a double can carry
    (workers rebase long before: `freshrec.models.decay`)."""
    if rate is None or landmark is None or clock is None:
        return 1.0
    exponent = float(rate) * (float(clock) - float(landmark))
    return math.exp(min(max(exponent, -_EXPONENT_BOUND), _EXPONENT_BOUND))


def _log_failure(task: asyncio.Future[Any], what: str = "snapshot refresh failed") -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("%s: %s", what, task.exception())


def _on_scale(prediction: float, mean: float, low: float, high: float) -> float:
    """``prediction`` clipped to ``[low, high]``; ``mean`` (clipped) where it is not finite.

    >>> [_on_scale(p, 3.5, 1.0, 5.0) for p in (7.2, float("nan"), 0.2, 4.25)]
    [5.0, 3.5, 1.0, 4.25]
    """
    if not math.isfinite(prediction):
        prediction = mean
    return min(max(prediction, low), high)


def _mean(raw: list[bytes | None], prior: float) -> float:
    """The mean rating learned (the ``sum`` and ``n`` fields); ``prior`` before any."""
    total, n = raw
    if not n or int(n) == 0:
        return prior
    return float(total) / int(n)
