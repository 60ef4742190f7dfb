"""The operator commands as an operator runs them: ``check``, ``tail``, ``run --once`` progress and ``demo``.

Each command runs as a subprocess (``python -m bridge ...``) against the real broker and the simulator served
over real HTTP, and each test checks what the operator sees (exit code, lines) and what the other side saw.
The progress display on a terminal is tested in-process with a fake terminal.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import signal
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest

from bridge.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from bridge.events import Event, InvalidRecord, convert
from bridge.progress import ProgressReporter, ProgressTracker, Snapshot, format_duration
from bridge.records import RawRecord
from bridge.simulator import Faults, Simulator, running
from tests.harness import BRIDGE_COMMAND, Broker, bridge_env, bridge_settings, broker_view

broker = pytest.mark.broker

_TIMEOUT_S = 30


@pytest.fixture
async def view(broker_url: str, exchange_name: str) -> AsyncIterator[Broker]:
    """The bridge's topology for this test's exchange, deleted afterwards."""
    async with broker_view(broker_url, exchange_name) as declared:
        yield declared


async def run_cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """Run ``task-bridge ARGS`` to completion; (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        *BRIDGE_COMMAND, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), _TIMEOUT_S)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def report(stdout: str) -> dict[str, tuple[str, str]]:
    """``check``'s report as {check name: (status, detail)}."""
    found: dict[str, tuple[str, str]] = {}
    for line in stdout.splitlines():
        match = re.match(r"^(OK|FAIL|SKIP)\s+(\S+)\s+(.*)$", line)
        if match:
            found[match.group(2)] = (match.group(1), match.group(3))
    return found


def event(detail_no: str, task_type: str, domain: str, status: str = "EXECUTE_SUCCESS") -> Event:
    record = {
        "TaskDetailNo": detail_no,
        "TaskType": task_type,
        "TaskStatus": status,
        "DomainName": domain,
        "UpdateTime": "2024-05-01 15:22:18",
    }
    item = convert(RawRecord(record, detail_no), source="urn:test", account="default")
    assert isinstance(item, Event)
    return item


# --- check ---------------------------------------------------------------------------------------------------


@broker
async def test_check_passes_and_changes_nothing(view: Broker, broker_url: str) -> None:
    sim = Simulator(tasks=30, seed=1)
    async with running(sim) as url:
        env = bridge_env(bridge_settings(view.exchange, broker_url, upstream_endpoint=url))
        code, out, err = await run_cli(env, "check")
    lines = report(out)
    assert code == EXIT_OK, out + err
    assert list(lines) == ["settings", "upstream", "broker", "topology"]
    assert {status for status, _ in lines.values()} == {"OK"}
    assert "30 task details pending" in lines["upstream"][1]
    assert "match" in lines["topology"][1]
    assert out.rstrip().endswith("check passed")
    assert sim.acknowledged_count == 0 and sim.pending_count == 30
    assert "sim-access-key-secret" not in out + err


@broker
async def test_check_names_a_wrong_secret_without_showing_it(view: Broker, broker_url: str) -> None:
    async with running(Simulator(tasks=1)) as url:
        env = bridge_env(bridge_settings(view.exchange, broker_url, upstream_endpoint=url))
        env["ALIBABA_CLOUD_ACCESS_KEY_SECRET"] = "wrong-secret-3141"
        code, out, err = await run_cli(env, "check")
    lines = report(out)
    assert code == EXIT_FAILURE
    assert lines["upstream"][0] == "FAIL"
    assert "SignatureDoesNotMatch" in lines["upstream"][1]
    assert "ALIBABA_CLOUD_ACCESS_KEY_SECRET" in lines["upstream"][1]
    assert lines["broker"][0] == "OK"
    assert out.rstrip().endswith("check failed: upstream")
    assert "wrong-secret-3141" not in out + err


@broker
async def test_check_fails_when_the_broker_is_unreachable(broker_url: str, exchange_name: str) -> None:
    async with running(Simulator(tasks=1)) as url:
        settings = bridge_settings(exchange_name, "amqp://guest:hidden-pw-2718@127.0.0.1:1/", upstream_endpoint=url)
        code, out, err = await run_cli(bridge_env(settings), "check")
    lines = report(out)
    assert code == EXIT_FAILURE
    assert lines["upstream"][0] == "OK"
    assert lines["broker"][0] == "FAIL"
    assert "amqp://guest:***@127.0.0.1:1/" in lines["broker"][1]
    assert lines["topology"][0] == "SKIP"
    assert "hidden-pw-2718" not in out + err


