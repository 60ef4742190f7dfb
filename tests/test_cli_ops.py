"""What an operator meets around the commands: log formats, the start and exit lines, ``peek``, ``config`` and
one line for every refusal.

Every command runs as a subprocess (``python -m bridge ...``) against the simulator over real HTTP and a real
RabbitMQ: the machine's broker for what any user may do (a missing exchange), a private node of this module for
what needs users and virtual hosts of its own (an unknown virtual host, a user without permissions).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import shlex
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from bridge.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from bridge.events import Event, convert
from bridge.logs import JsonFormatter, TextFormatter, configure_logging
from bridge.refusals import explain
from bridge.settings import SETTING_NAMES, env_name
from bridge.simulator import Faults, Simulator, running
from bridge.topology import declare
from bridge.upstream import RawRecord
from tests.harness import BRIDGE_COMMAND, Broker, bridge_env, bridge_settings, broker_view, eventually
from tests.private_broker import PrivateNode
from tests.shared_node import USERS
from tests.test_cli_tools import report, run_cli, tail_env

broker = pytest.mark.broker

_TIMEOUT_S = 60
TOKEN = "sts-token-Qz81vY"
AMQP_PASSWORD = USERS["bridge"][0]
NOBODY = ("nobody", USERS["nobody"][0])  # may log in, has no permission on any virtual host
READER = ("reader", USERS["reader"][0])  # may read '/', may not configure or write anything


@pytest.fixture
async def view(broker_url: str, exchange_name: str) -> AsyncIterator[Broker]:
    async with broker_view(broker_url, exchange_name) as declared:
        yield declared


@pytest.fixture(scope="module")
def node(shared_node: PrivateNode) -> PrivateNode:
    """The session's private node, with a user of full rights on '/' and two users who lack them (NOBODY, READER).

    ``tests/shared_node.py`` creates these users as the node boots.
    """
    return shared_node


def node_url(node: PrivateNode, user: str, password: str, vhost: str = "") -> str:
    return f"amqp://{user}:{password}@127.0.0.1:{node.port}/{vhost}"


async def run_logged(env: dict[str, str], *args: str) -> tuple[int, str]:
    """Run ``task-bridge ARGS`` with stderr in a file (no terminal); (exit code, everything it printed)."""
    process = await asyncio.create_subprocess_exec(
        *BRIDGE_COMMAND, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(process.communicate(), _TIMEOUT_S)
    assert process.returncode is not None
    return process.returncode, out.decode()


def json_entries(output: str) -> list[dict[str, Any]]:
    """Every line as JSON: fails on a line that is not."""
    return [json.loads(line) for line in output.strip().splitlines()]


def assert_no_secret(output: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in output, secret


def one_line(text: str) -> str:
    """The only line of ``text``; fails on a traceback or more lines."""
    assert "Traceback" not in text, text
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


# --- log formats ------------------------------------------------------------------------------------------------


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize(
    ("stream", "setting", "chosen"),
    [(FakeTerminal(), None, "text"), (io.StringIO(), None, "json"), (FakeTerminal(), "json", "json")],
    ids=["terminal", "pipe", "explicit-wins"],
)
def test_log_format_is_text_on_a_terminal_and_json_otherwise(
    stream: io.StringIO, setting: str | None, chosen: str
) -> None:
    assert configure_logging("INFO", setting, stream) == chosen
    logging.getLogger("bridge.test").info("polled", extra={"page": 1, "error": "two words"})
    line = stream.getvalue().strip()
    if chosen == "json":
        entry = json.loads(line)
        assert (entry["message"], entry["page"], entry["error"]) == ("polled", 1, "two words")
    else:
        with pytest.raises(ValueError):
            json.loads(line)
        assert line.endswith('INFO  polled  page=1 error="two words"'), line


def test_text_lines_flatten_mappings_and_quote_what_needs_it() -> None:
    record = logging.LogRecord("bridge", logging.WARNING, __file__, 1, "a\nmessage", (), None)
    record.settings = {"exchange": "domain.tasks", "security_token": None, "read_ahead": True}
    record.reason = ""
    line = TextFormatter().format(record)
    assert "\n" not in line
    assert line.split(" ", 1)[1] == (
        "WARNING a message  settings.exchange=domain.tasks settings.security_token=null "
        'settings.read_ahead=true reason=""'
    )
    assert json.loads(JsonFormatter().format(record))["settings"]["read_ahead"] is True


def _log_env(sim_url: str, exchange: str, amqp_url: str, **extra: str) -> dict[str, str]:
    env = bridge_env(bridge_settings(exchange, amqp_url, upstream_endpoint=sim_url))
    env["ALIBABA_CLOUD_SECURITY_TOKEN"] = TOKEN
    env.update(extra)
    return env


@broker
async def test_json_logs_start_with_version_host_pid_and_masked_settings_and_end_with_drained(
    node: PrivateNode, exchange_name: str
) -> None:
    sim = Simulator(tasks=20, seed=31, security_token=TOKEN)
    async with running(sim) as url:
        env = _log_env(url, exchange_name, node_url(node, "bridge", AMQP_PASSWORD))
        code, output = await run_logged(env, "run", "--once")
    assert code == EXIT_OK, output
    entries = json_entries(output)  # not a line that is not JSON
    first, last = entries[0], entries[-1]
    assert first["message"].startswith("task-bridge ") and "starting" in first["message"]
    assert first["version"] and first["host"] == socket.gethostname() and first["pid"] > 0
    shown = first["settings"]
    assert shown["exchange"] == exchange_name
    assert shown["amqp_url"] == f"amqp://bridge:***@127.0.0.1:{node.port}/"
    assert shown["access_key_id"] == shown["access_key_secret"] == shown["security_token"] == "***"
    assert (last["reason"], last["exit_code"], last["level"]) == ("drained", EXIT_OK, "info")
    assert last["message"] == "task-bridge exiting: drained"
    assert_no_secret(output, AMQP_PASSWORD, TOKEN, "sim-access-key-secret", "sim-access-key-id")
    assert sim.acknowledged_count == 20


@broker
async def test_text_logs_are_readable_lines_and_the_last_says_sigterm(view: Broker, broker_url: str) -> None:
    sim = Simulator(tasks=5, seed=32, security_token=TOKEN)
    async with running(sim) as url:
        env = _log_env(url, view.exchange, broker_url, BRIDGE_LOG_FORMAT="text")
        process = await asyncio.create_subprocess_exec(
            *BRIDGE_COMMAND, "run", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        await eventually(lambda: sim.acknowledged_count == 5, timeout_s=_TIMEOUT_S, what="the backlog drained")
        process.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(process.communicate(), _TIMEOUT_S)
    output = out.decode()
    lines = output.strip().splitlines()
    assert process.returncode == EXIT_OK, output
    for line in lines:
        with pytest.raises(ValueError):
            json.loads(line)
    assert " INFO  task-bridge " in lines[0] and "starting: run" in lines[0]
    for field in (
        "version=",
        f"host={socket.gethostname()}",
        f"pid={process.pid}",
        f"settings.exchange={view.exchange}",
    ):
        assert field in lines[0], field
    assert "settings.access_key_secret=*** " in lines[0]
    assert lines[-1].endswith('task-bridge exiting: stopped by SIGTERM  reason="stopped by SIGTERM" exit_code=0')
    assert_no_secret(output, TOKEN, "sim-access-key-secret")


@broker
async def test_the_last_line_names_a_failure_and_its_exit_code(broker_url: str, exchange_name: str) -> None:
    async with running(Simulator(tasks=1)) as url:
        env = _log_env(url, exchange_name, broker_url, ALIBABA_CLOUD_ACCESS_KEY_SECRET="wrong-secret-9Tq")
        code, output = await run_logged(env, "run")
    last = json_entries(output)[-1]
    assert code == EXIT_FAILURE
    assert last["level"] == "error" and last["exit_code"] == EXIT_FAILURE
    assert last["message"].startswith("task-bridge exiting: failed: PollTaskResult failed")
    assert "SignatureDoesNotMatch" in last["reason"]
    assert_no_secret(output, "wrong-secret-9Tq", TOKEN)


async def test_a_busy_operator_port_is_one_line_not_a_traceback(exchange_name: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = _log_env("http://127.0.0.1:1", exchange_name, "amqp://guest:guest@127.0.0.1:1/")
        env.update({"BRIDGE_METRICS_PORT": str(port), "BRIDGE_LOG_FORMAT": "text"})
        code, output = await run_logged(env, "run")
    assert code == EXIT_FAILURE
    assert "Traceback" not in output
    last = output.strip().splitlines()[-1]
    assert "task-bridge exiting: failed:" in last and "in use" in last.lower(), last
    assert "exit_code=1" in last


# --- peek ----------------------------------------------------------------------------------------------------


def _peek_sim() -> Simulator:
    """Eight details, some malformed, behind a record without any TaskDetailNo at the head of the list."""
    sim = Simulator(seed=33, faults=Faults(malformed_ratio=0.4))
    sim.add_raw({"TaskType": "CHG_DNS", "TaskStatus": "EXECUTE_SUCCESS", "DomainName": "no-id.example"})
    sim.add_details(8)
    return sim


def _expected(sim: Simulator, detail_no: str) -> Any:
    record = sim.detail(detail_no)
    return convert(RawRecord(record, detail_no), source="urn:test:peek", account="default")


@broker
async def test_peek_shows_exactly_what_would_be_published_and_changes_nothing(view: Broker, broker_url: str) -> None:
    sim = _peek_sim()
    every = await view.bind("every")
    async with running(sim) as url:
        settings = bridge_settings(view.exchange, broker_url, upstream_endpoint=url, event_source="urn:test:peek")
        env = bridge_env(settings)
        env["BRIDGE_EVENT_SOURCE"] = "urn:test:peek"
        code, out, err = await run_cli(env, "peek", "--count", "6", "--json")
    assert code == EXIT_OK, err
    previews = [json.loads(line) for line in out.splitlines()]
    assert len(previews) == 6
    assert previews[0]["kind"] == "left_upstream" and previews[0]["body"]["DomainName"] == "no-id.example"
    assert previews[0]["exchange"] is None and "TaskDetailNo" in previews[0]["note"]
    kinds = {p["kind"] for p in previews[1:]}
    assert kinds == {"event", "invalid"}, kinds
    for preview in previews[1:]:
        properties = preview["properties"]
        item = _expected(sim, properties["message_id"])
        assert json.loads(item.body) == preview["body"]
        assert preview["routing_key"] == item.routing_key
        assert properties["headers"] == item.properties().headers
        assert properties["headers"]["account"] == "default"  # the single account's name
        assert properties["delivery_mode"] == 2 and properties["app_id"] == "task-bridge"
        if isinstance(item, Event):
            assert preview["exchange"] == view.exchange
            assert properties["type"] == "com.alibabacloud.domain.task.finished.v1"
            assert properties["content_type"] == "application/cloudevents+json"
            assert properties["timestamp"] == item.timestamp.isoformat().replace("+00:00", "Z")
        else:
            assert preview["exchange"] == view.invalid
            assert properties["content_type"] == "application/json"
            assert properties["message_id"] in sim.malformed_ids
    assert err.strip().endswith("nothing was published or acknowledged")
    assert "1 left upstream" in err
    # Nothing acknowledged, one poll of page 1, and nothing reached the broker the settings name.
    assert sim.acknowledged_count == 0 and sim.pending_count == 9
    assert dict(sim.polls_by_page) == {1: 1}
    assert await view.take(every.name) == [] and await view.take(view.invalid) == []
    assert await view.take(view.unrouted) == []


async def test_peek_needs_no_broker_and_reads_like_the_contract(exchange_name: str) -> None:
    sim = Simulator(tasks=3, seed=34)
    async with running(sim) as url:
        settings = bridge_settings(exchange_name, "amqp://guest:guest@127.0.0.1:1/", upstream_endpoint=url)
        code, out, err = await run_cli(bridge_env(settings), "peek", "--count", "2")
    assert code == EXIT_OK, err
    blocks = out.split("\n#")
    assert len(blocks) == 2
    first = blocks[0].splitlines()
    assert first[0].startswith(f"#1 event  exchange '{exchange_name}'  routing key '")
    assert first[1].startswith("  properties: content_type=application/cloudevents+json delivery_mode=2 ")
    assert first[2].startswith("  headers: task_type=")
    body = json.loads(first[3].removeprefix("  body: "))
    assert body["specversion"] == "1.0" and body["id"] in first[1]
    assert "peek: 2 of 3 pending task details" in err
    assert sim.pending_count == 3 and sim.acknowledged_count == 0


async def test_peek_refused_by_the_upstream_is_one_line(exchange_name: str) -> None:
    async with running(Simulator(tasks=1)) as url:
        env = bridge_env(bridge_settings(exchange_name, "amqp://guest:guest@127.0.0.1:1/", upstream_endpoint=url))
        env["ALIBABA_CLOUD_ACCESS_KEY_SECRET"] = "wrong-secret-3Zp"
        code, out, err = await run_cli(env, "peek")
    assert code == EXIT_FAILURE and out == ""
    assert "SignatureDoesNotMatch" in one_line(err)
    assert "wrong-secret-3Zp" not in err
    env.pop("ALIBABA_CLOUD_ACCESS_KEY_ID")
    code, _out, err = await run_cli(env, "peek")
    assert code == EXIT_USAGE
    assert "ALIBABA_CLOUD_ACCESS_KEY_ID: required" in one_line(err)


# --- config --------------------------------------------------------------------------------------------------


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "ALIBABA_CLOUD_"))}


async def run_in(directory: Path, env: dict[str, str], *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *BRIDGE_COMMAND,
        *args,
        env=env,
        cwd=directory,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), _TIMEOUT_S)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_config_shows_each_value_and_where_it_came_from(tmp_path: Path) -> None:
    secret_file = tmp_path / "ak_secret"
    secret_file.write_text("file-secret-77Hb\n", encoding="utf-8")
    (tmp_path / ".env").write_text("BRIDGE_LOG_LEVEL=debug\nBRIDGE_EXCHANGE=from.dotenv\n", encoding="utf-8")
    env = _clean_env()
    env.update(
        {
            "ALIBABA_CLOUD_ACCESS_KEY_ID": "key-id-Lm3",
            "ALIBABA_CLOUD_ACCESS_KEY_SECRET_FILE": str(secret_file),
            "ALIBABA_CLOUD_SECURITY_TOKEN": TOKEN,
            "BRIDGE_AMQP_URL": f"amqp://bridge:{AMQP_PASSWORD}@rabbit:5672/prod",
            "BRIDGE_EXCHANGE": "from.environment",  # wins over the .env file
            "BRIDGE_REQUEST_TIMEOUT_SECONDS": "3",
        }
    )
    code, out, err = await run_in(tmp_path, env, "config", "--json")
    assert code == EXIT_OK, err
    rows = {row["variable"]: row for row in map(json.loads, out.splitlines())}
    assert set(rows) == {env_name(field) for field in SETTING_NAMES}

    def seen(variable: str) -> tuple[Any, str]:
        return rows[variable]["value"], rows[variable]["origin"]

    assert seen("BRIDGE_EXCHANGE") == ("from.environment", "environment")
    assert seen("BRIDGE_LOG_LEVEL") == ("DEBUG", ".env file")
    assert seen("BRIDGE_REQUEST_TIMEOUT_SECONDS") == (3.0, "environment")
    assert seen("BRIDGE_PAGE_SIZE") == (1000, "default")
    assert seen("ALIBABA_CLOUD_ACCESS_KEY_SECRET") == (
        "***",
        f"file {secret_file} (ALIBABA_CLOUD_ACCESS_KEY_SECRET_FILE)",
    )
    assert seen("ALIBABA_CLOUD_ACCESS_KEY_ID") == ("***", "environment")
    assert seen("ALIBABA_CLOUD_SECURITY_TOKEN") == ("***", "environment")
    assert seen("BRIDGE_AMQP_URL") == ("amqp://bridge:***@rabbit:5672/prod", "environment")
    assert rows["BRIDGE_UPSTREAM_ENDPOINT"]["note"].startswith("https://domain-intl.aliyuncs.com")

    code, table, _err = await run_in(tmp_path, env, "config")
    assert code == EXIT_OK
    assert any(line.split() == ["BRIDGE_LOG_LEVEL", "DEBUG", ".env", "file"] for line in table.splitlines())
    for output in (out, table):
        assert_no_secret(output, "file-secret-77Hb", TOKEN, AMQP_PASSWORD, "key-id-Lm3")


async def test_config_of_invalid_settings_exits_2_with_one_line_per_problem(tmp_path: Path) -> None:
    env = _clean_env()
    env.update({"BRIDGE_PAGE_SIZE": "5000", "BRIDGE_AMQP_URL": f"http://x:{AMQP_PASSWORD}@h"})
    code, out, err = await run_in(tmp_path, env, "config")
    assert code == EXIT_USAGE and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in err
    assert any(line.startswith("task-bridge: invalid setting: BRIDGE_PAGE_SIZE") and "5000" in line for line in lines)
    assert any("BRIDGE_AMQP_URL" in line for line in lines)
    assert AMQP_PASSWORD not in err


# --- refusals: one line each -----------------------------------------------------------------------------------


@broker
async def test_a_missing_exchange_is_one_line_for_tail_and_an_ok_for_check(broker_url: str, exchange_name: str) -> None:
    code, out, err = await run_cli(tail_env(broker_url, exchange_name), "tail", "--invalid")
    assert code == EXIT_FAILURE and out == ""
    line = one_line(err)
    assert f"exchange '{exchange_name}.invalid' does not exist" in line and "BRIDGE_EXCHANGE" in line
    async with running(Simulator(tasks=1)) as url:
        env = bridge_env(bridge_settings(exchange_name, broker_url, upstream_endpoint=url))
        code, out, err = await run_cli(env, "check")
    assert code == EXIT_OK, out + err
    assert report(out)["topology"] == ("OK", f"not declared yet; the bridge declares '{exchange_name}' at start")


@broker
async def test_demo_on_an_exchange_declared_otherwise_is_one_line(
    amqp: aio_pika.abc.AbstractRobustConnection, broker_url: str, exchange_name: str
) -> None:
    channel = await amqp.channel()
    await channel.declare_exchange(exchange_name, type=aio_pika.ExchangeType.FANOUT, durable=True)
    try:
        env = tail_env(broker_url, exchange_name)
        code, _out, err = await run_cli(env, "demo", "--seconds", "1", "--tasks", "1")
    finally:
        await channel.exchange_delete(exchange_name)
    assert code == EXIT_FAILURE
    line = one_line(err)
    assert line.startswith("task-bridge demo: ") and exchange_name in line and "PRECONDITION_FAILED" in line
    assert "BRIDGE_EXCHANGE" in line


REFUSALS = [
    # (who, vhost, what the line must say)
    ((*NOBODY,), "", "refused virtual host '/' to user 'nobody'"),
    (("bridge", AMQP_PASSWORD), "tb-no-such-vhost", "refused virtual host 'tb-no-such-vhost' to user 'bridge'"),
    (("nobody", "wrong-pw-1"), "", "refused the login of user 'nobody'"),
]


@pytest.mark.parametrize(("who", "vhost", "said"), REFUSALS, ids=["no-permission", "unknown-vhost", "bad-login"])
@pytest.mark.parametrize("command", ["tail", "demo", "check"])
async def test_a_broker_refusal_is_one_line_naming_the_problem(
    node: PrivateNode, exchange_name: str, command: str, who: tuple[str, str], vhost: str, said: str
) -> None:
    url = node_url(node, *who, vhost)
    async with running(Simulator(tasks=1)) as upstream:
        env = bridge_env(bridge_settings(exchange_name, url, upstream_endpoint=upstream))
        code, out, err = await run_cli(env, command, *(["--seconds", "1"] if command == "demo" else []))
    assert code == EXIT_FAILURE
    if command == "check":
        status, detail = report(out)["broker"]
        assert status == "FAIL" and said in detail, detail
        assert "Traceback" not in err
    else:
        line = one_line(err)
        assert line.startswith(f"task-bridge {command}: ") and said in line, line
        assert "BRIDGE_AMQP_URL" in line
    assert_no_secret(out + err, who[1])


async def _declare_on(node: PrivateNode, exchange: str) -> None:
    connection = await aio_pika.connect(node_url(node, "bridge", AMQP_PASSWORD))
    async with connection:
        await declare(await connection.channel(), exchange)


@pytest.mark.parametrize("command", ["tail", "demo", "check"])
async def test_a_missing_permission_is_one_line_naming_user_and_fix(
    node: PrivateNode, exchange_name: str, command: str
) -> None:
    await _declare_on(node, exchange_name)
    async with running(Simulator(tasks=1)) as upstream:
        env = bridge_env(bridge_settings(exchange_name, node_url(node, *READER), upstream_endpoint=upstream))
        code, out, err = await run_cli(env, command, *(["--seconds", "1"] if command == "demo" else []))
    assert code == EXIT_FAILURE
    if command == "check":
        status, detail = report(out)["topology"]
        assert status == "FAIL" and "ACCESS_REFUSED" in detail and "'reader'" in detail, detail
    else:
        line = one_line(err)
        assert "user 'reader' lacks a permission on virtual host '/'" in line, line
        assert "ACCESS_REFUSED" in line and "rabbitmqctl set_permissions" in line
    assert_no_secret(out + err, READER[1])


async def test_run_refused_by_the_broker_ends_with_one_line(node: PrivateNode, exchange_name: str) -> None:
    async with running(Simulator(tasks=1)) as upstream:
        settings = bridge_settings(exchange_name, node_url(node, *NOBODY), upstream_endpoint=upstream)
        env = bridge_env(settings)
        env["BRIDGE_ONCE_DEADLINE_SECONDS"] = "1"
        code, output = await run_logged(env, "run", "--once")
    assert code == EXIT_FAILURE
    last = json_entries(output)[-1]
    assert last["message"].startswith("task-bridge exiting: failed: ") and last["exit_code"] == EXIT_FAILURE
    assert "Traceback" not in output
    assert_no_secret(output, NOBODY[1])


# --- the README's example command ------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def _readme_consumer_command() -> tuple[dict[str, str], list[str]]:
    """The README's command for the example consumer: its environment assignments and its arguments."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    (line,) = [line for line in readme.splitlines() if "examples/failure_consumer.py" in line and "--" in line]
    words = shlex.split(line)
    assignments = {}
    while "=" in words[0] and not words[0].startswith("-"):
        name, _, value = words.pop(0).partition("=")
        assignments[name] = value
    return assignments, words


