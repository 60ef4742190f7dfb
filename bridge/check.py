"""``task-bridge check``: is this configuration able to run? One line per check, never a secret.

Checks, in order of the report:

- ``settings``: the environment (and the config file) give valid settings and each account its access key pair
  (done by the CLI, which exits 2 when they are invalid, as ``run`` does);
- ``upstream``: one signed PollTaskResult call with PageSize 1 (it acknowledges nothing, so it changes nothing),
  for every account (``upstream <account>`` when there are several);
- ``broker``: a connection to the AMQP URL;
- ``topology``: every exchange and queue of :mod:`bridge.topology` is either absent (the bridge declares it at
  start) or matches what the bridge declares. An existing one is declared again with the bridge's arguments:
  a no-op when they agree, a ``PRECONDITION_FAILED`` naming the difference when not, which is exactly what
  would stop ``run``. Nothing is created: absent names are only reported.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import aio_pika
import aiormq
import httpx
from aio_pika.abc import AbstractChannel, AbstractConnection

from bridge import refusals
from bridge.errors import BrokerError, UpstreamError
from bridge.settings import AccountSettings, Settings
from bridge.topology import describe
from bridge.upstream import UpstreamClient

__all__ = ["CheckResult", "Status", "format_report", "run_checks", "settings_result"]

_MAX_DETAIL_CHARS = 400  # a SignatureDoesNotMatch message carries the whole string to sign
# What to look at when the upstream refuses the call for a reason retrying cannot fix.
_UPSTREAM_HINTS = {
    "SignatureDoesNotMatch": "check ALIBABA_CLOUD_ACCESS_KEY_SECRET and BRIDGE_SIGNATURE_VERSION",
    "IncompleteSignature": "check ALIBABA_CLOUD_ACCESS_KEY_SECRET and BRIDGE_SIGNATURE_VERSION",
    "InvalidAccessKeyId": "check ALIBABA_CLOUD_ACCESS_KEY_ID",
    "InvalidSecurityToken": "check ALIBABA_CLOUD_SECURITY_TOKEN (STS tokens expire)",
    "InvalidTimeStamp": "the clock of this host is off by more than 15 minutes",
    "Forbidden.RAM": "the RAM user lacks permission for PollTaskResult",
}


_ACCOUNT_KEYS = {
    "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "access_key_secret",
    "ALIBABA_CLOUD_ACCESS_KEY_ID": "access_key_id",
    "ALIBABA_CLOUD_SECURITY_TOKEN": "security_token",
    "BRIDGE_SIGNATURE_VERSION": "signature_version",
}


class Status(StrEnum):
    OK = "OK"
    FAIL = "FAIL"
    SKIP = "SKIP"


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The outcome of one check: ``name``, ``status`` and a one-line ``detail`` free of secrets."""

    name: str
    status: Status
    detail: str

    @property
    def failed(self) -> bool:
        return self.status is Status.FAIL


def format_report(results: list[CheckResult]) -> str:
    """The report: one ``STATUS  name  detail`` line per check, then a verdict line."""
    width = max((len(r.name) for r in results), default=0)
    lines = [f"{r.status.value:<4}  {r.name:<{width}}  {r.detail}" for r in results]
    failed = [r.name for r in results if r.failed]
    lines.append(f"check failed: {', '.join(failed)}" if failed else "check passed")
    return "\n".join(lines) + "\n"


def settings_result(settings: Settings) -> CheckResult:
    """The ``settings`` line for valid settings: what the bridge will talk to, without any secret."""
    exchange = f"exchange {settings.broker.exchange!r}"
    if len(settings.accounts) > 1:
        names = ", ".join(account.name for account in settings.accounts)
        return CheckResult("settings", Status.OK, f"{len(settings.accounts)} accounts ({names}); {exchange}")
    return CheckResult("settings", Status.OK, f"{_describe_account(settings.account)}; {exchange}")


def _describe_account(account: AccountSettings) -> str:
    credentials = "access key pair" + (" and STS token" if account.security_token is not None else "") + " set"
    return (
        f"{account.api} API {account.api_version} at {account.base_url}, "
        f"{account.signature_version} signing, {credentials}"
    )


async def run_checks(settings: Settings, http: httpx.AsyncClient) -> list[CheckResult]:
    """Check every account's upstream, the broker and the topology (concurrently); results in report order."""
    scrub = settings.scrub
    several = len(settings.accounts) > 1

    def upstream_check(account: AccountSettings) -> Coroutine[Any, Any, CheckResult]:
        name = f"upstream {account.name}" if several else "upstream"
        return _guarded(name, scrub, lambda: _check_upstream(settings, account, name, http, several=several))

    async with asyncio.TaskGroup() as group:
        upstreams = [group.create_task(upstream_check(account)) for account in settings.accounts]
        broker = group.create_task(_check_broker(settings, scrub))
    return [settings_result(settings), *(task.result() for task in upstreams), *broker.result()]


async def _guarded(name: str, scrub: Callable[[str], str], check: Callable[[], Awaitable[CheckResult]]) -> CheckResult:
    # A check that breaks in an unforeseen way is a failed check, not a traceback in the middle of the report.
    try:
        return await check()
    except Exception as exc:
        return CheckResult(name, Status.FAIL, _one_line(scrub(f"{type(exc).__name__}: {exc}")))


