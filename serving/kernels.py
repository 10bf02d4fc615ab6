"""The funnel's compiled kernels, made ready before anything is served.

Recall's merge, the ranking features, rerank, MF recall's cell search, the scatter of neighbour
lists read from Redis and the rating predictor's signals are numba functions compiled on their
first call, for the argument types of that call, and cached on disk (``NUMBA_CACHE_DIR``, by
default under ``FRESHREC_HOME``: see `freshrec`). Compiling them all takes from half a minute to
a couple of minutes on a small machine; loading them from the cache about a second. Whatever
pays for that first call must not be a request, so `warm_up` calls each kernel once with tiny
inputs built the way the request path builds its own (same dtypes, same number of dimensions,
same memory layouts, and the configuration's own scalars), which compiles or loads exactly the
specialisations requests then use. The reader runs it before it binds its port; in-process users
of the funnel (``freshrec eval``) before their first request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from freshrec.models import inner_product_search, quantized_scan, rating_stack
from freshrec.models.click_model import FEATURES, FIXED_BLEND
from freshrec.models.inner_product_search import CELL_SIZE, MIN_CELLS, CellIndex
from freshrec.models.mf import implicit_part, vector_width
from freshrec.models.rating_stack import PAIR_FIELDS, RatingRecord
from freshrec.models.rating_stack import features as rating_features
from freshrec.serving import features as features_module
from freshrec.serving.features import candidate_features
from freshrec.serving.funnel_config import FunnelConfig
from freshrec.serving.item_index import STATS, fill_lists
from freshrec.serving.recall import CF, COLD, MF, TRENDING, Recalled, Scratch, merge_channels
from freshrec.serving.rerank import rerank

log = logging.getLogger(__name__)

KERNELS = (
    merge_channels,
    features_module._features,
    rerank,
    inner_product_search.top_inner_products,
    quantized_scan.top_quantized,
    fill_lists,
    # The cell index's upkeep, run by every refresh of the item snapshot on the event loop.
    inner_product_search._sums,
    inner_product_search._widen,
    inner_product_search._covered,
    inner_product_search._grouped,
    # A rating's features, for /predict (and the learner, in workers and direct evaluation).
    rating_stack._record_signals,
)
"""Every compiled function the reader calls directly (their callees compile with them)."""

_FACTORS = 4  # any width: a kernel's specialisation depends on types, not shapes


@dataclass(frozen=True)
class WarmUp:
    """What `warm_up` did: kernels compiled now, loaded from the cache, and where that is."""

    seconds: float
    compiled: int
    loaded: int
    cache_dir: str

    def __str__(self) -> str:
        return (
            f"kernels ready in {self.seconds:.1f} s: {self.compiled} compiled, "
            f"{self.loaded} loaded from the cache in {self.cache_dir}"
        )


def warm_up(configs: Iterable[FunnelConfig] = ()) -> WarmUp:
    """Compile, or load from the cache, every kernel a request can call; safe to call again.

    ``configs`` are the funnel configurations that will be served (a reader's variants): their
    scalars are passed as they are, so a setting given as an int where the default is a float
    gets its own specialisation now rather than on a request. With none, the defaults'.
    """
    started = time.perf_counter()
    before = [_counts(kernel) for kernel in KERNELS]
    log.info("warming up the funnel's compiled kernels (cache: %s)", cache_dir())
    for config in list(configs) or [FunnelConfig()]:
        _funnel_stages(config)
        _empty_catalogue(config)
    _cell_search()
    _neighbour_lists()
    _rating_signals()
    after = [_counts(kernel) for kernel in KERNELS]
    done = WarmUp(
        seconds=time.perf_counter() - started,
        compiled=sum(a[0] - b[0] for a, b in zip(after, before, strict=True)),
        loaded=sum(a[1] - b[1] for a, b in zip(after, before, strict=True)),
        cache_dir=cache_dir(),
    )
    log.info("%s", done)
    return done


def cache_dir() -> str:
    """Where numba keeps these kernels (it picks the folder when their module is imported)."""
    return str(merge_channels.stats.cache_path)


def _counts(kernel: object) -> tuple[int, int]:
    stats = kernel.stats  # type: ignore[attr-defined]
    return sum(stats.cache_misses.values()), sum(stats.cache_hits.values())


def _funnel_stages(config: FunnelConfig) -> None:
    """Recall, features and rerank on four items, with arrays made as `Funnel.serve` makes them.

    Item 0 is the user's history and the seed; its neighbours are items 2 and 1; MF finds 3
    and 1; item 1 is cold, so the exploration slot has a candidate.
    """
    # The item snapshot, as `ItemIndex` holds it.
    matrix = np.eye(4, _FACTORS, dtype=np.float32)
    stats = np.ones((4, len(STATS)))  # occurrences, popularity, first seen, rating bias
    neighbours = np.full((4, 2), -1, dtype=np.int64)
    neighbours[0] = (2, 1)
    weights = np.zeros((4, 2))
    weights[0] = (4.0, 1.0)
    # The per-refresh pools, as `Funnel._refresh` makes them.
    trending = np.array([0, 2, 3], dtype=np.int64)
    cold = np.array([1], dtype=np.int64)
    cold_impressions = np.zeros(1)
    unavailable = np.zeros(4, dtype=bool)
    # The user, as `Funnel._user` reads it: rows of the history, the vector a float64 view.
    history = np.array([0], dtype=np.int64)
    seeds = history[history >= 0]
    y_user = implicit_part(np.ones(vector_width(_FACTORS)), _FACTORS)
    scratch = Scratch()
    with scratch.seen(len(matrix), history) as seen:
        recalled = Recalled(
            *merge_channels(
                seen,
                scratch.cf_slot,
                scratch.candidate_slot,
                seeds,
                np.exp(-np.arange(len(seeds)) / config.cf_recency),
                np.zeros(len(seeds)),
                neighbours,
                weights,
                stats[:, 0],
                1.0,
                config.recall_per_seed,
                np.array([3, 1], dtype=np.int64),
                trending[: config.recall_popular + 10],
                cold,
                cold_impressions < config.cold_max_impressions,
                config.recall_cold,
                CF | MF | TRENDING | COLD,
            )
        )
    for y in (y_user, None):  # a known user and an unknown one share a specialisation
        features = candidate_features(recalled, stats, matrix, y, 3600.0, len(history))
    blend = np.array([FIXED_BLEND.get(name, 0.0) for name in FEATURES])
    keep = np.argsort(-np.dot(features, blend), kind="stable")
    rerank(
        recalled.rows[keep],
        np.dot(features[keep], blend),
        np.ones(len(keep)),
        unavailable,
        recalled.cold_slot[keep],
        np.zeros(len(recalled.cold)),
        cold_impressions[recalled.cold],
        float(len(recalled.cold)),
        0.0,
        config.ucb_beta,
        config.exploration_slots,
        matrix,
        config.diversity,
        3,
    )


def _empty_catalogue(config: FunnelConfig) -> None:
    """Recall before the reader has loaded any item, as the first requests of a new system are.

    The occurrence counts recall reads are a column of the statistics matrix: a strided view
    (layout "A" to numba) once the snapshot has rows, but a contiguous one ("C") while it has
    none, which numba compiles apart. With no candidates the later stages do not run.
    """
    stats = np.zeros((0, len(STATS)))
    nothing = np.empty(0, dtype=np.int64)
    scratch = Scratch()
    with scratch.seen(0, nothing) as seen:
        merge_channels(
            seen,
            scratch.cf_slot,
            scratch.candidate_slot,
            nothing,
            np.empty(0),
            np.empty(0),
            np.full((0, 2), -1, dtype=np.int64),
            np.zeros((0, 2)),
            stats[:, 0],
            1.0,
            config.recall_per_seed,
            nothing,
            nothing[: config.recall_popular + 10],
            nothing,
            np.empty(0) < config.cold_max_impressions,
            config.recall_cold,
            CF | MF | TRENDING | COLD,
        )


def _neighbour_lists() -> None:
    """Two neighbour lists read from Redis into the index's rows, as `ItemIndex.load_neighbours`
    parses them: the weights a read-only view of the reply."""
    fill_lists(
        np.array([0, 1], dtype=np.int64),
        np.array([1, 1], dtype=np.int64),
        np.array([1, 1], dtype=np.int64),
        np.array([1, -1], dtype=np.int64),
        np.frombuffer(np.ones(2).tobytes(), "<f8"),
        np.full((2, 2), -1, dtype=np.int64),
        np.zeros((2, 2)),
        np.zeros(2, dtype=np.int64),
    )


def _rating_signals() -> None:
    """A rating's features as `Funnel.predict_many` builds them (the pair rows and the partners'
    counts read-only views of the reply) and as the learner does (arrays of its own)."""
    records = [RatingRecord("a", 4.0, 0.5, 0.25, 0.1, 0.0)]
    pairs = np.frombuffer(np.ones(PAIR_FIELDS, dtype="<f4").tobytes(), "<f4")
    partners = np.frombuffer(np.ones(1).tobytes(), "<f8")
    for rows, counts in ((pairs, partners), (pairs.astype(np.float64), partners.copy())):
        rating_features(
            3.5, 0.1, -0.1, 0.2, 2.0, 3.0, records, rows.reshape(-1, PAIR_FIELDS), counts
        )


def _cell_search() -> None:
    """The first fit of MF recall's cells, a row placed after it, and one search over them and
    one flat."""
    count = CELL_SIZE * MIN_CELLS  # the fewest rows that get cells
    matrix = np.random.default_rng(0).normal(size=(count + 1, _FACTORS)).astype(np.float32)
    matrix[count] = matrix[0]  # a new row that widens no cell, so it is placed, not refit
    cells = CellIndex(_FACTORS)
    cells.place(matrix, count, np.arange(count))
    cells.place(matrix, count + 1, np.array([count]))
    excluded = np.zeros(count + 1, dtype=bool)
    cells.top(np.ones(_FACTORS), 5, matrix, count + 1, excluded)
    cells.flat.top(np.ones(_FACTORS), 5, matrix, count + 1, excluded)