@broker
async def test_check_reports_a_topology_mismatch(
    amqp: aio_pika.abc.AbstractRobustConnection, broker_url: str, exchange_name: str
) -> None:
    channel = await amqp.channel()
    await channel.declare_exchange(exchange_name, type=aio_pika.ExchangeType.FANOUT, durable=True)
    try:
        async with running(Simulator(tasks=1)) as url:
            env = bridge_env(bridge_settings(exchange_name, broker_url, upstream_endpoint=url))
            code, out, _err = await run_cli(env, "check")
    finally:
        await channel.exchange_delete(exchange_name)
    lines = report(out)
    assert code == EXIT_FAILURE
    status, detail = lines["topology"]
    assert status == "FAIL"
    assert "PRECONDITION_FAILED" in detail and exchange_name in detail and "fanout" in detail
    # Nothing was created by the check: only the pre-declared exchange existed, and it is gone now.
    probe = await amqp.channel()
    with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
        await probe.declare_exchange(f"{exchange_name}.unrouted", passive=True)


async def test_check_exits_2_on_invalid_settings(exchange_name: str) -> None:
    env = bridge_env(bridge_settings(exchange_name, "amqp://guest:guest@127.0.0.1:5672/"))
    env["BRIDGE_PAGE_SIZE"] = "5000"
    code, out, err = await run_cli(env, "check")
    assert code == EXIT_USAGE
    assert re.search(r"^FAIL\s+settings\s+BRIDGE_PAGE_SIZE: .*5000", out, re.M), out
    assert "Traceback" not in err


# --- tail ----------------------------------------------------------------------------------------------------


def tail_env(broker_url: str, exchange: str) -> dict[str, str]:
    """Only the broker settings: tail needs no upstream credentials."""
    env = bridge_env(bridge_settings(exchange, broker_url))
    for name in ("ALIBABA_CLOUD_ACCESS_KEY_ID", "ALIBABA_CLOUD_ACCESS_KEY_SECRET", "BRIDGE_UPSTREAM_ENDPOINT"):
        env.pop(name)
    return env


