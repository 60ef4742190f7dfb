"""The compose path works as written: ``demo``, ``tail`` and ``check`` against the compose RabbitMQ, as its users.

No Docker engine runs here. Instead a private RabbitMQ node starts with the repository's own
``deploy/rabbitmq/rabbitmq.conf``, ``definitions.json`` and ``enabled_plugins`` (only the definitions' path in the
conf is pointed at the node's copy, and the node's ports are its own), and the host commands that
``docker-compose.yml`` documents in its header run as subprocesses, exactly as written there, with the compose
broker's host port replaced by the node's. Each user then gets no more than its commands need.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import sys
import tempfile
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import pytest
import yaml

from bridge.simulator import Simulator, running
from tests.private_broker import PrivateNode, free_port

ROOT = Path(__file__).resolve().parents[1]
RABBITMQ = ROOT / "deploy" / "rabbitmq"
COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text(encoding="utf-8")
COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_TEXT)
SERVICES: dict[str, Any] = COMPOSE["services"]
EXCHANGE = "domain.tasks"  # the compose bridge's BRIDGE_EXCHANGE, the name the definitions grant
_TIMEOUT_S = 40


# --- what docker-compose.yml says -------------------------------------------------------------------------------


def _published(service: str) -> dict[int, list[int]]:
    """Container port -> host ports of a compose service's ``ports`` (a range, ``9108-9109``, for replicas)."""
    mapping: dict[int, list[int]] = {}
    for entry in SERVICES[service].get("ports", []):
        host, _, container = str(entry).rpartition(":")
        first, _, last = (host.rpartition(":")[2] or container).partition("-")
        mapping[int(container)] = list(range(int(first), int(last or first) + 1))
    return mapping


def _host_commands() -> dict[str, dict[str, str]]:
    """The ``VAR=value ... task-bridge COMMAND`` lines of the compose file's header: command -> environment."""
    commands: dict[str, dict[str, str]] = {}
    for line in COMPOSE_TEXT.splitlines():
        match = re.fullmatch(r"#\s+((?:[A-Z_]+=\S+\s+)+)task-bridge (\w+)\s*", line)
        if match:
            env = dict(part.split("=", 1) for part in shlex.split(match.group(1)))
            commands[match.group(2)] = env
    return commands


def test_compose_publishes_rabbitmq_beside_a_local_broker() -> None:
    rabbitmq = _published("rabbitmq")
    assert rabbitmq[5672] != [5672] and rabbitmq[15672] != [15672], "would clash with the quickstart's local broker"
    hosts = [port for service in SERVICES for ports in _published(service).values() for port in ports]
    assert len(hosts) == len(set(hosts)), f"two services publish the same host port: {sorted(hosts)}"
    assert 5672 not in hosts and 15672 not in hosts
    assert 15692 not in rabbitmq, "Prometheus scrapes rabbitmq_prometheus inside the compose network"


def test_compose_enables_rabbitmq_prometheus_and_scrapes_per_queue_depth() -> None:
    volumes = [str(v) for v in SERVICES["rabbitmq"]["volumes"]]
    assert "./deploy/rabbitmq/enabled_plugins:/etc/rabbitmq/enabled_plugins:ro" in volumes
    plugins = (RABBITMQ / "enabled_plugins").read_text(encoding="utf-8")
    assert re.fullmatch(r"\[([a-z_]+,)*[a-z_]+\]\.\n", plugins)
    assert {"rabbitmq_prometheus", "rabbitmq_management"} <= set(plugins.strip("[].\n").split(","))
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text(encoding="utf-8"))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["rabbitmq"]["static_configs"][0]["targets"] == ["rabbitmq:15692"]
    queues = jobs["rabbitmq-queues"]
    assert queues["static_configs"][0]["targets"] == ["rabbitmq:15692"]
    assert queues["metrics_path"] == "/metrics/detailed"
    assert queues["params"] == {"family": ["queue_coarse_metrics"]}


