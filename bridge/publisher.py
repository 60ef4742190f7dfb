"""The publisher: one broker connection, one confirm channel, a bounded window of publishes in flight.

:meth:`Publisher.publish` never raises for a per-message failure: it returns one of five outcomes, and
only ``ACK`` (the broker's ``Basic.Ack``) means the event is stored. A nack, a return, a timeout and a closed
channel are counted apart and acknowledge nothing upstream: the detail comes back on a later poll and is
published again with the same ``message_id``.

Reconnection is the run loop's job (with backoff); the publisher only reports, through :attr:`connected`,
that its connection is gone. ``connect_robust`` is not used on purpose: it reconnects on a fixed interval
with no backoff and hides the outage from the readiness probe.
"""

from __future__ import annotations

import asyncio
import logging
import time
from enum import StrEnum
from typing import Any, Protocol, cast

import aiormq
from aio_pika.abc import AbstractChannel
from pamqp.commands import Basic

from bridge import amqp as broker_link
from bridge import refusals
from bridge.amqp import BrokerConnection, HandshakeRefused
from bridge.metrics import Metrics
from bridge.settings import BrokerSettings
from bridge.topology import declare

__all__ = ["PublishOutcome", "Publishable", "Publisher"]

log = logging.getLogger(__name__)


class PublishOutcome(StrEnum):
    """What the broker said about one publish. Only ``ACK`` lets the detail be acknowledged upstream."""

    ACK = "ack"
    NACK = "nack"
    RETURNED = "returned"
    TIMEOUT = "timeout"
    CLOSED = "closed"


class Publishable(Protocol):
    """An event or an invalid record, as built by :mod:`bridge.events`."""

    @property
    def message_id(self) -> str: ...

    @property
    def routing_key(self) -> str: ...

    @property
    def body(self) -> bytes: ...

    def properties(self) -> Basic.Properties: ...


