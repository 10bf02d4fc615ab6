"""The reader's shared Redis connection: replies reach their callers, failures are recoverable."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import warnings
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest
import redis
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from freshrec.serving.multiplexed_redis import MultiplexedRedis
from freshrec.settings import Settings
from freshrec.store.keys import Keys
from freshrec.store.server_scripts import USER_STATE
from tests.support import wait_until

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def _clients(url: str) -> AsyncIterator[tuple[Redis, MultiplexedRedis]]:
    """A redis-py client and a shared connection to the same server, both closed afterwards."""
    client = Redis.from_url(url)
    shared = MultiplexedRedis.like(client)
    try:
        yield client, shared
    finally:
        await shared.aclose()
        await client.aclose()


def test_concurrent_commands_each_get_their_own_reply(settings: Settings) -> None:
    keys = Keys(settings.key_prefix)
    names = [keys.item_vector(f"i{n}") for n in range(300)]

    async def run() -> None:
        async with _clients(settings.redis_url) as (client, shared):
            await client.mset({name: f"value-{n}" for n, name in enumerate(names)})
            replies = await asyncio.gather(*(shared.execute("GET", name) for name in names))
            assert replies == [f"value-{n}".encode() for n in range(len(names))]
            assert await shared.execute("GET", keys.item_vector("missing")) is None
            with pytest.raises(redis_errors.ResponseError, match="WRONGTYPE"):
                await shared.execute("ZCARD", names[0])
            assert await shared.execute("GET", names[1]) == b"value-1"  # still in step

    asyncio.run(run())


def test_a_script_gives_what_redis_py_gives_and_survives_a_script_flush(
    settings: Settings,
) -> None:
    keys = Keys(settings.key_prefix)
    script_keys = [keys.history("u1"), keys.user_vector("u1")]

    async def run() -> None:
        async with _clients(settings.redis_url) as (client, shared):
            await client.zadd(script_keys[0], {"a": 1.0, "b": 3.0, "c": 2.0})
            await client.set(script_keys[1], b"\x00\x01\x02\x03")
            expected = await client.register_script(USER_STATE)(keys=script_keys, args=[2])
            assert await shared.run_script(USER_STATE, script_keys, [2]) == expected
            assert expected == [b"b\nc", b"3", b"\x00\x01\x02\x03"]
            await client.script_flush()  # the server forgets it; the connection does not know
            assert await shared.run_script(USER_STATE, script_keys, [2]) == expected

    asyncio.run(run())


def test_a_killed_connection_fails_its_waiters_and_the_next_call_reconnects(
    settings: Settings,
) -> None:
    keys = Keys(settings.key_prefix)
    name = f"{settings.key_prefix}-multiplexed"

    async def run() -> None:
        async with _clients(settings.redis_url) as (client, shared):
            await shared.execute("CLIENT", "SETNAME", name)
            # Written at once; the kill below fails it whether or not Redis has read it yet.
            blocked = asyncio.ensure_future(shared.execute("BLPOP", keys.history("none"), 30))
            ours = [c["id"] for c in await client.client_list() if c.get("name") == name]
            assert len(ours) == 1
            await client.client_kill_filter(_id=ours[0])
            with pytest.raises(redis_errors.ConnectionError):
                await blocked
            assert await shared.execute("PING") == b"PONG"  # a new connection, by itself

    asyncio.run(run())


def test_an_unreachable_server_is_a_connection_error_not_a_hang(settings: Settings) -> None:
    async def run() -> None:
        shared = MultiplexedRedis(port=_closed_port(), timeout_s=1.0)
        with pytest.raises(redis_errors.ConnectionError, match="cannot connect"):
            await shared.execute("PING")

    asyncio.run(run())


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_database_of_the_url_is_selected(settings: Settings) -> None:
    url = urlsplit(settings.redis_url)._replace(path="/5").geturl()
    key = f"{settings.key_prefix}:db5-probe"

    async def run() -> None:
        async with _clients(url) as (client, shared):
            await client.set(key, b"in db 5")
            try:
                assert await shared.execute("GET", key) == b"in db 5"
            finally:
                await client.delete(key)

    asyncio.run(run())
    assert redis.Redis.from_url(settings.redis_url).exists(key) == 0


def test_a_refused_setup_closes_its_connection_at_once(settings: Settings) -> None:
    """AUTH refused (here: a password the server does not have), over and over: each attempt's
    connection is closed by the client at once, not left to the garbage collector (or, while
    anything holds the error's traceback, open on the server)."""
    client = redis.Redis.from_url(settings.redis_url)
    kwargs = client.connection_pool.connection_kwargs
    host, port = kwargs["host"], kwargs["port"]
    before = client.info("clients")["connected_clients"]

    async def run() -> None:
        shared = MultiplexedRedis(host=host, port=port, password="not-the-password")
        for _ in range(20):
            with pytest.raises(redis_errors.AuthenticationError):
                await shared.execute("PING")
        await shared.aclose()

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            asyncio.run(run())
            gc.collect()
        unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
        assert not unclosed, unclosed[:3]  # each closed by the client, not left to the collector
        wait_until(
            lambda: client.info("clients")["connected_clients"] <= before + 2,
            10,
            f"the refused connections to close (were {before})",
        )
    finally:
        client.close()


def test_a_server_that_stops_answering_is_left_after_one_timeout(settings: Settings) -> None:
    """A connection whose server went silent without a reset (a failover, a partition) times
    out once; the next request connects again instead of timing out on it for good."""

    async def run() -> None:
        client = Redis.from_url(settings.redis_url)
        kwargs = client.connection_pool.connection_kwargs
        async with _SilencingProxy(kwargs["host"], kwargs["port"]) as proxy:
            shared = MultiplexedRedis(host="127.0.0.1", port=proxy.port, timeout_s=0.5)
            try:
                assert await shared.execute("PING") == b"PONG"
                proxy.silence_open_connections()
                with pytest.raises(redis_errors.TimeoutError):
                    await shared.execute("PING")
                assert await shared.execute("PING") == b"PONG"  # a new connection
                assert proxy.connections == 2
            finally:
                await shared.aclose()
                await client.aclose()

    asyncio.run(run())


class _SilencingProxy:
    """A TCP relay to Redis that can stop relaying on the connections open so far, keeping
    them open: what a client sees of a server gone without a reset."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.connections = 0
        self._silenced: list[asyncio.Event] = []
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    def silence_open_connections(self) -> None:
        for silenced in self._silenced:
            silenced.set()

    async def __aenter__(self) -> _SilencingProxy:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        silenced = asyncio.Event()
        self._silenced.append(silenced)
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        self._writers += [writer, up_writer]

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            while data := await source.read(65536):
                if silenced.is_set():
                    continue  # swallowed: the peer hears nothing, and no reset either
                sink.write(data)
                await sink.drain()

        with contextlib.suppress(ConnectionError):
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
