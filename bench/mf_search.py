"""MF recall's search side by side: the exact cell search against approximate indexes.

For each user of a sample, the n best items by ``y_u . y_i`` that the user has not seen, as the
reader asks them (`freshrec.serving.item_index.ItemIndex.top_rows`), found by

- ``exact``: `freshrec.models.inner_product_search.CellIndex`, the reader's search (k-means
  cells with the ball bound; flat when the bound does not prune);
- ``flat``: one ``np.dot`` over every item and an exact top-n, for scale;
- ``hnsw``: faiss's HNSW graph (Malkov & Yashunin, *Efficient and robust approximate nearest
  neighbor search using Hierarchical Navigable Small World graphs*, TPAMI 2018) over inner
  products, at a few ``efSearch``;
- ``hnsw-l2``: the same graph in L2 over vectors with one more element,
  :math:`\\sqrt{M^2 - \\lVert y_i \\rVert^2}` (0 for the query), which turns the largest inner
  product into the nearest neighbour (Bachrach et al., *Speeding up the Xbox recommender
  system using a Euclidean transformation for inner-product spaces*, RecSys 2014);
- ``ivf``: faiss's inverted lists over k-means cells (``IndexIVFFlat``, inner product) at a
  few ``nprobe``: the cell search without the bound, reading a fixed number of cells;
- ``cells read=x%``: the reader's own cells, approximate: the best cells by their bound until
  that share of the items is read (`CellIndex` with ``read_share``).

An approximate index is asked for n plus the user's seen items, which are then dropped, so the
answer is filtered as the exact one is. Each query is timed alone, one after another on one
thread, as the reader runs them; recall@n is the share of the exact answer each finds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from freshrec.models.inner_product_search import CellIndex
from freshrec.models.top_k import top_n

Search = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``search(query, seen_rows)`` -> the rows found, best first, none of them seen."""

HNSW_M = 32  # links per node above the bottom layer (twice that on it)
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = (128, 256, 512)
IVF_NPROBE = (8, 32, 64)
CELL_SHARES = (0.05, 0.1, 0.2)


