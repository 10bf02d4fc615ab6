"""A lean HTTP/1.1 server for the reader: httptools' parser on an asyncio protocol.

The reader answers small GETs with small JSON bodies at thousands per second on one core.
aiohttp's server spent 0.16 ms of CPU on each such request before the handler ran, about as much
as the whole MF scan; this one spends about 0.04 ms. It does what the reader needs and no more:
GET (and HEAD) routes with path parameters, keep-alive, pipelined requests answered in order,
limits on request size, an idle timeout and a graceful stop. Anything else is answered with a
JSON error: 400 for what cannot be parsed, 404, 405, 408, 413, 414, 431 and 503.

Limits (module constants, each also an `HttpServer` parameter where a test or an embedder may
want another value; none is a setting):

* ``MAX_URL_BYTES`` (8 KiB, else 414) and ``MAX_HEADER_BYTES`` (16 KiB, else 431) count bytes
  as they arrive: httptools buffers a header line until it ends, so a line that never ends is
  measured here from the raw stream (bytes since the last newline) and cut at the limit.
* ``MAX_BODY_BYTES`` (64 KiB, else 413).
* ``REQUEST_DEADLINE_S`` (10 s): a whole request must arrive within this from its first byte,
  however slowly it trickles (slowloris); past it the connection gets 408 and is closed.
  ``IDLE_TIMEOUT_S`` (75 s) separately closes keep-alive connections with nothing to do.
* ``HANDLER_DEADLINE_S`` (2 s): a request whose handler runs longer is answered 503 with
  ``Retry-After`` and the handler is cancelled.
* ``MAX_CONNECTIONS`` (1024): a connection beyond it is answered 503 with ``Retry-After`` and
  closed. Every refusal (400, 408, 413, 414, 431, this 503) half-closes and drains input for
  ``LINGER_S`` (1 s) before closing, so the answer is not lost to a TCP reset.
* ``MAX_IN_FLIGHT`` (1024 across connections): requests beyond it are answered 503 with
  ``Retry-After`` without running.
* Backpressure: a connection stops reading while ``MAX_PIPELINED`` (64) of its requests wait
  for their answers, and while the transport's write buffer is above its high-water mark, so
  neither a client that pipelines without end nor one that does not read its answers can grow
  the reader's memory: TCP's flow control holds them back. Requests that one read brings past
  the cap are answered 503 with ``Retry-After`` without running.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.utils
import functools
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qsl, unquote

import httptools
import orjson

log = logging.getLogger(__name__)

MAX_URL_BYTES = 8192
MAX_HEADER_BYTES = 16384
MAX_BODY_BYTES = 65536
IDLE_TIMEOUT_S = 75.0  # longer than common client pools' keep-alive (60 s), as nginx's default
REQUEST_DEADLINE_S = 10.0  # from a request's first byte to its last
HANDLER_DEADLINE_S = 2.0  # from a request's last byte to its answer being ready
MAX_CONNECTIONS = 1024
MAX_IN_FLIGHT = 1024  # requests whose handlers run, across connections
MAX_PIPELINED = 64  # requests queued on one connection, answered or not
RETRY_AFTER_S = 1  # what a 503 for load or a deadline tells the client
LINGER_S = 1.0  # how long a refused connection drains input before it is closed
SWEEP_INTERVAL_S = 0.5  # how often deadlines and idle connections are checked


@dataclass
class Request:
    method: str
    path: str
    params: dict[str, str] = field(default_factory=dict)
    query: dict[str, str] = field(default_factory=dict)


@dataclass
class Response:
    body: bytes
    status: int = 200
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def json(
        cls, payload: object, status: int = 200, headers: tuple[tuple[str, str], ...] = ()
    ) -> Response:
        return cls(orjson.dumps(payload), status, headers=headers)


Handler = Callable[[Request], Awaitable[Response]]


class Router:
    """GET routes like ``/similar/{item_id}``; a segment parameter matches one path segment."""

    def __init__(self) -> None:
        self._routes: list[tuple[re.Pattern[str], str, Handler]] = []
        self._static: dict[str, tuple[str, Handler]] = {}

    def add(self, template: str, handler: Handler) -> None:
        if "{" not in template:
            self._static[template] = (template, handler)
            return
        pattern = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", template)
        self._routes.append((re.compile(f"^{pattern}$"), template, handler))

    def match(self, path: str) -> tuple[str, Handler, dict[str, str]] | None:
        static = self._static.get(path)
        if static is not None:
            return static[0], static[1], {}
        for pattern, template, handler in self._routes:
            found = pattern.match(path)
            if found:
                params = {name: unquote(value) for name, value in found.groupdict().items()}
                return template, handler, params
        return None


Dispatch = Callable[[Request, str, Handler], Awaitable[Response]]
"""``dispatch(request, route, handler)``: runs a matched handler (errors, metrics)."""


class HttpServer:
    """Serves ``router`` through ``dispatch``; unmatched requests get JSON errors here.

    The keyword parameters are the limits the module docstring describes, defaulting to its
    constants.
    """

    def __init__(
        self,
        router: Router,
        dispatch: Dispatch,
        *,
        max_connections: int = MAX_CONNECTIONS,
        max_in_flight: int = MAX_IN_FLIGHT,
        max_pipelined: int = MAX_PIPELINED,
        request_deadline_s: float = REQUEST_DEADLINE_S,
        handler_deadline_s: float = HANDLER_DEADLINE_S,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
    ) -> None:
        self.router = router
        self.dispatch = dispatch
        self.max_connections = max_connections
        self.max_in_flight = max_in_flight
        self.max_pipelined = max_pipelined
        self.request_deadline_s = request_deadline_s
        self.handler_deadline_s = handler_deadline_s
        self.idle_timeout_s = idle_timeout_s
        self.connections: set[_Connection] = set()
        self.in_flight = 0
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int, reuse_port: bool = False) -> None:
        """Listens on ``host:port``: `bind`, then `serve`."""
        await self.bind(host, port, reuse_port)
        await self.serve()

    async def bind(self, host: str, port: int, reuse_port: bool = False) -> None:
        """Takes ``host:port`` without listening yet: a port in use fails here, before any
        other start-up work, while clients are still refused. With ``reuse_port`` other
        processes may listen there too (SO_REUSEPORT: the kernel hashes each new connection
        to one of them)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self),
            host,
            port,
            reuse_address=True,
            reuse_port=reuse_port or None,
            backlog=1024,
            start_serving=False,
        )

    async def serve(self) -> None:
        """Starts listening on the bound port."""
        assert self._server is not None, "bind first"
        await self._server.start_serving()
        self._sweeper = asyncio.create_task(self._sweep())

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting, let requests in flight finish (up to ``grace_s``), close the rest."""
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        deadline = time.monotonic() + grace_s
        while any(c.busy for c in self.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for connection in list(self.connections):
            connection.close()
        if self._server is not None:
            await self._server.wait_closed()

    async def handle(self, method: str, target: bytes) -> Response:
        try:
            url = httptools.parse_url(target)
        except httptools.HttpParserInvalidURLError:  # an absolute form the parser let through
            refusal = _answer(400, "the request target is not a valid URL")
            return await self.dispatch(Request(method, "", {}, {}), "unmatched", refusal)
        # An absolute form with no path ("http://h") asks for "/" (RFC 9110 section 4.2.3).
        raw_path = url.path.decode("latin-1") if url.path else "/"
        path = unquote(raw_path)
        matched = self.router.match(raw_path)  # parameters are unquoted one by one: %2F stays
        if matched is None:
            route, handler, params = "unmatched", _answer(404, f"no route for {path}"), {}
        elif method not in ("GET", "HEAD"):
            refusal = _answer(405, f"{method} is not allowed here", (("Allow", "GET, HEAD"),))
            route, handler, params = matched[0], refusal, {}
        else:
            route, handler, params = matched
        raw_query = url.query.decode("latin-1") if url.query else ""
        # Blank values kept: `?k=` is a k that is not a number (400), not a k left to default.
        query = dict(parse_qsl(raw_query, keep_blank_values=True)) if raw_query else {}
        bounded = functools.partial(self._within_deadline, handler)
        return await self.dispatch(Request(method, path, params, query), route, bounded)

    def _finished(self, _: object) -> None:
        self.in_flight -= 1

    async def _within_deadline(self, handler: Handler, request: Request) -> Response:
        """The handler, or 503 once it has run longer than ``handler_deadline_s``."""
        deadline = asyncio.timeout(self.handler_deadline_s)
        try:
            async with deadline:
                return await handler(request)
        except TimeoutError:
            if not deadline.expired():
                raise
            log.warning("%s took longer than %s s; answered 503", request.path,
                        self.handler_deadline_s)  # fmt: skip
            return unavailable(f"no answer within {self.handler_deadline_s} s; retry shortly")

    async def _sweep(self) -> None:
        """Closes idle connections and those whose request is not in by its deadline."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            now = time.monotonic()
            idle_cutoff = now - self.idle_timeout_s
            request_cutoff = now - self.request_deadline_s
            for connection in list(self.connections):
                started = connection.request_started
                if started is not None and started < request_cutoff and not connection.refused:
                    connection.late()
                elif not connection.busy and connection.last_active < idle_cutoff:
                    connection.close()


