"""``task-bridge demo``: the whole flow on one machine with no setup but a local RabbitMQ.

The simulator serves a seeded backlog (and new details arriving at ``rate`` per second) on a free local port;
the bridge runs against it with the simulator's credentials; a temporary queue bound to every event (``#``),
and one to the invalid route, print each message as it arrives; a summary line every few seconds shows what
the bridge counted. The broker URL and the exchange come from the usual settings (``BRIDGE_AMQP_URL``,
``BRIDGE_EXCHANGE``); everything upstream is replaced by the simulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TextIO

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from bridge import refusals
from bridge.app import App
from bridge.errors import BrokerError
from bridge.ledger import Progress
from bridge.settings import BrokerSettings, Settings
from bridge.simulator import Faults, Simulator, running
from bridge.tail import bind_temporary_queue, format_line
from bridge.topology import declare

__all__ = ["DemoOptions", "demo_overrides", "run_demo"]

_SIM_KEY_ID = "demo-access-key-id"
_SIM_KEY_SECRET = "demo-access-key-secret"  # the simulator's own, not a real credential
_DELIVERY_GRACE_S = 2.0  # after the bridge stopped, how long to wait for the last deliveries to print


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """What ``task-bridge demo`` was asked for."""

    tasks: int = 200
    rate: float = 5.0
    seed: int = 0
    seconds: float | None = None
    malformed_ratio: float = 0.0
    summary_interval_s: float = 3.0


def demo_overrides(poll_interval_s: float) -> dict[str, object]:
    """Settings the demo imposes over the environment: the simulator's credentials, no upstream filters."""
    return {
        "access_key_id": _SIM_KEY_ID,
        "access_key_secret": _SIM_KEY_SECRET,
        "security_token": None,
        "task_result_status": None,
        "domain_name": None,
        "instance_id": None,
        "task_no": None,
        "user_client_ip": None,
        "metrics_host": "127.0.0.1",
        "metrics_port": 0,  # never clash with a bridge already running on 9108
        "poll_interval_s": poll_interval_s,
    }


class _Counts:
    """What the demo's own queues received, next to the bridge's counters."""

    def __init__(self) -> None:
        self.events = 0
        self.invalid = 0
        self.last_acknowledged = 0
        self.last_time = time.monotonic()


