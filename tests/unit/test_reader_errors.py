"""The reader's answer to each Redis error reply, as redis-py raises it: 503 for a Redis that is
up but cannot answer now, 500 for the rest."""

from __future__ import annotations

import asyncio

import pytest
from redis._parsers import BaseParser
from redis.asyncio import Redis

from freshrec.serving.api import Reader
from freshrec.serving.funnel import FunnelConfig
from freshrec.serving.http_server import Request, Response
from freshrec.store.keys import Keys


@pytest.fixture(scope="module")
def reader() -> Reader:
    """A reader never started: its Redis client is not connected until a route runs."""
    return Reader(Redis(), Keys("unit"), FunnelConfig(), max_k=200)


def _answer(reader: Reader, reply: str) -> Response:
    error = BaseParser.parse_error(reply)  # the exception redis-py raises for this reply

    async def handler(_: Request) -> Response:
        raise error

    request = Request("GET", "/recommendations/u1", {"user_id": "u1"}, {})
    return asyncio.run(reader.dispatch(request, "recommendations", handler))


@pytest.mark.parametrize(
    "reply",
    [
        "OOM command not allowed when used memory > 'maxmemory'.",
        "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.",
        "LOADING Redis is loading the dataset in memory",
        "READONLY You can't write against a read only replica.",
        "TRYAGAIN Multiple keys request during rehashing of slot",
        "CLUSTERDOWN The cluster is down",
        "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
    ],
)
def test_a_redis_that_cannot_answer_now_is_503(reader: Reader, reply: str) -> None:
    response = _answer(reader, reply)
    assert response.status == 503, (reply, response.body)


def test_an_error_a_retry_cannot_fix_is_500(reader: Reader) -> None:
    response = _answer(reader, "WRONGTYPE Operation against a key holding the wrong kind of value")
    assert response.status == 500
