r"""``freshrec eval``: prequential (test-then-train) evaluation on a ratings or events file.

The file is read in full, validated by the worker's own rules (what fails is skipped and
counted), and sorted by event time, stably. It is then walked in chunks of ``chunk`` events;
for every chunk, every system first **predicts** every event of the chunk from its current
state, then **learns** the chunk:

* rating track: each rating is predicted before it is learned, clipped to the rating scale
  (an item the system has never seen gets the mean rating so far); MAE and RMSE;
* top-N track: each interaction (click, view, purchase, rating) of a user with history, on an
  item that user has not interacted with before, is looked up in a list of
  :data:`LIST_LENGTH` for that user; HR@10, HR@20, NDCG@10 and MRR truncated at the list's
  end, ties counted against the target (:mod:`freshrec.evaluation.ranking_metrics`); catalog
  coverage of the top :data:`COVERAGE_K`; the share of hits on cold items (fewer than
  :data:`COLD_BELOW` interactions before the event).

Predicting a whole chunk from the state before it makes each prediction up to ``chunk - 1``
events stale: the price of asking the real system, through the real reader, in bulk. The
staleness is the same for every system and in both modes.

Modes: ``direct`` runs the worker's update code
(:class:`freshrec.store.batch_update.BatchUpdater`) and the reader's funnel
(:class:`freshrec.serving.funnel.Funnel`) in this process against Redis; ``pipeline``
produces each chunk to Kafka, waits until a real worker process has applied it (its offset
watermarks), and asks a real reader process over HTTP. The same chunks and the
same definitions in both, so their RMSE agrees to far better than 1%.

Side by side, learned from the same chunks: a popularity baseline and river's ``reco.BiasedMF``
(:mod:`freshrec.evaluation.baselines`), so the lift of the personal model shows in the same run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from redis.asyncio import Redis

from freshrec.devenv.isolated_run import isolated_run
from freshrec.devenv.processes import Children, free_port, group_is_consuming, http_json
from freshrec.evaluation.backends import Backend, DirectBackend, PipelineBackend
from freshrec.evaluation.baselines import BiasedMFRanker, PopularityBaseline
from freshrec.evaluation.datasets import RAW_KEY, detect_format, read_events
from freshrec.evaluation.ranking_metrics import (
    COLD_BELOW,
    MISSING,
    ErrorAccumulator,
    TopNAccumulator,
    clip_predictions,
    hit_rate,
    pessimistic_ranks,
    rank_in_list,
)
from freshrec.evaluation.report import SYSTEMS, format_summary, write_report
from freshrec.progress import Progress
from freshrec.serving.funnel import FunnelConfig
from freshrec.serving.kernels import warm_up
from freshrec.settings import Settings
from freshrec.store.batch_update import INTERACTIONS
from freshrec.streams.events import Event, EventValidator, InvalidEvent

__all__ = ["COLD_BELOW", "LIST_LENGTH", "format_summary", "load_events", "run_eval"]

LIST_LENGTH = 20
"""Length of every ranked list: HR@20 is its depth and MRR is truncated there."""
COVERAGE_K = 10
"""Items of each list that count towards catalog coverage."""


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


# --- the prequential loop ------------------------------------------------------------------------
@dataclass
class _SystemScore:
    """Accumulated metrics of one system, plus per-event series for the report's plots."""

    rating: ErrorAccumulator = field(default_factory=ErrorAccumulator)
    topn: TopNAccumulator = field(
        default_factory=lambda: TopNAccumulator(list_length=LIST_LENGTH, coverage_k=COVERAGE_K)
    )
    sq_errors: list[np.ndarray] = field(default_factory=list)
    hits: list[np.ndarray] = field(default_factory=list)

    def add_ratings(self, predictions: np.ndarray, truths: np.ndarray) -> None:
        self.rating.update(predictions, truths)
        self.sq_errors.append((truths - predictions) ** 2)

    def add_ranks(self, ranks: np.ndarray, cold: np.ndarray) -> None:
        self.topn.update(ranks, cold)
        self.hits.append(hit_rate(ranks, 10))

    def metrics(self, catalog_size: int) -> dict[str, float]:
        out = {"mae": round(self.rating.mae, 6), "rmse": round(self.rating.rmse, 6)}
        out["rmse_last_quarter"] = round(self._tail_rmse(), 6)
        out.update(self.topn.metrics(catalog_size))
        return out

    def _tail_rmse(self) -> float:
        """RMSE over the last quarter of the ratings: where the learning curve has got to."""
        if not self.sq_errors:
            return math.nan
        squared = np.concatenate(self.sq_errors)
        tail = squared[-max(1, squared.size // 4) :]
        tail = tail[np.isfinite(tail)]
        return float(np.sqrt(tail.mean())) if tail.size else math.nan


@dataclass
class _Chunk:
    """What a chunk asks of every system, worked out before any of them learns it."""

    rating_rows: list[int] = field(default_factory=list)  # positions in the chunk
    topn_rows: list[int] = field(default_factory=list)
    cold: list[bool] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)  # catalog index, -1: not in the catalog yet
    users: list[str] = field(default_factory=list)  # distinct users of the top-N rows
    known: int = 0  # catalog size before the chunk: the items a ranking can hold


class Evaluation:
    """The prequential state shared by all systems: catalog, histories, counts, scores."""

    def __init__(
        self,
        settings: Settings,
        backend: Backend,
        ablation: dict[str, FunnelConfig] | None = None,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.ablation = ablation or {}
        self.catalog: dict[str, int] = {}  # item -> index, in order of first interaction
        self.item_ids: list[str] = []  # index -> item
        self.seen: defaultdict[str, set[str]] = defaultdict(set)
        self.seen_index: defaultdict[str, list[int]] = defaultdict(list)
        self.interactions: defaultdict[str, int] = defaultdict(int)
        self.rating_sum = 0.0
        self.rating_n = 0
        self.popularity = PopularityBaseline()
        self.river = BiasedMFRanker(
            settings.mf_factors,
            settings.mf_lr,
            settings.mf_reg,
            init_std=settings.mf_init_std,
            seed=settings.mf_seed,
        )
        self.scores = {name: _SystemScore() for name in (*SYSTEMS, *self.ablation)}
        self.rating_positions: list[int] = []
        self.topn_positions: list[int] = []
        self.ours_seconds = 0.0
        self.events = 0
        self.users: set[str] = set()

    # --- one chunk ---------------------------------------------------------------------------
    def _plan(self, events: Sequence[Event]) -> _Chunk:
        """Which events each track scores; history and item counts advance event by event."""
        plan = _Chunk()
        added: defaultdict[str, set[str]] = defaultdict(set)
        counts: defaultdict[str, int] = defaultdict(int)
        users: dict[str, None] = {}
        known = plan.known = len(self.catalog)
        for n, e in enumerate(events):
            if e.type == "rating":
                plan.rating_rows.append(n)
            if e.type not in INTERACTIONS:
                continue
            user, item = e.user_id, e.item_id
            index = self.catalog.setdefault(item, len(self.catalog))  # new: not rankable yet
            if index == len(self.item_ids):
                self.item_ids.append(item)
            history = self.seen.get(user, ())
            if (history or added[user]) and item not in history and item not in added[user]:
                plan.topn_rows.append(n)
                plan.cold.append(self.interactions.get(item, 0) + counts[item] < COLD_BELOW)
                plan.targets.append(index if index < known else -1)
                users.setdefault(user, None)
            added[user].add(item)
            counts[item] += 1
        plan.users = list(users)
        return plan

    async def step(self, events: Sequence[Event], offset: int) -> None:
        plan = self._plan(events)
        ratings = [events[n] for n in plan.rating_rows]
        truths = np.array([float(e.value) for e in ratings])  # type: ignore[arg-type]
        fallback = (
            self.rating_sum / self.rating_n
            if self.rating_n
            else (self.settings.rating_min + self.settings.rating_max) / 2
        )
        lo, hi = self.settings.rating_min, self.settings.rating_max

        # --- freshrec: predict the chunk through the system, then learn it ----------------------
        started = time.perf_counter()
        pairs = list(dict.fromkeys((e.user_id, e.item_id) for e in ratings))
        predicted, ranked = await asyncio.gather(
            self.backend.predict(pairs), self.backend.recommend(plan.users, LIST_LENGTH)
        )
        answers = dict(zip(pairs, predicted, strict=True))
        lists = dict(zip(plan.users, ranked, strict=True))
        self.ours_seconds += time.perf_counter() - started

        if ratings:
            ours = np.array(
                [answers[(e.user_id, e.item_id)] for e in ratings], dtype=np.float64
            )  # None -> nan -> the fallback: the mean rating so far
            self.scores["freshrec"].add_ratings(clip_predictions(ours, lo, hi, fallback), truths)
        if plan.topn_rows:
            ranks = np.array(
                [rank_in_list(*lists[events[n].user_id], events[n].item_id) for n in plan.topn_rows]
            )
            self.scores["freshrec"].add_ranks(ranks, np.array(plan.cold))
            for items, _ in lists.values():
                self.scores["freshrec"].topn.recommend(items)

        # --- the same funnel with fewer recall channels, same state (direct mode) ---------------
        for name, config in self.ablation.items():
            alt = await self.backend.recommend(plan.users, LIST_LENGTH, config)  # type: ignore[call-arg]
            alt_lists = dict(zip(plan.users, alt, strict=True))
            if plan.topn_rows:
                ranks = np.array(
                    [
                        rank_in_list(*alt_lists[events[n].user_id], events[n].item_id)
                        for n in plan.topn_rows
                    ]
                )
                self.scores[name].add_ranks(ranks, np.array(plan.cold))
                for items, _ in alt_lists.values():
                    self.scores[name].topn.recommend(items)

        # --- baselines, from the same state (before the chunk) -----------------------------------
        self._baselines_predict(events, plan, ratings, truths, fallback)

        # --- learn -----------------------------------------------------------------------------
        started = time.perf_counter()
        await self.backend.learn(events)
        self.ours_seconds += time.perf_counter() - started
        self._learn(events)
        self.rating_positions.extend(offset + n for n in plan.rating_rows)
        self.topn_positions.extend(offset + n for n in plan.topn_rows)
        self.events += len(events)

    def _baselines_predict(
        self,
        events: Sequence[Event],
        plan: _Chunk,
        ratings: list[Event],
        truths: np.ndarray,
        fallback: float,
    ) -> None:
        lo, hi = self.settings.rating_min, self.settings.rating_max
        if ratings:
            indices = [self.catalog[e.item_id] for e in ratings]
            pop = np.array([self.popularity.predict_rating(i) for i in indices])
            self.scores["popularity"].add_ratings(clip_predictions(pop, lo, hi, fallback), truths)
            river = np.array(
                [
                    self.river.predict_rating(e.user_id, i)
                    for e, i in zip(ratings, indices, strict=True)
                ]
            )
            self.scores["river_biased_mf"].add_ratings(
                clip_predictions(river, lo, hi, fallback), truths
            )
        if not plan.topn_rows:
            return
        n_items = plan.known
        row_of = {user: r for r, user in enumerate(plan.users)}
        candidates = np.ones((len(plan.users), n_items), dtype=bool)
        for r, user in enumerate(plan.users):
            candidates[r, self.seen_index.get(user, [])] = False
        rows = np.array([row_of[events[n].user_id] for n in plan.topn_rows])
        targets = np.array(plan.targets)
        cold = np.array(plan.cold)
        matrices = {
            "popularity": np.broadcast_to(
                self.popularity.scores(n_items), (len(plan.users), n_items)
            ),
            "river_biased_mf": self.river.scores(plan.users, n_items),
        }
        items = self.item_ids
        for name, matrix in matrices.items():
            if n_items == 0:
                ranks = np.full(len(rows), MISSING)
            else:
                ranks = pessimistic_ranks(matrix[rows], targets, candidates[rows])
            self.scores[name].add_ranks(ranks, cold)
            self._note_lists(name, matrix, candidates, items)

    def _note_lists(
        self, name: str, matrix: np.ndarray, candidates: np.ndarray, items: list[str]
    ) -> None:
        """The top ``COVERAGE_K`` unseen items of each user's row, for coverage."""
        if matrix.shape[1] == 0:
            return
        masked = np.where(candidates, matrix, -np.inf)
        k = min(COVERAGE_K, masked.shape[1])
        top = np.argpartition(-masked, k - 1, axis=1)[:, :k]
        accumulator = self.scores[name].topn
        for row, columns in enumerate(top):
            accumulator.recommend([items[c] for c in columns if np.isfinite(masked[row, c])])

    def _learn(self, events: Sequence[Event]) -> None:
        for e in events:
            self.users.add(e.user_id)
            if e.type not in INTERACTIONS:
                continue
            index = self.catalog[e.item_id]  # numbered by _plan
            rating = float(e.value) if e.type == "rating" else None  # type: ignore[arg-type]
            self.popularity.learn_one(index, rating)
            if rating is not None:
                self.river.learn_one(e.user_id, index, rating)
                self.rating_sum += rating
                self.rating_n += 1
            if e.item_id not in self.seen[e.user_id]:
                self.seen[e.user_id].add(e.item_id)
                self.seen_index[e.user_id].append(index)
            self.interactions[e.item_id] += 1

    # --- results -----------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        catalog = len(self.catalog)
        ours = self.scores["freshrec"]
        out: dict[str, Any] = {
            "events": self.events,
            "users": len(self.users),
            "items": catalog,
            "rating_events": ours.rating.n,
            "topn_events": ours.topn.n,
            "cold_event_share": round(ours.topn.cold_events / ours.topn.n, 6)
            if ours.topn.n
            else math.nan,
        }
        out.update(ours.metrics(catalog))
        out["events_per_s"] = round(self.events / max(self.ours_seconds, 1e-9), 1)
        out["baselines"] = {
            name: self.scores[name].metrics(catalog) for name in SYSTEMS if name != "freshrec"
        }
        if self.ablation:
            keep = ("hr@10", "hr@20", "ndcg@10", "mrr", "coverage")
            out["recall_ablation"] = {
                name: {key: self.scores[name].metrics(catalog)[key] for key in keep}
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
    chunk: int = 200,
    show_progress: bool = True,
    ablation: bool = False,
) -> dict[str, Any]:
    """Evaluate ``path`` prequentially in ``mode`` ("pipeline" or "direct"); the summary.

    ``ablation`` (direct mode) also scores the same funnel with MF recall only and with CF
    recall only, on the same state at the same moments.

    Services come from ``freshrec.devenv.local_services.resolve`` (started when not configured and
    stopped at the end); the run uses topics and keys of its own and deletes them at the end.
    """
    if mode not in ("pipeline", "direct"):
        raise ValueError(f"unknown mode {mode!r}; expected pipeline or direct")
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    if ablation and mode != "direct":
        raise ValueError("--ablation needs --mode direct (the reader serves one configuration)")
    path = Path(path)
    events, skipped, fmt = load_events(path, settings, fmt, limit)
    if not events:
        raise ValueError(f"{path}: no valid events to evaluate ({skipped} skipped)")

    # Topics and keys of its own on the shared services, all erased at the end.
    with isolated_run(
        settings, "eval", worker_metrics_port=0, serve_port=free_port()
    ) as run_settings:
        started = time.perf_counter()
        variants = _recall_ablation(run_settings) if ablation else None
        evaluation = asyncio.run(_run(run_settings, mode, events, chunk, show_progress, variants))
        wall = time.perf_counter() - started
    summary = {"mode": mode, "file": str(path), "format": fmt, "chunk": chunk}
    summary.update(evaluation.summary())
    summary["skipped"] = skipped
    summary["wall_s"] = round(wall, 2)
    if mode == "direct" and isinstance(evaluation.backend, DirectBackend):
        summary["sequential"] = _sequential(evaluation, events, settings)
    summary = _json_safe(summary)
    if out_dir is not None:
        summary["report"] = str(write_report(Path(out_dir), summary, evaluation))
    return summary


def _json_safe(value: Any) -> Any:
    """NaN (a metric with nothing to average, e.g. RMSE of a file without ratings) -> None."""
    if isinstance(value, dict):
        return {key: _json_safe(v) for key, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _sequential(evaluation: Evaluation, events: Sequence[Event], settings: Settings) -> dict:
    """Direct mode only: the per-event prequential error the updater itself measures.

    Every rating predicted just before its own update, no chunk staleness: the lower bound the
    chunked figure approaches as ``chunk`` goes to 1.
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
    ``freshrec``.
    """
    base = dataclasses.replace(settings.funnel_config(), exploration_slots=0)
    alone = dataclasses.replace(base, diversity=0.0)
    return {
        "all_channels": base,
        "mf_recall_only": dataclasses.replace(base, channels=("mf",)),
        "cf_recall_only": dataclasses.replace(base, channels=("cf",)),
        "mf_recall_alone": dataclasses.replace(alone, channels=("mf",), blend=(("mf", 1.0),)),
        "cf_recall_alone": dataclasses.replace(alone, channels=("cf",), blend=(("cf", 1.0),)),
    }


async def _run(
    settings: Settings,
    mode: str,
    events: list[Event],
    chunk: int,
    show_progress: bool,
    ablation: dict[str, FunnelConfig] | None = None,
) -> Evaluation:
    redis = Redis.from_url(settings.redis_url, socket_timeout=10)
    processes: Children | None = None
    backend: Any = None
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
            processes.start("worker", ["worker", "--loglevel", "warning"])
            processes.start("reader", ["serve"])
            base_url = f"http://{settings.serve_host}:{settings.serve_port}"
            processes.wait(lambda: http_json(base_url + "/healthz")[0] == 200, 60, "the reader")
            processes.wait(
                lambda: group_is_consuming(
                    settings.kafka_bootstrap, f"{settings.topic_prefix}-worker"
                ),
                90,
                "the worker to join its consumer group",
            )
            backend = PipelineBackend(settings, redis, base_url, processes.check)
        evaluation = Evaluation(settings, backend, ablation)
        progress = Progress(len(events), f"eval {mode}") if show_progress else None
        for offset in range(0, len(events), chunk):
            batch = events[offset : offset + chunk]
            await evaluation.step(batch, offset)
            if progress is not None:
                ours = evaluation.scores["freshrec"]
                progress.advance(
                    len(batch), note=f"rmse {ours.rating.rmse:.3f}  hr@10 {ours.topn.hr(10):.3f}"
                )
        if progress is not None:
            progress.close()
        return evaluation
    finally:
        if backend is not None:
            await backend.close()
        await redis.aclose()
        if processes is not None:
            processes.stop()
