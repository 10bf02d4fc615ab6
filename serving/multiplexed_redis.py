"""One Redis connection shared by every request of a reader, commands pipelined on it.

The reader makes exactly one Redis call per request. Through redis-py's pooled client that call
cost 110-180 µs of CPU (pool checkout, retry and encoder layers, one read per reply); written
straight to a shared connection and parsed by hiredis it costs about 40 µs, and requests in
flight together share their writes and reads. Redis answers a connection's commands in order,
so replies are matched to waiting requests first in, first out, as multiplexing clients
(StackExchange.Redis, Lettuce) do.

Failures are redis-py's exception types, so callers handle both clients alike: a lost or
refused connection fails every waiting request with `ConnectionError` and the next request
connects again. A reply slower than the timeout raises `TimeoutError` for that request and
closes the connection (failing the requests behind it, whose replies were queued after it), so
the next request connects again: a server that vanished without a reset (a failover, a
partition) would otherwise hold the connection until the kernel gave up on it, some fifteen
minutes. A connection whose setup fails (AUTH refused, a timeout, a cancelled request) is closed
at once, never left open on the server.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hashlib
import ssl as tls
from collections.abc import Awaitable
from typing import Any

import hiredis
from redis import exceptions as redis_errors
from redis.asyncio import Redis


class MultiplexedRedis:
    """Pipelined commands over one connection, opened on first use and after a loss.

    Parameters
    ----------
    host, port, path
        A TCP address, or ``path`` of a Unix socket.
    db, username, password
        Selected and authenticated on every (re)connection.
    ssl
        TLS, as ``rediss://`` URLs ask: True for the default context (the system's CAs, host
        name checked), or the context to use (own CA, client certificate, verify mode).
    timeout_s
        The longest wait for a connection or for a reply.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 6379,
        path: str | None = None,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        ssl: bool | tls.SSLContext = False,
        timeout_s: float = 2.0,
    ) -> None:
        self._address = (host, port, path, ssl)
        self._setup = _setup_commands(db, username, password)
        self.timeout_s = timeout_s
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None
        self._known_scripts: set[str] = set()

    @classmethod
    def like(cls, client: Redis, timeout_s: float = 2.0) -> MultiplexedRedis:
        """The same server, database, credentials and TLS options (CA, client certificate,
        verify mode) as a redis-py client."""
        pool = client.connection_pool
        kwargs = pool.connection_kwargs
        context: bool | tls.SSLContext = False
        if "SSL" in pool.connection_class.__name__:
            # redis-py's own SSLContext from the pool's options, so both clients trust alike.
            context = pool.connection_class(**kwargs).ssl_context.get()
        return cls(
            host=kwargs.get("host", "127.0.0.1"),
            port=kwargs.get("port", 6379),
            path=kwargs.get("path"),
            db=kwargs.get("db", 0),
            username=kwargs.get("username"),
            password=kwargs.get("password"),
            ssl=context,
            timeout_s=timeout_s,
        )

    async def execute(self, *args: str | bytes | int | float) -> Any:
        """One command's reply; error replies raise `redis.exceptions.ResponseError`."""
        protocol = await self._connected()
        try:
            return await reply_within(protocol.send(_pack(args)), self.timeout_s)
        except redis_errors.TimeoutError:
            protocol.close()
            raise

    async def run_script(self, source: str, keys: list[str], args: list[Any]) -> Any:
        """EVALSHA, loading the script once per connection if the server does not know it."""
        sha = _sha1(source)
        if sha not in self._known_scripts:
            await self.execute("SCRIPT", "LOAD", source)
            self._known_scripts.add(sha)
        try:
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args)
        except redis_errors.NoScriptError:  # flushed or failed over since
            self._known_scripts.discard(sha)
            return await self.execute("EVAL", source, len(keys), *keys, *args)

    async def aclose(self) -> None:
        if self._protocol is not None:
            self._protocol.close()
            self._protocol = None

    async def _connected(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and protocol.open:
            return protocol
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:  # one connection attempt, however many requests wait
            if self._protocol is None or not self._protocol.open:
                self._protocol = await self._connect()
                self._known_scripts.clear()  # a new server may not have them
            return self._protocol

    async def _connect(self) -> _Protocol:
        host, port, path, ssl = self._address
        loop = asyncio.get_running_loop()
        protocol: _Protocol | None = None
        try:
            async with asyncio.timeout(self.timeout_s):
                if path:
                    _, protocol = await loop.create_unix_connection(_Protocol, path)
                else:
                    _, protocol = await loop.create_connection(
                        _Protocol, host, port, ssl=ssl or None
                    )
                for command in self._setup:
                    await protocol.send(_pack(command))
        except BaseException as exc:
            if protocol is not None:  # connected, then refused, timed out or cancelled
                protocol.close()
            if isinstance(exc, (OSError, TimeoutError)):
                where = path or f"{host}:{port}"
                message = f"cannot connect to Redis at {where}: {exc}"
                raise redis_errors.ConnectionError(message) from exc
            if isinstance(exc, redis_errors.ResponseError):
                raise redis_errors.AuthenticationError(str(exc)) from exc
            raise
        return protocol


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.open = True

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        if not self.open or self.transport is None:
            raise redis_errors.ConnectionError("connection to Redis lost")
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiting.append(reply)
        self.transport.write(packed)
        return reply

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if not self.waiting:  # nothing asked for this: the stream is out of step
                self.close()
                return
            waiter = self.waiting.popleft()
            if waiter.done():  # its caller timed out; the reply is dropped in order
                continue
            if isinstance(reply, hiredis.ReplyError):
                waiter.set_exception(_response_error(str(reply)))
            else:
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_exception(
                    redis_errors.ConnectionError(f"connection to Redis lost: {exc or 'closed'}")
                )

    def close(self) -> None:
        self.open = False  # at once: the next request connects anew, not after connection_lost
        if self.transport is not None:
            self.transport.close()


def _response_error(message: str) -> redis_errors.ResponseError:
    if message.startswith("NOSCRIPT"):
        return redis_errors.NoScriptError(message)
    return redis_errors.ResponseError(message)


def _setup_commands(
    db: int, username: str | None, password: str | None
) -> list[tuple[str | int, ...]]:
    commands: list[tuple[str | int, ...]] = []
    if password is not None:
        commands.append(("AUTH", username, password) if username else ("AUTH", password))
    if db:
        commands.append(("SELECT", db))
    return commands


def _pack(args: tuple[Any, ...]) -> bytes:
    """RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        elif not isinstance(arg, bytes):
            arg = repr(arg).encode()
        out.append(b"$%d\r\n%b\r\n" % (len(arg), arg))
    return b"".join(out)


@functools.cache
def _sha1(source: str) -> str:
    return hashlib.sha1(source.encode()).hexdigest()


class ClusterCalls:
    """The reader's per-request calls on Redis Cluster, in `MultiplexedRedis`'s form
    (``execute``, ``run_script``): through the reader's cluster client, which routes each call
    to its slot's node and keeps a pool of connections per node."""

    def __init__(self, client: Any, timeout_s: float) -> None:
        self.client = client
        self.timeout_s = timeout_s

    async def execute(self, *args: Any) -> Any:
        return await reply_within(self.client.execute_command(*args), self.timeout_s)

    async def run_script(self, source: str, keys: list[str], args: list[Any]) -> Any:
        """One script of one slot (its keys share a hash tag), sent with ``EVAL``."""
        call = self.client.eval(source, len(keys), *keys, *args)
        return await reply_within(call, self.timeout_s)

    async def aclose(self) -> None:
        """Nothing of its own: the cluster client is the reader's, which closes it."""


async def reply_within(reply: Awaitable[Any], timeout_s: float) -> Any:
    """``reply``, or redis-py's `TimeoutError` after ``timeout_s``."""
    try:
        async with asyncio.timeout(timeout_s):
            return await reply
    except TimeoutError:
        raise redis_errors.TimeoutError(f"no reply from Redis within {timeout_s} s") from None
