"""The operator's HTTP port: a small HTTP/1.1 server, bounded so that no client of it can hurt the poller.

Why not uvicorn (as of 0.54, checked in its source): it accepts every connection the kernel hands over, starts no
timer until a first response is sent (a connection that sends nothing, or half a request head, is kept forever),
checks ``limit_concurrency`` only after a whole request head arrived (and then answers 503 with a log line per
request), and leaves accepting to asyncio, which logs a traceback for every ``accept()`` that fails for want of
file descriptors. 1,100 silent connections under a 1,024-file limit therefore took every descriptor the poller
needed and wrote tens of megabytes of log lines. This server does the few things the operator port needs and
bounds each of them:

- **Connections**: at most ``max_connections`` open at once (well below the open-file limit, see
  :func:`connection_cap`). A connection beyond that replaces the one that has waited longest without sending
  anything new (as nginx reuses idle connections when it runs out), so a flood of idle connections can never
  lock a scraper out, and the port never holds more descriptors than its cap.
- **Time**: a request head must arrive whole within ``header_timeout_s`` of the connection (or of its first
  byte after a response); a kept-alive connection with nothing to say is closed after ``keep_alive_timeout_s``.
- **Size**: a request head over :data:`MAX_HEAD_BYTES` gets 431; a request with a body is answered and closed
  (no path here takes a body), and a connection is not read while a request head waits for its answer, so
  nothing is buffered beyond about one head per connection.
- **Rate**: one request per connection per turn of the event loop, and at most :data:`MAX_REQUESTS_PER_S` for
  the whole port (a burst of twice that); a request over the rate waits for its turn, unread.
- **Logs**: connections closed by a limit, a timeout or a malformed request, and accepts that failed, are
  counted per reason (``dropped``, a labelled counter) and summed in at most one WARNING line per
  ``log_interval_s``.
- **HEAD** gets the head of the GET answer, without its body. Which methods and paths exist is the handler's
  business (:func:`bridge.health.operator_routes`: GET and HEAD, 405 for any other method, 404 for other paths).

The handler is synchronous and cheap (a metrics snapshot, a readiness check); it runs in the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import re
import socket
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import urlsplit

from bridge.runtime import open_file_limit
from bridge.serving import bind

__all__ = [
    "HEADER_TIMEOUT_S",
    "KEEP_ALIVE_TIMEOUT_S",
    "LOG_INTERVAL_S",
    "MAX_CONNECTIONS",
    "MAX_HEAD_BYTES",
    "MAX_REQUESTS_PER_S",
    "Handler",
    "Request",
    "Response",
    "connection_cap",
    "serve_operator_port",
]

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 64
MAX_HEAD_BYTES = 8 * 1024
_MAX_HEADERS = 64
HEADER_TIMEOUT_S = 5.0
KEEP_ALIVE_TIMEOUT_S = 5.0
LOG_INTERVAL_S = 10.0
MAX_REQUESTS_PER_S = 200
_REQUEST_BURST = 400
# Descriptors per connection slot: the cap stays a small share of the open-file limit, the rest is the poller's.
_FDS_PER_SLOT = 16
_ACCEPTS_PER_WAKEUP = 4
_ACCEPT_PAUSE_S = 1.0
_LISTEN_BACKLOG = 128
_OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


@dataclass(frozen=True, slots=True)
class Request:
    """One request head: method, path, raw query string and lower-cased header names (repeats joined by ``,``)."""

    method: str
    path: str
    query: str
    headers: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Response:
    """What the handler answers; ``Content-Length`` and ``Connection`` are added by the server."""

    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = field(default=())


Handler = Callable[[Request], Response]


class DropCounter(Protocol):
    """A labelled counter (``prometheus_client.Counter`` with a ``reason`` label)."""

    def labels(self, reason: str) -> Any: ...


def connection_cap(limit: int = MAX_CONNECTIONS) -> int:
    """``limit``, lowered to a sixteenth of the soft open-file limit when that is small (at least 4)."""
    soft = open_file_limit()
    if soft is None:
        return limit
    return max(4, min(limit, soft // _FDS_PER_SLOT))


class _BadRequest(Exception):
    def __init__(self, status: int, why: str) -> None:
        self.status = status
        super().__init__(why)


def _parse_head(head: bytes) -> tuple[Request, str, bool]:
    """``(request, HTTP version, has a body)``; raises :class:`_BadRequest` for what is not HTTP/1.x."""
    lines = head.split(b"\n")
    parts = lines[0].rstrip(b"\r").split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]):
        raise _BadRequest(400, "malformed request line")
    method, target, version = (p.decode("latin-1") for p in parts)
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise _BadRequest(505 if version.startswith("HTTP/") else 400, "only HTTP/1.0 and HTTP/1.1 are served")
    if len(lines) - 1 > _MAX_HEADERS:
        raise _BadRequest(431, "too many header fields")
    headers: dict[str, str] = {}
    for raw in lines[1:]:
        name, sep, value = raw.rstrip(b"\r").partition(b":")
        if not sep or not _TOKEN.fullmatch(name):
            raise _BadRequest(400, "malformed header field")
        key, text = name.decode("latin-1").lower(), value.decode("latin-1").strip()
        headers[key] = f"{headers[key]},{text}" if key in headers else text
    length = headers.get("content-length", "0").strip()
    if not length.isdigit():
        raise _BadRequest(400, "malformed Content-Length")
    has_body = int(length) > 0 or "transfer-encoding" in headers
    path, query = _split_target(target)
    return Request(method=method, path=path, query=query, headers=headers), version, has_body


def _split_target(target: str) -> tuple[str, str]:
    """``(path, query)`` of an origin-form (``/p?q``) or absolute-form (``http://h/p?q``) request target."""
    if target.startswith(("http://", "https://")):
        split = urlsplit(target)
        return split.path or "/", split.query
    if target.startswith("/"):
        path, _, query = target.partition("?")
        return path, query
    raise _BadRequest(400, "malformed request target")


def _keep_alive(request: Request, version: str) -> bool:
    tokens = {t.strip().lower() for t in request.headers.get("connection", "").split(",")}
    return "keep-alive" in tokens if version == "HTTP/1.0" else "close" not in tokens


def _serialize(response: Response, *, head_only: bool, keep_alive: bool, extra: str = "") -> bytes:
    try:
        reason = HTTPStatus(response.status).phrase
    except ValueError:
        reason = ""
    lines = [
        f"HTTP/1.1 {response.status} {reason}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        *(f"{name}: {value}" for name, value in response.headers),
        f"Connection: {'keep-alive' if keep_alive else 'close'}",
    ]
    head = ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode("latin-1")
    return head if head_only else head + response.body


def _error(status: int, why: str) -> Response:
    return Response(status, f"{why}\n".encode())


class _Connection(asyncio.Protocol):
    """One client connection: reads request heads, answers each, keeps the connection within its timers."""

    def __init__(self, server: _OperatorServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self._waiting_for_head = True  # False while idle between requests
        self._write_paused = False
        self._closing = False
        self._scheduled = False  # a call of _process is due in the loop
        self._throttled = False  # over the port's request rate, waiting for its turn
        self._reading = True

    # --- asyncio.Protocol -----------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._server.opened(self)
        self._arm(self._server.header_timeout_s, counted=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._cancel_timer()
        self._server.closed(self)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._server.touched(self)
        if not self._waiting_for_head and not self._buffer:
            # The first byte of the next request: from now on its head must arrive in time.
            self._waiting_for_head = True
            self._arm(self._server.header_timeout_s, counted=True)
        self._buffer += data
        self._update_reading()
        if not self._scheduled:
            self._process()

    def eof_received(self) -> bool:
        return False  # close our side too

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()
        if not self._scheduled:
            self._process()

    # --- the connection's life --------------------------------------------------------------------------

    def abort(self, reason: str | None) -> None:
        """Close at once (no flush); ``reason`` is counted as a dropped connection unless None."""
        if self._closing or self._transport is None:
            return
        self._closing = True
        self._cancel_timer()
        self._transport.abort()
        if reason is not None:
            self._server.dropped(reason)

    def _arm(self, delay_s: float, *, counted: bool) -> None:
        self._cancel_timer()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(delay_s, self.abort, "timeout" if counted else None)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _update_reading(self) -> None:
        """Read only while answers flow and at most one request head waits: memory per connection stays bounded."""
        if self._transport is None or self._closing:
            return
        wanted = not self._write_paused and not self._throttled and len(self._buffer) <= MAX_HEAD_BYTES
        if wanted != self._reading:
            self._reading = wanted
            if wanted:
                self._transport.resume_reading()
            else:
                self._transport.pause_reading()

    def _unthrottle(self) -> None:
        self._throttled = False
        self._update_reading()
        self._process()

    def _process(self) -> None:
        self._scheduled = False
        if self._write_paused or self._throttled or self._closing:
            return
        while self._buffer[:2] == b"\r\n" or self._buffer[:1] == b"\n":  # blank lines before a request
            del self._buffer[: 2 if self._buffer[:1] == b"\r" else 1]
        match = _HEAD_END.search(self._buffer, 0, MAX_HEAD_BYTES + 4)
        if match is None:
            if len(self._buffer) > MAX_HEAD_BYTES:
                self._fail(431, "request head too large")
            return
        wait_s = self._server.request_wait_s()
        if wait_s > 0:  # over the port's request rate: answer later, read nothing meanwhile
            self._throttled = True
            self._scheduled = True
            self._update_reading()
            asyncio.get_running_loop().call_later(wait_s, self._unthrottle)
            return
        head = bytes(self._buffer[: match.start()])
        del self._buffer[: match.end()]
        self._answer(head)
        self._update_reading()
        if self._buffer and not self._closing:
            # One request per turn of the loop: a client that sends many at once cannot hold the poller up.
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._process)

    def _answer(self, head: bytes) -> None:
        try:
            request, version, has_body = _parse_head(head)
        except _BadRequest as bad:
            self._fail(bad.status, str(bad))
            return
        keep_alive = _keep_alive(request, version) and not has_body
        response = self._server.handler(request)
        self._write(_serialize(response, head_only=request.method == "HEAD", keep_alive=keep_alive), keep_alive)

    def _fail(self, status: int, why: str) -> None:
        self._write(_serialize(_error(status, why), head_only=False, keep_alive=False), keep_alive=False)
        self._server.dropped("malformed")

    def _write(self, data: bytes, keep_alive: bool) -> None:
        assert self._transport is not None
        self._transport.write(data)
        self._server.touched(self)
        if not keep_alive:
            self._closing = True
            self._cancel_timer()
            self._transport.close()  # after the buffered answer is sent
            return
        if self._buffer:
            self._arm(self._server.header_timeout_s, counted=True)  # the next request has begun
        else:
            self._waiting_for_head = False
            self._arm(self._server.keep_alive_timeout_s, counted=False)


class _OperatorServer:
    """The listening socket, its accept loop, the open connections and the drop accounting."""

    def __init__(
        self,
        sock: socket.socket,
        handler: Handler,
        *,
        dropped: DropCounter | None,
        max_connections: int,
        header_timeout_s: float,
        keep_alive_timeout_s: float,
        log_interval_s: float,
    ) -> None:
        self._sock = sock
        self.handler = handler
        self._drop_counter = dropped
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.keep_alive_timeout_s = keep_alive_timeout_s
        self._log_interval_s = log_interval_s
        self._loop = asyncio.get_running_loop()
        # Open connections, least recently active first: the first one is replaced when the cap is reached.
        self._connections: OrderedDict[_Connection, None] = OrderedDict()
        self._starting: set[asyncio.Task[Any]] = set()
        self._pending_drops: Counter[str] = Counter()
        self._log_timer: asyncio.TimerHandle | None = None
        self._last_log_s = -log_interval_s
        self._resume_timer: asyncio.TimerHandle | None = None
        self._accepting = False
        self.address = sock.getsockname()[:2]
        self._tokens = float(_REQUEST_BURST)
        self._tokens_at = self._loop.time()

    # --- accepting ----------------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop.add_reader(self._sock.fileno(), self._accept)
        self._accepting = True

    def _accept(self) -> None:
        for _ in range(_ACCEPTS_PER_WAKEUP):
            try:
                conn, _address = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_DESCRIPTORS:
                    # The connection stays in the kernel's queue; try again later instead of spinning.
                    self.dropped("accept_error")
                    self._pause_accepting()
                return  # anything else (the client already left) concerns one connection only
            self._admit(conn)

    def _admit(self, conn: socket.socket) -> None:
        if len(self._connections) + len(self._starting) >= self.max_connections:
            if self._connections:
                oldest = next(iter(self._connections))
                self._connections.pop(oldest)
                oldest.abort("limit")
            else:  # every slot is a connection still being set up: refuse the new one
                conn.close()
                self.dropped("limit")
                return
        conn.setblocking(False)
        task = self._loop.create_task(self._loop.connect_accepted_socket(lambda: _Connection(self), conn))
        self._starting.add(task)
        task.add_done_callback(self._started)

    def _started(self, task: asyncio.Task[Any]) -> None:
        self._starting.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.dropped("accept_error")  # the client left while its transport was being made

    def _pause_accepting(self) -> None:
        if self._accepting:
            self._loop.remove_reader(self._sock.fileno())
            self._accepting = False
            self._resume_timer = self._loop.call_later(_ACCEPT_PAUSE_S, self.start)

    # --- connections --------------------------------------------------------------------------------------

    def request_wait_s(self) -> float:
        """0 when a request may be answered now (and takes its turn), else how long to wait (a token bucket)."""
        now = self._loop.time()
        self._tokens = min(_REQUEST_BURST, self._tokens + (now - self._tokens_at) * MAX_REQUESTS_PER_S)
        self._tokens_at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / MAX_REQUESTS_PER_S

    def opened(self, conn: _Connection) -> None:
        self._connections[conn] = None

    def touched(self, conn: _Connection) -> None:
        if conn in self._connections:
            self._connections.move_to_end(conn)

    def closed(self, conn: _Connection) -> None:
        self._connections.pop(conn, None)

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    # --- accounting -----------------------------------------------------------------------------------------

    def dropped(self, reason: str) -> None:
        if self._drop_counter is not None:
            self._drop_counter.labels(reason).inc()
        self._pending_drops[reason] += 1
        if self._log_timer is None:
            delay_s = max(0.0, self._last_log_s + self._log_interval_s - self._loop.time())
            self._log_timer = self._loop.call_later(delay_s, self._log_drops)

    def _log_drops(self) -> None:
        self._log_timer = None
        self._last_log_s = self._loop.time()
        counts, self._pending_drops = dict(self._pending_drops), Counter()
        host, port = self.address
        summary = ", ".join(f"{reason}={count}" for reason, count in sorted(counts.items()))
        log.warning(
            f"operator port {host}:{port} closed {sum(counts.values())} connections ({summary}); "
            f"at most one such line per {self._log_interval_s:g} s",
            extra={"dropped": counts, "open_connections": len(self._connections), "cap": self.max_connections},
        )

    async def close(self) -> None:
        if self._accepting:
            self._loop.remove_reader(self._sock.fileno())
            self._accepting = False
        for timer in (self._resume_timer, self._log_timer):
            if timer is not None:
                timer.cancel()
        for task in list(self._starting):
            task.cancel()
        for conn in list(self._connections):
            conn.abort(None)
        self._sock.close()
        if self._starting:
            await asyncio.gather(*self._starting, return_exceptions=True)
        await asyncio.sleep(0)  # let the aborted transports close their sockets


@contextlib.asynccontextmanager
async def serve_operator_port(
    handler: Handler,
    host: str,
    port: int,
    *,
    dropped: DropCounter | None = None,
    max_connections: int | None = None,
    header_timeout_s: float = HEADER_TIMEOUT_S,
    keep_alive_timeout_s: float = KEEP_ALIVE_TIMEOUT_S,
    log_interval_s: float = LOG_INTERVAL_S,
) -> AsyncIterator[tuple[str, int]]:
    """Serve ``handler`` on ``host:port`` in the current loop; yield the bound (host, port).

    Raises ``OSError`` when the address cannot be bound. ``max_connections`` defaults to :func:`connection_cap`.
    """
    server = _OperatorServer(
        bind(host, port, backlog=_LISTEN_BACKLOG),
        handler,
        dropped=dropped,
        max_connections=max_connections if max_connections is not None else connection_cap(),
        header_timeout_s=header_timeout_s,
        keep_alive_timeout_s=keep_alive_timeout_s,
        log_interval_s=log_interval_s,
    )
    server.start()
    try:
        yield server.address
    finally:
        await server.close()