@broker
async def test_the_readme_consumer_command_works_as_written(
    view: Broker, amqp: aio_pika.abc.AbstractRobustConnection
) -> None:
    assignments, words = _readme_consumer_command()
    # As written: the virtual environment's Python (this test's own), run from the repository's root.
    assert words[0] == ".venv/bin/python" and words[1] == "examples/failure_consumer.py"
    args = words[2:]
    args[args.index("--exchange") + 1] = view.exchange  # this test's exchange instead of domain.tasks
    queue = f"{view.exchange}.failures"
    try:
        await _consume_one_failure(view, amqp, assignments, [words[1], *args, "--queue", queue])
    finally:
        await view.channel.queue_delete(queue)


async def _consume_one_failure(
    view: Broker, amqp: aio_pika.abc.AbstractRobustConnection, assignments: dict[str, str], args: list[str]
) -> None:
    """Run the example with ``args``; publish one failure; it prints it, and stops cleanly on Ctrl-C."""
    queue = args[-1]
    env = {**os.environ, **assignments}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )

    async def consuming() -> bool:
        probe = await amqp.channel()  # a passive declare of an absent queue closes its channel
        try:
            declared = await probe.declare_queue(queue, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return False
        await probe.close()
        return declared.declaration_result.consumer_count > 0

    await eventually(consuming, timeout_s=_TIMEOUT_S, what="the example consuming")
    record = {
        "TaskDetailNo": "readme-1",
        "TaskType": "CHG_DNS",
        "TaskStatus": "EXECUTE_FAILURE",
        "DomainName": "readme.example",
        "ErrorMsg": "DNS server unreachable",
    }
    item = convert(RawRecord(record, "readme-1"), source="urn:test", account="default")
    assert isinstance(item, Event)
    exchange = await view.channel.get_exchange(view.exchange)
    await exchange.publish(item.message(), routing_key=item.routing_key)
    assert process.stdout is not None
    printed = await asyncio.wait_for(process.stdout.readline(), _TIMEOUT_S)
    process.send_signal(signal.SIGINT)
    _out, err = await asyncio.wait_for(process.communicate(), _TIMEOUT_S)
    assert process.returncode == 0, err
    assert b"readme.example" in printed and b"DNS server unreachable" in printed
    assert err.decode().strip() == "stopped: 1 handled, 0 duplicates, 0 rejected"


def test_a_refusal_names_the_guest_user_whose_password_is_its_name() -> None:
    settings = bridge_settings("x", "amqp://guest:guest@127.0.0.1:5672/tb-nowhere")
    line = str(
        explain(aio_pika.exceptions.ProbableAuthenticationError("ACCESS_REFUSED - Login was refused"), settings.broker)
    )
    assert "user 'guest'" in line and "amqp://guest:***@127.0.0.1:5672/tb-nowhere" in line
    secret = bridge_settings("x", "amqp://bridge:pw-Kx9@127.0.0.1:5672/")
    assert secret.scrub("bridge pw-Kx9") == "bridge ***"
