"""The operator's HTTP port: ``/metrics`` (Prometheus), ``/healthz`` (alive) and ``/readyz`` (ready).

``/readyz`` answers 200 only while the bridge can deliver (the broker connection is open and the last poll
succeeded recently, see :meth:`bridge.loop.BridgeLoop.not_ready_reason`), and otherwise 503 with the reason in
the body, so an orchestrator stops routing to (and alerts on) a bridge that is running but cannot deliver.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import make_asgi_app

from bridge.metrics import Metrics

__all__ = ["create_app"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def _text(send: Send, status: int, body: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain; charset=utf-8")],
        }
    )
    await send({"type": "http.response.body", "body": body.encode()})


def create_app(metrics: Metrics, not_ready: Callable[[], str | None]) -> ASGIApp:
    """The ASGI app of the operator's port; ``not_ready`` (None when ready, else why not) is asked per ``/readyz``."""
    metrics_app = make_asgi_app(registry=metrics.registry)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan and websocket events need nothing here
        path = scope["path"]
        if path == "/metrics":
            await metrics_app(scope, receive, send)
        elif path == "/healthz":
            await _text(send, 200, "ok\n")
        elif path == "/readyz":
            reason = not_ready()
            if reason is None:
                await _text(send, 200, "ready\n")
            else:
                await _text(send, 503, f"not ready: {reason}\n")
        else:
            await _text(send, 404, "not found\n")

    return app
