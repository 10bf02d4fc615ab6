"""The reader's own checks of request parameters, before any state is read."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from freshrec.serving.api import BadRequest, Reader, request_ids
from freshrec.serving.funnel import FunnelConfig
from freshrec.serving.http_server import Request
from freshrec.store.keys import Keys


@pytest.fixture(scope="module")
def reader() -> Reader:
    """A reader never started: its Redis client is not connected until a route runs."""
    return Reader(Redis(), Keys("unit"), FunnelConfig(), max_k=200)


def _query(**query: str) -> Request:
    return Request("GET", "/recommendations/u1", {"user_id": "u1"}, query)


@pytest.mark.parametrize(("raw", "k"), [(None, 10), ("1", 1), ("007", 7), ("200", 200)])
def test_k_in_range_is_taken(reader: Reader, raw: str | None, k: int) -> None:
    assert reader._k(_query() if raw is None else _query(k=raw)) == k


@pytest.mark.parametrize(
    "raw",
    ["", "0", "201", "-1", " 5", "5 ", "+5", "1_0", "5.0", "٥", "1e2", "9" * 5000],
)
def test_k_other_than_plain_digits_in_range_is_a_bad_request(reader: Reader, raw: str) -> None:
    """int() alone would take " 5", "+5", "1_0" and digits of other scripts."""
    with pytest.raises(BadRequest, match="k must be an integer from 1 to 200"):
        reader._k(_query(k=raw))


@pytest.mark.parametrize("value", ["", "a" * 129, "tab\there", "zero\u200bwidth", "\ue000"])
def test_ids_not_printable_or_too_long_are_bad_requests(reader: Reader, value: str) -> None:
    request = Request("GET", "/similar/x", {"item_id": value})
    with pytest.raises(BadRequest, match="item_id must be 1 to 128 printable characters"):
        reader._identifier(request, "item_id")


def test_request_ids_are_unique_within_and_across_readers() -> None:
    first, second = request_ids(), request_ids()
    ids = [first() for _ in range(1000)] + [second() for _ in range(1000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
