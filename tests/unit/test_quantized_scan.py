"""The int8 scan returns exactly a float32 full scan's top n, on any data, as rows change."""

from __future__ import annotations

import numpy as np
import pytest

from freshrec.models.quantized_scan import QuantizedRows, quantized

ITEMS, FACTORS, N = 5000, 32, 100


def _full_scan(
    vectors: np.ndarray, query: np.ndarray, excluded: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """The reference: every row scored in float32, factor by factor in order, stable sort."""
    scores = np.zeros(len(vectors), dtype=np.float32)
    for f in range(vectors.shape[1]):
        scores = scores + vectors[:, f] * query[f]
    candidates = np.flatnonzero(~excluded[: len(vectors)])
    ranked = candidates[np.argsort(-scores[candidates], kind="stable")][:n]
    return ranked, scores[ranked]


def _assert_exact(rows_index: QuantizedRows, vectors, query, excluded, n=N) -> None:  # type: ignore[no-untyped-def]
    rows, scores = rows_index.top(query, n, vectors, len(vectors), excluded)
    expected_rows, expected_scores = _full_scan(vectors, query, excluded, n)
    assert rows.tolist() == expected_rows.tolist()
    np.testing.assert_array_equal(scores, expected_scores)


def _indexed(vectors: np.ndarray) -> QuantizedRows:
    index = QuantizedRows(vectors.shape[1])
    index.place(vectors, len(vectors), np.arange(len(vectors)))
    return index


@pytest.mark.parametrize(
    "make",
    [
        lambda rng: rng.normal(0, 0.3, (ITEMS, FACTORS)),
        # norms spread over three orders of magnitude
        lambda rng: rng.normal(0, 0.3, (ITEMS, FACTORS)) * np.exp(rng.normal(0, 2, (ITEMS, 1))),
        # one factor dominates each row's scale, so the others get coarse codes
        lambda rng: (
            rng.normal(0, 0.1, (ITEMS, FACTORS)) + 5 * np.eye(FACTORS)[rng.integers(0, 4, ITEMS)]
        ),
    ],
    ids=["gaussian", "spread-norms", "one-big-factor"],
)
def test_the_scan_equals_a_float32_full_scan(make) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    vectors = make(rng).astype(np.float32)
    index = _indexed(vectors)
    for _ in range(30):
        excluded = rng.random(ITEMS) < 0.02
        _assert_exact(index, vectors, rng.normal(0, 1, FACTORS).astype(np.float32), excluded)


def test_ties_go_to_the_lower_row_and_zero_rows_are_scored() -> None:
    rng = np.random.default_rng(1)
    vectors = np.repeat(rng.normal(0, 1, (50, FACTORS)), 40, axis=0).astype(np.float32)
    vectors[::7] = 0.0  # rows with scale 0
    index = _indexed(vectors)
    for _ in range(10):
        query = rng.normal(0, 1, FACTORS).astype(np.float32)
        _assert_exact(index, vectors, query, np.zeros(len(vectors), dtype=bool))
        _assert_exact(index, vectors, -np.abs(query), np.zeros(len(vectors), dtype=bool))


def test_fewer_rows_than_n_and_everything_excluded() -> None:
    rng = np.random.default_rng(2)
    vectors = rng.normal(0, 1, (30, FACTORS)).astype(np.float32)
    index = _indexed(vectors)
    query = rng.normal(0, 1, FACTORS).astype(np.float32)
    excluded = rng.random(30) < 0.5
    _assert_exact(index, vectors, query, excluded)  # n > the rows left
    rows, scores = index.top(query, N, vectors, 30, np.ones(30, dtype=bool))
    assert len(rows) == len(scores) == 0


def test_changed_and_new_rows_are_coded_again() -> None:
    rng = np.random.default_rng(3)
    vectors = np.zeros((ITEMS + 2000, FACTORS), dtype=np.float32)
    vectors[:ITEMS] = rng.normal(0, 0.3, (ITEMS, FACTORS))
    index = QuantizedRows(FACTORS)
    index.place(vectors, ITEMS, np.arange(ITEMS))
    query = rng.normal(0, 1, FACTORS).astype(np.float32)
    moved = rng.choice(ITEMS, 300, replace=False)
    vectors[moved] = 3.0 * query / np.linalg.norm(query) + rng.normal(0, 0.1, (300, FACTORS))
    index.place(vectors, ITEMS, moved)  # the moved rows now lead
    _assert_exact(index, vectors[:ITEMS], query, np.zeros(ITEMS, dtype=bool))
    vectors[ITEMS:] = rng.normal(0, 2.0, (2000, FACTORS))
    index.place(vectors, ITEMS + 2000, np.arange(ITEMS, ITEMS + 2000))  # past the codes' width
    _assert_exact(index, vectors, query, np.zeros(ITEMS + 2000, dtype=bool))


def test_codes_are_within_half_a_scale_step() -> None:
    rng = np.random.default_rng(4)
    vectors = rng.normal(0, 1, (500, FACTORS)).astype(np.float32)
    vectors[0] = 0.0
    scale, codes = quantized(vectors)
    assert codes.dtype == np.int8 and np.abs(codes).max() <= 127
    error = np.abs(vectors - scale[:, None] * codes.astype(np.float32))
    assert (error <= scale[:, None] / 2 * (1 + 1e-5) + 1e-12).all()
    assert scale[0] == 0 and not codes[0].any()
