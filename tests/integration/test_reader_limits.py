"""The reader's limits under attack, on a real reader process over raw sockets.

An unterminated header is cut at the limit, a slowloris client is cut at the request deadline,
connections beyond the cap are turned away with 503, a Redis busy with a script makes 503 with
``Retry-After``; and through each the reader keeps answering ordinary requests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pytest
import redis

from freshrec.serving.http_server import (
    MAX_CONNECTIONS,
    MAX_HEADER_BYTES,
    MAX_PIPELINED,
    REQUEST_DEADLINE_S,
)
from freshrec.settings import Settings
from tests.support import OwnRedis, http_json, running_reader, wait_until

pytestmark = pytest.mark.integration

GET = b"GET /recommendations/someone?k=5 HTTP/1.1\r\nHost: t\r\n\r\n"


def _address(base: str) -> tuple[str, int]:
    host, port = base.removeprefix("http://").split(":")
    return host, int(port)


def _connect(base: str, timeout_s: float = 10.0) -> socket.socket:
    return socket.create_connection(_address(base), timeout=timeout_s)


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response: status, headers (lower-case names), body; raises if the peer closes first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response; got {data[:200]!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return status, headers, rest[:length]


def _read_buffered(stream: BinaryIO) -> tuple[int, dict[str, str], bytes]:
    """One of several responses on a stream, leaving the next ones unread."""
    status = int(stream.readline().split()[1])
    headers: dict[str, str] = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, stream.read(int(headers.get("content-length", "0")))


def _closed_by_peer(sock: socket.socket) -> bool:
    """True once the peer has closed (EOF or reset); the socket must have a timeout."""
    try:
        while chunk := sock.recv(65536):
            del chunk
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _serves(base: str) -> None:
    status, body = http_json(f"{base}/recommendations/someone?k=5")
    assert status == 200, body


def test_an_unterminated_header_is_cut_at_the_limit(reader: str) -> None:
    with _connect(reader) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Long: ")
        sent = 0
        chunk = b"a" * 65536
        with contextlib.suppress(ConnectionError):  # a reset once the reader stops reading
            while sent < 1024 * 1024:
                sock.sendall(chunk)
                sent += len(chunk)
        status, _, body = _read_response(sock)
        assert status == 431, body
        assert _closed_by_peer(sock)
    # It stopped reading near the limit, not at the end of the 1 MiB (the kernel buffers some).
    _serves(reader)

    with _connect(reader) as sock:  # a request line that never ends
        sock.sendall(b"GET /" + b"a" * (4 * MAX_HEADER_BYTES))
        status, _, _ = _read_response(sock)
        assert status == 414
        assert _closed_by_peer(sock)
    _serves(reader)


def test_a_slowloris_client_is_cut_at_the_request_deadline(reader: str) -> None:
    started = time.monotonic()
    with _connect(reader, timeout_s=0.5) as sock:
        payload = iter(GET[:-2] + b"X-Slow: " + b"a" * 1000)
        answered = b""
        while time.monotonic() - started < REQUEST_DEADLINE_S + 5:
            try:
                sock.send(bytes([next(payload)]))
            except (BrokenPipeError, ConnectionResetError):
                break
            try:
                chunk = sock.recv(65536)  # waits up to the socket's 0.5 s: one byte per 0.5 s
            except TimeoutError:
                continue
            answered += chunk
            if not chunk:
                break
            _serves(reader)  # others are served meanwhile
        took = time.monotonic() - started
    assert b" 408 " in answered.split(b"\r\n")[0], answered
    assert REQUEST_DEADLINE_S - 1 <= took <= REQUEST_DEADLINE_S + 3, took
    _serves(reader)


def test_connections_beyond_the_cap_get_503_with_retry_after(reader: str) -> None:
    held: list[socket.socket] = []
    try:
        for _ in range(MAX_CONNECTIONS):
            held.append(_connect(reader))

        def turned_away() -> bool:
            with _connect(reader) as extra:
                extra.sendall(GET)
                status, headers, _ = _read_response(extra)
                if status == 200:
                    return False  # the reader has not accepted all the held ones yet
                assert status == 503 and headers.get("retry-after"), (status, headers)
                return True

        wait_until(turned_away, 20, "a connection beyond the cap to be answered 503")
        # The held connections are real: one of them is served.
        held[0].sendall(GET)
        assert _read_response(held[0])[0] == 200
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: http_json(f"{reader}/healthz")[0] == 200, 10, "the reader to serve again")
    _serves(reader)


def test_pipelined_requests_beyond_the_cap_get_503_in_order(reader: str) -> None:
    count = 2 * MAX_PIPELINED
    with _connect(reader) as sock:
        sock.sendall(GET * count)  # one write: parsed at once, before any handler runs
        stream = sock.makefile("rb")
        answers = [_read_buffered(stream) for _ in range(count)]
    statuses = [status for status, _, _ in answers]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[:MAX_PIPELINED] == [200] * MAX_PIPELINED
    assert 503 in statuses
    assert all(headers.get("retry-after") for status, headers, _ in answers if status == 503)
    _serves(reader)


BUSY_LOOP = """
local start = redis.call('TIME')
while true do
  local now = redis.call('TIME')
  if (now[1] - start[1]) * 1000000 + (now[2] - start[2]) > tonumber(ARGV[1]) * 1000000 then
    return 1
  end
