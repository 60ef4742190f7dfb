"""The broker connection: aio-pika's, with the three seams aiormq 7 does not offer publicly.

- **Blocked / unblocked.** RabbitMQ sends ``Connection.Blocked`` (with its reason, "low on memory") when a
  resource alarm stops it from reading publishes, and ``Connection.Unblocked`` when the alarm clears. aiormq
  handles both frames in two private methods (it only logs them), so :class:`_AmqpConnection` overrides those
  methods, by their mangled names, to call the publisher's hooks. A test on a private node pins the behaviour.
- **The broker's reason for a refused handshake.** aiormq checks the frame type before it looks for
  ``Connection.Close``, so a wrong password or an unknown vhost reads ``InvalidFrameError: Expected one of
  ['Connection.OpenOk'] ...``. :meth:`_AmqpConnection._rpc` looks for the close first and raises
  :class:`HandshakeRefused` with the broker's reply code and text.
- **One socket write for the frames queued together.** aiormq's writer task sends each queued frame with its
  own ``transport.write`` (a ``send()`` system call per published message). :class:`_AmqpConnection` gives it a
  write queue (:class:`_CoalescingQueue`) that hands over every frame queued at that moment as one, in order,
  and holds enough frames for the publisher's whole window, so the publishes of one loop iteration leave in one
  write instead of waiting, a few at a time, for room in aiormq's queue of ten.
- **A transport that can be aborted.** Closing a connection whose peer does not read (a stalled link, a broker
  that blocked it) waits for bytes that never leave; :meth:`BrokerConnection.abort` resets the socket instead,
  so an abandoned connection never lingers on either side.

With several URLs in ``BRIDGE_AMQP_URL`` (a cluster's nodes), :func:`connect` tries them in turn from the one
its caller names (the publisher names the one after the node it lost): see docs/broker.md, "A broker cluster".

The connection is built by hand (not with ``aio_pika.connect``) only because aio-pika passes the underlying
connection no arguments of its own choosing; it is an ``aio_pika.Connection`` for everything else.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any

import aio_pika
import aiormq
import pamqp.frame
from aio_pika.abc import UnderlayConnection
from aiormq.abc import ChannelFrame
from aiormq.connection import TransportFactory
from pamqp import commands as spec
from yarl import URL

from bridge.settings import BrokerSettings

__all__ = ["BrokerConnection", "HandshakeRefused", "NoNodeConnected", "connect", "dead_link_detection_s"]

log = logging.getLogger(__name__)


def dead_link_detection_s(heartbeat_s: int) -> float:
    """The longest a dead, idle link goes unnoticed by the bridge with AMQP heartbeat ``heartbeat_s``.

    aiormq sends a heartbeat every ``heartbeat_s // 2`` seconds (at least 1) and, at each of those ticks, gives
    the connection up once no frame has arrived for ``(heartbeat_s + 1) * 3`` seconds: the grace, plus up to one
    tick before it is checked. (RabbitMQ, for its side, closes a connection after about two missed heartbeats.)
    """
    grace_s = (heartbeat_s + 1) * aiormq.Connection.HEARTBEAT_GRACE_MULTIPLIER
    tick_s = max(1, int(heartbeat_s * aiormq.Connection.HEARTBEAT_INTERVAL_MULTIPLIER))
    return float(grace_s + tick_s)


class HandshakeRefused(aiormq.exceptions.AMQPConnectionError):
    """The broker closed the connection during the handshake: login, vhost or access refused."""

    def __init__(self, reply_code: int, reply_text: str) -> None:
        self.reply_code = reply_code
        self.reply_text = reply_text
        super().__init__(reply_code, reply_text)

    def __str__(self) -> str:
        return f"{self.reply_text} (reply code {self.reply_code})"


class _Transports(TransportFactory):
    """Opens TCP or TLS like aiormq's own factories and keeps the writer, so the socket can be aborted."""

    def __init__(self) -> None:
        self.writer: asyncio.StreamWriter | None = None

    async def create(self, url: URL, **kwargs: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        provider = kwargs.pop("ssl_context_provider")
        context = await provider.get_context() if url.scheme == "amqps" else None
        try:
            reader, writer = await asyncio.open_connection(host=url.host, port=url.port, ssl=context, **kwargs)
        except ssl.SSLError:
            raise  # kept as it is: the publisher names TLS and the setting to use
        except OSError as exc:
            raise aiormq.exceptions.AMQPConnectionError(*exc.args) from exc
        self.writer = writer
        return reader, writer

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()


# Frames the write queue holds before a publish waits for room: more than the publisher's window (at most
# BRIDGE_MAX_IN_FLIGHT publishes, one frame each) plus the channel's own requests, so the window alone paces
# publishing, as it does the confirms. The bytes are bounded by that window either way: a publish that waits
# for room holds its frame too.
_WRITE_QUEUE_FRAMES = 65_536 + 64
# At most this many bytes go into one write; the rest of the queue follows in the next ones.
_WRITE_MAX_BYTES = 256 * 1024


class _Frames(ChannelFrame):
    """Consecutive frames of the write queue as one: their payloads joined, each drain waiter kept."""

    waiting: list[ChannelFrame]

    def __init__(self, frames: list[ChannelFrame]) -> None:
        super().__init__(payload=b"".join([frame.payload for frame in frames]), should_close=frames[-1].should_close)
        # A frozen dataclass: its fields are set this way (as its own __init__ does).
        object.__setattr__(self, "waiting", [frame for frame in frames if frame.drain_future is not None])

    @property
    def should_drain(self) -> bool:
        return any(frame.should_drain for frame in self.waiting)

    def drain(self) -> None:
        for frame in self.waiting:
            frame.drain()


class _CoalescingQueue(asyncio.Queue[ChannelFrame]):
    """aiormq's write queue, handing its writer every frame queued at that moment as one (see the module doc).

    Order is kept; a closing frame (``Connection.CloseOk``) ends a batch, as aiormq's writer stops after it; a
    frame whose sender waits for it to be written (``drain_future``) is released after the write of its batch
    has drained, as aiormq does after the frame's own write.
    """

    async def get(self) -> ChannelFrame:
        frame = await super().get()
        if self.empty() or frame.should_close:
            return frame
        frames = [frame]
        size = len(frame.payload)
        while not self.empty() and size < _WRITE_MAX_BYTES and not frame.should_close:
            frame = self.get_nowait()
            self.task_done()  # aiormq's writer marks the batch done once, for its first frame
            frames.append(frame)
            size += len(frame.payload)
        return _Frames(frames)


class _AmqpConnection(aiormq.Connection):
    """aiormq's connection, telling ``on_blocked(reason)`` / ``on_unblocked()`` about the broker's alarms, with
    a write queue that coalesces frames into one socket write."""

    def __init__(
        self,
        url: URL,
        *,
        on_blocked: Callable[[str], None],
        on_unblocked: Callable[[], None],
        **kwargs: Any,
    ) -> None:
        super().__init__(url, **kwargs)
        self.write_queue = _CoalescingQueue(maxsize=_WRITE_QUEUE_FRAMES)
        self._on_blocked = on_blocked
        self._on_unblocked = on_unblocked

    # Overrides of aiormq's private handlers (Connection.__handle_connection_blocked / _unblocked). They do what
    # aiormq's do (the event gates aiormq's writer at start and its ready()), without aiormq's log line.
    async def _Connection__handle_connection_blocked(self, frame: spec.Connection.Blocked) -> None:
        getattr(self, "_Connection__connection_unblocked").clear()  # noqa: B009 (a mangled private name)
        self._on_blocked(frame.reason or "no reason given")

    async def _Connection__handle_connection_unblocked(self, _frame: spec.Connection.Unblocked) -> None:
        getattr(self, "_Connection__connection_unblocked").set()  # noqa: B009
        self._on_unblocked()

    @staticmethod
    async def _rpc(request: Any, writer: asyncio.StreamWriter, frame_receiver: Any, wait_response: bool = True) -> Any:
        # aiormq's own, with Connection.Close looked at first: its reply text is the broker's reason.
        writer.write(pamqp.frame.marshal(request, 0))
        await writer.drain()
        if not wait_response:
            return None
        _, _, frame = await frame_receiver.get_frame()
        if isinstance(frame, spec.Connection.Close):
            raise HandshakeRefused(frame.reply_code or 0, frame.reply_text or "")
        if request.synchronous and frame.name not in request.valid_responses:
            raise aiormq.exceptions.InvalidFrameError(f"Expected one of {request.valid_responses!r}, got {frame!r}")
        return frame


class _Underlay(UnderlayConnection):
    @classmethod
    async def make_connection(
        cls,
        url: URL,
        timeout: float | None = None,  # noqa: ASYNC109 (aio-pika's signature)
        **kwargs: Any,
    ) -> _AmqpConnection:
        connection = _AmqpConnection(url, **kwargs)
        await asyncio.wait_for(connection.connect(), timeout=timeout)
        await connection.ready()
        return connection


class BrokerConnection(aio_pika.Connection):
    """An ``aio_pika.Connection`` with blocked/unblocked hooks, the broker's handshake refusals and :meth:`abort`."""

    def __init__(
        self,
        url: str,
        *,
        heartbeat_s: int,
        ssl_context: ssl.SSLContext | None,
        on_blocked: Callable[[str], None],
        on_unblocked: Callable[[], None],
    ) -> None:
        super().__init__(URL(url).update_query(heartbeat=heartbeat_s), ssl_context=ssl_context)
        self._transports = _Transports()
        self._hooks = {"on_blocked": on_blocked, "on_unblocked": on_unblocked}
        self.node_index = 0
        """Which URL of ``BRIDGE_AMQP_URL`` this connection went to (from 0)."""
        self.broker = ""
        """That URL with its password masked, for logs and reports."""

    async def connect(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (aio-pika's signature)
        self.transport = await _Underlay.connect(
            self.url,
            self._on_connection_close,
            timeout=timeout,
            transport_factory=self._transports,
            **self._hooks,
            **self.kwargs,
        )
        await self._on_connected()

    def abort(self) -> None:
        """Reset the socket now, without the closing handshake (for a peer that no longer reads)."""
        self._transports.abort()
        if self.transport is None and not self._closed.done():
            # Never opened: nothing to close. Marked closed, so aio-pika's __del__ schedules no close() that an
            # event loop may never run (an "never awaited" warning after every failed connect).
            self._closed.set_result(True)


def _ignore(*_args: object) -> None:
    return None


class NoNodeConnected(aiormq.exceptions.AMQPConnectionError):
    """No URL of a ``BRIDGE_AMQP_URL`` list took the connection: ``failures`` holds (URL index, error) for each."""

    def __init__(self, failures: list[tuple[int, Exception]]) -> None:
        self.failures = failures
        super().__init__(f"no broker node of {len(failures)} took the connection")


async def connect(
    settings: BrokerSettings,
    *,
    on_blocked: Callable[[str], None] = _ignore,
    on_unblocked: Callable[[], None] = _ignore,
    first: int = 0,
) -> BrokerConnection:
    """A connection to ``BRIDGE_AMQP_URL`` with the bridge's heartbeat and TLS settings (every command uses it).

    With several URLs (a cluster's nodes) they are tried in turn, from number ``first`` (from 0, taken modulo
    their count), until one connects: :attr:`BrokerConnection.node_index` says which. Raises what aiormq
    raises (``AMQPError``, ``OSError``, ``TimeoutError``), :class:`HandshakeRefused` for a refused login or
    vhost, and ``ssl.SSLError`` for a failed TLS handshake; with several URLs, :class:`NoNodeConnected`
    carrying each node's error.
    """
    urls = settings.amqp_urls
    failures: list[tuple[int, Exception]] = []
    for step in range(len(urls)):
        index = (first + step) % len(urls)
        try:
            connection = await _connect_node(settings, urls[index], on_blocked, on_unblocked)
        except Exception as exc:
            if len(urls) == 1:
                raise
            failures.append((index, exc))
            if step + 1 < len(urls):
                reason = settings.scrub(f"{type(exc).__name__}: {' '.join(str(exc).split())}")[:300]
                broker = settings.amqp_node(index).amqp_url_masked
                log.warning(
                    f"broker node {broker} failed ({reason}); trying the next URL",
                    extra={"broker": broker, "reason": reason},
                )
            continue
        connection.node_index = index
        connection.broker = settings.amqp_node(index).amqp_url_masked
        return connection
    raise NoNodeConnected(failures)


async def _connect_node(
    settings: BrokerSettings, url: str, on_blocked: Callable[[str], None], on_unblocked: Callable[[], None]
) -> BrokerConnection:
    connection = BrokerConnection(
        url,
        heartbeat_s=settings.amqp_heartbeat_s,
        ssl_context=settings.amqp_ssl_context() if settings.amqp_tls else None,
        on_blocked=on_blocked,
        on_unblocked=on_unblocked,
    )
    try:
        await connection.connect(timeout=settings.publish_timeout_s)
    except BaseException:
        connection.abort()
        raise
    return connection
