"""The reader's HTTP/1.1 server over real sockets: routing, keep-alive, pipelining, limits."""

from __future__ import annotations

import asyncio
import json

import pytest

from serving.http_server import MAX_URL_BYTES, HttpServer, Request, Response, Router


async def _echo(request: Request) -> Response:
    delay = float(request.query.get("delay", "0"))
    if delay:
        await asyncio.sleep(delay)  # a slow handler, not synchronisation
    return Response.json({"params": request.params, "query": request.query})


async def _dispatch(request: Request, route: str, handler) -> Response:  # type: ignore[no-untyped-def]
    response = await handler(request)
    if response.status == 200:
        body = json.loads(response.body)
        body["route"] = route
        return Response.json(body)
    return response


async def _server() -> HttpServer:
    router = Router()
    router.add("/items/{item_id}", _echo)
    router.add("/pairs/{a}/{b}", _echo)
    router.add("/healthz", _echo)
    server = HttpServer(router, _dispatch)
    await server.start("127.0.0.1", 0)
    return server


async def _exchange(port: int, raw: bytes, responses: int = 1) -> list[tuple[int, dict, bytes]]:
    """Sends ``raw`` as is; reads ``responses`` answers: (status, headers, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    answers = []
    try:
        for _ in range(responses):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = dict(line.split(": ", 1) for line in lines[1:] if line)
            body = await reader.readexactly(int(headers["Content-Length"]))
            answers.append((status, headers, body))
    finally:
        writer.close()
    return answers


def test_routes_parameters_and_query() -> None:
    async def run() -> None:
        server = await _server()
        try:
            target = b"/pairs/a%2Fb/%C3%A9t%C3%A9?k=3&debug=1"
            [(status, _, body)] = await _exchange(
                server.port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n"
            )
            assert status == 200
            assert json.loads(body) == {
                "params": {"a": "a/b", "b": "été"},
                "query": {"k": "3", "debug": "1"},
                "route": "/pairs/{a}/{b}",
            }
            [(status, _, body)] = await _exchange(server.port, b"GET /nope HTTP/1.1\r\n\r\n")
            assert status == 404 and json.loads(body)["status"] == 404
            [(status, headers, body)] = await _exchange(
                server.port, b"POST /healthz HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"
            )
            assert status == 405 and headers["Allow"] == "GET, HEAD"
        finally:
            await server.stop()

    asyncio.run(run())


def test_pipelined_requests_are_answered_in_order_on_one_connection() -> None:
    async def run() -> None:
        server = await _server()
        try:
            raw = (
                b"GET /items/slow?delay=0.2 HTTP/1.1\r\n\r\n"
                b"GET /items/fast HTTP/1.1\r\n\r\n"
                b"HEAD /items/head HTTP/1.1\r\n\r\n"
                b"GET /items/last HTTP/1.1\r\n\r\n"
            )
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(raw)
            seen = []
            for expect_body in (True, True, False, True):
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                assert length > 0 and b"Connection: close" not in head
                if expect_body:
                    seen.append(json.loads(await reader.readexactly(length))["params"]["item_id"])
            assert seen == ["slow", "fast", "last"]
            writer.close()
        finally:
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
        server = await _server()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(raw)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(f"HTTP/1.1 {status} ".encode()) and b"Connection: close" in head
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            assert json.loads(await reader.readexactly(length))["status"] == status
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
            writer.close()
        finally:
            await server.stop()

    asyncio.run(run())


def test_http_1_0_and_connection_close_are_honoured() -> None:
    async def run() -> None:
        server = await _server()
        try:
            for raw in (
                b"GET /healthz HTTP/1.0\r\n\r\n",
                b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n",
            ):
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(raw)
                answer = await asyncio.wait_for(reader.read(), 5)  # until the server closes
                assert answer.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in answer
                writer.close()
        finally:
            await server.stop()

    asyncio.run(run())


def test_stop_lets_a_request_in_flight_finish() -> None:
    async def run() -> None:
        server = await _server()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /items/late?delay=0.3 HTTP/1.1\r\n\r\n")
        await asyncio.wait_for(_until(lambda: any(c.busy for c in server.connections)), 5)
        await server.stop()
        answer = await asyncio.wait_for(reader.read(), 5)
        assert answer.startswith(b"HTTP/1.1 200 OK") and b'"late"' in answer
        writer.close()

    asyncio.run(run())


async def _until(condition) -> None:  # type: ignore[no-untyped-def]
    while not condition():
        await asyncio.sleep(0.005)