def test_compose_documents_each_host_command_with_its_own_user() -> None:
    commands = _host_commands()
    assert set(commands) == {"demo", "tail", "check"}
    port = _published("rabbitmq")[5672][0]
    users = {}
    for name, env in commands.items():
        match = re.fullmatch(rf"amqp://(\w+):(\w+)@localhost:{port}/", env["BRIDGE_AMQP_URL"])
        assert match, f"{name}: {env['BRIDGE_AMQP_URL']} is not the compose broker's host port {port}"
        users[name] = match.group(1)
    # The bridge's own user for what runs the bridge (demo) or checks its configuration; a read-only one to tail.
    assert users == {"demo": "bridge", "check": "bridge", "tail": "observer"}
    bridge_url = next(v for k, v in _environment("bridge").items() if k == "BRIDGE_AMQP_URL")
    assert bridge_url.startswith("amqp://bridge:bridge@rabbitmq:5672/")
    simulator = [str(part) for part in SERVICES["simulator"]["command"]]
    assert commands["check"]["BRIDGE_UPSTREAM_ENDPOINT"] == f"http://localhost:{_published('simulator')[8000][0]}"
    assert simulator[simulator.index("--host") + 1] == "0.0.0.0"
    assert commands["check"]["ALIBABA_CLOUD_ACCESS_KEY_ID"] == simulator[simulator.index("--access-key-id") + 1]
    secret = simulator[simulator.index("--access-key-secret") + 1]
    assert commands["check"]["ALIBABA_CLOUD_ACCESS_KEY_SECRET"] == secret


def _environment(service: str) -> dict[str, str]:
    return {key: str(value) for key, value in SERVICES[service]["environment"].items()}


# --- a node like the compose one --------------------------------------------------------------------------------


def _node_config(node_dir: Path) -> list[str]:
    """The repository's rabbitmq.conf, its definitions path pointed at the node's copy, plus the node's own ports."""
    conf = (RABBITMQ / "rabbitmq.conf").read_text(encoding="utf-8")
    lines, count = re.subn(
        r"^(\s*load_definitions\s*=\s*)\S+\s*$", rf"\g<1>{node_dir / 'definitions.json'}", conf, flags=re.MULTILINE
    )
    assert count == 1, "rabbitmq.conf must load the definitions exactly once"
    # The machine's broker may hold 15672 and 15692: this node's HTTP listeners take free ports.
    return [
        *lines.splitlines(),
        f"management.tcp.port = {free_port()}",
        "management.tcp.ip = 127.0.0.1",
        f"prometheus.tcp.port = {free_port()}",
        "prometheus.tcp.ip = 127.0.0.1",
    ]


@pytest.fixture(scope="module")
def node() -> Iterator[PrivateNode]:
    base = Path(tempfile.mkdtemp(prefix="tb-node-"))
    node = PrivateNode(config=_node_config(base), base=base)
    try:
        for name in ("definitions.json", "enabled_plugins"):
            node.write_file(name, (RABBITMQ / name).read_text(encoding="utf-8"))
        node.start()
        yield node
    finally:
        node.stop()


def _prometheus_port(node: PrivateNode) -> int:
    return int(next(line.split("=")[1] for line in node.config if line.startswith("prometheus.tcp.port")))


def url_of(node: PrivateNode, user: str) -> str:
    """The compose host command's URL for ``user``, at this node's port (demo passwords equal the user name)."""
    port = _published("rabbitmq")[5672][0]
    for env in _host_commands().values():
        url = env["BRIDGE_AMQP_URL"]
        if url.startswith(f"amqp://{user}:"):
            return url.replace(f"@localhost:{port}/", f"@127.0.0.1:{node.port}/")
    return f"amqp://{user}:{user}@127.0.0.1:{node.port}/"