def compare_searches(
    items: np.ndarray,
    users: np.ndarray,
    seen: list[np.ndarray],
    n: int = 100,
) -> dict[str, Any]:
    """Per-query latency (median, p90, p99 in µs), recall@n against ``exact`` and the share of
    items scored, for every search above that can run here, over the queries ``users`` with
    their ``seen`` rows; and each index's build time."""
    items = np.ascontiguousarray(items, dtype=np.float32)
    users = np.ascontiguousarray(users, dtype=np.float32)
    count = len(items)
    cells = CellIndex(items.shape[1])
    started = time.perf_counter()
    cells.place(items, count, np.arange(count))
    built = {"exact": time.perf_counter() - started, "flat": 0.0}
    mask = np.zeros(count, dtype=bool)
    read: list[int] = []

    def exact(query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        mask[rows] = True
        found, _ = cells.top(query, n, items, count, mask)
        mask[rows] = False
        read.append(cells.last_scanned)
        return found

    def flat(query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        scores = np.dot(items, query)
        scores[rows] = -np.inf
        return top_n(scores, n)

    searches: dict[str, Search] = {"exact": exact, "flat": flat}
    for share in CELL_SHARES:
        searches[f"cells read={share:.0%}"] = _cells_search(items, n, share, built)
    notes = []
    try:
        searches.update(_faiss_searches(items, n, built))
    except ImportError:
        notes.append("faiss is not installed (pip install faiss-cpu): exact and flat only")
    truth = [exact(q, s) for q, s in zip(users, seen, strict=True)]  # also warms the kernels
    read.clear()
    results: dict[str, Any] = {}
    for name, search in searches.items():
        for query, rows in zip(users[:20], seen[:20], strict=True):
            search(query, rows)  # warm caches
        laps, found = [], []
        for query, rows in zip(users, seen, strict=True):
            begin = time.perf_counter_ns()
            answer = search(query, rows)
            laps.append(time.perf_counter_ns() - begin)
            found.append(answer)
        us = np.array(laps) / 1000.0
        recall = [
            len(np.intersect1d(a, t)) / max(len(t), 1) for a, t in zip(found, truth, strict=True)
        ]
        results[name] = {
            "p50_us": round(float(np.percentile(us, 50)), 1),
            "p90_us": round(float(np.percentile(us, 90)), 1),
            "p99_us": round(float(np.percentile(us, 99)), 1),
            "recall": round(float(np.mean(recall)), 4),
            "recall_min": round(float(np.min(recall)), 4),
            "build_s": round(built.get(name.split(" ")[0], 0.0), 2),
        }
    results["exact"]["share_read"] = round(float(np.mean(read)) / count, 4)
    return {"items": count, "queries": len(users), "n": n, "searches": results, "notes": notes}


def _cells_search(items: np.ndarray, n: int, share: float, built: dict[str, float]) -> Search:
    count = len(items)
    started = time.perf_counter()
    cells = CellIndex(items.shape[1], read_share=share)
    cells.place(items, count, np.arange(count))
    built["cells"] = time.perf_counter() - started
    mask = np.zeros(count, dtype=bool)

    def search(query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        mask[rows] = True
        found, _ = cells.top(query, n, items, count, mask)
        mask[rows] = False
        return found

    return search


def _faiss_searches(items: np.ndarray, n: int, built: dict[str, float]) -> dict[str, Search]:
    import faiss

    faiss.omp_set_num_threads(1)  # one query at a time on a shared core, as the reader runs
    count, width = items.shape
    out: dict[str, Search] = {}

    started = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(width, HNSW_M, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    hnsw.add(items)
    built["hnsw"] = time.perf_counter() - started

    norms = np.linalg.norm(items, axis=1)
    extra = np.sqrt(np.maximum(norms.max() ** 2 - norms**2, 0.0)).astype(np.float32)
    started = time.perf_counter()
    hnsw_l2 = faiss.IndexHNSWFlat(width + 1, HNSW_M)
    hnsw_l2.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    hnsw_l2.add(np.hstack([items, extra[:, None]]))
    built["hnsw-l2"] = time.perf_counter() - started

    started = time.perf_counter()
    lists = max(8, int(np.sqrt(count)))
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(width), width, lists, faiss.METRIC_INNER_PRODUCT)
    ivf.train(items)
    ivf.add(items)
    built["ivf"] = time.perf_counter() - started

    def searcher(index: Any, params: Any, widen: bool) -> Search:
        def search(query: np.ndarray, rows: np.ndarray) -> np.ndarray:
            q = np.append(query, np.float32(0.0)) if widen else query
            _, found = index.search(q[None, :], n + len(rows), params=params)
            found = found[0]
            keep = (found >= 0) & ~np.isin(found, rows)
            return found[keep][:n]

        return search

    for ef in HNSW_EF_SEARCH:
        params = faiss.SearchParametersHNSW(efSearch=ef)
        out[f"hnsw ef={ef}"] = searcher(hnsw, params, False)
        out[f"hnsw-l2 ef={ef}"] = searcher(hnsw_l2, params, True)
    for probe in IVF_NPROBE:
        out[f"ivf nprobe={probe}"] = searcher(ivf, faiss.SearchParametersIVF(nprobe=probe), False)
    return out


def format_search_comparison(results: dict[str, Any]) -> str:
    lines = [
        f"MF recall's search, {results['items']:,} items, {results['queries']:,} queries one "
        f"at a time, top {results['n']} of the unseen",
        f"{'search':<22} {'p50 µs':>8} {'p90 µs':>8} {'p99 µs':>8} {'recall':>7} "
        f"{'worst':>6} {'build s':>8} {'served':>7}",
    ]
    for name, r in results["searches"].items():
        served = r.get("served_overlap")
        lines.append(
            f"{name:<22} {r['p50_us']:>8.1f} {r['p90_us']:>8.1f} {r['p99_us']:>8.1f} "
            f"{r['recall']:>7.4f} {r['recall_min']:>6.2f} {r['build_s']:>8.2f} "
            f"{'-' if served is None else f'{served:.4f}':>7}"
        )
    lines.append(
        f"exact search read {100 * results['searches']['exact']['share_read']:.1f}% "
        "of the items per query; served: the share of a served top 10 the exact search's "
        "list also holds (the reader's funnel, in process)"
    )
    lines.extend(results["notes"])
    return "\n".join(lines)
