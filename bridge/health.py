"""The operator's HTTP port: ``/metrics`` (Prometheus), ``/healthz`` (alive) and ``/readyz`` (ready).

``/readyz`` answers 200 only while the bridge can deliver (the broker connection is open and the last poll
succeeded recently, see :meth:`bridge.loop.BridgeLoop.not_ready_reason`), and otherwise 503 with the reason in
the body, so an orchestrator stops routing to (and alerts on) a bridge that is running but cannot deliver.

:func:`operator_routes` answers one request; :mod:`bridge.operator_port` serves it on the port, and
:func:`create_app` wraps the same answers as an ASGI app (for tests and embedding).
"""

from __future__ import annotations

import gzip
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

from prometheus_client.exposition import choose_encoder, gzip_accepted

from bridge.metrics import Metrics
from bridge.operator_port import Handler, Request, Response

__all__ = ["MAX_RENDERS_PER_S", "METRICS_REUSE_S", "create_app", "operator_routes"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_ALLOWED_METHODS = ("GET", "HEAD")
METRICS_REUSE_S = 0.1
MAX_RENDERS_PER_S = 20
_MAX_KEPT_ANSWERS = 16


def _text(status: int, body: str) -> Response:
    return Response(status, body.encode())


class _Exposition:
    """``/metrics``: the same exposition as prometheus_client's own apps (its encoder, OpenMetrics when asked for,
    ``name[]`` filters, gzip when accepted), within a budget of rendering time.

    A render of the bridge's registry costs 2-3 ms of the event loop the poller runs on. An answer rendered less
    than :data:`METRICS_REUSE_S` ago is sent again, and at most :data:`MAX_RENDERS_PER_S` renders happen per
    second; beyond that, the last answer of the same kind, or 503 with ``Retry-After: 1``. A scraper never meets
    either (Prometheus asks every 15-60 s); a client asking in a loop cannot take the poller's time.
    """

    def __init__(self, metrics: Metrics, clock: Callable[[], float] = time.monotonic) -> None:
        self._registry = metrics.registry
        self._clock = clock
        self._answers: dict[tuple[str, bool, tuple[str, ...]], tuple[float, Response]] = {}
        self._renders: deque[float] = deque()

    def answer(self, request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        compress = gzip_accepted(request.headers.get("accept-encoding", ""))
        names = tuple(sorted(set(parse_qs(request.query).get("name[]", ()))))
        key = (content_type, compress, names)
        now = self._clock()
        last = self._answers.get(key)
        if last is not None and now - last[0] < METRICS_REUSE_S:
            return last[1]
        while self._renders and now - self._renders[0] >= 1.0:
            self._renders.popleft()
        if len(self._renders) >= MAX_RENDERS_PER_S:
            if last is not None:
                return last[1]
            return Response(503, b"metrics asked for too often; retry in a second\n", headers=(("Retry-After", "1"),))
        self._renders.append(now)
        registry: Any = self._registry.restricted_registry(names) if names else self._registry
        body = encoder(registry)
        if compress:
            response = Response(200, gzip.compress(body), content_type, (("Content-Encoding", "gzip"),))
        else:
            response = Response(200, body, content_type)
        if names and len(self._answers) >= _MAX_KEPT_ANSWERS:
            # Forget the oldest filtered answer; the few unfiltered kinds (format, gzip) are always kept.
            oldest = next((k for k in self._answers if k[2]), None)
            if oldest is not None:
                del self._answers[oldest]
        self._answers.pop(key, None)
        self._answers[key] = (now, response)
        return response


def _no_role() -> str | None:
    return None


def operator_routes(
    metrics: Metrics, not_ready: Callable[[], str | None], role: Callable[[], str | None] = _no_role
) -> Handler:
    """The answer to one request; ``not_ready`` (None when ready, else why not) is asked per ``/readyz``.

    ``role`` (``"standby for account default"``, or None) goes into the body of a ready answer, so a standby
    replica's 200 says what it is doing.
    """

    exposition = _Exposition(metrics)

    def handle(request: Request) -> Response:
        if request.method not in _ALLOWED_METHODS:
            return Response(405, b"method not allowed\n", headers=(("Allow", ", ".join(_ALLOWED_METHODS)),))
        if request.path == "/metrics":
            return exposition.answer(request)
        if request.path == "/healthz":
            return _text(200, "ok\n")
        if request.path == "/readyz":
            reason = not_ready()
            if reason is not None:
                return _text(503, f"not ready: {reason}\n")
            described = role()
            return _text(200, f"ready: {described}\n" if described else "ready\n")
        return _text(404, "not found\n")

    return handle


def create_app(metrics: Metrics, not_ready: Callable[[], str | None]) -> ASGIApp:
    """The operator port's answers as an ASGI app (the bridge itself serves :func:`operator_routes`)."""
    handle = operator_routes(metrics, not_ready)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan and websocket events need nothing here
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope["headers"]:
            name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
            headers[name] = f"{headers[name]},{value}" if name in headers else value
        request = Request(
            method=scope["method"].upper(),
            path=scope["path"],
            query=scope.get("query_string", b"").decode("latin-1"),
            headers=headers,
        )
        response = handle(request)
        response_headers = [(b"content-type", response.content_type.encode())]
        response_headers += [(n.lower().encode(), v.encode()) for n, v in response.headers]
        await send({"type": "http.response.start", "status": response.status, "headers": response_headers})
        body = b"" if request.method == "HEAD" else response.body
        await send({"type": "http.response.body", "body": body})

    return app
