"""Several accounts in one process: the config file, one loop per account, and one failing account alone.

The settings tests read TOML files written to a temporary directory, with the ``BRIDGE_*`` and
``ALIBABA_CLOUD_*`` variables removed. The integration tests run the bridge against two simulators over real
HTTP (one per account, each with its own access key pair) and the machine's broker.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bridge.app import App
from bridge.cli import EXIT_OK, EXIT_USAGE
from bridge.configview import config_rows
from bridge.errors import AccountFailedError, SettingsError
from bridge.logs import JsonFormatter, for_account
from bridge.metrics import Metrics
from bridge.settings import load_settings, origins
from bridge.simulator import Simulator, running
from tests.faults_support import node_app_stopped, scenario_queues
from tests.harness import BRIDGE_COMMAND, bridge_env, bridge_settings, broker_view, eventually, sample
from tests.private_broker import PrivateNode

EU = {"access_key_id": "eu-key-id", "access_key_secret": "eu-secret-Q7x"}
CN = {"access_key_id": "cn-key-id", "access_key_secret": "cn-secret-W2v"}


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


TWO_ACCOUNTS = """
exchange = "from.file"
page_size = 50
upstream_endpoint = "http://upstream.test"

[[accounts]]
name = "reseller-eu"
access_key_id = "eu-key-id"
access_key_secret_file = "{secret}"

