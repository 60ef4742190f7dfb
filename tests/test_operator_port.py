"""The operator port (``/metrics``, ``/healthz``, ``/readyz``): answers, limits, timeouts, and a flood from outside.

The first tests serve the port in-process and speak raw HTTP to it; the last ones run ``task-bridge run`` as a
process under an open-file limit of 1,024 and flood its port while the simulator counts its polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from bridge import operator_port
from bridge.cli import EXIT_FAILURE
from bridge.health import MAX_RENDERS_PER_S, create_app, operator_routes
from bridge.metrics import Metrics
from bridge.operator_port import MAX_HEAD_BYTES, Request, serve_operator_port
from bridge.simulator import Simulator, running
from tests.harness import BRIDGE_COMMAND, bridge_env, bridge_settings, eventually

NOT_READY = "broker: connection closed"


def _dropped(metrics: Metrics, reason: str) -> float:
    return metrics.registry.get_sample_value("bridge_operator_connections_dropped_total", {"reason": reason}) or 0.0


@contextlib.asynccontextmanager
async def _port(
    metrics: Metrics, not_ready: Callable[[], str | None] = lambda: None, **options: Any
) -> AsyncIterator[int]:
    handler = operator_routes(metrics, not_ready)
    async with serve_operator_port(
        handler, "127.0.0.1", 0, dropped=metrics.operator_connections_dropped, **options
    ) as (_host, port):
        yield port


async def _exchange(port: int, request: bytes, *, timeout_s: float = 5.0) -> bytes:
    """Send ``request`` raw and read until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout_s)
    finally:
        writer.close()


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


# --- answers ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "BREW"])
async def test_methods_other_than_get_and_head_get_405(method: str) -> None:
    async with _port(Metrics()) as port, httpx.AsyncClient() as http:
        for path in ("/metrics", "/readyz", "/healthz"):
            answer = await http.request(method, f"http://127.0.0.1:{port}{path}", content=b"x=1")
            assert answer.status_code == 405
            assert answer.headers["allow"] == "GET, HEAD"


async def test_unknown_paths_get_404_and_head_has_no_body() -> None:
    async with _port(Metrics()) as port, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        for path in ("/", "/metric", "/metrics/x", "/admin", "/readyz/../x"):
            assert (await http.get(path)).status_code == 404, path
        head = await _exchange(port, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"Content-Length: 3\r\n" in head
    assert head.endswith(b"\r\n\r\n"), "HEAD answers carry no body"


def _steady(exposition: bytes) -> list[bytes]:
    """The exposition's lines without the process collector's, whose values change between two renders."""
    return [line for line in exposition.splitlines() if b"process_" not in line]


async def test_metrics_are_exactly_what_prometheus_client_generates() -> None:
    metrics = Metrics()
    metrics.account("default").polls.labels("ok").inc(3)
    async with _port(metrics) as port, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        text = await http.get("/metrics", headers={"accept-encoding": "identity"})
        openmetrics = await http.get("/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"})
        zipped = await http.get("/metrics", headers={"accept-encoding": "gzip"})
        only = await http.get("/metrics", params={"name[]": "bridge_polls_total"})
    assert _steady(text.content) == _steady(generate_latest(metrics.registry))
    assert text.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert _steady(openmetrics.content) == _steady(generate_openmetrics(metrics.registry))
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert zipped.headers["content-encoding"] == "gzip" and _steady(zipped.content) == _steady(text.content)
    assert b'bridge_polls_total{account="default",outcome="ok"} 3.0' in only.content
    assert b"bridge_info" not in only.content


async def test_metrics_renders_are_reused_and_budgeted() -> None:
    handle = operator_routes(Metrics(), lambda: None)
    first = handle(Request("GET", "/metrics", "", {}))
    started = time.monotonic()
    answers = [handle(Request("GET", "/metrics", f"name[]=bridge_polls_total&name[]=n{i}", {})) for i in range(200)]
    elapsed_s = time.monotonic() - started
    refused = [a for a in answers if a.status == 503]
    assert len(answers) - len(refused) <= MAX_RENDERS_PER_S * (int(elapsed_s) + 2)
    assert refused and all(dict(a.headers)["Retry-After"] == "1" for a in refused)
    same = [handle(Request("GET", "/metrics", "", {})) for _ in range(50)]
    assert all(a.body == first.body for a in same), "the last answer of the same kind is sent again"


