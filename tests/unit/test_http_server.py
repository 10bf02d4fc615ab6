"""The reader's HTTP/1.1 server over real sockets: routing, keep-alive, pipelining, limits."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable

import pytest

from freshrec.serving.http_server import (
    MAX_URL_BYTES,
    Handler,
    HttpServer,
    Request,
    Response,
    Router,
)


async def _echo(request: Request) -> Response:
    delay = float(request.query.get("delay", "0"))
    if delay:
        await asyncio.sleep(delay)  # a slow handler, not synchronisation
    return Response.json({"params": request.params, "query": request.query})


async def _dispatch(request: Request, route: str, handler: Handler) -> Response:
    response = await handler(request)
    if response.status == 200:
        return Response.json({**json.loads(response.body), "route": route})
    return response


Connected = tuple[HttpServer, asyncio.StreamReader, asyncio.StreamWriter]


@contextlib.asynccontextmanager
async def _connected() -> AsyncIterator[Connected]:
    """A server with three routes and one client connection to it; both closed afterwards."""
    router = Router()
    for template in ("/items/{item_id}", "/pairs/{a}/{b}", "/healthz"):
        router.add(template, _echo)
    server = HttpServer(router, _dispatch)
    await server.start("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        yield server, reader, writer
    finally:
        writer.close()
        await server.stop()


async def _answer(
    reader: asyncio.StreamReader, with_body: bool = True
) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if line)
    length = int(headers["Content-Length"])
    body = await reader.readexactly(length) if with_body else b""
    return int(lines[0].split()[1]), headers, body


def test_routes_parameters_and_query() -> None:
    async def run() -> None:
        async with _connected() as (_, reader, writer):
            writer.write(b"GET /pairs/a%2Fb/%C3%A9t%C3%A9?k=3&debug=1 HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, body = await _answer(reader)
            assert status == 200
            assert json.loads(body) == {
                "params": {"a": "a/b", "b": "été"},
                "query": {"k": "3", "debug": "1"},
                "route": "/pairs/{a}/{b}",
            }
            writer.write(b"GET /nope HTTP/1.1\r\n\r\n")
            status, _, body = await _answer(reader)
            assert status == 404 and json.loads(body)["status"] == 404
            writer.write(b"POST /healthz HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
            status, headers, _ = await _answer(reader)
            assert status == 405 and headers["Allow"] == "GET, HEAD"

    asyncio.run(run())


def test_an_absolute_form_target_is_routed_by_its_path_and_no_path_is_the_root() -> None:
    """A proxy's form of the target (RFC 9112 section 3.2.2). An empty path is "/" (RFC 9110
    section 4.2.3), which has no route here: a 404, not a failure, and the connection goes on."""

    async def run() -> None:
        async with _connected() as (_, reader, writer):
            writer.write(b"GET http://x:8080/items/a?k=2 HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, body = await _answer(reader)
            assert status == 200 and json.loads(body)["params"] == {"item_id": "a"}
            for target in (b"http://x", b"http://x?k=2"):
                writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
                status, headers, body = await _answer(reader)
                assert status == 404, (target, body)
                assert headers["Content-Type"].startswith("application/json")
                assert json.loads(body)["error"] == "no route for /"

    asyncio.run(run())


def test_blank_query_values_are_kept_not_dropped() -> None:
    """``?k=`` reaches the handler as an empty k (refused there), not as no k (the default)."""

    async def run() -> None:
        async with _connected() as (_, reader, writer):
            writer.write(b"GET /items/x?k=&debug HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, body = await _answer(reader)
            assert status == 200 and json.loads(body)["query"] == {"k": "", "debug": ""}

    asyncio.run(run())


def test_pipelined_requests_are_answered_in_order_on_one_connection() -> None:
    async def run() -> None:
        async with _connected() as (_, reader, writer):
            writer.write(
                b"GET /items/slow?delay=0.2 HTTP/1.1\r\n\r\n"
                b"GET /items/fast HTTP/1.1\r\n\r\n"
                b"HEAD /items/head HTTP/1.1\r\n\r\n"
                b"GET /items/last HTTP/1.1\r\n\r\n"
            )
            seen = []
            for with_body in (True, True, False, True):
                status, headers, body = await _answer(reader, with_body)
                assert status == 200 and "Connection" not in headers
                if with_body:
                    seen.append(json.loads(body)["params"]["item_id"])
            assert seen == ["slow", "fast", "last"]

    asyncio.run(run())


def test_a_connection_stops_reading_while_its_queue_of_answers_is_full() -> None:
    """Requests pipelined past the cap in later reads wait in TCP's buffers, not in the
    reader's memory, and are answered once the queue drains: none is refused."""

    async def run() -> None:
        gate = asyncio.Event()

        async def gated(request: Request) -> Response:
            await gate.wait()
            return Response.json({"n": request.params["n"]})

        async def dispatch(request: Request, route: str, handler: Handler) -> Response:
            return await handler(request)

        router = Router()
        router.add("/gated/{n}", gated)
        server = HttpServer(router, dispatch, max_pipelined=4)
        await server.start("127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(b"".join(b"GET /gated/%d HTTP/1.1\r\n\r\n" % n for n in range(4)))
            await asyncio.wait_for(
                _until(lambda: any(len(c.pending) == 4 for c in server.connections)), 5
            )
            (connection,) = server.connections
            assert connection.transport is not None
            assert not connection.transport.is_reading()
            writer.write(b"".join(b"GET /gated/%d HTTP/1.1\r\n\r\n" % n for n in range(4, 8)))
            await writer.drain()
            gate.set()
            answers = [await _answer(reader) for _ in range(8)]
            assert [status for status, _, _ in answers] == [200] * 8
            assert [json.loads(body)["n"] for _, _, body in answers] == [str(n) for n in range(8)]
            await asyncio.wait_for(_until(lambda: not connection.pending), 5)
            assert connection.transport.is_reading()
        finally:
            writer.close()
            await server.stop()

    asyncio.run(run())


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /items/x HTTP/1.1\r\nHost: x\r\nbad header\r\n\r\n", 400),
        (b"GET /items/" + b"x" * (MAX_URL_BYTES + 10) + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET /items/x HTTP/1.1\r\nX-Big: " + b"y" * 20000 + b"\r\n\r\n", 431),
    ],
)
def test_bad_requests_get_a_json_error_and_the_connection_closes(raw: bytes, status: int) -> None:
    async def run() -> None:
        async with _connected() as (_, reader, writer):
            writer.write(raw)
            answered, headers, body = await _answer(reader)
            assert answered == status and headers["Connection"] == "close"
            assert json.loads(body)["status"] == status
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server

    asyncio.run(run())


