"""The application: builds the clients and components from settings and runs every account's loop.

Lifecycle: open the operator port → connect to the broker (the loops retry with backoff) → run one loop per
account → on stop, let each loop finish its in-flight publishes and acknowledgements within the shutdown budget
→ close the operator port, the broker connection and the HTTP client. The operator port and the accounts' loops
are tasks of one task group: a fatal error of the process (the broker refuses the login, the port is taken)
cancels them all, and :meth:`App.run` raises one :class:`~bridge.errors.BridgeError`.

Accounts share the broker connection, the HTTP client and the operator port; each has its own upstream client,
ledger, lock and backoff. With several accounts, a fatal upstream error (a wrong secret, a missing permission)
parks that account alone: it is reported (``bridge_account_failing``, ``/readyz``'s body, an ERROR line) and
retried every ``BRIDGE_BACKOFF_MAX_SECONDS`` while the others go on. With one account it stops the process, as
there is nothing else to keep running.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import httpx

from bridge.errors import AccountFailedError, BridgeError, DeadlineExceeded, OperatorPortError, UpstreamError
from bridge.health import operator_routes
from bridge.leadership import Leadership
from bridge.ledger import Progress
from bridge.logs import for_account
from bridge.loop import BridgeLoop, one_error
from bridge.metrics import Metrics
from bridge.operator_port import Handler, serve_operator_port
from bridge.publisher import Publisher
from bridge.settings import AccountSettings, OperatorSettings, Settings, UpstreamSettings
from bridge.upstream import UpstreamClient

__all__ = ["App", "upstream_http_client"]

log = logging.getLogger(__name__)

# The errors that belong to one account: its upstream refused it, or its --once drain could not finish.
_ACCOUNT_ERRORS = (UpstreamError, DeadlineExceeded)


@asynccontextmanager
async def upstream_http_client(settings: UpstreamSettings, accounts: int = 1) -> AsyncIterator[httpx.AsyncClient]:
    """The upstream HTTP client: enough connections for one poll and every acknowledgement of each account.

    TLS verification is always on, against the system's CAs or ``upstream_ca_file`` when set.
    """
    connections = (settings.ack_concurrency + 2) * accounts
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    verify: ssl.SSLContext | bool = True
    if settings.upstream_ca_file is not None:
        verify = ssl.create_default_context(cafile=str(settings.upstream_ca_file))
    async with httpx.AsyncClient(timeout=settings.request_timeout_s, limits=limits, verify=verify) as client:
        yield client


class App:
    """One bridge: the publisher, one loop per account and the operator port, wired from :class:`Settings`.

    ``http`` replaces the upstream HTTP client (tests pass one over ``httpx.ASGITransport``).
    """

    def __init__(self, settings: Settings, *, metrics: Metrics | None = None, http: httpx.AsyncClient | None = None):
        self.settings = settings
        self.metrics = metrics or Metrics()
        self._http = http
        self.loops: list[BridgeLoop] = []
        self.failures: dict[str, BridgeError] = {}
        """The accounts whose ``--once`` drain failed, with why (several accounts only; one raises instead)."""
        self.metrics_port: int | None = None
        self.started = asyncio.Event()

    def progress(self) -> Progress | None:
        """The run's progress, every account's added together; None before the run built its loops."""
        return Progress.total([loop.progress for loop in self.loops]) if self.loops else None

    @property
    def loop(self) -> BridgeLoop | None:
        """The first account's loop (the only one, unless the settings list several accounts)."""
        return self.loops[0] if self.loops else None

    async def run(self, stop: asyncio.Event, *, once: bool = False) -> bool:
        """Run until ``stop`` (or drained, with ``once``); True when nothing confirmed is unacknowledged.

        With several accounts and ``once``, an account that fails does not stop the others' drains; the run then
        raises for it (the first, by name) once they are done.
        """
        settings = self.settings
        async with AsyncExitStack() as stack:
            http = self._http
            if http is None:
                http = await stack.enter_async_context(upstream_http_client(settings.upstream, len(settings.accounts)))
            publisher = Publisher(settings.broker, self.metrics)
            stack.push_async_callback(publisher.close)
            self.loops = [self._account_loop(stack, account, http, publisher) for account in settings.accounts]
            routes = operator_routes(self.metrics, self.not_ready_reason, self.role)
            try:
                async with asyncio.TaskGroup() as group:
                    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
                    port = group.create_task(_serve(settings.operator, routes, self.metrics, bound), name="bridge-port")
                    self.metrics_port = await bound
                    self._log_start(once)
                    self.started.set()
                    runs = [
                        group.create_task(self._run_account(loop, stop, once), name=f"bridge-account-{loop.account}")
                        for loop in self.loops
                    ]
                    complete = all([await run for run in runs])
                    port.cancel()
            except BaseExceptionGroup as failure:
                raise one_error(failure) from None
        if self.failures:
            name, error = sorted(self.failures.items())[0]
            raise AccountFailedError(f"account {name}: {error}") from error
        return complete

    def _account_loop(
        self, stack: AsyncExitStack, account: AccountSettings, http: httpx.AsyncClient, publisher: Publisher
    ) -> BridgeLoop:
        metrics = self.metrics.account(account.name)
        upstream = UpstreamClient(http, self.settings.upstream, account, metrics=metrics)
        leadership = self._leadership(stack, account.name, publisher)
        return BridgeLoop(self.settings.delivery, upstream, publisher, metrics, leadership=leadership)

    def _leadership(self, stack: AsyncExitStack, account: str, publisher: Publisher) -> Leadership | None:
        """The account's election; without one (``BRIDGE_LEADER_ELECTION=false``) this process is the only poller.

        Without an election ``bridge_leader`` is 1 while the process runs, so the "no leader" and "two leaders"
        alerts hold for a deployment that opted out too.
        """
        metrics = self.metrics.leadership
        if self.settings.delivery.leader_election:
            # While the broker blocks the publisher's connection it keeps the lock; the lease check knows.
            return Leadership(
                account,
                self.settings.broker.exchange,
                metrics,
                blocked=lambda: publisher.blocked_reason is not None,
            )
        gauge = metrics.leader.labels(account)
        gauge.set(1)
        stack.callback(gauge.set, 0)
        return None

    async def _run_account(self, loop: BridgeLoop, stop: asyncio.Event, once: bool) -> bool:
        """Run one account's loop; with several accounts, park it on an error of its own instead of failing."""
        for_account(loop.account)
        if len(self.loops) == 1:
            return await loop.run(stop, once=once)
        retry_s = self.settings.delivery.backoff_max_s
        while True:
            try:
                return await loop.run(stop, once=once)
            except _ACCOUNT_ERRORS as exc:
                loop.parked(str(exc))
                if once:
                    log.error(f"account {loop.account} failed: {exc}", extra={"error": str(exc)})
                    self.failures[loop.account] = exc
                    return False
                log.error(
                    f"account {loop.account} stopped polling: {exc}; the other accounts go on",
                    extra={"error": str(exc), "retry_in_s": retry_s},
                )
            try:
                async with asyncio.timeout(retry_s):
                    await stop.wait()
                return True  # stopped while parked: nothing of this account is on its way
            except TimeoutError:
                pass

    # --- the operator port's view of the accounts ---
    def not_ready_reason(self) -> str | None:
        """None while every account can deliver; else why not (one line: the broker's, or each account's)."""
        reasons = [(loop.account, reason) for loop in self.loops if (reason := loop.not_ready_reason()) is not None]
        if not reasons:
            return None
        if len(self.loops) == 1:
            return reasons[0][1]
        broker = {reason for _account, reason in reasons if reason.startswith("broker:")}
        if len(broker) == 1 and len(reasons) == len(self.loops):
            return broker.pop()  # the shared connection: one reason for all
        return "; ".join(f"account {account}: {reason}" for account, reason in reasons)

    def role(self) -> str | None:
        """Each account's role (``leader for account a; standby for account b``); None without an election."""
        roles = [role for loop in self.loops if (role := loop.role()) is not None]
        return "; ".join(roles) if roles else None

    def _log_start(self, once: bool) -> None:
        settings = self.settings
        log.info(
            "task-bridge started",
            extra={
                "upstream": ", ".join(sorted({account.base_url for account in settings.accounts})),
                "broker": settings.broker.amqp_url_masked,
                "exchange": settings.broker.exchange,
                "metrics_port": self.metrics_port,
                "once": once,
                "accounts": [account.name for account in settings.accounts],
                "leader_election": settings.delivery.leader_election,
            },
        )


async def _serve(settings: OperatorSettings, handler: Handler, metrics: Metrics, bound: asyncio.Future[int]) -> None:
    """Serve the operator port until cancelled; ``bound`` gets its port, or an :class:`OperatorPortError`."""
    host, port = settings.metrics_host, settings.metrics_port
    port_context = serve_operator_port(handler, host, port, dropped=metrics.operator_connections_dropped)
    try:
        async with port_context as (_host, bound_port):
            bound.set_result(bound_port)
            await asyncio.Future()  # until the run ends and cancels it
    except OSError as exc:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        why = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be opened ({exc.strerror or exc})"
        bound.set_exception(
            OperatorPortError(f"operator port {where} {why}; set BRIDGE_METRICS_PORT (or BRIDGE_METRICS_HOST)")
        )
