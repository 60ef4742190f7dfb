"""One active poller per account among replicas, elected through the broker the bridge already uses.

The lock is an **exclusive consumer** on a classic, non-durable, auto-delete queue named
``<exchange>.leader.<account>``: the broker lets exactly one consumer hold it (any other ``basic.consume`` gets
``ACCESS_REFUSED``), drops that consumer when its channel or connection closes, and deletes the queue with it.
A contender declares the queue and reads the ``consumer_count`` of the ``Queue.DeclareOk``: a count of zero is
the only case in which it asks for the consumer, so standing by costs one ordinary declare per retry and no
channel error. ``docs/leadership.md`` argues the choice against an exclusive queue and a single-active-consumer
queue, and goes through the failure modes.

Use::

    leadership = Leadership("reseller-eu", settings.exchange, LeadershipMetrics(metrics.registry))
    lease = await leadership.acquire(connection, stop)   # stands by until leader; None when ``stop`` is set
    if lease is not None:
        async with lease:                                  # releases the lock on leaving: a clean stop
            ...poll, publish, acknowledge while not lease.lost.is_set()...

The leader keeps checking the lock with a round trip every ``probe_interval_s`` and gives it up (``lost``) once
no round trip has succeeded for ``max_silence_s``, which is shorter than the broker's own heartbeat timeout: a
leader cut off from the broker stops polling before the broker hands the lock to a standby.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
from collections.abc import Awaitable, Callable
from enum import StrEnum
from types import TracebackType
from typing import Any, TypeVar

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from prometheus_client import CollectorRegistry, Counter, Gauge

from bridge.errors import BrokerError, BrokerRefusedError, BrokerUnavailableError

__all__ = ["Leadership", "LeadershipMetrics", "Lease", "Role", "lock_name"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Classic on purpose: RabbitMQ 3.10 accepts a second exclusive consumer on a quorum queue without complaint, so a
# vhost whose default queue type is quorum would silently allow two leaders. Non-durable and auto-delete: the lock
# leaves nothing behind, and it disappears with a failed node instead of waiting for it to come back.
LOCK_ARGUMENTS: dict[str, Any] = {"x-queue-type": "classic"}
_ACCOUNT = re.compile(r"^[a-z0-9-]+$")
# Heartbeat to assume when the connection does not say: RabbitMQ's default.
_DEFAULT_HEARTBEAT_S = 60.0
# A partitioned leader must stop before the broker frees the lock, which it does no sooner than two heartbeat
# intervals after the last byte it read; 1.5 leaves half an interval for the probe's own timing.
_SILENCE_PER_HEARTBEAT = 1.5
_CHANNEL_CLOSE_TIMEOUT_S = 2.0
# How often a probe waiting for its answer looks whether the broker blocks the connection meanwhile.
_BLOCK_CHECK_S = 0.25
_BROKEN = (aiormq.exceptions.AMQPError, ConnectionError, OSError, RuntimeError)


class Role(StrEnum):
    """Where one account's election stands in this process."""

    IDLE = "idle"
    """Not contending: before the first attempt, after losing the lock, after a clean stop."""
    STANDBY = "standby"
    LEADER = "leader"


def lock_name(exchange: str, account: str) -> str:
    """The lock queue of ``account`` in the deployment publishing to ``exchange``."""
    return f"{exchange}.leader.{account}"