def command_env(node: PrivateNode, command: str, simulator_url: str | None = None) -> dict[str, str]:
    """The environment of a documented host command, pointed at this node (and this test's simulator)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "ALIBABA_CLOUD_"))}
    port = _published("rabbitmq")[5672][0]
    for key, value in _host_commands()[command].items():
        value = value.replace(f"@localhost:{port}/", f"@127.0.0.1:{node.port}/")
        if simulator_url is not None:
            value = value.replace(f"http://localhost:{_published('simulator')[8000][0]}", simulator_url)
        env[key] = value
    return env


async def run_command(env: dict[str, str], cwd: Path, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", *args, env=env, cwd=cwd, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), _TIMEOUT_S)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.fixture
async def bridge_channel(node: PrivateNode) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    connection = await aio_pika.connect(url_of(node, "bridge"))
    async with connection:
        yield await connection.channel()


# --- the documented commands, as written -----------------------------------------------------------------------


async def test_demo_runs_against_the_compose_broker(node: PrivateNode, tmp_path: Path) -> None:
    code, out, err = await run_command(
        command_env(node, "demo"), tmp_path, "demo", "--seconds", "3", "--tasks", "20", "--summary-interval", "1"
    )
    assert code == 0, err[-2000:]
    assert "Traceback" not in err + out
    lines = out.splitlines()
    assert lines[-1].startswith("demo stopped"), lines[-3:]
    stats = dict(re.findall(r"(published|acknowledged) (\d+)", lines[-1]))
    assert int(stats["acknowledged"]) >= 20
    assert sum(1 for line in lines if ".execute_" in line) >= 20  # the events, printed from its own queue


async def test_demo_as_a_user_without_its_rights_says_so_in_one_line(node: PrivateNode, tmp_path: Path) -> None:
    env = command_env(node, "demo")
    env["BRIDGE_AMQP_URL"] = url_of(node, "consumer")
    code, out, err = await run_command(env, tmp_path, "demo", "--seconds", "2", "--tasks", "1")
    assert code == 1
    assert "Traceback" not in err + out
    (line,) = err.splitlines()
    assert line.startswith("task-bridge demo: declaring the demo's topology and its temporary queues")
    assert "ACCESS_REFUSED" in line
    assert "'domain.tasks.tail.'*" in line and "consumer:consumer" not in line


async def test_tail_runs_as_the_read_only_user(
    node: PrivateNode, tmp_path: Path, bridge_channel: aio_pika.abc.AbstractChannel
) -> None:
    for args, exchange in ((("--count", "2"), EXCHANGE), (("--invalid", "--count", "1"), f"{EXCHANGE}.invalid")):
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge", "tail", *args, env=command_env(node, "tail"), cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert process.stderr is not None
        ready = await asyncio.wait_for(process.stderr.readline(), _TIMEOUT_S)
        assert ready.startswith(b"tailing "), ready
        target = await bridge_channel.get_exchange(exchange)
        wanted = int(args[-1])
        for n in range(wanted):
            body = json.dumps({"id": f"compose-{n}", "subject": "example.com", "data": {"TaskStatus": "OK"}})
            await target.publish(
                aio_pika.Message(body.encode(), message_id=f"compose-{n}"), routing_key="chg_dns.execute_success"
            )
        out, err = await asyncio.wait_for(process.communicate(), _TIMEOUT_S)
        assert process.returncode == 0, err.decode()
        assert "Traceback" not in err.decode()
        assert [line.split()[-1] for line in out.decode().splitlines()] == [f"compose-{n}" for n in range(wanted)]


async def test_check_passes_as_the_bridge_user(node: PrivateNode, tmp_path: Path) -> None:
    async with running(Simulator(tasks=3, seed=1), "127.0.0.1", 0) as simulator_url:
        code, out, err = await run_command(command_env(node, "check", simulator_url), tmp_path, "check")
    assert code == 0, out + err
    assert out.splitlines()[-1] == "check passed"
    assert re.search(r"^OK\s+topology\s+.*match what the bridge declares", out, flags=re.MULTILINE), out
    assert "Traceback" not in err


# --- and nothing more -------------------------------------------------------------------------------------------


async def _refused(url: str, action: Any) -> bool:
    """True when the broker refuses ``action(channel)`` with ACCESS_REFUSED."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        try:
            await action(channel)
        except aiormq.exceptions.ChannelAccessRefused:
            return True
    return False


def _declare(name: str, **kwargs: Any) -> Any:
    async def action(channel: aio_pika.abc.AbstractChannel) -> None:
        await channel.declare_queue(name, **kwargs)

    return action


def _consume(queue: str) -> Any:
    async def action(channel: aio_pika.abc.AbstractChannel) -> None:
        declared = await channel.declare_queue(queue, passive=True)
        await declared.get(fail=False)

    return action


def _publish(exchange: str) -> Any:
    async def action(channel: aio_pika.abc.AbstractChannel) -> None:
        target = await channel.get_exchange(exchange)
        await target.publish(aio_pika.Message(b"{}"), routing_key="x.execute_success")

    return action