[[accounts]]
name = "reseller-cn"
access_key_id = "cn-key-id"
access_key_secret = "cn-secret-W2v"
api = "domain"
signature_version = "v1"
lang = "zh"
task_result_status = 3
"""


def _two_accounts(directory: Path) -> Path:
    secret = _write(directory / "eu.secret", "eu-secret-Q7x\n")
    return _write(directory / "bridge.toml", TWO_ACCOUNTS.format(secret=secret))


# --- the config file ---
def test_a_file_lists_accounts_each_with_its_own_upstream_settings(clean_env: Path) -> None:
    settings = load_settings(_two_accounts(clean_env), credentials=True)
    eu, cn = settings.accounts
    assert (eu.name, cn.name) == ("reseller-eu", "reseller-cn")
    assert eu.access_key_secret is not None and eu.access_key_secret.get_secret_value() == "eu-secret-Q7x"
    assert (eu.api, eu.signature_version, eu.lang, eu.task_result_status) == ("domain-intl", "v3", "en", None)
    assert (cn.api, cn.signature_version, cn.lang, cn.task_result_status) == ("domain", "v1", "zh", 3)
    # A per-account setting at the top level is every account's default.
    assert eu.base_url == cn.base_url == "http://upstream.test"
    assert cn.api_version == "2018-01-29"
    assert settings.broker.exchange == "from.file" and settings.upstream.page_size == 50


def test_the_environment_overrides_the_file_and_the_variable_names_the_file(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _two_accounts(clean_env)
    monkeypatch.setenv("BRIDGE_EXCHANGE", "from.environment")
    monkeypatch.setenv("BRIDGE_CONFIG_FILE", str(path))
    settings = load_settings()
    assert settings.broker.exchange == "from.environment"
    assert len(settings.accounts) == 2
    found = origins()
    assert found["exchange"] == "environment"
    assert found["page_size"] == f"config file {path}"
    assert found["max_in_flight"] == "default"


def test_without_accounts_in_the_file_the_environment_defines_one(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(clean_env / "bridge.toml", 'account = "solo"\npoll_interval_seconds = 2.5\n')
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_ID", "env-id")
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_SECRET", "env-secret")
    settings = load_settings(path, credentials=True)
    (account,) = settings.accounts
    assert account.name == "solo" and account.access_key_id is not None
    assert settings.delivery.poll_interval_s == 2.5


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('exchnage = "x"\n', "unknown setting 'exchnage'"),
        ('access_key_secret = "top-secret-value"\n', "credentials belong in an [[accounts]] table"),
        ("page_size = 5000\n", "page_size (config file"),
        ('[[accounts]]\nname = "Bad_Name"\naccess_key_id = "i"\naccess_key_secret = "s"\n', "[[accounts]] 1"),
        ('[[accounts]]\nname = "eu"\nacess_key_secret = "typo-secret-value"\n', "acess_key_secret: unknown key"),
        (
            '[[accounts]]\nname = "eu"\naccess_key_secret_file = "/nonexistent/eu"\n',
            "access_key_secret_file: cannot read '/nonexistent/eu'",
        ),
        (
            '[[accounts]]\nname = "eu"\n[[accounts]]\nname = "eu"\n',
            "account names must be unique: eu",
        ),
        ("accounts = 3\n", "must be one or more [[accounts]] tables"),
        ("page_size = \n", "not valid TOML"),
    ],
)
def test_a_bad_file_is_one_line_naming_the_file_and_the_key(clean_env: Path, text: str, expected: str) -> None:
    path = _write(clean_env / "bridge.toml", text)
    with pytest.raises(SettingsError) as caught:
        load_settings(path)
    assert len(caught.value.problems) == 1, caught.value.problems
    (line,) = caught.value.problems
    assert expected in line and "\n" not in line
    assert "secret-value" not in line, "a secret (even a misspelt key's) is never shown"


def test_credentials_in_the_environment_beside_listed_accounts_are_refused(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_ID", "env-id")
    monkeypatch.setenv("BRIDGE_ACCOUNT", "env-account")
    with pytest.raises(SettingsError) as caught:
        load_settings(_two_accounts(clean_env))
    (line,) = caught.value.problems
    assert line.startswith("BRIDGE_ACCOUNT, ALIBABA_CLOUD_ACCESS_KEY_ID: set, but the config file lists [[accounts]]")


def test_a_listed_account_without_its_key_pair_is_named(clean_env: Path) -> None:
    path = _write(clean_env / "bridge.toml", '[[accounts]]\nname = "eu"\naccess_key_id = "i"\n')
    assert load_settings(path).account.name == "eu"  # `config` shows it
    with pytest.raises(SettingsError) as caught:
        load_settings(path, credentials=True)
    assert caught.value.problems == ["account 'eu': access_key_secret: required (or set access_key_secret_file)"]


def test_config_lists_each_account_and_masks_its_secrets(clean_env: Path) -> None:
    settings = load_settings(_two_accounts(clean_env))
    rows = {row.variable: row for row in config_rows(settings, origins(clean_env / "bridge.toml"))}
    assert rows["accounts.reseller-cn.api"].value == "domain"
    assert rows["accounts.reseller-eu.access_key_secret"].value == "***"
    assert rows["BRIDGE_EXCHANGE"].origin.startswith("config file")
    assert rows["accounts.reseller-cn.api"].origin == f"config file {clean_env / 'bridge.toml'}"
    assert rows["accounts.reseller-eu.access_key_secret"].origin.startswith(f"file {clean_env / 'eu.secret'}")
    assert rows["accounts.reseller-eu.endpoint"].origin.startswith("config file"), "the top-level default"
    assert rows["accounts.reseller-eu.lang"].origin == "default"
    shown = repr(settings) + str(settings.masked()) + str([row.value for row in rows.values()])
    assert "eu-secret-Q7x" not in shown and "cn-secret-W2v" not in shown
    assert settings.scrub("x eu-secret-Q7x cn-secret-W2v") == "x *** ***"


# --- the run ---
@pytest.fixture
async def two_simulators() -> AsyncIterator[tuple[Simulator, str, Simulator, str]]:
    eu = Simulator(tasks=300, seed=61, **EU)
    cn = Simulator(tasks=200, seed=62, **CN)
    async with running(eu) as eu_url, running(cn) as cn_url:
        yield eu, eu_url, cn, cn_url


def _accounts(eu_url: str, cn_url: str, *, cn_secret: str = CN["access_key_secret"]) -> list[dict[str, Any]]:
    return [
        {"name": "reseller-eu", "endpoint": eu_url, **EU},
        {
            "name": "reseller-cn",
            "endpoint": cn_url,
            "access_key_id": CN["access_key_id"],
            "access_key_secret": cn_secret,
        },
    ]


def _config_file(path: Path, accounts: list[dict[str, Any]], **top: str) -> Path:
    """A TOML file with the ``top`` settings and one ``[[accounts]]`` table per entry of ``accounts``."""
    lines = [f'{key} = "{value}"' for key, value in top.items()]
    for account in accounts:
        lines += ["[[accounts]]", *(f'{key} = "{value}"' for key, value in account.items())]
    return _write(path, "\n".join(lines) + "\n")


def _environment_without_accounts(exchange: str, amqp_url: str) -> dict[str, str]:
    """A bridge process's environment (the test's broker and exchange), leaving the accounts to the file."""
    env = bridge_env(bridge_settings(exchange, amqp_url))
    for name in ("ALIBABA_CLOUD_ACCESS_KEY_ID", "ALIBABA_CLOUD_ACCESS_KEY_SECRET", "BRIDGE_UPSTREAM_ENDPOINT"):
        env.pop(name)
    return env


@pytest.mark.broker
async def test_two_accounts_drain_into_one_exchange_each_event_naming_its_account(
    two_simulators: tuple[Simulator, str, Simulator, str], broker_url: str, exchange_name: str
) -> None:
    eu, eu_url, cn, cn_url = two_simulators
    settings = bridge_settings(exchange_name, broker_url, accounts=_accounts(eu_url, cn_url))
    metrics = Metrics()
    async with broker_view(broker_url, exchange_name) as view:
        queue = await view.bind("all")
        complete = await App(settings, metrics=metrics).run(asyncio.Event(), once=True)
        messages = await view.wait_for(queue.name, 500)
    assert complete
    assert eu.pending_count == cn.pending_count == 0
    assert (eu.acknowledged_count, cn.acknowledged_count) == (300, 200)
    by_account: dict[str, set[str]] = {}
    for message in messages:
        by_account.setdefault(str(message.headers["account"]), set()).add(str(message.message_id))
        assert json.loads(message.body)["account"] == message.headers["account"]  # the CloudEvents attribute too
    assert by_account == {"reseller-eu": set(eu.ack_counts), "reseller-cn": set(cn.ack_counts)}
    for account, count in (("reseller-eu", 300), ("reseller-cn", 200)):
        assert sample(metrics, "bridge_events_published_total", account=account, outcome="ack") == count
        assert sample(metrics, "bridge_leader", account=account) == 0, "released at the end of the drain"
        assert sample(metrics, "bridge_leader_transitions_total", account=account, role="leader") == 1


@pytest.mark.broker
async def test_an_account_with_a_wrong_secret_never_stops_the_other(
    two_simulators: tuple[Simulator, str, Simulator, str],
    broker_url: str,
    exchange_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    eu, eu_url, cn, cn_url = two_simulators
    accounts = _accounts(eu_url, cn_url, cn_secret="wrong-secret-Z9")
    settings = bridge_settings(exchange_name, broker_url, accounts=accounts, backoff_max_s=0.5)
    metrics = Metrics()
    stop = asyncio.Event()
    app = App(settings, metrics=metrics)
    caplog.set_level(logging.ERROR, logger="bridge.app")
    run = asyncio.create_task(app.run(stop))
    try:
        await eventually(lambda: eu.acknowledged_count == 300, timeout_s=30, what="the good account drained")
        await eventually(lambda: sample(metrics, "bridge_account_failing", account="reseller-cn") == 1)
        assert sample(metrics, "bridge_account_failing", account="reseller-eu") == 0
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.metrics_port}") as http:
            ready = await http.get("/readyz")
        assert ready.status_code == 503
        assert "account reseller-cn: upstream: PollTaskResult failed" in ready.text
        assert "reseller-eu" not in ready.text, "the good account is ready"
        # Parked, it is retried: the count of its failed polls keeps growing.
        failed = sample(metrics, "bridge_upstream_requests_total", account="reseller-cn", outcome="fatal_error")
        await eventually(
            lambda: (
                sample(metrics, "bridge_upstream_requests_total", account="reseller-cn", outcome="fatal_error") > failed
            ),
            what="the parked account retried",
        )
    finally:
        stop.set()
        complete = await asyncio.wait_for(run, 30)
    assert complete
    assert cn.pending_count == 200 and cn.acknowledged_count == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "bridge.app"]
    assert any(line.startswith("account reseller-cn stopped polling: PollTaskResult failed") for line in lines)
    assert all("wrong-secret-Z9" not in line for line in lines)


@pytest.mark.broker
async def test_a_once_drain_finishes_the_good_account_then_fails_naming_the_other(
    two_simulators: tuple[Simulator, str, Simulator, str], broker_url: str, exchange_name: str
) -> None:
    eu, eu_url, cn, cn_url = two_simulators
    settings = bridge_settings(exchange_name, broker_url, accounts=_accounts(eu_url, cn_url, cn_secret="wrong-1"))
    with pytest.raises(AccountFailedError) as caught:
        await App(settings).run(asyncio.Event(), once=True)
    assert str(caught.value).startswith("account reseller-cn: PollTaskResult failed")
    assert eu.acknowledged_count == 300 and cn.acknowledged_count == 0


@pytest.mark.broker
async def test_run_and_check_read_the_config_file(
    two_simulators: tuple[Simulator, str, Simulator, str], broker_url: str, exchange_name: str, tmp_path: Path
) -> None:
    eu, eu_url, cn, cn_url = two_simulators
    secret = _write(tmp_path / "cn.secret", CN["access_key_secret"] + "\n")
    eu_table, cn_table = _accounts(eu_url, cn_url)
    del cn_table["access_key_secret"]
    config = _config_file(tmp_path / "bridge.toml", [eu_table, {**cn_table, "access_key_secret_file": str(secret)}])
    env = _environment_without_accounts(exchange_name, broker_url)

    async def cli(*args: str) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            *BRIDGE_COMMAND, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        out, _ = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode is not None
        return process.returncode, out.decode()

    code, report = await cli("check", "--config", str(config))
    assert code == EXIT_OK, report
    assert "OK    upstream reseller-eu" in report and "OK    upstream reseller-cn" in report
    code, output = await cli("run", "--once", "--config", str(config))
    assert code == EXIT_OK, output
    assert eu.acknowledged_count == 300 and cn.acknowledged_count == 200
    assert CN["access_key_secret"] not in output and EU["access_key_secret"] not in output
    summary = next(json.loads(line) for line in output.splitlines() if '"message": "summary"' in line)
    assert (summary["done"], summary["published"]) == (500, 500), "the summary adds up both accounts"
    env["ALIBABA_CLOUD_ACCESS_KEY_ID"] = "stray"
    code, output = await cli("run", "--once", "--config", str(config))
    assert code == EXIT_USAGE and "ALIBABA_CLOUD_ACCESS_KEY_ID: set, but the config file lists" in output


@pytest.mark.broker
async def test_a_process_with_a_wrong_secret_for_one_account_drains_the_other_and_names_it(
    two_simulators: tuple[Simulator, str, Simulator, str], broker_url: str, exchange_name: str, tmp_path: Path
) -> None:
    eu, eu_url, cn, cn_url = two_simulators
    config = _config_file(tmp_path / "bridge.toml", _accounts(eu_url, cn_url, cn_secret="wrong-secret-Z9"))
    env = _environment_without_accounts(exchange_name, broker_url)
    env["BRIDGE_LOG_FORMAT"] = "json"
    process = await asyncio.create_subprocess_exec(
        *BRIDGE_COMMAND, "check", "--config", str(config), env=env, stdout=asyncio.subprocess.PIPE
    )
    report = (await asyncio.wait_for(process.communicate(), 60))[0].decode()
    assert process.returncode == 1, report
    assert "OK    upstream reseller-eu" in report
    assert "FAIL  upstream reseller-cn" in report and "access_key_secret of account 'reseller-cn'" in report
    process = await asyncio.create_subprocess_exec(
        *BRIDGE_COMMAND, "run", "--once", "--config", str(config), env=env, stderr=asyncio.subprocess.PIPE
    )
    output = (await asyncio.wait_for(process.communicate(), 60))[1].decode()
    assert process.returncode == 1, output
    assert eu.acknowledged_count == 300 and eu.pending_count == 0, "the good account drained completely"
    assert cn.acknowledged_count == 0 and cn.pending_count == 200
    entries = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    last = entries[-1]
    assert last["message"].startswith("task-bridge exiting: failed: account reseller-cn: PollTaskResult failed")
    assert any(e.get("account") == "reseller-cn" and e["level"] == "error" for e in entries[:-1])
    assert "wrong-secret-Z9" not in output and EU["access_key_secret"] not in output


async def test_lines_logged_for_an_account_carry_its_name() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("bridge.test-accounts")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

    async def account_task(name: str) -> None:
        for_account(name)
        await asyncio.create_task(asyncio.sleep(0))  # a task it starts inherits the name
        logger.info("polled", extra={"page": 1})

    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(account_task("reseller-eu"))
            group.create_task(account_task("reseller-cn"))
        logger.info("process line")
    finally:
        logger.removeHandler(handler)
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert sorted(e.get("account") for e in entries if e["message"] == "polled") == ["reseller-cn", "reseller-eu"]
    assert "account" not in next(e for e in entries if e["message"] == "process line")


@pytest.mark.broker
async def test_two_replicas_of_two_accounts_have_one_poller_per_account(
    two_simulators: tuple[Simulator, str, Simulator, str], broker_url: str, exchange_name: str
) -> None:
    eu, eu_url, cn, cn_url = two_simulators
    settings = bridge_settings(exchange_name, broker_url, accounts=_accounts(eu_url, cn_url), page_size=50)
    apps = [App(settings, metrics=Metrics()), App(settings, metrics=Metrics())]
    names = ("reseller-eu", "reseller-cn")
    stop = asyncio.Event()
    two_leaders: list[str] = []
    polled_while_standby: list[str] = []
    previous = {(i, name): (0.0, 0.0) for i in range(2) for name in names}

    def check() -> None:
        for name in names:
            leading = [sample(app.metrics, "bridge_leader", account=name) for app in apps]
            if sum(leading) > 1:
                two_leaders.append(name)
            for i, app in enumerate(apps):
                polls = sample(app.metrics, "bridge_polls_total", account=name)
                before_polls, before_leading = previous[i, name]
                if polls > before_polls and not leading[i] and not before_leading:
                    polled_while_standby.append(f"{name} on replica {i}")
                previous[i, name] = (polls, leading[i])

    async with broker_view(broker_url, exchange_name) as view:
        queue = await view.bind("all")
        runs = [asyncio.create_task(app.run(stop)) for app in apps]
        try:
            while eu.pending_count or cn.pending_count:
                check()
                await asyncio.sleep(0.02)
                assert not any(run.done() for run in runs), "a replica stopped"
            check()
        finally:
            stop.set()
            results = await asyncio.wait_for(asyncio.gather(*runs), 30)
        messages = await view.take(queue.name)
    assert results == [True, True]
    assert not two_leaders and not polled_while_standby, (two_leaders, polled_while_standby)
    assert (eu.acknowledged_count, cn.acknowledged_count) == (300, 200)
    ids = [str(m.message_id) for m in messages]
    assert len(ids) == len(set(ids)) == 500, "no duplicates: each account had one leader throughout"


@pytest.mark.parametrize(("account", "shown"), [("reseller-eu", "account=reseller-eu"), ("default", None)])
def test_tail_names_the_account_unless_it_is_the_only_default_one(account: str, shown: str | None) -> None:
    from types import SimpleNamespace

    from bridge.events import convert
    from bridge.records import RawRecord
    from bridge.tail import format_line

    detail = {"TaskDetailNo": "T-1", "TaskType": "CHG_DNS", "TaskStatus": "EXECUTE_SUCCESS", "DomainName": "a.com"}
    event = convert(RawRecord(detail, "T-1"), source="urn:test", account=account)
    properties = event.properties()
    message = SimpleNamespace(
        headers=properties.headers,
        body=event.body,
        routing_key=event.routing_key,
        message_id=event.message_id,
        timestamp=None,
    )
    line = format_line(message)  # type: ignore[arg-type]
    assert "T-1" in line
    assert (shown in line) if shown else ("account=" not in line)


async def test_peek_polls_the_account_it_is_asked_for(
    two_simulators: tuple[Simulator, str, Simulator, str], tmp_path: Path
) -> None:
    eu, eu_url, cn, cn_url = two_simulators
    config = _config_file(tmp_path / "bridge.toml", _accounts(eu_url, cn_url), upstream_endpoint="http://unused.test")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "ALIBABA_CLOUD_"))}

    async def peek(*args: str) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            *BRIDGE_COMMAND, "peek", "--config", str(config), "--json", "--count", "3", *args,
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()

    code, out, err = await peek("--account", "reseller-cn")
    assert code == EXIT_OK, err
    previews = [json.loads(line) for line in out.splitlines()]
    assert len(previews) == 3
    assert {p["properties"]["headers"]["account"] for p in previews} == {"reseller-cn"}
    assert all(cn.detail(p["body"]["id"]) is not None for p in previews), "the details of that account's upstream"
    assert all(eu.detail(p["body"]["id"]) is None for p in previews)
    code, out, err = await peek()
    assert code == EXIT_OK and {json.loads(line)["body"]["account"] for line in out.splitlines()} == {"reseller-eu"}
    code, _out, err = await peek("--account", "nope")
    assert code == 1 and "no account 'nope'" in err
    assert eu.acknowledged_count == cn.acknowledged_count == 0, "peek acknowledges nothing"


@pytest.mark.broker
async def test_a_broker_restart_mid_drain_loses_nothing_of_either_account(
    two_simulators: tuple[Simulator, str, Simulator, str], shared_node: PrivateNode, exchange_name: str
) -> None:
    # On the session's private node: the machine's broker is shared and never stopped.
    eu, eu_url, cn, cn_url = two_simulators
    eu.add_details(2700)
    cn.add_details(1800)  # 3000 and 2000 pending
    window = 128
    metrics = Metrics()
    async with scenario_queues(shared_node.url, exchange_name) as queues:
        settings = bridge_settings(
            exchange_name, shared_node.url, accounts=_accounts(eu_url, cn_url), page_size=250, max_in_flight=window
        )
        run = asyncio.create_task(App(settings, metrics=metrics).run(asyncio.Event(), once=True))
        try:
            await eventually(lambda: eu.acknowledged_count >= 500 and cn.acknowledged_count >= 300, what="under way")
            async with node_app_stopped(shared_node):
                await eventually(lambda: sample(metrics, "bridge_broker_connected") == 0, what="connection lost")
                await asyncio.sleep(1.0)
            complete = await asyncio.wait_for(run, 90)
        finally:
            run.cancel()
        ids = await queues.take(queues.events)
    assert complete
    assert eu.pending_count == cn.pending_count == 0
    assert set(ids) == set(eu.ack_counts) | set(cn.ack_counts), "every acknowledged detail has its event"
    assert len(ids) - len(set(ids)) <= window, "duplicates stay within the one shared window"
    for account in ("reseller-eu", "reseller-cn"):
        assert sample(metrics, "bridge_leader_transitions_total", account=account, role="leader") >= 2