class LeadershipMetrics:
    """The election's metrics, registered on the process's registry: build one, share it among the accounts."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.leader = Gauge(
            "bridge_leader",
            "1 while this process holds the account's lock and polls it, else 0.",
            ["account"],
            registry=registry,
        )
        self.transitions = Counter(
            "bridge_leader_transitions",
            "Changes of this process's role for an account, by the role entered (leader, standby, idle).",
            ["account", "role"],
            registry=registry,
        )


class Lease:
    """The lock, held. ``lost`` is set once the lock is gone for any reason, a clean release included."""

    def __init__(
        self,
        leadership: Leadership,
        connection: AbstractConnection,
        channel: AbstractChannel,
        amqp: aiormq.abc.AbstractChannel,
    ) -> None:
        self._leadership = leadership
        self._connection = connection
        self._channel = channel
        self._amqp = amqp
        self.lost = asyncio.Event()
        self.reason: str | None = None
        self._watch: asyncio.Task[None] | None = None
        self._blocked: Callable[[], bool] = _never
        self._closing: asyncio.Task[None] | None = None

    def _start(self, probe_interval_s: float, max_silence_s: float, blocked: Callable[[], bool]) -> None:
        self._connection.close_callbacks.add(self._on_connection_close)
        self._channel.close_callbacks.add(self._on_channel_close)
        self._amqp.on_consumer_cancel_callbacks.add(self._on_cancel)
        self._blocked = blocked
        self._watch = asyncio.create_task(self._probe(probe_interval_s, max_silence_s))
        if _gone(self._connection) or self._channel.is_closed:  # closed before the callbacks were in place
            self._lose("lock channel closed while taking the lock")

    def _on_connection_close(self, _sender: Any, exc: BaseException | None = None) -> None:
        self._lose(f"broker connection closed ({_describe(exc)})")

    def _on_channel_close(self, _sender: Any, exc: BaseException | None = None) -> None:
        self._lose(f"lock channel closed ({_describe(exc)})")

    async def _on_cancel(self, _frame: Any) -> None:
        self._lose("the broker cancelled the lock (its queue was deleted or its node went down)")

    def _lose(self, reason: str) -> None:
        if self.lost.is_set():
            return
        self.reason = reason
        self.lost.set()
        self._connection.close_callbacks.discard(self._on_connection_close)
        self._leadership._lost(reason)
        if self._watch is not None and self._watch is not asyncio.current_task():
            self._watch.cancel()
        # The broker may still count this consumer (a false alarm of the probe, a slow link): closing the channel
        # frees it, or the connection's end will. Done in the background, since a callback cannot await.
        if not self._channel.is_closed:
            self._closing = asyncio.create_task(self._close_channel())

    async def _close_channel(self) -> None:
        await _close_quietly(self._channel)

    async def _probe(self, probe_interval_s: float, max_silence_s: float) -> None:
        """A round trip on the lock's channel every interval; the lease ends when none succeeded for too long."""
        loop = asyncio.get_running_loop()
        confirmed_at = loop.time()
        name = self._leadership.lock_name
        while True:
            await asyncio.sleep(probe_interval_s)
            sent_at = loop.time()
            if self._blocked():
                # The broker blocks this connection (a resource alarm): it reads nothing from it, and it counts no
                # missed heartbeat either, so it keeps the lock. The silence of a block does not count.
                confirmed_at = sent_at
                continue
            try:
                # The broker read this declare at or after sent_at, so it cannot free the lock before
                # sent_at plus its heartbeat timeout: the lease runs from the send time, not the answer's.
                declared = await self._answer(
                    self._amqp.queue_declare(name, passive=True), confirmed_at + max_silence_s, max_silence_s
                )
            except TimeoutError:
                self._lose(f"no answer from the broker for {max_silence_s:.1f} s")
                return
            except _BROKEN as exc:
                self._lose(f"lock check failed ({_describe(exc)})")
                return
            if not declared.consumer_count:
                self._lose("the lock queue has no consumer")
                return
            confirmed_at = sent_at

    async def _answer(self, request: Awaitable[T], deadline: float, max_silence_s: float) -> T:
        """``await request`` until the loop time ``deadline``, which a block of the connection pushes back."""
        loop = asyncio.get_running_loop()
        answer = asyncio.ensure_future(request)
        try:
            while not answer.done():
                now = loop.time()
                if self._blocked():
                    deadline = max(deadline, now + max_silence_s)  # the block's silence does not count
                if now >= deadline:
                    raise TimeoutError
                await asyncio.wait([answer], timeout=min(_BLOCK_CHECK_S, deadline - now))
        finally:
            if not answer.done():
                answer.cancel()
        return answer.result()

    async def release(self) -> None:
        """Give the lock up (a clean stop): a standby takes it at its next retry. Idempotent."""
        if not self.lost.is_set():
            self._lose("released")
        with contextlib.suppress(asyncio.CancelledError):
            if self._watch is not None:
                self._watch.cancel()
                await asyncio.gather(self._watch, return_exceptions=True)
        await self._close_channel()

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.release()