end
"""


def test_a_busy_redis_is_503_with_retry_after_then_recovers(
    settings: Settings, own_redis: OwnRedis, tmp_path: Path
) -> None:
    configured = dataclasses.replace(settings, redis_url=own_redis.url)
    with (
        running_reader(configured, tmp_path / "reader.log") as (base, reader),
        redis.Redis.from_url(own_redis.url, socket_timeout=10) as admin,
    ):
        _serves(base)
        with contextlib.suppress(redis.ResponseError):  # the option's name before Redis 7
            admin.config_set("busy-reply-threshold", 100)
        with contextlib.suppress(redis.ResponseError):
            admin.config_set("lua-time-limit", 100)

        def busy() -> None:
            with (
                redis.Redis.from_url(own_redis.url, socket_timeout=30) as client,
                contextlib.suppress(redis.RedisError),  # killed by SCRIPT KILL
            ):
                client.eval(BUSY_LOOP, 0, 20)

        script = threading.Thread(target=busy, daemon=True)
        script.start()
        try:

            def answered_busy() -> bool:
                with _connect(base) as sock:
                    sock.sendall(GET)
                    status, headers, body = _read_response(sock)
                assert status in (200, 503), (status, body)
                if status == 503:
                    assert headers.get("retry-after"), headers
                    return True
                return False

            wait_until(answered_busy, 10, "the reader to answer 503 while Redis is busy")
        finally:
            wait_until(_script_killed(admin), 10, "SCRIPT KILL to stop the busy script")
            script.join(10)
        wait_until(
            lambda: http_json(f"{base}/recommendations/someone?k=5")[0] == 200,
            15,
            "the reader to serve again once Redis is no longer busy",
        )
        assert reader.poll() is None


def _script_killed(admin: redis.Redis) -> Callable[[], bool]:
    def kill() -> bool:
        try:
            admin.script_kill()
        except redis.ResponseError as exc:
            return "NOTBUSY" in str(exc)
        return False

    return kill


def test_a_target_that_is_no_valid_url_is_400_and_the_connection_goes_on(reader: str) -> None:
    with _connect(reader) as sock:
        for target in (b"http://h:99999/x", b"http:///x", b"http://[::1/x"):
            sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: t\r\n\r\n")
            status, headers, body = _read_response(sock)
            assert status == 400, (target, body)
            assert headers["content-type"].startswith("application/json")
            assert b"not a valid URL" in body
        sock.sendall(GET)  # the same connection, still in step
        assert _read_response(sock)[0] == 200
    _serves(reader)
