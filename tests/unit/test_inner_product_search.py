"""The cell search returns a full scan's top n, on any data, as vectors move and rows arrive."""

from __future__ import annotations

import numpy as np
import pytest

from freshrec.models.inner_product_search import CELL_SIZE, MIN_CELLS, CellIndex

ITEMS, FACTORS, N = 6000, 16, 50


def _clustered(rng: np.random.Generator, rows: int, spread: float = 0.1) -> np.ndarray:
    centres = np.random.default_rng(99).normal(0, 0.5, (12, FACTORS))  # the same tastes
    picks = centres[rng.integers(0, 12, rows)]
    return (picks + rng.normal(0, spread, (rows, FACTORS))).astype(np.float32)


def _gaussian(rng: np.random.Generator, rows: int) -> np.ndarray:
    return rng.normal(0, 0.3, (rows, FACTORS)).astype(np.float32)


def _assert_a_full_scans_top(
    cells: CellIndex,
    query: np.ndarray,
    vectors: np.ndarray,
    excluded: np.ndarray,
    read_share: float | None = None,
) -> None:
    rows, scores = cells.top(query, N, vectors, len(vectors), excluded, read_share=read_share)
    exact = vectors.astype(np.float64) @ query.astype(np.float64)
    exact[excluded] = -np.inf
    nth = np.sort(exact)[::-1][N - 1]
    assert len(rows) == N == len(set(rows.tolist())) and not excluded[rows].any()
    np.testing.assert_allclose(scores, exact[rows], rtol=1e-5, atol=1e-5)  # what it says
    assert (np.diff(scores) <= 0).all()  # best first
    assert (exact[rows] >= nth - 1e-5).all()  # nothing better was left out, but for rounding


@pytest.mark.parametrize("make", [_clustered, _gaussian])
def test_the_search_equals_a_full_scan(make) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    vectors = make(rng, ITEMS)
    cells = CellIndex(FACTORS)
    cells.place(vectors, ITEMS, np.arange(ITEMS))
    for _ in range(50):
        excluded = rng.random(ITEMS) < 0.01
        _assert_a_full_scans_top(cells, make(rng, 1)[0], vectors, excluded)


def test_on_clustered_factors_most_items_are_skipped() -> None:
    rng = np.random.default_rng(1)
    vectors = _clustered(rng, ITEMS, spread=0.05)
    cells = CellIndex(FACTORS)
    cells.place(vectors, ITEMS, np.arange(ITEMS))
    read = []
    for _ in range(20):
        query = _clustered(rng, 1, spread=0.05)[0]
        cells.top(query, N, vectors, ITEMS, np.zeros(ITEMS, dtype=bool))
        read.append(cells.last_scanned)
    assert np.median(read) < ITEMS / 4


def test_the_cell_ordered_copy_follows_every_placed_vector() -> None:
    rng = np.random.default_rng(6)
    vectors = _clustered(rng, ITEMS)
    cells = CellIndex(FACTORS)
    cells.place(vectors, ITEMS, np.arange(ITEMS))
    for spread in (0.001, 0.001, 0.3):  # moves within cells, then across them
        moved = rng.choice(ITEMS, 500, replace=False)
        vectors[moved] += rng.normal(0, spread, (500, FACTORS)).astype(np.float32)
        cells.place(vectors, ITEMS, moved)
        np.testing.assert_array_equal(cells.grouped[: len(cells.order)], vectors[cells.order])
        assert sorted(cells.order.tolist()) == list(range(ITEMS))


def test_moved_vectors_and_new_rows_are_found_before_a_refit() -> None:
    rng = np.random.default_rng(2)
    vectors = np.zeros((ITEMS + 500, FACTORS), dtype=np.float32)
    vectors[:ITEMS] = _clustered(rng, ITEMS)
    cells = CellIndex(FACTORS)
    cells.place(vectors, ITEMS, np.arange(ITEMS))
    query = vectors[0] * 3.0
    moved = rng.choice(ITEMS, 300, replace=False)
    vectors[moved] = query / 2  # now among the best, far from their cells
    cells.place(vectors, ITEMS, moved)
    _assert_a_full_scans_top(cells, query, vectors[:ITEMS], np.zeros(ITEMS, dtype=bool))
    vectors[ITEMS:] = query  # new rows, the very best: not yet placed, read all the same
    rows, _ = cells.top(query, N, vectors, ITEMS + 500, np.zeros(ITEMS + 500, dtype=bool))
    assert (rows >= ITEMS).all()
    cells.place(vectors, ITEMS + 500, np.arange(ITEMS, ITEMS + 500))
    assert cells.covered == ITEMS + 500 and cells.fit_for == ITEMS  # placed, not refit