async def test_readyz_names_the_failing_check() -> None:
    reason: list[str | None] = [NOT_READY]
    async with _port(Metrics(), lambda: reason[0]) as port, httpx.AsyncClient() as http:
        answer = await http.get(f"http://127.0.0.1:{port}/readyz")
        assert answer.status_code == 503 and answer.text == f"not ready: {NOT_READY}\n"
        reason[0] = None
        assert (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200


async def test_asgi_app_gives_the_same_answers() -> None:
    transport = httpx.ASGITransport(app=create_app(Metrics(), lambda: NOT_READY))
    async with httpx.AsyncClient(transport=transport, base_url="http://operator") as http:
        assert (await http.get("/readyz")).text == f"not ready: {NOT_READY}\n"
        assert (await http.post("/metrics")).status_code == 405
        assert (await http.get("/nope")).status_code == 404
        assert (await http.head("/healthz")).content == b""


async def test_pipelined_requests_are_answered_one_per_turn_of_the_loop() -> None:
    turns = 0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal turns
        while not done.is_set():
            turns += 1
            await asyncio.sleep(0)

    async with _port(Metrics()) as port:
        task = asyncio.create_task(ticker())
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        answer = await _exchange(port, request * 299 + b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
        done.set()
        await task
    assert answer.count(b"HTTP/1.1 200 OK") == 300
    assert turns >= 150, "other tasks ran between the answers"


async def test_requests_over_the_ports_rate_wait_for_their_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(operator_port, "MAX_REQUESTS_PER_S", 20)
    monkeypatch.setattr(operator_port, "_REQUEST_BURST", 20)
    async with _port(Metrics()) as port:
        started = time.monotonic()
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        answer = await _exchange(port, request * 59 + b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
        elapsed_s = time.monotonic() - started
    assert answer.count(b"HTTP/1.1 200 OK") == 60
    assert 1.8 < elapsed_s < 4


async def test_keep_alive_serves_several_requests_on_one_connection() -> None:
    async with _port(Metrics()) as port:
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        answer = await _exchange(port, request * 3 + b"GET /readyz HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert answer.count(b"HTTP/1.1 200 OK") == 4


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /metrics\r\n\r\n", 400),
        (b"GET /metrics HTTP/2.0\r\n\r\n", 505),
        (b"GET metrics HTTP/1.1\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * (MAX_HEAD_BYTES + 10) + b"\r\n\r\n", 431),
        (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * (MAX_HEAD_BYTES + 10), 431),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n", 400),
    ],
)
async def test_malformed_requests_get_4xx_and_are_closed_and_counted(request_bytes: bytes, status: int) -> None:
    metrics = Metrics()
    async with _port(metrics) as port:
        answer = await _exchange(port, request_bytes)
    assert _status(answer) == status
    assert b"Connection: close" in answer
    assert _dropped(metrics, "malformed") == 1


# --- limits and timeouts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("sent", [b"", b"GET /metrics HTTP/1.1\r\nHost: x\r\n"])
async def test_header_timeout_closes_a_connection_that_sends_no_whole_head(sent: bytes) -> None:
    metrics = Metrics()
    async with _port(metrics, header_timeout_s=0.3) as port:
        started = time.monotonic()
        answer = await _exchange(port, sent)
    assert answer == b""
    assert 0.25 < time.monotonic() - started < 2
    assert _dropped(metrics, "timeout") == 1


async def test_idle_keep_alive_connection_is_closed_without_counting_it() -> None:
    metrics = Metrics()
    async with _port(metrics, keep_alive_timeout_s=0.3) as port:
        started = time.monotonic()
        answer = await _exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert 0.25 < time.monotonic() - started < 2
    assert _dropped(metrics, "timeout") == 0


async def test_a_request_with_a_body_is_answered_and_closed() -> None:
    async with _port(Metrics()) as port:
        answer = await _exchange(port, b"GET /healthz HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", timeout_s=2)
    assert answer.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in answer


def _open_idle(port: int, count: int) -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            sock.connect(("127.0.0.1", port))
        sockets.append(sock)
    return sockets


def _close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


async def test_connections_over_the_cap_replace_the_longest_idle_and_a_scrape_still_answers() -> None:
    metrics = Metrics()
    async with _port(metrics, max_connections=8, header_timeout_s=30) as port:
        idle = _open_idle(port, 40)
        try:
            await eventually(lambda: _dropped(metrics, "limit") >= 32, timeout_s=5, what="idle ones replaced")
            async with httpx.AsyncClient() as http:
                answer = await asyncio.wait_for(http.get(f"http://127.0.0.1:{port}/healthz"), 2)
            assert answer.status_code == 200
        finally:
            _close_all(idle)
    assert _dropped(metrics, "timeout") == 0


async def test_drops_are_logged_at_most_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    caplog.set_level(logging.WARNING, logger="bridge.operator_port")
    async with _port(metrics, max_connections=4, header_timeout_s=0.2, log_interval_s=1.0) as port:
        idle = _open_idle(port, 100)
        try:
            await eventually(lambda: _dropped(metrics, "limit") + _dropped(metrics, "timeout") >= 100, timeout_s=5)
            await asyncio.sleep(1.2)  # the second interval's summary
        finally:
            _close_all(idle)
    lines = [r.getMessage() for r in caplog.records if r.name == "bridge.operator_port"]
    assert 1 <= len(lines) <= 3, lines
    assert all("closed" in line and "connections" in line for line in lines)


def test_open_file_limit_is_raised_to_the_hard_limit() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= 512:
        pytest.skip("the hard limit leaves nothing to raise")
    code = "from bridge.runtime import raise_open_file_limit; print(*raise_open_file_limit())"
    out = subprocess.run(
        [sys.executable, "-c", code],
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard)),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out[0] == "512" and int(out[1]) > 512


# --- the bridge as a process ------------------------------------------------------------------------------------

FLOOD_SILENT = 1100
FLOOD_HALF_HEAD = 100
FLOOD_S = 8.0
FD_LIMIT = 1024


def _limit_open_files() -> None:
    # Soft and hard: the bridge cannot raise its way out, so the port's own cap must protect the poller.
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


@contextlib.contextmanager
def _flood(port: int) -> Iterator[list[socket.socket]]:
    sockets = _open_idle(port, FLOOD_SILENT)
    try:
        yield sockets
    finally:
        _close_all(sockets)


async def _half_heads(port: int) -> list[asyncio.StreamWriter]:
    writers = []
    for _ in range(FLOOD_HALF_HEAD):
        with contextlib.suppress(OSError):
            _reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: flood\r\nX-Slow: ")
            writers.append(writer)
    return writers


def _metrics_port(log_path: Path) -> int:
    for line in log_path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if entry.get("message") == "task-bridge started":
                return int(entry["metrics_port"])
    raise AssertionError("no start line")


POLL_INTERVAL_S = 0.2


@contextlib.asynccontextmanager
async def _bridge_process(
    sim: Simulator, broker_url: str, exchange: str, log_path: Path
) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    """``task-bridge run`` under an open-file limit of 1,024, polling ``sim``; yields it and its operator port."""
    async with running(sim) as url:
        settings = bridge_settings(exchange, broker_url, upstream_endpoint=url, poll_interval_s=POLL_INTERVAL_S)
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                *BRIDGE_COMMAND, "run", env=bridge_env(settings), stdout=log, stderr=log, preexec_fn=_limit_open_files
            )
        try:
            await eventually(lambda: "task-bridge started" in log_path.read_text(), timeout_s=20, what="start")
            await eventually(lambda: sim.acknowledged_count > 0, timeout_s=20, what="first delivery")
            yield process, _metrics_port(log_path)
        finally:
            process.terminate()
            await asyncio.wait_for(process.wait(), 20)


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def _answers(url: str, timeout_s: float = 2.0) -> int:
    async with httpx.AsyncClient(timeout=timeout_s) as http:
        return (await http.get(url)).status_code


@pytest.mark.broker
async def test_a_flood_on_the_operator_port_does_not_stop_polling_or_flood_the_log(
    broker_url: str, exchange_name: str, tmp_path: Path
) -> None:
    sim = Simulator(tasks=0, seed=31, rate=50)
    log_path = tmp_path / "bridge.log"
    async with _bridge_process(sim, broker_url, exchange_name, log_path) as (process, port):
        base = f"http://127.0.0.1:{port}"
        log_before = log_path.stat().st_size
        polls_before, acked_before = sum(sim.polls_by_page.values()), sim.acknowledged_count
        with _flood(port):
            writers = await _half_heads(port)
            fds = [_open_fds(process.pid)]
            ready_early = await _answers(f"{base}/readyz", timeout_s=5)
            for _ in range(int(FLOOD_S / 0.5)):
                await asyncio.sleep(0.5)
                fds.append(_open_fds(process.pid))
            polls_during = sum(sim.polls_by_page.values()) - polls_before
            acked_during = sim.acknowledged_count - acked_before
            ready_during = await _answers(f"{base}/readyz", timeout_s=5)
            for writer in writers:
                writer.close()
        started = time.monotonic()
        assert await _answers(f"{base}/readyz") == 200
        assert await _answers(f"{base}/metrics") == 200
        answered_after_s = time.monotonic() - started
        log_lines = log_path.read_text(encoding="utf-8").splitlines()
        log_bytes = log_path.stat().st_size - log_before
    sys.stderr.write(
        f"flood: {polls_during} polls and {acked_during} acknowledgements during {FLOOD_S:g} s, "
        f"/readyz early in it: {ready_early}, late in it: {ready_during}, answered {answered_after_s * 1000:.0f} ms "
        f"after, {log_bytes} log bytes, at most {max(fds)} open files\n"
    )
    assert polls_during >= FLOOD_S / POLL_INTERVAL_S / 4, polls_during
    assert acked_during > 0
    assert ready_early == 200 and ready_during == 200
    assert max(fds) < 64 + 64, "the port's connections stay within its cap"
    assert answered_after_s < 2
    assert log_bytes < 4096, log_lines[-10:]
    assert "Traceback" not in "\n".join(log_lines)
    assert not any("Too many open files" in line for line in log_lines)


async def test_a_busy_operator_port_is_one_line_and_exit_1(exchange_name: str, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        env = bridge_env(bridge_settings(exchange_name, "amqp://guest:guest@127.0.0.1:5672/"))
        env["BRIDGE_METRICS_PORT"] = str(port)
        process = await asyncio.create_subprocess_exec(
            *BRIDGE_COMMAND, "run", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(process.communicate(), 20)
    output = (out + err).decode()
    assert process.returncode == EXIT_FAILURE, output
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if f"127.0.0.1:{port}" in line]
    assert len(lines) == 1, output
    assert "in use" in lines[0] and "BRIDGE_METRICS_PORT" in lines[0]


_HAMMER = """
import socket, sys, threading, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
answers = []

def hammer(n):
    deadline = time.monotonic() + seconds
    got = 0
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                while time.monotonic() < deadline:
                    filtered = b"GET /metrics?name[]=bridge_polls_total&name[]=x%d HTTP/1.1\\r\\nHost: h\\r\\n\\r\\n"
                    batch = b"".join(filtered % (n * 10**6 + got + i) for i in range(20))
                    batch += b"GET /metrics HTTP/1.1\\r\\nHost: h\\r\\n\\r\\n" * 20
                    sock.sendall(batch)
                    seen = 0
                    while seen < 40:
                        data = sock.recv(65536)
                        if not data:
                            raise OSError("closed")
                        seen += data.count(b"HTTP/1.1 ")
                    got += seen
        except OSError:
            pass
    answers.append(got)

threads = [threading.Thread(target=hammer, args=(n,)) for n in range(16)]
for t in threads: t.start()
for t in threads: t.join()
print(sum(answers))
"""


@pytest.mark.broker
async def test_clients_asking_for_metrics_in_a_loop_do_not_stop_polling(
    broker_url: str, exchange_name: str, tmp_path: Path
) -> None:
    sim = Simulator(tasks=0, seed=32, rate=50)
    async with _bridge_process(sim, broker_url, exchange_name, tmp_path / "bridge.log") as (_process, port):
        polls_before = sum(sim.polls_by_page.values())
        hammer = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _HAMMER, str(port), str(FLOOD_S), stdout=asyncio.subprocess.PIPE
        )
        out, _ = await asyncio.wait_for(hammer.communicate(), FLOOD_S + 30)
        polls_during = sum(sim.polls_by_page.values()) - polls_before
        ready_after = await _answers(f"http://127.0.0.1:{port}/readyz")
    answered = int(out.decode().strip() or 0)
    sys.stderr.write(f"metrics hammer: {answered} answers, {polls_during} polls during {FLOOD_S:g} s\n")
    assert answered > 500, "the hammer was served"
    # Unbudgeted renders at any rate left 11 polls of 40 here.
    assert polls_during >= FLOOD_S / POLL_INTERVAL_S / 2, polls_during
    assert ready_after == 200
