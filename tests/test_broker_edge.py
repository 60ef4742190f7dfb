"""The broker's edge, on private RabbitMQ nodes: resource alarms, refusals, a dead link, TLS.

Each test that alarms a broker, changes its users or gives it a TLS listener runs on a private node
(:mod:`tests.private_broker`: the session's shared node, or a TLS node of this module's own), never on the
machine's broker.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bridge.amqp import dead_link_detection_s
from bridge.cli import EXIT_FAILURE, EXIT_USAGE
from bridge.loop import BridgeLoop
from bridge.metrics import Metrics
from bridge.publisher import PublishOutcome
from bridge.settings import BrokerSettings, Settings, default_of
from bridge.simulator import Simulator
from tests.faults_support import ScenarioQueues, TcpProxy, draining, scenario_queues
from tests.harness import (
    BRIDGE_COMMAND,
    asgi_client,
    bridge_env,
    bridge_settings,
    eventually,
    running_bridge,
    sample,
    upstream_client,
)
from tests.private_broker import PrivateNode, free_port
from tests.shared_node import USERS

pytestmark = pytest.mark.broker

PAGE = 250
WINDOW = 128


@pytest.fixture(scope="module")
def node(shared_node: PrivateNode) -> PrivateNode:
    """The session's private node, for the module's alarm and refusal tests (each puts back what it changed)."""
    return shared_node


@pytest.fixture
async def queues(node: PrivateNode) -> AsyncIterator[ScenarioQueues]:
    async with scenario_queues(node.url, f"test.{uuid.uuid4().hex[:12]}") as declared:
        yield declared


def settings_for(exchange: str, amqp_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"page_size": PAGE, "max_in_flight": WINDOW, "once_deadline_s": 90.0}
    values.update(overrides)
    return bridge_settings(exchange, amqp_url, **values)


def publishes(metrics: Metrics, outcome: str) -> int:
    return int(sample(metrics, "bridge_events_published_total", outcome=outcome))


async def readyz(port: int | None) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.get(f"http://127.0.0.1:{port}/readyz")


def connections(node: PrivateNode) -> list[str]:
    """The node's client connections, one line each (their user and state)."""
    out = node.ctl("list_connections", "user", "state", "--no-table-headers", "--quiet")
    return [line for line in out.splitlines() if line.strip()]