class _Connection(asyncio.Protocol):
    """One client connection: parses requests, answers them in the order they came."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.pending: collections.deque[tuple[asyncio.Future[Response], bool, bool]] = (
            collections.deque()
        )
        self.url = b""
        self.header_bytes = 0
        self.line_bytes = 0  # of the head's line in progress, which httptools buffers unseen
        self.in_head = True  # between requests or inside one's request line and headers
        self.request_started: float | None = None  # a request's first byte, until its last
        self.body_bytes = 0
        self.last_active = time.monotonic()
        self.refused = False
        self.rejected = False
        self.writes_behind = False  # the write buffer is above its high-water mark

    @property
    def busy(self) -> bool:
        return bool(self.pending)

    # --- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if len(self.server.connections) >= self.server.max_connections:
            self._reject()
            return
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        for task, _, _ in self.pending:
            task.cancel()
        self.pending.clear()

    def pause_writing(self) -> None:
        """The client reads slower than it asks: stop reading until its answers drain."""
        self.writes_behind = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.writes_behind = False
        self._resume_reading()

    def _resume_reading(self) -> None:
        """Reads again once neither the write buffer nor the queue of answers holds it back."""
        transport = self.transport
        if (
            transport is not None
            and not transport.is_reading()  # reading as usual: nothing else to check
            and not transport.is_closing()
            and not self.refused
            and not self.writes_behind
            and len(self.pending) < self.server.max_pipelined
        ):
            transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.refused or self.rejected:  # the stream is out of step, or never listened to
            return
        now = self.last_active = time.monotonic()
        if self.in_head and self.request_started is None:
            self.request_started = now
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(400, "protocol upgrades are not supported")
            return
        except httptools.HttpParserError as exc:
            limit = exc.__context__  # a callback's exception arrives wrapped
            if isinstance(limit, _TooLarge):
                self._refuse(limit.status, str(limit))
            else:
                self._refuse(400, f"malformed HTTP request: {exc}")
            return
        if self.in_head:  # count what httptools holds back: the line in progress
            newline = data.rfind(b"\n")
            self.line_bytes = (
                len(data) - newline - 1 if newline >= 0 else self.line_bytes + len(data)
            )
            if self.header_bytes + self.line_bytes > MAX_HEADER_BYTES:
                self._refuse(431, f"the headers are longer than {MAX_HEADER_BYTES} bytes")

    # --- httptools callbacks ------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.url = b""
        self.header_bytes = 0
        self.body_bytes = 0
        self.in_head = True
        if self.request_started is None:
            self.request_started = time.monotonic()

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > MAX_URL_BYTES:
            raise _TooLarge(414, f"the URL is longer than {MAX_URL_BYTES} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value)
        if self.header_bytes > MAX_HEADER_BYTES:
            raise _TooLarge(431, f"the headers are longer than {MAX_HEADER_BYTES} bytes")

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.line_bytes = 0

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)
        if self.body_bytes > MAX_BODY_BYTES:
            raise _TooLarge(413, f"the body is longer than {MAX_BODY_BYTES} bytes")

    def on_message_complete(self) -> None:
        self.in_head = True
        self.request_started = None
        method = self.parser.get_method().decode("latin-1")
        head_only, keep_alive = method == "HEAD", self.parser.should_keep_alive()
        server = self.server
        task: asyncio.Future[Response]
        if len(self.pending) >= server.max_pipelined or server.in_flight >= server.max_in_flight:
            task = asyncio.get_running_loop().create_future()
            task.set_result(unavailable("too many requests in flight; retry shortly"))
        else:
            task = asyncio.ensure_future(server.handle(method, self.url))
            server.in_flight += 1  # counted here: tasks of one read have not started yet
            task.add_done_callback(server._finished)
        self.pending.append((task, head_only, keep_alive))
        task.add_done_callback(self._flush)
        if len(self.pending) >= server.max_pipelined and self.transport is not None:
            self.transport.pause_reading()  # until answers are written (`_flush`)

    # --- responses ----------------------------------------------------------------------------
    def _flush(self, _: object = None) -> None:
        """Writes finished responses from the front: pipelined answers keep request order."""
        while self.pending and self.pending[0][0].done():
            task, head_only, keep_alive = self.pending.popleft()
            if task.cancelled():
                continue
            exc = task.exception()
            if exc is not None:
                log.error("request failed outside its handler", exc_info=exc)
                response = _error(500, "internal error; see the reader's log")
            else:
                response = task.result()
            self._write(response, head_only, keep_alive)
            if not keep_alive:
                self.close()
                return
        self.last_active = time.monotonic()
        self._resume_reading()

    def _write(self, response: Response, head_only: bool, keep_alive: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        lines = [
            f"HTTP/1.1 {response.status} {HTTPStatus(response.status).phrase}",
            f"Date: {_http_date()}",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(response.body)}",
            *(f"{name}: {value}" for name, value in response.headers),
        ]
        if not keep_alive:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.transport.write(head if head_only else head + response.body)

    def _refuse(self, status: int, message: str) -> None:
        """Answer after the requests already queued, then close: the stream cannot be trusted."""
        self.refused = True
        self.request_started = None
        for task, _, _ in self.pending:
            task.remove_done_callback(self._flush)
        answered = list(self.pending)
        self.pending.clear()

        async def last() -> None:
            for task, head_only, _ in answered:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    self._write(await task, head_only, True)
            self._write(_error(status, message), False, False)
            self._linger()

        self.closing = asyncio.ensure_future(last())

    def late(self) -> None:
        """The request in progress missed its deadline: 408 after what is queued, then close."""
        log.info("closing a connection whose request took over %s s to arrive",
                 self.server.request_deadline_s)  # fmt: skip
        self._refuse(408, f"the request did not arrive within {self.server.request_deadline_s} s")

    def _reject(self) -> None:
        """Over the connection cap: 503 at once, then drain briefly so the answer is not reset."""
        self.rejected = True
        self._write(unavailable("too many connections; retry shortly"), False, False)
        self._linger()

    def _linger(self) -> None:
        """Half-close, discard what still comes for ``LINGER_S``, then close: closing with
        unread input would send a reset, which can destroy the answer before the client reads
        it."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if transport.can_write_eof():
            transport.write_eof()
        if not self.writes_behind and not transport.is_reading():
            transport.resume_reading()  # paused for a full queue: drain what comes instead
        asyncio.get_running_loop().call_later(LINGER_S, self.close)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


@functools.lru_cache(maxsize=2)
def _date_of(second: int) -> str:
    return email.utils.formatdate(second, usegmt=True)


def _http_date() -> str:
    """The Date header, formatted once a second."""
    return _date_of(int(time.time()))


class _TooLarge(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _answer(status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> Handler:
    async def answer(request: Request) -> Response:
        return _error(status, message, headers)

    return answer


def _error(status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response.json({"error": message, "status": status}, status, headers)


def unavailable(message: str, retry_after_s: int = RETRY_AFTER_S) -> Response:
    """503 with ``Retry-After``: overload, a deadline, or a dependency that will be back."""
    return _error(503, message, (("Retry-After", str(retry_after_s)),))
