"""Pipelines that hold scripts, on a redis-server of the test's own: no ``SCRIPT EXISTS``
round trip, and a server that has lost its scripts (restarted, or its cache flushed) still
answers every command in its place."""

from __future__ import annotations

import asyncio

import pytest
import redis
from redis.asyncio import Redis

from freshrec.store.script_pipeline import script_pipeline
from freshrec.store.server_scripts import ServerScripts
from tests.support import OwnRedis

pytestmark = pytest.mark.integration


def _calls(server: redis.Redis, command: str) -> int:
    return int(server.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


async def _queued(client: Redis, scripts: ServerScripts) -> list[object]:
    """A command, a script, a command, a script: their replies."""
    pipe = script_pipeline(client)
    pipe.set("before", "1")
    await scripts.raise_clock(keys=["clock"], args=["5"], client=pipe)
    pipe.incr("after")
    await scripts.raise_clock(keys=["clock"], args=["3"], client=pipe)  # lower: no change
    return await pipe.execute()


def test_a_pipeline_sends_its_scripts_without_asking_the_server_first(
    own_redis: OwnRedis,
) -> None:
    server = redis.Redis.from_url(own_redis.url)

    async def run() -> list[list[object]]:
        client = Redis.from_url(own_redis.url)
        scripts = ServerScripts(client)
        try:
            await scripts.raise_clock(keys=["clock"], args=["1"])  # loads it, as at start-up
            return [await _queued(client, scripts) for _ in range(3)]
        finally:
            await client.aclose()

    asked = _calls(server, "script|exists")
    rounds = asyncio.run(run())
    assert _calls(server, "script|exists") == asked, "the pipeline asked SCRIPT EXISTS"
    assert rounds == [[True, 1, n, 1] for n in (1, 2, 3)]
    assert float(server.get("clock")) == 5.0
    server.close()


def test_scripts_the_server_has_lost_are_loaded_and_sent_again_in_their_place(
    own_redis: OwnRedis,
) -> None:
    server = redis.Redis.from_url(own_redis.url)

    async def run() -> tuple[list[object], list[object]]:
        client = Redis.from_url(own_redis.url)
        scripts = ServerScripts(client)
        try:
            first = await _queued(client, scripts)  # never loaded on this server
            server.script_flush()
            server.set("clock", "4")
            return first, await _queued(client, scripts)
        finally:
            await client.aclose()

    first, again = asyncio.run(run())
    # Each script ran once and each reply is in its own place; the clock only went forward.
    assert first == [True, 1, 1, 1] and again == [True, 1, 2, 1]
    assert float(server.get("clock")) == 5.0
    assert _calls(server, "script|load") >= 2  # once before the flush, once after
    server.close()


def test_a_script_error_is_raised_and_the_other_commands_still_answer(
    own_redis: OwnRedis,
) -> None:
    async def run() -> list[object]:
        client = Redis.from_url(own_redis.url)
        scripts = ServerScripts(client)
        try:
            pipe = script_pipeline(client)
            pipe.rpush("clock", "a list, not a number")
            await scripts.raise_clock(keys=["clock"], args=["5"], client=pipe)  # WRONGTYPE
            pipe.incr("after")
            with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
                await pipe.execute()
            await scripts.raise_clock(keys=["clock"], args=["5"], client=pipe)
            pipe.incr("after")
            return await pipe.execute(raise_on_error=False)
        finally:
            await client.aclose()

    replies = asyncio.run(run())
    assert isinstance(replies[0], redis.ResponseError) and replies[1] == 2