async def _check_upstream(
    settings: Settings, account: AccountSettings, name: str, http: httpx.AsyncClient, *, several: bool
) -> CheckResult:
    """The ``name`` line for ``account``; with ``several`` accounts it names the account's keys, not variables."""
    client = UpstreamClient(http, settings.upstream, account)
    started = time.perf_counter()
    try:
        page = await client.poll(page_num=1, page_size=1)
    except UpstreamError as exc:
        hint = next((h for code, h in _UPSTREAM_HINTS.items() if (exc.code or "").startswith(code)), None)
        if hint is not None and several:
            # The account's credentials are keys of its [[accounts]] table, not variables.
            for variable, key in _ACCOUNT_KEYS.items():
                hint = hint.replace(variable, f"{key} of account {account.name!r}")
        text = _one_line(str(exc))
        return CheckResult(name, Status.FAIL, f"{text} -> {hint}" if hint else text)
    elapsed_ms = (time.perf_counter() - started) * 1000
    pending = "an unknown number of" if page.total_items is None else f"{page.total_items:,}"
    request = f" (RequestId {page.request_id})" if page.request_id else ""
    answer = f"PollTaskResult answered in {elapsed_ms:.0f} ms: {pending} task details pending{request}"
    return CheckResult(name, Status.OK, f"{_describe_account(account)}: {answer}" if several else answer)


async def _check_broker(settings: Settings, scrub: Callable[[str], str]) -> list[CheckResult]:
    try:
        connection = await refusals.connect(settings.broker)
    except BrokerError as exc:
        return [
            CheckResult("broker", Status.FAIL, _one_line(str(exc))),
            CheckResult("topology", Status.SKIP, "needs the broker"),
        ]
    try:
        transport = connection.transport
        properties: dict[str, Any] = dict(transport.connection.server_properties or {}) if transport else {}
        server = " ".join(str(properties[k]) for k in ("product", "version") if k in properties) or "connected"
        topology = await _guarded("topology", scrub, lambda: _check_topology(connection, settings.broker.exchange))
    finally:
        await connection.close()
    return [CheckResult("broker", Status.OK, f"{connection.broker}: {server}"), topology]


_Declaration = Callable[[AbstractChannel], Awaitable[Any]]


def _exchange_declarations(spec: dict[str, Any]) -> tuple[_Declaration, _Declaration]:
    name, kind, arguments = spec["name"], aio_pika.ExchangeType(spec["type"]), spec["arguments"] or None

    async def passive(channel: AbstractChannel) -> None:
        await channel.declare_exchange(name, passive=True)

    async def full(channel: AbstractChannel) -> None:
        await channel.declare_exchange(name, type=kind, durable=True, arguments=arguments)

    return passive, full


def _queue_declarations(spec: dict[str, Any]) -> tuple[_Declaration, _Declaration]:
    name, arguments = spec["name"], spec["arguments"]

    async def passive(channel: AbstractChannel) -> None:
        await channel.declare_queue(name, passive=True)

    async def full(channel: AbstractChannel) -> None:
        await channel.declare_queue(name, durable=True, arguments=arguments)

    return passive, full


async def _check_topology(connection: AbstractConnection, exchange: str) -> CheckResult:
    definitions = describe(exchange)
    checks = [(f"exchange {spec['name']!r}", *_exchange_declarations(spec)) for spec in definitions["exchanges"]]
    checks += [(f"queue {spec['name']!r}", *_queue_declarations(spec)) for spec in definitions["queues"]]
    found: list[str] = []
    absent: list[str] = []
    for label, passive, full in checks:
        if not await _exists(connection, passive):
            absent.append(label)
            continue
        problem = await _attempt(connection, full)
        if problem is not None:
            return _mismatch(label, problem)
        found.append(label)
    if not absent:
        return CheckResult("topology", Status.OK, f"{', '.join(found)} match what the bridge declares")
    if not found:
        return CheckResult("topology", Status.OK, f"not declared yet; the bridge declares {exchange!r} at start")
    return CheckResult(
        "topology",
        Status.OK,
        f"{', '.join(found)} match; absent, the bridge declares them at start: {', '.join(absent)}",
    )


def _mismatch(label: str, problem: aiormq.exceptions.AMQPError) -> CheckResult:
    reply = _reply_text(problem)
    if isinstance(problem, aiormq.exceptions.ChannelPreconditionFailed):
        return CheckResult(
            "topology",
            Status.FAIL,
            f"{label} differs from what the bridge declares ({reply}); the bridge would stop at start: "
            "delete it or declare it as deploy/rabbitmq/definitions.json does",
        )
    return CheckResult("topology", Status.FAIL, f"cannot declare {label}: {reply}")


async def _exists(connection: AbstractConnection, declare: _Declaration) -> bool:
    problem = await _attempt(connection, declare)
    if problem is None:
        return True
    if isinstance(problem, aiormq.exceptions.ChannelNotFoundEntity):
        return False
    raise problem


async def _attempt(connection: AbstractConnection, declare: _Declaration) -> aiormq.exceptions.AMQPError | None:
    """Run one declaration on a channel of its own (a failed one closes its channel); the error or None."""
    channel = await connection.channel(publisher_confirms=False)
    try:
        await declare(channel)
    except aiormq.exceptions.AMQPChannelError as exc:
        return exc
    finally:
        if not channel.is_closed:
            await channel.close()
    return None


def _reply_text(exc: BaseException) -> str:
    # aiormq puts the broker's reply text (e.g. "PRECONDITION_FAILED - inequivalent arg 'type' ...") first.
    args = getattr(exc, "args", ())
    text = args[0] if args and isinstance(args[0], str) else str(exc)
    return _one_line(text)


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_DETAIL_CHARS else text[: _MAX_DETAIL_CHARS - 1] + "…"