def test_cells_are_refit_once_drift_has_loosened_the_bound() -> None:
    rng = np.random.default_rng(5)
    vectors = _clustered(rng, ITEMS)
    cells = CellIndex(FACTORS)
    cells.place(vectors, ITEMS, np.arange(ITEMS))
    fitted = cells.centroids.copy()
    for _ in range(3):  # the model learns: everything moves a little
        moved = rng.choice(ITEMS, ITEMS // 3, replace=False)
        vectors[moved] += rng.normal(0, 0.08, (len(moved), FACTORS)).astype(np.float32)
        cells.place(vectors, ITEMS, moved)
        _assert_a_full_scans_top(cells, _clustered(rng, 1)[0], vectors, np.zeros(ITEMS, bool))
    assert not np.array_equal(cells.centroids, fitted)
    assert cells.radius.mean() <= 1.25 * cells.fit_radius


def test_ties_go_to_the_lower_row() -> None:
    rng = np.random.default_rng(3)
    # Small integers: every score is exact in float32, and many are equal.
    centres = rng.integers(-2, 3, (6, FACTORS))
    vectors = (centres[rng.integers(0, 6, ITEMS)] + rng.integers(-1, 2, (ITEMS, FACTORS))).astype(
        np.float32
    )
    cells = CellIndex(FACTORS)
    cells.place(vectors, ITEMS, np.arange(ITEMS))
    for _ in range(20):
        query = centres[rng.integers(0, 6)].astype(np.float32)
        rows, _ = cells.top(query, N, vectors, ITEMS, np.zeros(ITEMS, dtype=bool))
        exact = vectors.astype(np.float64) @ query.astype(np.float64)
        assert rows.tolist() == np.lexsort((np.arange(ITEMS), -exact))[:N].tolist()


def test_a_small_catalogue_is_scanned_flat_and_exactly() -> None:
    rng = np.random.default_rng(4)
    size = CELL_SIZE * MIN_CELLS - 1
    vectors = _gaussian(rng, size)
    cells = CellIndex(FACTORS)
    cells.place(vectors, size, np.arange(size))
    assert cells.covered == 0  # no cells
    rows, _ = cells.top(vectors[0], 5, vectors, size, np.zeros(size, dtype=bool))
    expected = np.argsort(-(vectors.astype(np.float64) @ vectors[0]), kind="stable")[:5]
    assert rows.tolist() == expected.tolist() and cells.last_scanned == size


def test_a_background_refit_keeps_every_search_exact_and_is_adopted() -> None:
    rng = np.random.default_rng(7)
    vectors = np.zeros((2 * ITEMS + 10, FACTORS), dtype=np.float32)
    vectors[:ITEMS] = _clustered(rng, ITEMS)
    cells = CellIndex(FACTORS, background=True)
    cells.place(vectors, ITEMS, np.arange(ITEMS))  # the first fit runs at once
    fitted = cells.centroids.copy()
    vectors[ITEMS:] = _clustered(rng, ITEMS + 10)  # the catalogue doubles: a refit is due
    cells.place(vectors, 2 * ITEMS, np.arange(ITEMS, 2 * ITEMS))
    moved = rng.choice(2 * ITEMS, 400, replace=False)  # rows change while the refit runs
    vectors[moved] = _clustered(rng, 400) * 1.5
    cells.place(vectors, 2 * ITEMS, moved)
    count = 2 * ITEMS + 10
    cells.place(vectors, count, np.arange(2 * ITEMS, count))
    for _ in range(10):
        query = _clustered(rng, 1)[0]
        _assert_a_full_scans_top(cells, query, vectors[:count], np.zeros(count, dtype=bool))
    cells.wait(vectors, count)
    assert cells.fit_for == 2 * ITEMS and not np.array_equal(cells.centroids, fitted)
    np.testing.assert_array_equal(cells.grouped[: len(cells.order)], vectors[cells.order])
    for _ in range(10):
        query = _clustered(rng, 1)[0]
        _assert_a_full_scans_top(cells, query, vectors[:count], np.zeros(count, dtype=bool))


def test_an_approximate_search_reads_its_share_of_the_best_cells() -> None:
    rng = np.random.default_rng(8)
    vectors = _gaussian(rng, ITEMS)  # no clusters: the exact search would read every row
    cells = CellIndex(FACTORS, read_share=0.2)
    cells.place(vectors, ITEMS, np.arange(ITEMS))
    largest_cell = int(np.diff(cells.start).max())
    recalls = []
    for _ in range(30):
        query = _gaussian(rng, 1)[0]
        excluded = rng.random(ITEMS) < 0.01
        rows, scores = cells.top(query, N, vectors, ITEMS, excluded)
        exact = vectors.astype(np.float64) @ query.astype(np.float64)
        np.testing.assert_allclose(scores, exact[rows], rtol=1e-5, atol=1e-5)
        assert len(rows) == N == len(set(rows.tolist())) and not excluded[rows].any()
        assert 0.2 * ITEMS <= cells.last_scanned < 0.2 * ITEMS + largest_cell
        exact[excluded] = -np.inf
        recalls.append(len(np.intersect1d(rows, np.argsort(-exact)[:N])) / N)
    # A fifth of the rows, the cells whose bound is highest: better than a random fifth's 0.2.
    assert np.mean(recalls) > 0.4


def test_a_search_may_ask_for_its_own_read_share() -> None:
    """A funnel configuration's share (`FunnelConfig.mf_read_share`) for one search is the
    index's own approximate mode; 1 is the exact answer whatever the index's share."""
    rng = np.random.default_rng(9)
    vectors = _gaussian(rng, ITEMS)
    per_search, own = CellIndex(FACTORS), CellIndex(FACTORS, read_share=0.2)
    for cells in (per_search, own):
        cells.place(vectors, ITEMS, np.arange(ITEMS))
    for _ in range(10):
        query = _gaussian(rng, 1)[0]
        excluded = rng.random(ITEMS) < 0.01
        rows, scores = per_search.top(query, N, vectors, ITEMS, excluded, read_share=0.2)
        scanned = per_search.last_scanned
        expected_rows, expected_scores = own.top(query, N, vectors, ITEMS, excluded)
        np.testing.assert_array_equal(rows, expected_rows)
        np.testing.assert_array_equal(scores, expected_scores)
        assert scanned == own.last_scanned < ITEMS
        _assert_a_full_scans_top(own, query, vectors, excluded, read_share=1.0)