async def run_demo(settings: Settings, options: DemoOptions, stop: asyncio.Event, out: TextIO) -> bool:
    """Run the demo until ``stop`` is set or ``options.seconds`` passed; True when the bridge ended cleanly.

    ``settings`` are used as given, except the upstream endpoint, which becomes the simulator's address.
    Raises :class:`BrokerError` when the broker cannot be reached or refuses the topology, and the bridge's
    own errors when it stops on one.
    """
    sim = Simulator(
        access_key_id=_SIM_KEY_ID,
        access_key_secret=_SIM_KEY_SECRET,
        tasks=options.tasks,
        seed=options.seed,
        rate=options.rate,
        faults=Faults(malformed_ratio=options.malformed_ratio),
    )

    def say(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    async with running(sim, "127.0.0.1", 0) as url:
        account = settings.account.model_copy(update={"endpoint": url})
        settings = settings.model_copy(update={"accounts": (account,)})
        broker = settings.broker
        connection = await refusals.connect(broker)
        async with connection:
            counts = _Counts()

            async def on_event(message: AbstractIncomingMessage) -> None:
                counts.events += 1
                say(format_line(message))

            async def on_invalid(message: AbstractIncomingMessage) -> None:
                counts.invalid += 1
                say(format_line(message))

            channel = await _watch(connection, broker, on_event, on_invalid)
            say(
                f"demo: simulator at {url} with {options.tasks} task details pending and {options.rate:g} new "
                f"per second; bridge publishing to {broker.exchange!r} on {broker.amqp_url_masked}"
            )
            say("demo: " + ("Ctrl-C to stop" if options.seconds is None else f"stopping after {options.seconds:g}s"))
            app = App(settings)
            started = time.monotonic()
            bridge = asyncio.create_task(app.run(stop), name="bridge")
            try:
                await _report_until_stopped(app, bridge, stop, options, counts, sim, started, say)
            finally:
                stop.set()
                complete = await bridge  # the bridge's own shutdown budget bounds this
            progress = app.loop.progress if app.loop is not None else Progress()
            # Everything the broker confirmed is in the demo's queues: give their deliveries a moment to print.
            deadline = time.monotonic() + _DELIVERY_GRACE_S
            while counts.events + counts.invalid < progress.published + progress.invalid:
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            say(_summary("demo stopped", progress, counts, sim, started, final=True))
            with contextlib.suppress(Exception):
                await channel.close()
    return complete


async def _watch(
    connection: AbstractConnection,
    settings: BrokerSettings,
    on_event: Callable[[AbstractIncomingMessage], Awaitable[None]],
    on_invalid: Callable[[AbstractIncomingMessage], Awaitable[None]],
) -> AbstractChannel:
    """Declare the topology and consume every event and invalid record from temporary queues; the channel.

    Raises :class:`BrokerError` naming the problem when the broker refuses any of it.
    """
    try:
        channel = await connection.channel(publisher_confirms=False)
        # The bridge declares the same topology at start; declaring it first lets the demo's queues bind
        # before the first event is published.
        await declare(channel, settings.exchange)
        events = await bind_temporary_queue(channel, settings.exchange, "#")
        invalid = await bind_temporary_queue(channel, settings.invalid_exchange, prefix_of=settings.exchange)
        await events.consume(on_event, no_ack=True)
        await invalid.consume(on_invalid, no_ack=True)
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        raise BrokerError(
            f"exchange {settings.exchange!r} exists with other settings ({exc.args[0] if exc.args else exc}); "
            "set BRIDGE_EXCHANGE to another name"
        ) from None
    except refusals.CONNECT_ERRORS as exc:
        # The demo's user needs the bridge's rights plus its temporary queues (<exchange>.tail.*).
        doing = f"declaring the demo's topology and its temporary queues ({settings.exchange + '.tail.'!r}*)"
        raise refusals.explain(exc, settings, doing) from None
    return channel


async def _report_until_stopped(
    app: App,
    bridge: asyncio.Task[bool],
    stop: asyncio.Event,
    options: DemoOptions,
    counts: _Counts,
    sim: Simulator,
    started: float,
    say: Callable[[str], None],
) -> None:
    end = None if options.seconds is None else started + options.seconds
    waiter = asyncio.ensure_future(stop.wait())
    try:
        while not stop.is_set() and not bridge.done():
            timeout = options.summary_interval_s
            if end is not None:
                timeout = min(timeout, max(0.0, end - time.monotonic()))
            await asyncio.wait([waiter, bridge], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if app.loop is not None and not stop.is_set() and not bridge.done():
                say(_summary("demo", app.loop.progress, counts, sim, started))
            if end is not None and time.monotonic() >= end:
                return
    finally:
        waiter.cancel()


def _summary(
    head: str, progress: Progress, counts: _Counts, sim: Simulator, started: float, final: bool = False
) -> str:
    now = time.monotonic()
    elapsed = now - started
    if final:
        rate = progress.acknowledged / elapsed if elapsed > 0 else 0.0
    else:
        span = now - counts.last_time
        rate = (progress.acknowledged - counts.last_acknowledged) / span if span > 0 else 0.0
        counts.last_acknowledged, counts.last_time = progress.acknowledged, now
    text = (
        f"{head} [{elapsed:5.1f}s] polled {progress.polled} · published {progress.published} · "
        f"acknowledged {progress.acknowledged} · invalid {progress.invalid} · {rate:.1f}/s · "
        f"received {counts.events} events, {counts.invalid} invalid · pending upstream {sim.pending_count}"
    )
    if final:
        text += f" · acknowledged by the simulator {sim.acknowledged_count}"
    return text