class Publisher:
    """Publishes events to the topic exchange and invalid records to the invalid exchange, with confirms.

    While the broker blocks the connection (a resource alarm: :attr:`blocked_reason`), new publishes wait
    before they are written, and the confirm timeout of those already written is suspended: a blocked
    connection is waiting, not broken, and giving it up would only publish the same details again on another.
    """

    def __init__(self, settings: BrokerSettings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._window = asyncio.Semaphore(settings.max_in_flight)
        self._in_flight = 0
        self._connection: BrokerConnection | None = None
        self._generation: object | None = None  # the connection being opened, or open (see connect)
        # The URL of BRIDGE_AMQP_URL tried first on the next connect: the one after the last connected (round robin).
        self._next_node = 0
        self._channel: AbstractChannel | None = None
        self._amqp: aiormq.Channel | None = None
        self._connected = False
        self._unblocked = asyncio.Event()
        self._unblocked.set()
        self._blocked_at = 0.0
        self.blocked_reason: str | None = None
        """The broker's reason while it blocks publishing on this connection (``"low on memory"``), else None."""
        # The confirm timers of the publishes on the wire, suspended while the connection is blocked.
        self._timers: set[asyncio.Timeout] = set()
        self._refused_since: float | None = None  # first refusal since the last Basic.Ack
        self._refusal = ""
        self._connecting = asyncio.Lock()
        self.ever_connected = False
        """Whether a connection was ever open: a refusal before that is a configuration error."""
        metrics.in_flight.set_function(lambda: self._in_flight)

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def broker(self) -> str | None:
        """The URL (password masked) of the broker node this publisher is connected to, or None."""
        return self._connection.broker if self._connected and self._connection is not None else None

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def connection(self) -> BrokerConnection | None:
        """The open broker connection (the leader lock lives on it, so both end together), else None."""
        return self._connection if self._connected else None

    @property
    def last_refusal(self) -> str | None:
        """The broker's latest refusal (nack, return, access refused) when no publish was confirmed since."""
        return self._refusal if self._refused_since is not None else None

    @property
    def refused_reason(self) -> str | None:
        """Why publishes are refused, once every publish for ``ready_max_refused_s`` was refused; else None."""
        since = self._refused_since
        if since is None:
            return None
        refused_s = time.monotonic() - since
        if refused_s < self._settings.ready_max_refused_s:
            return None
        return f"refused for {refused_s:.0f}s: {self._refusal}"

    @property
    def settings(self) -> BrokerSettings:
        return self._settings

    async def ensure_connected(self) -> None:
        """Connect unless connected: the accounts share this publisher, and the first to ask opens it for all.

        Raises what :meth:`connect` raises.
        """
        async with self._connecting:
            if not self._connected:
                await self.connect()

    async def connect(self) -> None:
        """Open the connection and confirm channel and declare the topology.

        Raises :class:`BrokerRefusedError` (login, vhost or permission refused, with the broker's reason),
        :class:`BrokerUnavailableError` (cannot connect, TLS failed, connection lost) or :class:`BrokerError`
        (the topology differs from the broker's).
        """
        await self.close()
        # The hooks act only for the connection opened now: a frame from one closed before is stale.
        generation = self._generation = object()
        try:
            connection = await broker_link.connect(
                self._settings,
                on_blocked=lambda reason: self._on_blocked(generation, reason),
                on_unblocked=lambda: self._on_unblocked(generation),
                first=self._next_node,
            )
        except Exception as exc:
            self._next_node += 1
            raise self._connect_error(exc) from None
        self._next_node = connection.node_index + 1
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=False)
            await declare(channel, self._settings.exchange)
            # Publishing goes through aio-pika's own protocol channel: the same frames, without building an
            # aio_pika.Message per event (~7 µs each, a twentieth of the bridge's CPU per event).
            # The concrete aiormq channel: its basic_publish takes ``wait``, which the abstract one does not name.
            amqp = cast(aiormq.Channel, await channel.get_underlay_channel())
        except asyncio.CancelledError:
            connection.abort()
            raise
        except Exception as exc:
            await self._discard(connection)
            raise self._connect_error(exc) from None
        self._connection, self._channel, self._amqp = connection, channel, amqp
        connection.close_callbacks.add(self._on_close)
        channel.close_callbacks.add(self._on_close)
        self._connected = True
        self.ever_connected = True
        self._metrics.broker_connected.set(1)
        log.info("broker connected", extra={"broker": connection.broker})

    def _connect_error(self, exc: Exception) -> Exception:
        """What :meth:`connect` raises for ``exc``: one line with the broker's own reason (:mod:`bridge.refusals`)."""
        if isinstance(exc, (*refusals.CONNECT_ERRORS, RuntimeError)):
            return refusals.explain(exc, self._settings)
        return exc

    def _on_blocked(self, generation: object, reason: str) -> None:
        if generation is not self._generation or self.blocked_reason == reason:
            return
        if self.blocked_reason is None:
            self._blocked_at = time.monotonic()
        self.blocked_reason = reason
        self._unblocked.clear()
        self._metrics.broker_blocked.set(1)
        for timer in self._timers:
            if not timer.expired():
                timer.reschedule(None)
        log.warning(
            f"broker blocked publishing: {reason}; publishing pauses until the broker unblocks",
            extra={"reason": reason},
        )

    def _on_unblocked(self, generation: object) -> None:
        if generation is not self._generation or self.blocked_reason is None:
            return
        blocked_s = time.monotonic() - self._blocked_at
        self._release_block()
        # What was on the wire gets a whole timeout from now: the block ate the time it was given.
        deadline = asyncio.get_running_loop().time() + self._settings.publish_timeout_s
        for timer in self._timers:
            if not timer.expired():
                timer.reschedule(deadline)
        log.info("broker unblocked publishing; publishing resumes", extra={"blocked_s": round(blocked_s, 1)})

    def _release_block(self) -> None:
        self.blocked_reason = None
        self._metrics.broker_blocked.set(0)
        self._unblocked.set()

    def _on_close(self, sender: Any, exc: BaseException | None = None) -> None:
        if sender is not self._connection and sender is not self._channel:
            return  # one this publisher closed itself, or gave up before: nothing to report
        refusal = _refusal_text(exc) if exc is not None else None
        if refusal is not None:
            self._refused(refusal)
        if self._connected:
            reason = refusal or (self._describe(exc) if exc else "closed")
            broker = self._connection.broker if self._connection is not None else None
            log.warning(f"broker connection lost: {reason}", extra={"reason": reason, "broker": broker})
        self._connected = False
        self._metrics.broker_connected.set(0)
        self._release_block()  # publishes waiting for an unblock see the connection gone

    def _refused(self, text: str) -> None:
        if self._refused_since is None:
            self._refused_since = time.monotonic()
        self._refusal = text

    async def close(self) -> None:
        connection, self._connection, self._channel, self._amqp = self._connection, None, None, None
        self._generation = None
        self._connected = False
        self._metrics.broker_connected.set(0)
        self._release_block()
        if connection is not None:
            await self._discard(connection)

    async def _discard(self, connection: BrokerConnection) -> None:
        """Close ``connection`` within the publish timeout, then reset its socket: it never lingers."""
        try:
            if not connection.is_closed:
                await asyncio.wait_for(connection.close(), self._settings.publish_timeout_s)
        except Exception as exc:  # closing a broken connection must not mask the original failure
            log.debug("error while closing the broker connection", extra={"reason": self._describe(exc)})
        finally:
            # A peer that stopped reading (a stalled link, a broker blocking us) never lets a close finish.
            connection.abort()

    def _abandon_connection(self) -> None:
        """Stop publishing into a connection whose confirms no longer come back; the loop reconnects.

        A confirm that never arrived means a stalled link or a stuck broker: publishing the same details again
        on that connection would only pile up copies that land once the bytes flow again. (A blocked connection
        never gets here: its confirm timers are suspended.)
        """
        if self._connected:
            log.warning(
                "publish confirm timed out; reopening the broker connection",
                extra={"timeout_s": self._settings.publish_timeout_s},
            )
            self._connected = False
            self._metrics.broker_connected.set(0)

    def _describe(self, exc: BaseException) -> str:
        """One line about a broker error, without the AMQP URL's password."""
        return self._settings.scrub(f"{type(exc).__name__}: {' '.join(str(exc).split())}")[:300]

    async def publish(self, item: Publishable, *, invalid: bool = False) -> PublishOutcome:
        """Publish ``item`` (to the invalid exchange when ``invalid``) and wait for the broker's answer.

        Waits for a place in the in-flight window first, so callers are paced by the broker's confirms. The
        caller counts the outcome, for its account.
        """
        async with self._window:
            self._in_flight += 1
            started = time.perf_counter()
            try:
                outcome = await self._publish(item, invalid)
            finally:
                self._in_flight -= 1
        if outcome is PublishOutcome.ACK:
            self._refused_since = None
            self._metrics.confirm_latency.observe(time.perf_counter() - started)
        elif outcome is PublishOutcome.NACK:
            self._refused(_NACKED)
        return outcome

    async def _publish(self, item: Publishable, invalid: bool) -> PublishOutcome:
        amqp = self._amqp
        if not self._unblocked.is_set():
            await self._unblocked.wait()  # the broker blocks publishing: write nothing until it unblocks
            amqp = self._amqp
        if amqp is None or not self.connected:
            return PublishOutcome.CLOSED
        exchange = self._settings.invalid_exchange if invalid else self._settings.exchange
        try:
            async with asyncio.timeout(self._settings.publish_timeout_s) as timer:
                self._timers.add(timer)
                try:
                    confirmation = await amqp.basic_publish(
                        item.body,
                        exchange=exchange,
                        routing_key=item.routing_key,
                        properties=item.properties(),
                        mandatory=True,
                        # Do not hold the channel lock until the writer task has sent this message's frames:
                        # with wait=True every publish costs a writer round trip under the lock. The confirm (or
                        # the channel closing) still settles each publish, and the window bounds the write queue.
                        wait=False,
                    )
                finally:
                    self._timers.discard(timer)
        except aiormq.exceptions.DeliveryError:
            return PublishOutcome.NACK
        except aiormq.exceptions.PublishError:
            return PublishOutcome.RETURNED
        except TimeoutError:
            self._abandon_connection()
            return PublishOutcome.TIMEOUT
        except (aiormq.exceptions.AMQPError, ConnectionError, OSError, RuntimeError) as exc:
            log.debug("publish failed on a closed channel", extra={"reason": self._describe(exc)})
            return PublishOutcome.CLOSED
        if isinstance(confirmation, Basic.Ack):
            return PublishOutcome.ACK
        if isinstance(confirmation, Basic.Nack | Basic.Reject):
            return PublishOutcome.NACK
        # With on_return_raises=False an unroutable message comes back as the returned message itself.
        self._refused(f"publish returned by the broker: {_return_text(confirmation)}")
        return PublishOutcome.RETURNED


_NACKED = "publishes nacked by the broker (a full queue that rejects publishes, or a broker that cannot store them)"


def _refusal_text(exc: BaseException | None) -> str | None:
    """The broker's reason when ``exc`` is a refusal (login, vhost, permission), else None."""
    if isinstance(exc, HandshakeRefused):
        return exc.reply_text
    if isinstance(exc, aiormq.exceptions.ChannelAccessRefused | aiormq.exceptions.ConnectionNotAllowed):
        return " ".join(str(exc.args[-1] if exc.args else exc).split())
    if isinstance(exc, aiormq.exceptions.ConnectionClosed) and exc.args and exc.args[0] in (402, 403, 530):
        return " ".join(str(exc.args[-1]).split())
    return None


def _return_text(returned: Any) -> str:
    delivery = getattr(returned, "delivery", None)
    return str(getattr(delivery, "reply_text", None) or "unroutable")
