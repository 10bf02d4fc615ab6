r"""``freshrec eval``: prequential (test-then-train) evaluation on a ratings or events file.

The file is read in full, validated by the worker's own rules (what fails is skipped and
counted), and sorted by event time, stably. Every event is then predicted from a *state*: a
prefix ``[0, upto[e])`` of the sorted stream that every system has learned, and nothing else.

* **lag** (the default, ``lag_s = 1``): the state holds exactly the events at least ``lag_s``
  seconds older than the event,

  .. math::

      \mathrm{upto}[e] = \#\{e' : t_{e'} \le t_e - \mathrm{lag}\}
      = \texttt{searchsorted}(t, t_e - \mathrm{lag}, \texttt{side="right"}),

  which is what a real-time system with that freshness delivers;
* **chunk** (``chunk = N``): the stream is cut in blocks of ``N`` events and each block is
  predicted from the state before it (a batch system's view: up to ``N - 1`` events stale).

Events that share their ``upto`` are predicted together from the same state; then the events up
to the next group's ``upto`` are learned as one batch, and so on (:func:`prediction_groups`).

* rating track: every rating is predicted, clipped to the rating scale (an item the system has
  never seen gets the mean of the learned ratings); MAE and RMSE;
* top-N track: an interaction (click, view, purchase, rating) is a *target* when it is the
  user's first interaction with that item in the stream and the user has at least one learned
  interaction (:meth:`IndexedStream.topn_targets`). Each is looked up in a list of
  :data:`LIST_LENGTH` for its user; HR@10, HR@20, NDCG@10 and MRR truncated at the list's end,
  ties counted against the target (:mod:`freshrec.evaluation.ranking_metrics`); catalog
  coverage of the top :data:`COVERAGE_K`; the share of hits on cold items (fewer than
  :data:`COLD_BELOW` interactions before the event). The baselines rank every item the state
  knows that the user has not interacted with in the state; an item the state does not know
  yet is a miss for every system. The targets are also scored by the user's history in the
  state that predicted them (:meth:`Evaluation.by_history`): a model has to earn its place
  over popularity where it has a handful of interactions to go on.

Modes: ``direct`` runs the worker's update code
(:class:`freshrec.store.batch_update.BatchUpdater`) and the reader's funnel
(:class:`freshrec.serving.funnel.Funnel`) in this process against Redis; ``pipeline`` produces
each group's batch to Kafka, waits until a real worker process has applied it (its offset
watermarks), and asks a real reader process over HTTP. The same groups and definitions in both.

Side by side, learned from the same batches (:mod:`freshrec.evaluation.baselines`): popularity,
incremental item-kNN, river's ``reco.BiasedMF`` at freshrec's factor settings and at river's
own documented ones. *The value of freshness* (:func:`run_eval` with ``freshness_lags``) repeats the
lag protocol at several lags (1 s, 1 min, 1 h, 1 day) for every system.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import math
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from freshrec.connections import redis_client
from freshrec.devenv import local_services
from freshrec.devenv.isolated_run import isolated_run
from freshrec.devenv.processes import Children, free_port, group_is_consuming, http_json
from freshrec.evaluation.backends import (
    READ_TIMEOUT_S,
    Backend,
    DirectBackend,
    PipelineBackend,
)
from freshrec.evaluation.baselines import BiasedMFRanker, ItemKNN, PopularityBaseline
from freshrec.evaluation.datasets import RAW_KEY, detect_format, read_events
from freshrec.evaluation.ranking_metrics import (
    COLD_BELOW,
    MISSING,
    ErrorAccumulator,
    TopNAccumulator,
    clip_predictions,
    hit_rate,
    listed_top,
    ndcg,
    pessimistic_ranks,
    rank_in_list,
)
from freshrec.evaluation.report import SYSTEMS, format_summary, write_report
from freshrec.models.choice_ranker import ChoiceRanker
from freshrec.models.click_model import state_from_hash
from freshrec.progress import Progress
from freshrec.serving.funnel import FunnelConfig
from freshrec.serving.kernels import warm_up
from freshrec.settings import Settings
from freshrec.store.batch_update import INTERACTIONS
from freshrec.store.keys import Keys
from freshrec.streams.events import Event, EventValidator, InvalidEvent

__all__ = [
    "COLD_BELOW",
    "DEFAULT_LAG_S",
    "FRESHNESS_LAGS_S",
    "LIST_LENGTH",
    "IndexedStream",
    "chunked_upto",
    "format_summary",
    "learned_upto",
    "load_events",
    "prediction_groups",
    "run_eval",
]

LIST_LENGTH = 20
"""Length of every ranked list: HR@20 is its depth and MRR is truncated there."""
COVERAGE_K = 10
"""Items of each list that count towards catalog coverage."""
DEFAULT_LAG_S = 1.0
"""The default protocol: every event predicted from the events at least 1 s older."""
FRESHNESS_LAGS_S = (1.0, 60.0, 3600.0, 86400.0)
"""The lags of *the value of freshness*: a second, a minute, an hour, a day."""
HISTORY_SEGMENTS = (1, 5, 20, 100)
"""Lower ends of the segments of ``by_history``, in interactions the state held for the user."""


# --- reading -------------------------------------------------------------------------------------
def load_events(
    path: Path, settings: Settings, fmt: str | None = None, limit: int = 0
) -> tuple[list[Event], int, str]:
    """Valid events of ``path`` in event-time order (stable), the number skipped, the format.

    Lines that cannot be parsed and events the validator rejects are skipped and counted.
    With ``limit``, only the ``limit`` earliest events are kept.
    """
    fmt = fmt or detect_format(path)
    validator = EventValidator(settings)
    events: list[Event] = []
    skipped = 0
    for raw in read_events(path, fmt):
        if RAW_KEY in raw:
            skipped += 1
            continue
        try:
            events.append(validator.parse_one(raw))
        except InvalidEvent:
            skipped += 1
    events.sort(key=lambda e: e.ts)  # list.sort is stable: equal times keep file order
    if limit > 0:
        events = events[:limit]
    return events, skipped, fmt


# --- the protocol --------------------------------------------------------------------------------
def learned_upto(ts: np.ndarray, lag_s: float) -> np.ndarray:
    """``upto[e]``: the state that predicts event ``e`` holds the events ``[0, upto[e])``.

    The events at least ``lag_s`` seconds older than ``e``; ``ts`` sorted ascending.

    Examples
    --------
    >>> learned_upto(np.array([0.0, 0.0, 1.0, 1.5, 3.0]), 1.0).tolist()
    [0, 0, 2, 2, 4]
    """
    if not lag_s > 0:
        raise ValueError(f"lag must be positive seconds, got {lag_s}")
    ts = np.asarray(ts, dtype=np.float64)
    return np.searchsorted(ts, ts - lag_s, side="right").astype(np.int64)


def chunked_upto(n: int, chunk: int) -> np.ndarray:
    """``upto`` of the chunk protocol: each block of ``chunk`` events from the state before it.

    Examples
    --------
    >>> chunked_upto(5, 2).tolist()
    [0, 0, 2, 2, 4]
    """
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    return (np.arange(n, dtype=np.int64) // chunk) * chunk


def prediction_groups(upto: np.ndarray) -> list[tuple[int, int]]:
    """Runs ``[start, stop)`` of events that share their state (their ``upto``), in order.

    Examples
    --------
    >>> prediction_groups(np.array([0, 0, 2, 2, 4]))
    [(0, 2), (2, 4), (4, 5)]
    """
    upto = np.asarray(upto)
    if upto.size == 0:
        return []
    starts = [0, *(np.flatnonzero(np.diff(upto)) + 1).tolist()]
    return list(zip(starts, [*starts[1:], int(upto.size)], strict=True))


@dataclass
class IndexedStream:
    """The sorted stream as arrays: who, what, when, and what each event is known to follow.

    Users and items are numbered in order of first appearance (items: of their first
    interaction), so the items a prefix ``[0, U)`` knows are exactly ``0 .. known_items[U] - 1``.
    """

    events: list[Event]
    ts: np.ndarray
    user: np.ndarray  # user number per event
    item: np.ndarray  # catalog number per interaction, -1 for other events
    is_rating: np.ndarray
    value: np.ndarray  # the rating, NaN for other events
    first_pair: np.ndarray  # the user's first interaction with this item in the stream
    prior_interactions: np.ndarray  # interactions with the event's item before the event
    user_first_interaction: np.ndarray  # per user: position of the first interaction (n: none)
    known_items: np.ndarray  # (n + 1,): distinct items among the interactions of [0, U)
    user_ids: list[str]
    item_ids: list[str]

    @classmethod
    def build(cls, events: Sequence[Event]) -> IndexedStream:
        """Index ``events`` (sorted by time)."""
        n = len(events)
        users: dict[str, int] = {}
        catalog: dict[str, int] = {}
        pairs: set[tuple[int, int]] = set()
        user = np.zeros(n, dtype=np.int64)
        item = np.full(n, -1, dtype=np.int64)
        is_rating = np.zeros(n, dtype=bool)
        value = np.full(n, np.nan)
        first_pair = np.zeros(n, dtype=bool)
        prior = np.zeros(n, dtype=np.int64)
        new_item = np.zeros(n, dtype=np.int64)
        counts: list[int] = []
        first_interaction: list[int] = []
        for e, event in enumerate(events):
            u = users.setdefault(event.user_id, len(users))
            if u == len(first_interaction):
                first_interaction.append(n)
            user[e] = u
            if event.type == "rating":
                is_rating[e] = True
                value[e] = float(event.value)  # type: ignore[arg-type]
            if event.type not in INTERACTIONS:
                continue
            i = catalog.setdefault(event.item_id, len(catalog))
            if i == len(counts):
                counts.append(0)
                new_item[e] = 1
            item[e] = i
            prior[e] = counts[i]
            counts[i] += 1
            first_pair[e] = (u, i) not in pairs
            pairs.add((u, i))
            first_interaction[u] = min(first_interaction[u], e)
        return cls(
            events=list(events),
            ts=np.array([event.ts for event in events], dtype=np.float64),
            user=user,
            item=item,
            is_rating=is_rating,
            value=value,
            first_pair=first_pair,
            prior_interactions=prior,
            user_first_interaction=np.array(first_interaction, dtype=np.int64),
            known_items=np.concatenate([[0], np.cumsum(new_item)]),
            user_ids=list(users),
            item_ids=list(catalog),
        )

    def __len__(self) -> int:
        return len(self.events)

    def learned_interactions(self, rows: np.ndarray, upto: np.ndarray) -> np.ndarray:
        """Per row ``e``: the interaction events of its user among ``[0, upto[e])`` (repeats
        included), what the state had learned of the user when ``e`` was predicted."""
        n = len(self.events)
        positions = np.flatnonzero(self.item >= 0)
        keys = np.sort(self.user[positions] * (n + 1) + positions)
        base = self.user[rows] * (n + 1)
        return np.searchsorted(keys, base + upto[rows]) - np.searchsorted(keys, base)

    def topn_targets(self, upto: np.ndarray) -> np.ndarray:
        """Top-N targets: a user's first interaction with an item, the user having learned ones.

        The user has at least one interaction in the state ``[0, upto[e])``.
        """
        learned_user = self.user_first_interaction[self.user] < np.asarray(upto)
        return (self.item >= 0) & self.first_pair & learned_user


# --- the prequential loop ------------------------------------------------------------------------
class _SystemScore:
    """One system's predictions and ranks, kept per group and scored once at the end.

    Accumulating per group (a few events each under the lag protocol) cost more than the
    baselines themselves; the arrays are concatenated and scored in one pass instead. A few
    running sums feed the progress line.
    """

    def __init__(self) -> None:
        self.predictions: list[np.ndarray] = []
        self.truths: list[np.ndarray] = []
        self.ranks: list[np.ndarray] = []
        self.cold: list[np.ndarray] = []
        self.recommended: set[str] = set()  # items of served lists
        self.recommended_rows = np.zeros(0, dtype=bool)  # catalog rows of ranked lists
        self.rated = 0
        self.sq_sum = 0.0
        self.ranked = 0
        self.hits = 0

    def add_ratings(self, predictions: np.ndarray, truths: np.ndarray) -> None:
        self.predictions.append(predictions)
        self.truths.append(truths)
        ok = np.isfinite(predictions) & np.isfinite(truths)
        self.rated += int(ok.sum())
        self.sq_sum += float(np.square(truths - predictions)[ok].sum())

    def add_ranks(self, ranks: np.ndarray, cold: np.ndarray) -> None:
        self.ranks.append(ranks)
        self.cold.append(cold)
        self.ranked += ranks.size
        self.hits += int((ranks <= 10).sum())

    def recommend_rows(self, rows: np.ndarray, size: int) -> None:
        if self.recommended_rows.size < size:
            grown = np.zeros(max(size, 2 * self.recommended_rows.size), dtype=bool)
            grown[: self.recommended_rows.size] = self.recommended_rows
            self.recommended_rows = grown
        self.recommended_rows[rows] = True

    @property
    def running(self) -> str:
        rmse = math.sqrt(self.sq_sum / self.rated) if self.rated else math.nan
        hr = self.hits / self.ranked if self.ranked else math.nan
        return f"rmse {rmse:.3f}  hr@10 {hr:.3f}"

    def squared_errors(self) -> np.ndarray:
        if not self.truths:
            return np.zeros(0)
        return (np.concatenate(self.truths) - np.concatenate(self.predictions)) ** 2

    def hit_series(self) -> np.ndarray:
        return hit_rate(np.concatenate(self.ranks), 10) if self.ranks else np.zeros(0)

    def accumulators(self, item_ids: Sequence[str]) -> tuple[ErrorAccumulator, TopNAccumulator]:
        rating = ErrorAccumulator()
        if self.truths:
            rating.update(np.concatenate(self.predictions), np.concatenate(self.truths))
        topn = TopNAccumulator(list_length=LIST_LENGTH, coverage_k=COVERAGE_K)
        if self.ranks:
            topn.update(np.concatenate(self.ranks), np.concatenate(self.cold))
        topn.recommended = self.recommended | {
            item_ids[r] for r in np.flatnonzero(self.recommended_rows).tolist()
        }
        return rating, topn

    def metrics(self, item_ids: Sequence[str]) -> dict[str, float]:
        rating, topn = self.accumulators(item_ids)
        out = {"mae": round(rating.mae, 6), "rmse": round(rating.rmse, 6)}
        out["rmse_last_quarter"] = round(self._tail_rmse(), 6)
        out.update(topn.metrics(len(item_ids)))
        return out

    def _tail_rmse(self) -> float:
        """RMSE over the last quarter of the ratings: where the learning curve has got to."""
        squared = self.squared_errors()
        if not squared.size:
            return math.nan
        tail = squared[-max(1, squared.size // 4) :]
        tail = tail[np.isfinite(tail)]
        return float(np.sqrt(tail.mean())) if tail.size else math.nan


class Evaluation:
    """One prequential walk of a stream under one protocol: every system, same states."""

    def __init__(
        self,
        settings: Settings,
        backend: Backend,
        stream: IndexedStream,
        upto: np.ndarray,
        ablation: dict[str, FunnelConfig] | None = None,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.stream = stream
        self.upto = np.asarray(upto, dtype=np.int64)
        self.targets = stream.topn_targets(self.upto)
        self.ablation = ablation or {}
        self.learned = 0  # the state: events [0, learned)
        self.seen: dict[int, list[int]] = {}  # user number -> learned items, first time each
        self._seen_sets: dict[int, set[int]] = {}
        self.rating_sum = 0.0
        self.rating_n = 0
        self.popularity = PopularityBaseline()
        self.item_knn = ItemKNN()
        self.river = BiasedMFRanker(
            settings.mf_factors,
            settings.mf_lr,
            settings.mf_reg,
            init_std=settings.mf_init_std,
            seed=settings.mf_seed,
        )
        self.river_docs = BiasedMFRanker.river_documented()
        self.scores = {name: _SystemScore() for name in (*SYSTEMS, *self.ablation)}
        self.rating_positions: list[int] = []
        self.topn_positions: list[int] = []
        self.ours_seconds = 0.0
        self.baseline_seconds = 0.0
        self.cf_recency = math.nan  # item-CF's recency scale as learned by the end of the walk

    @property
    def events(self) -> int:
        return len(self.stream)

    # --- the walk ----------------------------------------------------------------------------
    async def run(self, progress: Progress | None = None) -> None:
        for start, stop in prediction_groups(self.upto):
            await self.step(start, stop)
            if progress is not None:
                progress.advance(stop - start, note=self.scores["freshrec"].running)
        # The rest of the stream, so the updater's own per-rating error covers every rating.
        await self._learn_upto(len(self.stream), baselines=False)

    async def step(self, start: int, stop: int) -> None:
        """Learn up to the group's state, then predict the group ``[start, stop)``."""
        await self._learn_upto(int(self.upto[start]))
        s = self.stream
        rating_rows = np.flatnonzero(s.is_rating[start:stop]) + start
        topn_rows = np.flatnonzero(self.targets[start:stop]) + start
        users = list(dict.fromkeys(s.user[topn_rows].tolist()))
        user_ids = [s.user_ids[u] for u in users]
        events = s.events
        truths = s.value[rating_rows]
        fallback = (
            self.rating_sum / self.rating_n
            if self.rating_n
            else (self.settings.rating_min + self.settings.rating_max) / 2
        )
        lo, hi = self.settings.rating_min, self.settings.rating_max
        cold = s.prior_interactions[topn_rows] < COLD_BELOW

        # --- freshrec: predict the group through the system -------------------------------------
        started = time.perf_counter()
        pairs = list(dict.fromkeys((events[n].user_id, events[n].item_id) for n in rating_rows))
        predicted, ranked = await asyncio.gather(
            self.backend.predict(pairs), self.backend.recommend(user_ids, LIST_LENGTH)
        )
        self.ours_seconds += time.perf_counter() - started
        answers = dict(zip(pairs, predicted, strict=True))
        lists = dict(zip(user_ids, ranked, strict=True))
        if rating_rows.size:
            ours = np.array(
                [answers[(events[n].user_id, events[n].item_id)] for n in rating_rows],
                dtype=np.float64,
            )  # None -> nan -> the fallback: the mean learned rating
            self.scores["freshrec"].add_ratings(clip_predictions(ours, lo, hi, fallback), truths)
        if topn_rows.size:
            self._score_lists("freshrec", lists, topn_rows, cold)

        # --- the same funnel with fewer recall channels, same state (direct mode) ---------------
        for name, config in self.ablation.items():
            alt = await self.backend.recommend(user_ids, LIST_LENGTH, config)  # type: ignore[call-arg]
            if topn_rows.size:
                self._score_lists(name, dict(zip(user_ids, alt, strict=True)), topn_rows, cold)

        # --- baselines, from the same state ------------------------------------------------------
        started = time.perf_counter()
        self._baselines_predict(rating_rows, truths, fallback, topn_rows, users, cold)
        self.baseline_seconds += time.perf_counter() - started
        self.rating_positions.extend(rating_rows.tolist())
        self.topn_positions.extend(topn_rows.tolist())

    def _score_lists(
        self, name: str, lists: dict[str, Any], rows: np.ndarray, cold: np.ndarray
    ) -> None:
        events = self.stream.events
        ranks = np.array(
            [rank_in_list(*lists[events[n].user_id], events[n].item_id) for n in rows.tolist()]
        )
        score = self.scores[name]
        score.add_ranks(ranks, cold)
        for items, _ in lists.values():
            score.recommended.update(items[:COVERAGE_K])

    async def _learn_upto(self, upto: int, baselines: bool = True) -> None:
        """Every system learns the events ``[learned, upto)`` as one batch."""
        if upto <= self.learned:
            return
        batch = self.stream.events[self.learned : upto]
        started = time.perf_counter()
        await self.backend.learn(batch)
        self.ours_seconds += time.perf_counter() - started
        if baselines:
            started = time.perf_counter()
            self._baselines_learn(self.learned, upto)
            self.baseline_seconds += time.perf_counter() - started
        self.learned = upto

    def _baselines_learn(self, start: int, stop: int) -> None:
        s = self.stream
        for n in range(start, stop):
            i = int(s.item[n])
            if i < 0:
                continue
            u = int(s.user[n])
            user_id = s.user_ids[u]
            rating = float(s.value[n]) if s.is_rating[n] else None
            self.popularity.learn_one(user_id, i, rating)
            self.item_knn.learn_one(user_id, i)
            if rating is not None:
                self.river.learn_one(user_id, i, rating)
                self.river_docs.learn_one(user_id, i, rating)
                self.rating_sum += rating
                self.rating_n += 1
            seen = self._seen_sets.setdefault(u, set())
            if i not in seen:
                seen.add(i)
                self.seen.setdefault(u, []).append(i)

    def _baselines_predict(
        self,
        rating_rows: np.ndarray,
        truths: np.ndarray,
        fallback: float,
        topn_rows: np.ndarray,
        users: list[int],
        cold: np.ndarray,
    ) -> None:
        s = self.stream
        lo, hi = self.settings.rating_min, self.settings.rating_max
        if rating_rows.size:
            items = s.item[rating_rows].tolist()
            user_ids = [s.user_ids[u] for u in s.user[rating_rows].tolist()]
            pop = np.array([self.popularity.predict_rating(i) for i in items])
            self.scores["popularity"].add_ratings(clip_predictions(pop, lo, hi, fallback), truths)
            for name, model in (
                ("river_biased_mf", self.river),
                ("river_biased_mf_docs", self.river_docs),
            ):
                predicted = np.array(
                    [model.predict_rating(u, i) for u, i in zip(user_ids, items, strict=True)]
                )
                self.scores[name].add_ratings(clip_predictions(predicted, lo, hi, fallback), truths)
        if not topn_rows.size:
            return
        n_items = int(s.known_items[self.learned])
        names = ("popularity", "item_knn", "river_biased_mf", "river_biased_mf_docs")
        if n_items == 0:
            for name in names:
                self.scores[name].add_ranks(np.full(topn_rows.size, MISSING), cold)
            return
        candidates = np.ones((len(users), n_items), dtype=bool)
        for r, user in enumerate(users):
            candidates[r, self.seen.get(user, [])] = False
        row_of = {user: r for r, user in enumerate(users)}
        rows = np.array([row_of[u] for u in s.user[topn_rows].tolist()])
        targets = s.item[topn_rows]
        targets = np.where(targets < n_items, targets, -1)  # not in the state: a miss
        user_ids = [s.user_ids[u] for u in users]
        stacked = np.empty((len(names), len(users), n_items))
        stacked[0] = self.popularity.scores(n_items)[None, :]
        stacked[1] = self.item_knn.scores(user_ids, n_items)
        stacked[2] = self.river.scores(user_ids, n_items)
        stacked[3] = self.river_docs.scores(user_ids, n_items)
        # Every system's ranks in one pass: rows of system-major (system, target) pairs.
        ranks = pessimistic_ranks(
            stacked[:, rows].reshape(-1, n_items),
            np.tile(targets, len(names)),
            np.tile(candidates[rows], (len(names), 1)),
        ).reshape(len(names), -1)
        # Coverage: the top COVERAGE_K unseen items of each user's row, every system at once.
        masked = np.where(candidates[None], stacked, -np.inf).reshape(-1, n_items)
        listed = listed_top(masked, COVERAGE_K).reshape(len(names), -1)
        for n, name in enumerate(names):
            self.scores[name].add_ranks(ranks[n], cold)
            self.scores[name].recommend_rows(np.flatnonzero(listed[n]) % n_items, n_items)

    # --- results -----------------------------------------------------------------------------
    def system_metrics(self) -> dict[str, dict[str, float]]:
        """Every system's metrics, freshrec first."""
        return {name: self.scores[name].metrics(self.stream.item_ids) for name in SYSTEMS}

    def by_history(self, names: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        """HR@10 and NDCG@10 of every system over the top-N targets of users whose history in
        the state, when predicted, falls in each of :data:`HISTORY_SEGMENTS`: where a learned
        model has little to go on and popularity is the bar to clear. ``names``: the systems (by
        default every one the run scores, the recall ablation's included)."""
        rows = np.asarray(self.topn_positions, dtype=np.int64)
        sizes = self.stream.learned_interactions(rows, self.upto)
        ranks = self.target_ranks(names or (*SYSTEMS, *self.ablation))
        out: dict[str, dict[str, Any]] = {}
        for low, high in itertools.pairwise((*HISTORY_SEGMENTS, None)):
            inside = (sizes >= low) if high is None else (sizes >= low) & (sizes < high)
            label = f"{low}+" if high is None else f"{low}-{high - 1}"
            segment: dict[str, Any] = {"targets": int(inside.sum())}
            for name, ranked in ranks.items():
                if ranked.size and inside.any():
                    segment[name] = hit_and_ndcg(ranked[inside])
            out[label] = segment
        return out

    def target_ranks(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        """Each system's ranks of the top-N targets, in the order of ``topn_positions``."""
        return {
            name: np.concatenate(self.scores[name].ranks)
            if self.scores[name].ranks
            else np.zeros(0)
            for name in names
        }

    def summary(self) -> dict[str, Any]:
        item_ids = self.stream.item_ids
        rating, topn = self.scores["freshrec"].accumulators(item_ids)
        out: dict[str, Any] = {
            "events": self.events,
            "users": len(self.stream.user_ids),
            "items": len(item_ids),
            "rating_events": rating.n,
            "topn_events": topn.n,
            "cold_event_share": round(topn.cold_events / topn.n, 6) if topn.n else math.nan,
            "groups": len(prediction_groups(self.upto)),
        }
        out.update(self.scores["freshrec"].metrics(item_ids))
        out["events_per_s"] = round(self.events / max(self.ours_seconds, 1e-9), 1)
        out["baselines_s"] = round(self.baseline_seconds, 2)
        out["cf_recency"] = round(self.cf_recency, 3)
        metrics = self.system_metrics()
        out["baselines"] = {name: metrics[name] for name in SYSTEMS if name != "freshrec"}
        out["by_history"] = self.by_history()
        if self.ablation:
            keep = ("hr@10", "hr@20", "ndcg@10", "mrr", "coverage")
            out["recall_ablation"] = {
                name: {key: self.scores[name].metrics(item_ids)[key] for key in keep}
                for name in self.ablation
            }
        return out


# --- the runner ----------------------------------------------------------------------------------
def run_eval(
    settings: Settings,
    path: Path,
    mode: str = "pipeline",
    fmt: str | None = None,
    out_dir: Path | None = None,
    limit: int = 0,
    chunk: int | None = None,
    show_progress: bool = True,
    ablation: bool = False,
    lag_s: float | None = None,
    freshness_lags: Sequence[float] = (),
) -> dict[str, Any]:
    """Evaluate ``path`` prequentially in ``mode`` ("pipeline" or "direct"); the summary.

    The protocol is the lag protocol at ``lag_s`` (default :data:`DEFAULT_LAG_S`), or the chunk
    protocol when ``chunk`` is given; not both. ``freshness_lags`` also runs the lag protocol
    at each of those lags for every system (*the value of freshness*; a lag equal to the main
    run's is not run twice). ``ablation`` (direct mode) also scores the same funnel with MF
    recall only and with CF recall only, on the same state at the same moments.

    Services come from ``freshrec.devenv.local_services.resolve`` (started when not configured and
    stopped at the end); each run uses topics and keys of its own and deletes them at the end.
    """
    if mode not in ("pipeline", "direct"):
        raise ValueError(f"unknown mode {mode!r}; expected pipeline or direct")
    if chunk is not None and lag_s is not None:
        raise ValueError("give --lag or --chunk, not both: they are two protocols")
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    if lag_s is None and chunk is None:
        lag_s = DEFAULT_LAG_S
    if lag_s is not None and not lag_s > 0:
        raise ValueError(f"lag must be positive seconds, got {lag_s}")
    if any(not lag > 0 for lag in freshness_lags):
        raise ValueError(f"freshness lags must be positive seconds, got {list(freshness_lags)}")
    if ablation and mode != "direct":
        raise ValueError("--ablation needs --mode direct (the reader serves one configuration)")
    path = Path(path)
    events, skipped, fmt = load_events(path, settings, fmt, limit)
    if not events:
        raise ValueError(f"{path}: no valid events to evaluate ({skipped} skipped)")
    stream = IndexedStream.build(events)
    upto = learned_upto(stream.ts, lag_s) if chunk is None else chunked_upto(len(stream), chunk)

    # The other lags of the value of freshness walk beside the main one, each in a process of
    # its own (direct mode; see `_walk_lags`); the main walk is timed on its own as before.
    extra = [lag for lag in dict.fromkeys(freshness_lags) if chunk is not None or lag != lag_s]
    started = time.perf_counter()
    common_lag = max(freshness_lags, default=0.0)  # its targets are every lag's
    walks = _walk_lags(settings, mode, stream, extra, common_lag, show_progress)
    with walks as (settings, collect):
        walk_started = time.perf_counter()
        lines = show_progress and bool(extra) and mode == "direct"
        evaluation = _evaluate(
            settings, mode, stream, upto, show_progress, ablation, label="", lines=lines
        )
        wall = time.perf_counter() - walk_started
        others = collect()
    summary: dict[str, Any] = {
        "mode": mode,
        "file": str(path),
        "format": fmt,
        "protocol": "chunk" if chunk is not None else "lag",
        "lag_s": lag_s,
        "chunk": chunk,
    }
    summary.update(evaluation.summary())
    summary["skipped"] = skipped
    summary["wall_s"] = round(wall, 2)
    if isinstance(evaluation.backend, PipelineBackend):
        summary["worker_restarts"] = evaluation.backend.processes.restarts.get("worker", [])
    if mode == "direct" and isinstance(evaluation.backend, DirectBackend):
        summary["sequential"] = _sequential(evaluation, events, settings)
    if freshness_lags:
        rows = dict(others)
        if chunk is None and lag_s in freshness_lags:
            rows[lag_s] = _freshness_row(lag_s, evaluation, common_lag)
        summary["freshness"] = [rows[lag] for lag in freshness_lags]
        summary["freshness_s"] = round(time.perf_counter() - started, 2)
    summary = _json_safe(summary)
    if out_dir is not None:
        summary["report"] = str(write_report(Path(out_dir), summary, evaluation))
    return summary


def _freshness_row(lag: float, evaluation: Evaluation, common_lag: float) -> dict[str, Any]:
    """One lag's entry of *the value of freshness*: every system's metrics, overall and by the
    user's history in the state (``by_history``), and its HR@10 and NDCG@10 over the targets
    every lag of the table shares (``same_targets``).

    A top-N target needs its user to have interactions in the state, so a longer lag has fewer
    targets, and only returning users' among them: the metrics over each lag's own targets mix
    what staleness costs with a harder population. The targets at the longest lag,
    ``common_lag``, are targets at every shorter one (its states are older): scored on those
    alone, the columns differ by the lag only.
    """
    stream = evaluation.stream
    common = stream.topn_targets(learned_upto(stream.ts, common_lag))
    shared = common[np.asarray(evaluation.topn_positions, dtype=np.int64)]
    ranks = evaluation.target_ranks(SYSTEMS)
    same = {
        name: hit_and_ndcg(ranked[shared] if ranked.size else ranked)
        for name, ranked in ranks.items()
    }
    return {
        "lag_s": lag,
        "rating_events": evaluation.scores["freshrec"].rated,
        "topn_events": evaluation.scores["freshrec"].ranked,
        "systems": evaluation.system_metrics(),
        "by_history": evaluation.by_history(SYSTEMS),
        "same_targets": {"lag_s": common_lag, "topn_events": int(shared.sum()), "systems": same},
    }


def _walk_at_lag(
    settings: Settings,
    mode: str,
    stream: IndexedStream,
    lag: float,
    common_lag: float,
    show_progress: bool,
    lines: bool = False,
) -> dict[str, Any]:
    """A whole walk at ``lag``, for `_walk_lags`; what it returns crosses a process boundary."""
    upto = learned_upto(stream.ts, lag)
    walk = _evaluate(
        settings, mode, stream, upto, show_progress, label=f" lag {lag:g} s", lines=lines
    )
    return _freshness_row(lag, walk, common_lag)


@contextlib.contextmanager
def _walk_lags(
    settings: Settings,
    mode: str,
    stream: IndexedStream,
    lags: Sequence[float],
    common_lag: float,
    show_progress: bool,
) -> Iterator[tuple[Settings, Callable[[], dict[float, dict[str, Any]]]]]:
    """Walks ``stream`` at each of ``lags``, beside the caller's own walk; yields the settings
    every walk shares and a function that waits for the rows, lag -> `_freshness_row`.

    Walks share nothing but the services (each has keys of its own), so in direct mode they
    run in processes of their own, up to one per core: the four lags of ``--freshness`` take
    the time of about two walks on two cores. The services are resolved here once, so the
    processes find them instead of each starting its own. Pipeline walks (a worker and a
    reader each) run one after another, after the caller's.
    """
    if not lags:
        yield settings, dict
        return
    if mode != "direct":

        def one_by_one() -> dict[float, dict[str, Any]]:
            return {
                lag: _walk_at_lag(settings, mode, stream, lag, common_lag, show_progress)
                for lag in lags
            }

        yield settings, one_by_one
        return
    endpoints, stop = local_services.resolve(settings, services=("redis",))
    shared = dataclasses.replace(settings, redis_url=endpoints.redis_url)
    workers = max(1, min(len(lags), os.cpu_count() or 1))
    context = multiprocessing.get_context("spawn")  # nothing of this process's loop or clients
    try:
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = {
                lag: pool.submit(
                    _walk_at_lag, shared, mode, stream, lag, common_lag, show_progress, True
                )
                for lag in lags
            }
            yield shared, lambda: {lag: future.result() for lag, future in futures.items()}
    finally:
        stop()


def _evaluate(
    settings: Settings,
    mode: str,
    stream: IndexedStream,
    upto: np.ndarray,
    show_progress: bool,
    ablation: bool = False,
    label: str = "",
    lines: bool = False,
) -> Evaluation:
    """One walk of ``stream`` with topics and keys of its own on the shared services.

    ``lines``: progress as lines, never redrawn in place (other walks share the terminal)."""
    with isolated_run(
        settings,
        "eval",
        kafka=mode != "direct",
        worker_metrics_port=0,
        serve_port=free_port(),
    ) as run_settings:
        variants = _recall_ablation(run_settings) if ablation else None
        return asyncio.run(
            _run(run_settings, mode, stream, upto, show_progress, variants, label, lines)
        )


async def _learned_cf_recency(redis: Any, settings: Settings) -> float:
    """Item-CF's recency scale as the readers have merged it into the shared state."""
    ranker = ChoiceRanker(cf_recency=settings.cf_recency)
    state = await redis.hgetall(Keys(settings.key_prefix).choice_ranker_state)
    ranker.load_merged(state_from_hash(state))
    return ranker.cf_recency


def hit_and_ndcg(ranks: np.ndarray) -> dict[str, float]:
    """HR@10 and NDCG@10 over ``ranks`` (NaN over none), to the summary's digits."""
    if not ranks.size:
        return {"hr@10": math.nan, "ndcg@10": math.nan}
    return {
        "hr@10": round(float(hit_rate(ranks, 10).mean()), 6),
        "ndcg@10": round(float(ndcg(ranks, 10).mean()), 6),
    }


def _json_safe(value: Any) -> Any:
    """NaN (a metric with nothing to average, e.g. RMSE of a file without ratings) -> None."""
    if isinstance(value, dict):
        return {key: _json_safe(v) for key, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _sequential(evaluation: Evaluation, events: Sequence[Event], settings: Settings) -> dict:
    """Direct mode only: the per-event prequential error the updater itself measures.

    Every rating predicted just before its own update, no staleness at all: the lower bound
    the protocol's figure approaches as the lag (or the chunk) goes to nothing.
    """
    assert isinstance(evaluation.backend, DirectBackend)
    truths = np.array([float(e.value) for e in events if e.type == "rating"])  # type: ignore[arg-type]
    errors = np.asarray(evaluation.backend.rating_errors, dtype=np.float64)
    if truths.size != errors.size or truths.size == 0:
        return {}
    predictions = clip_predictions(truths - errors, settings.rating_min, settings.rating_max, 0.0)
    acc = ErrorAccumulator()
    acc.update(predictions, truths)
    return {"mae": round(acc.mae, 6), "rmse": round(acc.rmse, 6)}


def _recall_ablation(settings: Settings) -> dict[str, FunnelConfig]:
    """The full funnel against each recall channel on its own, in two ways.

    ``*_recall_only`` keep the funnel's ranking and rerank over one channel's candidates (so
    the blend's other scores still rank them); ``*_recall_alone`` are the channel as a
    recommender by itself: its candidates in the order of its own score, no diversity. None
    has exploration slots, which reserve positions for unproven items and would count against
    whichever variant has a cold pool; the served configuration, exploration included, is
    ``freshrec``. ``fixed_blend`` is the served configuration with the fixed blend in the fine
    stage instead of the choice ranker (which learns from ``freshrec``'s lists only).
    """
    served = settings.funnel_config()
    base = dataclasses.replace(served, exploration_slots=0)
    alone = dataclasses.replace(base, diversity=0.0)
    return {
        "all_channels": base,
        "mf_recall_only": dataclasses.replace(base, channels=("mf",)),
        "cf_recall_only": dataclasses.replace(base, channels=("cf",)),
        "mf_recall_alone": dataclasses.replace(alone, channels=("mf",), blend=(("mf", 1.0),)),
        "cf_recall_alone": dataclasses.replace(alone, channels=("cf",), blend=(("cf", 1.0),)),
        "fixed_blend": dataclasses.replace(served, choice_ranker=False),
    }


async def _run(
    settings: Settings,
    mode: str,
    stream: IndexedStream,
    upto: np.ndarray,
    show_progress: bool,
    ablation: dict[str, FunnelConfig] | None = None,
    label: str = "",
    lines: bool = False,
) -> Evaluation:
    redis = redis_client(settings, socket_timeout=READ_TIMEOUT_S)
    processes: Children | None = None
    backend: Any = None
    succeeded = False
    try:
        # Before anything is timed or waited on: direct mode calls the funnel's kernels here,
        # and in pipeline mode the reader started below then loads them from the cache this
        # fills, so a first run on a machine never spends the reader's start-up deadline
        # compiling.
        warm_up([settings.funnel_config(), *(ablation or {}).values()])
        if mode == "direct":
            backend = DirectBackend(settings, redis)
        else:
            processes = Children(Path(tempfile.mkdtemp(prefix="freshrec-eval-")), settings)
            # A worker exits to recover from what it cannot mend in place (its consumer
            # stalled, Redis lost writes); started again as a supervisor would, it resumes
            # after its watermarks. Any other exit fails the run; the summary lists each
            # restart.
            from freshrec.streams.worker import EXIT_STALLED, EXIT_STATE_WENT_BACK

            recovers = (EXIT_STALLED, EXIT_STATE_WENT_BACK)
            worker = ["worker", "--loglevel", "info"]
            processes.start("worker", worker, restarts=3, restart_on=recovers)
            processes.start("reader", ["serve"])
            base_url = f"http://{settings.serve_host}:{settings.serve_port}"
            processes.wait(lambda: http_json(base_url + "/healthz")[0] == 200, 60, "the reader")
            processes.wait(
                lambda: group_is_consuming(
                    settings.kafka_bootstrap, f"{settings.topic_prefix}-worker", settings=settings
                ),
                90,
                "the worker to join its consumer group",
            )
            backend = PipelineBackend(settings, redis, base_url, processes)
        evaluation = Evaluation(settings, backend, stream, upto, ablation)
        progress = (
            Progress(len(stream), f"eval {mode}{label}", lines=lines) if show_progress else None
        )
        await evaluation.run(progress)
        if progress is not None:
            progress.close()
        evaluation.cf_recency = await _learned_cf_recency(redis, settings)
        succeeded = True
        return evaluation
    finally:
        if backend is not None:
            await backend.close()
        await redis.aclose()
        if processes is not None:
            processes.stop()
            if succeeded:  # a failed run's errors name its logs, which stay
                shutil.rmtree(processes.logs, ignore_errors=True)
