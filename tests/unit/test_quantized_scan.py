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


def test_the_bound_has_room_for_float32_rounding() -> None:
    """Pairs of rows each coded with exactly half a step of error, in opposite directions, whose
    float32 scores differ by about a rounding: a bound without room for float32 rounding drops
    the better row of many of them."""
    rng = np.random.default_rng(5)
    for factors in (3, 8, 32, 128):
        for trial in range(400):
            y = rng.normal(0, 1, factors).astype(np.float32)
            y[0] = np.float32(1e-7) * abs(y[0])
            y[1] = np.float32(np.abs(y[2:].astype(np.float64)).sum() * (1 + rng.normal(0, 3e-7)))
            sign = np.where(y >= 0, 1.0, -1.0)
            first = 2 * rng.integers(-62, 63, factors)
            first[0] = 127
            second = first + 2 * sign.astype(int)
            second[:2] = first[:2]
            a, b = first + 0.5 * sign, second - 0.5 * sign
            a[0] = b[0] = 127
            pair = np.array([b, a] if trial % 2 else [a, b]) * 2.0 ** rng.integers(-4, 4)
            vectors = pair.astype(np.float32)
            query = (y * np.float32(2.0 ** rng.integers(-10, 10))).astype(np.float32)
            _assert_exact(_indexed(vectors), vectors, query, np.zeros(2, dtype=bool), n=1)


@pytest.mark.parametrize(
    ("rows", "query"),
    [
        # subnormal rows: a scale floored at the smallest normal float32 keeps the bound
        ([[63, 63], [64, 0]], [1e30, 1e30]),
        ([[190, 0], [254, 66]], [1.0, -1.0]),
    ],
)
def test_rows_too_small_for_a_normal_scale(rows, query) -> None:  # type: ignore[no-untyped-def]
    vectors = (np.array(rows, dtype=np.float64) * 2.0**-149).astype(np.float32)
    query = np.array(query, dtype=np.float32)
    _assert_exact(_indexed(vectors), vectors, query, np.zeros(2, dtype=bool), n=1)


def test_sums_that_could_overflow_are_scored_in_full() -> None:
    vectors = np.array([[-1e-30, 0.0], [-1e-3, 1.0], [0.5, -2.0]], dtype=np.float32)
    index = _indexed(vectors)
    _assert_exact(index, vectors, np.array([1e37, 1.0], np.float32), np.zeros(3, bool), n=1)
    assert index.last_rescored == 3


def test_the_scan_prunes_and_handles_empty_searches() -> None:
    rng = np.random.default_rng(6)
    vectors = rng.normal(0, 0.3, (ITEMS, FACTORS)).astype(np.float32)
    index = _indexed(vectors)
    excluded = np.zeros(ITEMS + 100, dtype=bool)  # longer than the rows: the reader's mask
    _assert_exact(index, vectors, rng.normal(0, 1, FACTORS).astype(np.float32), excluded)
    assert N <= index.last_rescored < ITEMS // 10
    rows, scores = index.top(vectors[0], 0, vectors, ITEMS, excluded)
    assert len(rows) == len(scores) == 0
    rows, scores = index.top(vectors[0], N, vectors, 0, excluded)
    assert len(rows) == len(scores) == 0


def test_rows_never_placed_are_coded_with_the_next() -> None:
    rng = np.random.default_rng(7)
    vectors = rng.normal(0, 0.3, (3000, FACTORS)).astype(np.float32)
    index = QuantizedRows(FACTORS)
    index.place(vectors, 1000, np.arange(1000))
    index.place(vectors, 3000, np.array([2999]))  # rows 1000-2998 were never placed
    _assert_exact(
        index, vectors, rng.normal(0, 1, FACTORS).astype(np.float32), np.zeros(3000, bool)
    )