def _delete(queue: str) -> Any:
    async def action(channel: aio_pika.abc.AbstractChannel) -> None:
        await channel.queue_delete(queue)

    return action


async def test_each_user_may_do_no_more_than_its_commands_need(node: PrivateNode) -> None:
    observer, bridge, consumer = url_of(node, "observer"), url_of(node, "bridge"), url_of(node, "consumer")
    # The tail's user: temporary queues under the prefix, nothing else.
    assert not await _refused(observer, _declare(f"{EXCHANGE}.tail.mine", exclusive=True, auto_delete=True))
    assert await _refused(observer, _declare("elsewhere", exclusive=True, auto_delete=True))
    assert await _refused(observer, _declare("", exclusive=True))  # a server-named amq.gen-… queue
    assert await _refused(observer, _declare(f"{EXCHANGE}.unrouted", durable=True))
    assert await _refused(observer, _publish(EXCHANGE))
    assert await _refused(observer, _consume(f"{EXCHANGE}.failures"))
    assert await _refused(observer, _consume(f"{EXCHANGE}.unrouted"))
    assert await _refused(observer, _delete(f"{EXCHANGE}.unrouted"))
    # The bridge's user: its topology and temporary queues, not the consumers' queue nor other names.
    assert await _refused(bridge, _declare("elsewhere", exclusive=True, auto_delete=True))
    assert await _refused(bridge, _declare("", exclusive=True))
    assert await _refused(bridge, _consume(f"{EXCHANGE}.failures"))
    assert await _refused(bridge, _delete(f"{EXCHANGE}.failures"))
    # The example consumer's user: its own queue only.
    assert not await _refused(consumer, _consume(f"{EXCHANGE}.failures"))
    assert await _refused(consumer, _consume(f"{EXCHANGE}.unrouted"))
    assert await _refused(consumer, _declare(f"{EXCHANGE}.tail.mine", exclusive=True, auto_delete=True))
    assert await _refused(consumer, _publish(EXCHANGE))
    # The definitions replace the default user: no guest on the compose broker.
    with pytest.raises(aiormq.exceptions.ProbableAuthenticationError):
        await aio_pika.connect(f"amqp://guest:guest@127.0.0.1:{node.port}/")


# --- the per-queue metrics the alerts read ------------------------------------------------------------------------


async def test_rabbitmq_prometheus_reports_the_side_queues_the_alerts_watch(
    node: PrivateNode, bridge_channel: aio_pika.abc.AbstractChannel
) -> None:
    unrouted = await bridge_channel.get_exchange(f"{EXCHANGE}.unrouted")
    await unrouted.publish(aio_pika.Message(b"{}"), routing_key="")
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text(encoding="utf-8"))
    job = next(job for job in config["scrape_configs"] if job["job_name"] == "rabbitmq-queues")
    query = "&".join(f"{key}={value}" for key, values in job["params"].items() for value in values)
    url = f"http://127.0.0.1:{_prometheus_port(node)}{job['metrics_path']}?{query}"

    def scrape() -> str:
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text(encoding="utf-8"))["groups"]
    expressions = "\n".join(rule["expr"] for group in rules for rule in group["rules"])
    metrics = set(re.findall(r"\brabbitmq_[a-z_]+", expressions))
    assert metrics, "no alert reads RabbitMQ's own metrics"
    # Queue metrics are collected every few seconds: wait for the message to show.
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        text = await asyncio.to_thread(scrape)
        ready = re.search(
            rf'^rabbitmq_detailed_queue_messages_ready{{vhost="/",queue="{re.escape(EXCHANGE)}\.unrouted"}} (\S+)$',
            text,
            flags=re.MULTILINE,
        )
        if ready and float(ready.group(1)) >= 1:
            break
        assert asyncio.get_running_loop().time() < deadline, text[-2000:]
        await asyncio.sleep(1)
    exported = set(re.findall(r"^(rabbitmq_[a-z_]+)[{ ]", text, flags=re.MULTILINE))
    assert metrics <= exported, f"alerts.yml reads metrics this endpoint does not export: {metrics - exported}"
    assert re.search(rf'queue="{re.escape(EXCHANGE)}\.invalid"', text)