class Tail:
    """A running ``task-bridge tail`` subprocess."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, env: dict[str, str], *args: str) -> Tail:
        process = await asyncio.create_subprocess_exec(
            *BRIDGE_COMMAND, "tail", *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        assert process.stderr is not None
        ready = await asyncio.wait_for(process.stderr.readline(), _TIMEOUT_S)
        assert ready.startswith(b"tailing "), ready
        return cls(process)

    async def lines(self, count: int) -> list[str]:
        assert self.process.stdout is not None
        return [
            (await asyncio.wait_for(self.process.stdout.readline(), _TIMEOUT_S)).decode().rstrip("\n")
            for _ in range(count)
        ]

    async def interrupt(self) -> tuple[int, str]:
        """Ctrl-C; the exit code and whatever it printed after the lines already read."""
        self.process.send_signal(signal.SIGINT)
        rest, _err = await asyncio.wait_for(self.process.communicate(), _TIMEOUT_S)
        assert self.process.returncode is not None
        return self.process.returncode, rest.decode()


@broker
async def test_tail_prints_each_event_and_exits_0_on_ctrl_c(view: Broker, broker_url: str) -> None:
    tail = await Tail.start(tail_env(broker_url, view.exchange))
    sent = [event("id-one", "CHG_DNS", "example.com"), event("id-two", "ORDER_RENEW", "example.org", "EXECUTE_FAILURE")]
    exchange = await view.channel.get_exchange(view.exchange)
    for item in sent:
        await exchange.publish(item.message(), routing_key=item.routing_key)
    lines = await tail.lines(2)
    code, rest = await tail.interrupt()
    assert code == EXIT_OK
    assert rest == ""
    for line, item in zip(lines, sent, strict=True):
        assert line.split() == [
            "2024-05-01T07:22:18Z",  # the event's time: UpdateTime (UTC+8) in UTC
            item.routing_key,
            item.domain_name,
            item.task_status,
            item.message_id,
        ]
    # The tail's queue was bound to '#': the events were routed to it, none fell to the unrouted queue.
    assert await view.take(view.unrouted) == []


@broker
async def test_tail_json_filters_by_pattern(view: Broker, broker_url: str) -> None:
    tail = await Tail.start(tail_env(broker_url, view.exchange), "--json", "chg_dns.*")
    skipped = event("id-skipped", "ORDER_RENEW", "example.org")
    wanted = event("id-wanted", "CHG_DNS", "example.com")
    exchange = await view.channel.get_exchange(view.exchange)
    for item in (skipped, wanted):
        # The skipped one is kept by the alternate exchange in the unrouted queue, as the bridge's would be.
        await exchange.publish(item.message(), routing_key=item.routing_key)
    (line,) = await tail.lines(1)
    code, rest = await tail.interrupt()
    assert code == EXIT_OK
    assert rest == ""
    assert json.loads(line) == json.loads(wanted.body)


@broker
async def test_tail_invalid_route_shows_the_validation_error(view: Broker, broker_url: str) -> None:
    tail = await Tail.start(tail_env(broker_url, view.exchange), "--invalid", "--count", "1")
    record = {"TaskDetailNo": "id-bad", "TaskType": "CHG_DNS", "TaskStatus": "DONE", "DomainName": "bad.example"}
    item = convert(RawRecord(record, "id-bad"), source="urn:test", account="default")
    assert isinstance(item, InvalidRecord)
    exchange = await view.channel.get_exchange(view.invalid)
    await exchange.publish(item.message(), routing_key=item.routing_key)
    assert tail.process.stdout is not None
    out = await asyncio.wait_for(tail.process.stdout.read(), _TIMEOUT_S)  # --count 1: it exits by itself
    assert await asyncio.wait_for(tail.process.wait(), _TIMEOUT_S) == EXIT_OK
    line = out.decode().strip()
    assert "id-bad" in line and "bad.example" in line
    assert "INVALID: TaskStatus: 'DONE' is not one of" in line


@broker
async def test_tail_of_a_missing_exchange_says_so(broker_url: str, exchange_name: str) -> None:
    code, out, err = await run_cli(tail_env(broker_url, exchange_name), "tail")
    assert code == EXIT_FAILURE
    assert f"exchange '{exchange_name}' does not exist" in err
    assert out == ""


# --- run --once progress ---------------------------------------------------------------------------------------


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@broker
async def test_run_once_logs_progress_and_a_summary_without_a_terminal(view: Broker, broker_url: str) -> None:
    tasks = 2000
    sim = Simulator(tasks=tasks, seed=5, faults=Faults(latency_s=0.03))
    await view.bind("all")
    async with running(sim) as url:
        settings = bridge_settings(view.exchange, broker_url, upstream_endpoint=url, page_size=100)
        with tempfile.TemporaryFile() as log:  # a file: stderr is no terminal
            process = await asyncio.create_subprocess_exec(
                *BRIDGE_COMMAND, "run", "--once", "--progress-interval", "0.2", env=bridge_env(settings), stderr=log
            )
            code = await asyncio.wait_for(process.wait(), _TIMEOUT_S)
            log.seek(0)
            entries = json_lines(log.read().decode())
    assert code == EXIT_OK
    assert sim.acknowledged_count == tasks
    progress = [e for e in entries if e["message"] == "progress"]
    assert progress, "no progress line while draining"
    middle = [e for e in progress if 0 < e["done"] < tasks]
    assert middle, progress
    assert all(e["total"] is not None and abs(e["total"] - tasks) <= 100 for e in middle)
    assert any(e["rate_per_s"] and e["eta_s"] is not None for e in middle)
    (summary,) = [e for e in entries if e["message"] == "summary"]
    assert summary["complete"] is True
    assert summary["done"] == summary["published"] == tasks
    assert summary["total"] == tasks
    assert summary["average_rate_per_s"] > 0


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Counters:
    def __init__(self) -> None:
        self.polled = self.published = self.invalid = self.unusable = self.acknowledged = 0
        self.backlog: int | None = None
        self.acknowledged_at_poll = 0


def test_progress_on_a_terminal_redraws_one_line_and_ends_with_a_summary() -> None:
    now = [100.0]
    counters = Counters()
    screen = FakeTerminal()
    reporter = ProgressReporter(lambda: counters, screen, clock=lambda: now[0])
    assert reporter.interactive

    reporter.tick()
    assert screen.getvalue().endswith("\r\x1b[Kdraining: waiting for the first poll (0s)")
    # First page: 1000 pending, 200 on the page.
    counters.polled, counters.backlog = 200, 1000
    now[0] += 1
    reporter.tick()
    counters.published = counters.acknowledged = 200
    counters.invalid = 3
    now[0] += 1
    reporter.tick()
    line = screen.getvalue().rsplit("\r\x1b[K", 1)[1]
    assert line == "draining: 200 of 1,000 done (20.0%) · 100/s · 8s left · 3 invalid"
    assert "\n" not in screen.getvalue()  # redrawn in place, never scrolled

    counters.published = counters.acknowledged = 1000
    counters.polled, counters.backlog, counters.acknowledged_at_poll = 1000, 0, 1000  # the last poll: nothing left
    now[0] += 8
    snap = reporter.finish(complete=True)
    assert snap is not None and snap.done == snap.total == 1000
    assert screen.getvalue().endswith(
        "\r\x1b[Kdrained 1,000 task details acknowledged in 10s (100/s); 1,000 published, 3 invalid, 0 unusable\n"
    )


async def test_progress_line_gives_way_to_log_lines_on_the_same_terminal() -> None:
    screen = FakeTerminal()
    handler = logging.StreamHandler(screen)
    root = logging.getLogger()
    root.addHandler(handler)
    counters = Counters()
    try:
        async with ProgressReporter(lambda: counters, screen) as reporter:
            reporter.tick()
            logging.getLogger("bridge.test").warning("something happened")
    finally:
        root.removeHandler(handler)
    assert "draining: waiting for the first poll (0s)\r\x1b[Ksomething happened\n" in screen.getvalue()
    assert handler.filters == []  # detached again


def test_total_counts_what_was_acknowledged_at_the_time_of_the_poll() -> None:
    tracker = ProgressTracker(started=0.0)
    counters = Counters()
    counters.polled, counters.backlog = 100, 500
    assert tracker.observe(counters, 1.0).total == 500
    # Acknowledgements between two polls: the upstream's count is stale, the total is not inflated.
    counters.acknowledged = 100
    snap = tracker.observe(counters, 2.0)
    assert (snap.done, snap.total) == (100, 500)
    assert snap.rate_per_s == pytest.approx(50.0)
    assert snap.eta_s == pytest.approx(8.0)
    counters.polled, counters.backlog, counters.acknowledged_at_poll = 200, 400, 100  # the next poll agrees
    assert tracker.observe(counters, 2.1).total == 500
    counters.polled, counters.backlog = 300, 450  # 50 new details arrived upstream meanwhile
    assert tracker.observe(counters, 2.2).total == 550


def test_snapshot_fields_and_durations() -> None:
    snap = Snapshot(12.34, 5, None, None, None, 5, 5, 0, 0)
    assert snap.percent is None
    assert snap.fields()["elapsed_s"] == 12.3
    assert [format_duration(s) for s in (0.4, 59, 61, 3725)] == ["0s", "59s", "1m01s", "1h02m"]


# --- demo ----------------------------------------------------------------------------------------------------


@broker
async def test_demo_runs_by_itself_and_acknowledges_the_backlog(view: Broker, broker_url: str) -> None:
    env = bridge_env(bridge_settings(view.exchange, broker_url))
    for name in ("ALIBABA_CLOUD_ACCESS_KEY_ID", "ALIBABA_CLOUD_ACCESS_KEY_SECRET", "BRIDGE_UPSTREAM_ENDPOINT"):
        env.pop(name)  # the demo needs no setup: the simulator's credentials are filled in
    code, out, err = await run_cli(
        env, "demo", "--seconds", "4", "--tasks", "50", "--summary-interval", "1", "--malformed-ratio", "0.1"
    )
    assert code == EXIT_OK, err[-2000:]
    lines = out.splitlines()
    events = [line for line in lines if not line.startswith("demo")]
    summaries = [line for line in lines if line.startswith("demo [")]
    final = lines[-1]
    assert final.startswith("demo stopped")
    assert len(summaries) >= 2
    stats = dict(re.findall(r"(polled|published|acknowledged|invalid) (\d+)", final))
    acknowledged_by_sim = int(re.search(r"acknowledged by the simulator (\d+)", final).group(1))  # type: ignore[union-attr]
    assert acknowledged_by_sim >= 50, final
    assert int(stats["acknowledged"]) == acknowledged_by_sim
    assert int(stats["invalid"]) > 0  # --malformed-ratio reached the invalid route ...
    # Each id printed once per confirmed publish; a publish whose confirm timed out on a loaded machine is
    # published again (at least once), so the ids are counted, not the lines.
    ids = {line: line.split("  INVALID:")[0].split()[-1] for line in events}
    assert len({ids[line] for line in events if "INVALID:" in line}) == int(stats["invalid"])  # ... and was printed
    assert len(set(ids.values())) == int(stats["published"]) + int(stats["invalid"])
    valid = [line for line in events if "INVALID:" not in line]
    assert all(re.search(r"\.execute_(success|failure)\s.*EXECUTE_(SUCCESS|FAILURE)\s", line) for line in valid)
    assert "Traceback" not in err