class Leadership:
    """One account's election among the processes publishing to one exchange."""

    def __init__(
        self,
        account: str,
        exchange: str,
        metrics: LeadershipMetrics,
        *,
        retry_interval_s: tuple[float, float] = (1.0, 2.0),
        probe_interval_s: float = 1.0,
        max_silence_s: float | None = None,
        attempt_timeout_s: float = 5.0,
        rng: random.Random | None = None,
        blocked: Callable[[], bool] | None = None,
    ) -> None:
        """``retry_interval_s`` bounds a standby's uniformly drawn wait between attempts. ``max_silence_s``
        defaults to 1.5 heartbeat intervals of the connection the lock is taken on. ``blocked`` says whether the
        broker blocks that connection now (a resource alarm): the lease check does not count that silence."""
        if not _ACCOUNT.fullmatch(account):
            raise ValueError(f"account name must match [a-z0-9-]+, got {account!r}")
        self.account = account
        self.lock_name = lock_name(exchange, account)
        self._retry_interval_s = retry_interval_s
        self._probe_interval_s = probe_interval_s
        self._max_silence_s = max_silence_s
        self._attempt_timeout_s = attempt_timeout_s
        self._rng = rng or random.Random()
        self._blocked = blocked or _never
        self._gauge = metrics.leader.labels(account)
        self._transitions = metrics.transitions
        self._gauge.set(0)
        for role in Role:
            metrics.transitions.labels(account, role.value)
        self.role = Role.IDLE
        self._standby_channel: AbstractChannel | None = None

    def _enter(self, role: Role, message: str, reason: str, level: int = logging.INFO) -> None:
        if role is self.role:
            return
        self.role = role
        self._gauge.set(1 if role is Role.LEADER else 0)
        self._transitions.labels(self.account, role.value).inc()
        log.log(level, message, extra={"account": self.account, "lock": self.lock_name, "reason": reason})

    def _lost(self, reason: str) -> None:
        if reason == "released":
            self._enter(Role.IDLE, "released leadership", reason)
        else:
            self._enter(Role.IDLE, "lost leadership", reason, logging.WARNING)

    async def acquire(self, connection: AbstractConnection, stop: asyncio.Event) -> Lease | None:
        """Stand by until this process holds the lock; ``None`` once ``stop`` is set first.

        Raises :class:`BrokerUnavailableError` when ``connection`` closes (the caller reconnects), and
        :class:`BrokerError` when the broker refuses the lock queue for good (permissions, other arguments).
        """
        if self.role is Role.LEADER:
            raise RuntimeError(f"{self.lock_name}: acquire() while this process holds the lock")
        ended = "stopped"
        try:
            while not stop.is_set():
                if _gone(connection):
                    raise BrokerUnavailableError("broker connection closed while standing by")
                lease = await self._attempt(connection)
                if lease is not None:
                    return lease
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self._rng.uniform(*self._retry_interval_s))
            return None
        except BaseException as exc:
            ended = str(exc) or type(exc).__name__
            raise
        finally:
            await self._close_standby_channel()
            if self.role is Role.STANDBY:
                self._enter(Role.IDLE, "stopped standing by", ended)

    async def _attempt(self, connection: AbstractConnection) -> Lease | None:
        try:
            async with asyncio.timeout(self._attempt_timeout_s):
                return await self._try_lock(connection)
        except TimeoutError:
            reason = f"no answer from the broker within {self._attempt_timeout_s} s"
        except aiormq.exceptions.ChannelAccessRefused as exc:
            if "exclusive use" not in str(exc):
                raise BrokerRefusedError(f"lock queue {self.lock_name!r} refused: {_describe(exc)}") from None
            reason = "another process took the lock first"
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            raise BrokerError(f"lock queue {self.lock_name!r} exists with other arguments: {_describe(exc)}") from None
        except aiormq.exceptions.ChannelNotFoundEntity:
            reason = "the lock queue went away between declare and consume"
        except asyncio.CancelledError:
            if _cancelled_here():
                raise
            # aiormq re-raises the CancelledError that ended its reader when the connection dies under a call.
            if _gone(connection):
                raise BrokerUnavailableError("broker connection closed while standing by") from None
            reason = "lock attempt failed (its call was cancelled by the connection)"
        except _BROKEN as exc:
            if _gone(connection):
                raise BrokerUnavailableError(f"broker connection closed while standing by: {_describe(exc)}") from None
            reason = f"lock attempt failed ({_describe(exc)})"
        # A failed attempt leaves the channel closed or in doubt: the next attempt opens a fresh one.
        await self._close_standby_channel()
        self._enter(Role.STANDBY, "standing by", reason)
        return None

    async def _try_lock(self, connection: AbstractConnection) -> Lease | None:
        channel = self._standby_channel
        if channel is None or channel.is_closed:
            channel = self._standby_channel = await connection.channel(publisher_confirms=False)
        amqp = await channel.get_underlay_channel()
        declared = await amqp.queue_declare(self.lock_name, auto_delete=True, arguments=LOCK_ARGUMENTS)
        if declared.consumer_count:
            self._enter(Role.STANDBY, "standing by", "another process holds the lock")
            return None
        # Nothing is ever published to the lock queue; no_ack drops whatever someone might send to it by name.
        await amqp.basic_consume(self.lock_name, _discard, no_ack=True, exclusive=True)
        self._standby_channel = None
        lease = Lease(self, connection, channel, amqp)
        self._enter(Role.LEADER, "became leader", "the lock was free")
        lease._start(self._probe_interval_s, self._silence_limit(connection), self._blocked)
        return lease

    def _silence_limit(self, connection: AbstractConnection) -> float:
        if self._max_silence_s is not None:
            return self._max_silence_s
        heartbeat_s = float(getattr(getattr(connection.transport, "connection", None), "heartbeat_timeout", 0) or 0)
        return _SILENCE_PER_HEARTBEAT * (heartbeat_s or _DEFAULT_HEARTBEAT_S)

    async def _close_standby_channel(self) -> None:
        channel, self._standby_channel = self._standby_channel, None
        if channel is not None and not channel.is_closed:
            await _close_quietly(channel)


def _cancelled_here() -> bool:
    """Whether the current task is being cancelled, as opposed to aiormq re-raising a CancelledError of its own."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def _close_quietly(channel: AbstractChannel) -> None:
    """Close ``channel`` within a bound; a failure to close a channel of a dying connection is no news."""
    try:
        await asyncio.wait_for(channel.close(), _CHANNEL_CLOSE_TIMEOUT_S)
    except asyncio.CancelledError:
        if _cancelled_here():
            raise
    except Exception:  # the connection is closing anyway
        pass


def _gone(connection: AbstractConnection) -> bool:
    # is_closed turns true only once close() was called; a connection the broker or the network ended says so by
    # clearing ``connected``.
    return connection.is_closed or not connection.connected.is_set()


def _never() -> bool:
    return False


async def _discard(_message: Any) -> None:
    return None


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "closed"
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]
