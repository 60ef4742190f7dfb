"""The application: builds the clients and components from settings and runs the loop with its HTTP port.

Lifecycle: start the operator port → connect to the broker (the loop retries with backoff) → run the loop →
on stop, let the loop finish its in-flight publishes and acknowledgements within the shutdown budget → close
the broker connection and the HTTP client.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import httpx

from bridge.errors import OperatorPortError
from bridge.health import operator_routes
from bridge.leadership import Leadership
from bridge.loop import BridgeLoop
from bridge.metrics import Metrics
from bridge.operator_port import Handler, serve_operator_port
from bridge.publisher import Publisher
from bridge.settings import Settings
from bridge.upstream import UpstreamClient

__all__ = ["App", "upstream_http_client"]

log = logging.getLogger(__name__)


@asynccontextmanager
async def upstream_http_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The upstream HTTP client: enough connections for one poll and every acknowledgement at once.

    TLS verification is always on, against the system's CAs or ``upstream_ca_file`` when set.
    """
    connections = settings.ack_concurrency + 2
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    verify: ssl.SSLContext | bool = True
    if settings.upstream_ca_file is not None:
        verify = ssl.create_default_context(cafile=str(settings.upstream_ca_file))
    async with httpx.AsyncClient(timeout=settings.request_timeout_s, limits=limits, verify=verify) as client:
        yield client


class App:
    """One bridge: upstream client, publisher, loop and the operator port, wired from :class:`Settings`.

    ``http`` replaces the upstream HTTP client (tests pass one over ``httpx.ASGITransport``).
    """

    def __init__(self, settings: Settings, *, metrics: Metrics | None = None, http: httpx.AsyncClient | None = None):
        settings.require_credentials()
        self.settings = settings
        self.metrics = metrics or Metrics()
        self._http = http
        self.loop: BridgeLoop | None = None
        self.metrics_port: int | None = None
        self.started = asyncio.Event()

    async def run(self, stop: asyncio.Event, *, once: bool = False) -> bool:
        """Run until ``stop`` (or drained, with ``once``); True when nothing confirmed is unacknowledged."""
        settings = self.settings
        async with AsyncExitStack() as stack:
            http = self._http
            if http is None:
                http = await stack.enter_async_context(upstream_http_client(settings))
            upstream = UpstreamClient(http, settings, metrics=self.metrics)
            publisher = Publisher(settings, self.metrics)
            stack.push_async_callback(publisher.close)
            leadership = self._leadership(stack, publisher)
            loop = self.loop = BridgeLoop(settings, upstream, publisher, self.metrics, leadership=leadership)
            routes = operator_routes(self.metrics, loop.not_ready_reason, loop.role)
            self.metrics_port = await _open_operator_port(stack, settings, routes, self.metrics)
            log.info(
                "task-bridge started",
                extra={
                    "upstream": settings.endpoint,
                    "broker": settings.amqp_url_masked,
                    "exchange": settings.exchange,
                    "metrics_port": self.metrics_port,
                    "once": once,
                    "account": settings.account,
                    "leader_election": settings.leader_election,
                },
            )
            self.started.set()
            return await loop.run(stop, once=once)

    def _leadership(self, stack: AsyncExitStack, publisher: Publisher) -> Leadership | None:
        """The account's election; without one (``BRIDGE_LEADER_ELECTION=false``) this process is the only poller.

        Without an election ``bridge_leader`` is 1 while the process runs, so the "no leader" and "two leaders"
        alerts hold for a deployment that opted out too.
        """
        settings, metrics = self.settings, self.metrics.leadership
        if settings.leader_election:
            # While the broker blocks the publisher's connection it keeps the lock; the lease check knows.
            return Leadership(
                settings.account, settings.exchange, metrics, blocked=lambda: publisher.blocked_reason is not None
            )
        gauge = metrics.leader.labels(settings.account)
        gauge.set(1)
        stack.callback(gauge.set, 0)
        return None


async def _open_operator_port(stack: AsyncExitStack, settings: Settings, handler: Handler, metrics: Metrics) -> int:
    """Serve the operator port on the stack; its bound port. A port that cannot be bound is one clear line."""
    host, port = settings.metrics_host, settings.metrics_port
    port_context = serve_operator_port(handler, host, port, dropped=metrics.operator_connections_dropped)
    try:
        _host, bound_port = await stack.enter_async_context(port_context)
    except OSError as exc:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        why = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be opened ({exc.strerror or exc})"
        raise OperatorPortError(
            f"operator port {where} {why}; set BRIDGE_METRICS_PORT (or BRIDGE_METRICS_HOST)"
        ) from None
    return bound_port