@pytest.mark.parametrize(
    "raw",
    [b"GET /healthz HTTP/1.0\r\n\r\n", b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n"],
)
def test_http_1_0_and_connection_close_are_honoured(raw: bytes) -> None:
    async def run() -> None:
        async with _connected() as (_, reader, writer):
            writer.write(raw)
            answer = await asyncio.wait_for(reader.read(), 5)  # until the server closes
            assert answer.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in answer

    asyncio.run(run())


def test_stop_lets_a_request_in_flight_finish() -> None:
    async def run() -> None:
        async with _connected() as (server, reader, writer):
            writer.write(b"GET /items/late?delay=0.3 HTTP/1.1\r\n\r\n")
            await asyncio.wait_for(_until(lambda: any(c.busy for c in server.connections)), 5)
            await server.stop()
            answer = await asyncio.wait_for(reader.read(), 5)
            assert answer.startswith(b"HTTP/1.1 200 OK") and b'"late"' in answer

    asyncio.run(run())


def test_a_bound_port_refuses_connections_until_served() -> None:
    """``bind`` takes the port but clients are refused until ``serve``: a reader compiles its
    kernels between the two. Once served, another bind there fails at once."""

    async def run() -> None:
        router = Router()
        router.add("/healthz", _echo)
        first, second = HttpServer(router, _dispatch), HttpServer(router, _dispatch)
        await first.bind("127.0.0.1", 0)
        try:
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.1", first.port)
            await first.serve()
            with pytest.raises(OSError):
                await second.bind("127.0.0.1", first.port)
            reader, writer = await asyncio.open_connection("127.0.0.1", first.port)
            writer.write(b"GET /healthz HTTP/1.1\r\n\r\n")
            status, _, _ = await _answer(reader)
            assert status == 200
            writer.close()
        finally:
            await first.stop()

    asyncio.run(run())


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.005)