def warnings_naming(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


# --- resource alarms -----------------------------------------------------------------------------------------

# The publish timeout of the alarm tests. The block lasts four of them: a timer not suspended by the block fires.
# Not shorter: at 2 s a loaded machine (load 8 on 2 cores) let a confirm time out just before the broker's
# Connection.Blocked arrived; the bridge then left that connection, and the test saw no block on the next one.
BLOCK_TIMEOUT_S = 4.0

ALARMS = {
    # alarm: (raise it, put it back, the broker's reason in Connection.Blocked)
    "memory": (
        ("set_vm_memory_high_watermark", "0.0000001"),
        ("set_vm_memory_high_watermark", "0.4"),
        "low on memory",
    ),
    "disk": (
        ("set_disk_free_limit", "1000000000000000"),
        ("set_disk_free_limit", "50000000"),
        "low on disk",
    ),
}


@pytest.mark.parametrize("alarm", sorted(ALARMS))
async def test_resource_alarm_mid_drain_pauses_publishing_on_one_connection(
    node: PrivateNode, queues: ScenarioQueues, alarm: str, caplog: pytest.LogCaptureFixture
) -> None:
    raise_it, put_back, reason = ALARMS[alarm]
    details = 3000
    sim = Simulator(tasks=details, seed=301)
    metrics = Metrics()
    # A publish timeout far shorter than the alarm: a bridge that took the block for a stalled link would give
    # the connection up (and open another) several times over.
    settings = settings_for(queues.exchange, node.url, publish_timeout_s=BLOCK_TIMEOUT_S)
    caplog.set_level(logging.INFO)
    async with draining(settings, sim, metrics) as drain:
        await eventually(lambda: sim.acknowledged_count >= details // 5, what="drain under way")
        node.ctl(*raise_it)
        try:
            loop = drain.app.loop
            assert loop is not None
            await eventually(lambda: loop.not_ready_reason() is not None, what="the bridge sees the block")
            pending_when_blocked = sim.pending_count
            # A timeout before the block (a machine too loaded to confirm in time) is not what this test is about.
            timeouts_before = publishes(metrics, "timeout")
            await asyncio.sleep(4 * BLOCK_TIMEOUT_S)  # four publish timeouts
            answer = await readyz(drain.app.metrics_port)
            blocked_connections = connections(node)
            gauge = sample(metrics, "bridge_broker_blocked")
            acknowledged_while_blocked = sim.acknowledged_count
            timeouts = publishes(metrics, "timeout") - timeouts_before
        finally:
            node.ctl(*put_back)
        complete = await drain.finished(timeout_s=60)
    result = await queues.tally(sim, details)
    assert pending_when_blocked > 0, "the alarm should land mid-drain"
    assert answer.status_code == 503
    assert answer.text == f"not ready: broker: blocked publishing ({reason})\n"
    assert gauge == 1
    assert len(blocked_connections) == 1, blocked_connections
    assert timeouts == 0, "no confirm timeout while the broker blocks"
    assert sim.acknowledged_count - acknowledged_while_blocked > 0
    assert len(warnings_naming(caplog, reason)) == 1, warnings_naming(caplog, reason)
    assert any("unblocked" in r.getMessage() for r in caplog.records)
    assert sample(metrics, "bridge_broker_blocked") == 0
    assert complete
    assert sim.pending_count == 0
    assert result.lost == 0 and result.unacknowledged == 0
    assert result.duplicates <= timeouts_before, "every detail delivered exactly once"


async def test_stalled_link_abandoned_connection_is_closed_on_the_broker(
    node: PrivateNode, queues: ScenarioQueues
) -> None:
    details = 3000
    sim = Simulator(tasks=details, seed=302)
    metrics = Metrics()
    async with TcpProxy(node.port) as proxy:
        settings = settings_for(queues.exchange, proxy.url(node.url), publish_timeout_s=1.0, amqp_heartbeat_s=2)
        async with draining(settings, sim, metrics) as drain:
            await eventually(lambda: sim.acknowledged_count >= details // 5, what="drain under way")
            before = len(connections(node))
            proxy.stall()
            try:
                await eventually(lambda: publishes(metrics, "timeout") > 0, timeout_s=10, what="confirm timeouts")
                # The bridge gives the stalled connection up; it reconnects through the stalled proxy meanwhile
                # (those attempts time out). Within a bound the broker has no connection of the bridge left
                # except at most one attempt in its handshake.
                await eventually(
                    lambda: sum("running" in line for line in connections(node)) == 0,
                    timeout_s=20,
                    what="the abandoned connection closed on the broker",
                )
            finally:
                proxy.resume()
            complete = await drain.finished(timeout_s=60)
    result = await queues.tally(sim, details)
    assert before == 1
    assert complete
    assert sim.pending_count == 0 and result.lost == 0
    assert result.duplicates <= WINDOW


async def test_idle_bridge_notices_a_dead_link_by_heartbeat(node: PrivateNode, queues: ScenarioQueues) -> None:
    sim = Simulator(tasks=0, seed=303)
    async with TcpProxy(node.port) as proxy:
        settings = settings_for(queues.exchange, proxy.url(node.url), amqp_heartbeat_s=1, publish_timeout_s=2.0)
        async with running_bridge(settings, sim) as (app, _stop):
            loop = app.loop
            assert loop is not None
            await eventually(loop.ready, what="ready")
            accepted = proxy.accepted
            proxy.stall()
            try:
                # Heartbeat 1 s: aiormq gives the link up after (1 + 1) * 3 s without a frame from the broker.
                await eventually(
                    lambda: loop.not_ready_reason() == "broker: not connected",
                    timeout_s=dead_link_detection_s(1) + 3,
                    what="the dead link noticed",
                )
                answer = await readyz(app.metrics_port)
            finally:
                proxy.resume()
            await eventually(lambda: proxy.accepted > accepted and loop.ready(), timeout_s=20, what="reconnected")
    assert answer.status_code == 503


def test_default_heartbeat_notices_a_dead_link_within_30_seconds() -> None:
    default = default_of("amqp_heartbeat_s")
    assert dead_link_detection_s(default) <= 30
    # aiormq's own arithmetic, which dead_link_detection_s restates: (heartbeat + 1) * 3 s of silence.
    assert dead_link_detection_s(10) > 30


# --- refusals ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def users(node: PrivateNode) -> Iterator[dict[str, str]]:
    """URLs of the node for: a wrong password, an unknown vhost, a user without access, one without rights."""
    # tb_noaccess (no access to '/') and tb_readonly (may only read) are created as the node boots.
    noaccess = f"tb_noaccess:{USERS['tb_noaccess'][0]}@127.0.0.1:{node.port}"
    readonly = f"tb_readonly:{USERS['tb_readonly'][0]}@127.0.0.1:{node.port}"
    base = f"127.0.0.1:{node.port}"
    yield {
        "wrong password": (f"amqp://guest:not-the-password@{base}/", "ACCESS_REFUSED"),
        "unknown vhost": (f"amqp://guest:guest@{base}/no-such-vhost", "NOT_ALLOWED"),
        "no access to the vhost": (f"amqp://{noaccess}/", "NOT_ALLOWED"),
        "no configure permission": (f"amqp://{readonly}/", "ACCESS_REFUSED"),
    }  # type: ignore[misc]


@pytest.mark.parametrize(
    "case", ["wrong password", "unknown vhost", "no access to the vhost", "no configure permission"]
)
def test_refused_at_start_exits_1_with_the_brokers_reason(
    users: dict[str, tuple[str, str]], case: str, tmp_path: Path
) -> None:
    url, code = users[case]
    settings = settings_for("test.refused", url, upstream_endpoint="http://127.0.0.1:9")
    process = subprocess.run(
        [*BRIDGE_COMMAND, "run"], env=bridge_env(settings), capture_output=True, text=True, timeout=60
    )
    output = process.stdout + process.stderr
    assert process.returncode == EXIT_FAILURE, output
    assert "InvalidFrameError" not in output
    lines = [line for line in output.splitlines() if code in line]
    assert len(lines) == 1, output
    assert "refused" in lines[0]
    assert "not-the-password" not in output and "pw-" not in output


async def test_permissions_revoked_during_a_run_are_retried_with_the_reason(
    node: PrivateNode, caplog: pytest.LogCaptureFixture
) -> None:
    user, password = "tb_revoked", "pw-revoked"
    node.ctl("add_user", user, password)
    node.ctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
    exchange = f"test.{uuid.uuid4().hex[:12]}"
    url = f"amqp://{user}:{password}@127.0.0.1:{node.port}/"
    details = 2000
    sim = Simulator(tasks=details, seed=304)
    metrics = Metrics()
    caplog.set_level(logging.INFO)
    try:
        async with scenario_queues(node.url, exchange) as queues:
            async with draining(settings_for(exchange, url), sim, metrics) as drain:
                await eventually(lambda: sim.acknowledged_count >= details // 5, what="drain under way")
                node.ctl("clear_permissions", "-p", "/", user)
                node.ctl("close_all_connections", "permissions revoked")
                await eventually(
                    lambda: len(warnings_naming(caplog, "access to vhost '/' refused")) >= 2,
                    what="refusals retried",
                )
                assert drain.app.loop is not None and not drain.app.loop.ready()
                node.ctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
                complete = await drain.finished(timeout_s=60)
            result = await queues.tally(sim, details)
    finally:
        node.ctl("delete_user", user)
    retries = [m for m in warnings_naming(caplog, "retrying") if "refused" in m]
    assert retries and all("access to vhost '/' refused" in m for m in retries)
    assert complete
    assert sim.pending_count == 0 and result.lost == 0


def test_amqp_url_that_does_not_parse_is_a_settings_error(tmp_path: Path) -> None:
    cases = [
        "amqp://guest:s3cret-pw@127.0.0.1:notaport/",
        "amqp://guest:s3cret-pw@127.0.0.1:70000/",
        "amqp://guest:s3cret-pw@/",
        "amqpx://guest:s3cret-pw@127.0.0.1/",
        "amqp://guest:s3cret%zz@127.0.0.1/",
        "amqps://guest:s3cret-pw@127.0.0.1/?no_verify_ssl=1",
    ]
    for url in cases:
        settings_env = bridge_env(settings_for("test.url", "amqp://127.0.0.1/"))
        settings_env["BRIDGE_AMQP_URL"] = url
        process = subprocess.run(
            [sys.executable, "-m", "bridge", "run"], env=settings_env, capture_output=True, text=True, timeout=60
        )
        output = process.stdout + process.stderr
        assert process.returncode == EXIT_USAGE, (url, output)
        assert "BRIDGE_AMQP_URL" in output, (url, output)
        assert "s3cret" not in output, (url, output)
        assert len(output.strip().splitlines()) == 1, (url, output)


def test_tls_settings_with_a_plain_url_are_a_settings_error(tmp_path: Path) -> None:
    env = bridge_env(settings_for("test.url", "amqp://127.0.0.1/"))
    env["BRIDGE_AMQP_CA_FILE"] = str(tmp_path / "ca.pem")
    process = subprocess.run([*BRIDGE_COMMAND, "run"], env=env, capture_output=True, text=True, timeout=60)
    assert process.returncode == EXIT_USAGE
    assert "BRIDGE_AMQP_CA_FILE" in process.stderr and "amqps://" in process.stderr


# --- TLS -----------------------------------------------------------------------------------------------------


class TlsNode:
    """A private node with a TLS listener that requires a client certificate, and the files a client needs."""

    def __init__(self, node: PrivateNode, ssl_port: int, files: dict[str, Path]) -> None:
        self.node = node
        self.ssl_port = ssl_port
        self.files = files

    def url(self, query: str = "") -> str:
        return f"amqps://guest:guest@127.0.0.1:{self.ssl_port}/{query}"


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsNode]:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("task-bridge")
    node = PrivateNode()
    ssl_port = free_port()
    ca_file = node.write_file("ca.pem", ca.cert_pem.bytes().decode())
    cert_file = node.write_file("server.pem", server.cert_chain_pems[0].bytes().decode())
    key_file = node.write_file("server.key", server.private_key_pem.bytes().decode())
    node.config = [
        f"listeners.ssl.1 = 127.0.0.1:{ssl_port}",
        f"ssl_options.cacertfile = {ca_file}",
        f"ssl_options.certfile = {cert_file}",
        f"ssl_options.keyfile = {key_file}",
        "ssl_options.verify = verify_peer",
        "ssl_options.fail_if_no_peer_cert = true",
    ]
    own = tmp_path_factory.mktemp("tls")
    files = {
        "ca": own / "ca.pem",
        "cert": own / "client.pem",
        "key": own / "client.key",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    client.cert_chain_pems[0].write_to_path(str(files["cert"]))
    client.private_key_pem.write_to_path(str(files["key"]))
    try:
        node.start()
        yield TlsNode(node, ssl_port, files)
    finally:
        node.stop()


async def test_tls_with_ca_and_client_certificate_delivers(tls_node: TlsNode) -> None:
    details = 500
    sim = Simulator(tasks=details, seed=305)
    exchange = f"test.{uuid.uuid4().hex[:12]}"
    settings = settings_for(
        exchange,
        tls_node.url(),
        amqp_ca_file=tls_node.files["ca"],
        amqp_cert_file=tls_node.files["cert"],
        amqp_key_file=tls_node.files["key"],
    )
    async with scenario_queues(tls_node.node.url, exchange) as queues:
        async with draining(settings, sim, Metrics()) as drain:
            complete = await drain.finished()
        result = await queues.tally(sim, details)
    assert complete
    assert sim.pending_count == 0 and result.lost == 0 and result.duplicates == 0


def test_tls_without_the_ca_stops_with_one_line_naming_tls_the_host_and_the_setting(tls_node: TlsNode) -> None:
    settings = settings_for(
        "test.tls",
        tls_node.url(),
        upstream_endpoint="http://127.0.0.1:9",
        amqp_cert_file=tls_node.files["cert"],
        amqp_key_file=tls_node.files["key"],
    )
    env = bridge_env(settings)
    env["BRIDGE_AMQP_CERT_FILE"] = str(tls_node.files["cert"])
    env["BRIDGE_AMQP_KEY_FILE"] = str(tls_node.files["key"])
    process = subprocess.run([*BRIDGE_COMMAND, "run"], env=env, capture_output=True, text=True, timeout=60)
    output = process.stdout + process.stderr
    assert process.returncode == EXIT_FAILURE, output
    lines = [line for line in output.splitlines() if "TLS" in line]
    assert len(lines) == 1, output
    assert "127.0.0.1" in lines[0] and "BRIDGE_AMQP_CA_FILE" in lines[0]
    assert "Traceback" not in output


@pytest.mark.parametrize("query", ["?no_verify_ssl=1", "?cafile=/etc/ssl/ca.pem", "?heartbeat=0"])
def test_url_options_that_bypass_the_tls_settings_are_refused_at_start(tls_node: TlsNode, query: str) -> None:
    env = bridge_env(settings_for("test.tls", "amqp://127.0.0.1/", upstream_endpoint="http://127.0.0.1:9"))
    env["BRIDGE_AMQP_URL"] = tls_node.url(query)
    env["BRIDGE_AMQP_CA_FILE"] = str(tls_node.files["ca"])
    process = subprocess.run([*BRIDGE_COMMAND, "run"], env=env, capture_output=True, text=True, timeout=60)
    assert process.returncode == EXIT_USAGE, process.stderr
    assert "BRIDGE_AMQP_URL" in process.stderr
    assert "BRIDGE_AMQP_" in process.stderr.partition("BRIDGE_AMQP_URL")[2], "names the setting to use instead"


# --- publishes refused ---------------------------------------------------------------------------------------


class NackingPublisher:
    """A publisher that nacks the first ``refuse`` publishes and confirms the rest (a broker that recovered)."""

    def __init__(self, refuse: int, settings: BrokerSettings) -> None:
        self.settings = settings
        self.refuse = refuse
        self.published = 0
        self.connected = self.ever_connected = True
        self.blocked_reason: str | None = None
        self.refused_reason: str | None = None

    @property
    def last_refusal(self) -> str | None:
        return "nacked" if self.published <= self.refuse else None

    async def ensure_connected(self) -> None:
        self.connected = True

    async def close(self) -> None:
        self.connected = False

    async def publish(self, item: Any, *, invalid: bool = False) -> PublishOutcome:
        self.published += 1
        refused = self.published <= self.refuse
        # The nacks come late, as from a struggling broker: the next poll's publishes are answered first.
        await asyncio.sleep(0.5 if refused else 0.02)
        return PublishOutcome.NACK if refused else PublishOutcome.ACK


async def test_first_fully_confirmed_round_after_nacks_ends_the_backoff() -> None:
    # Backoff delays of 5-10 s: one backoff more than needed shows in the run's duration.
    page = 100
    sim = Simulator(tasks=3 * page, seed=306)
    settings = bridge_settings(
        "test.backoff",
        "amqp://127.0.0.1/",
        page_size=page,
        backoff_initial_s=10.0,
        backoff_max_s=10.0,
    )
    metrics = Metrics()
    # The first round is refused, every later one confirmed.
    publisher = NackingPublisher(refuse=page, settings=settings.broker)
    started = time.monotonic()
    async with asgi_client(sim) as http:
        loop = BridgeLoop(
            settings.delivery,
            upstream_client(http, settings, metrics=metrics),
            publisher,  # type: ignore[arg-type]
            metrics.account(settings.account.name),
        )
        complete = await asyncio.wait_for(loop.run(asyncio.Event(), once=True), 60)
    elapsed = time.monotonic() - started
    assert complete and sim.pending_count == 0
    assert publisher.published == 4 * page
    # The pause that the refused round causes ends when the next round is confirmed, well before 5 s.
    assert elapsed < 4.0, f"took {elapsed:.1f}s: a fully confirmed round did not end the backoff"


async def test_readyz_is_503_while_the_broker_refuses_every_publish(broker_url: str, exchange_name: str) -> None:
    details, room = 1000, 100
    sim = Simulator(tasks=details, seed=307)
    metrics = Metrics()
    refusing = {"x-max-length": room, "x-overflow": "reject-publish"}
    async with scenario_queues(broker_url, exchange_name, arguments=refusing) as queues:
        settings = settings_for(exchange_name, broker_url, ready_max_refused_s=1.0)
        async with draining(settings, sim, metrics) as drain:
            await eventually(lambda: publishes(metrics, "nack") >= 100, what="the full queue refuses publishes")
            loop = drain.app.loop
            assert loop is not None
            await eventually(lambda: loop.not_ready_reason() is not None, what="not ready while refused")
            answer = await readyz(drain.app.metrics_port)
            acks_before = publishes(metrics, "ack")
            async with queues.consuming(queues.events) as consumed:
                await eventually(lambda: publishes(metrics, "ack") > acks_before, what="publishes confirmed again")
                reason_after = loop.not_ready_reason() or ""
                complete = await drain.finished()
                await eventually(lambda: len(consumed) >= details, what="the consumer got every event")
    assert answer.status_code == 503
    assert answer.text.startswith("not ready: broker: publishes refused for ")
    assert "nacked" in answer.text
    assert complete
    assert not reason_after.startswith("broker: publishes refused"), "ready again once a publish is confirmed"
