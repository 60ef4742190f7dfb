"""``BRIDGE_AMQP_URL`` as a list of broker nodes: parsing, masking, and connecting to each in turn.

The cluster itself (three private nodes, one stopped mid-drain) is a scenario of tests/test_faults.py.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import aiormq
import pytest

from bridge import amqp, refusals
from bridge.errors import BrokerRefusedError, BrokerUnavailableError, SettingsError
from bridge.metrics import Metrics
from bridge.publisher import Publisher
from bridge.settings import Settings, load_settings
from tests.faults_support import TcpProxy, amqp_port
from tests.harness import bridge_settings
from tests.private_broker import free_port

PASSWORDS = ("first-Pa55", "second-Pa55", "third-Pa55")
THREE = (
    f"amqp://bridge:{PASSWORDS[0]}@rabbit-0:5672/prod , "
    f"amqp://bridge:{PASSWORDS[1]}@rabbit-1:5673/prod,"
    f"amqp://bridge:{PASSWORDS[2]}@[::1]/prod"
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith(("BRIDGE_", "ALIBABA_CLOUD_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def _problem(url: str) -> str:
    with pytest.raises(SettingsError) as caught:
        load_settings(amqp_url=url)
    (line,) = caught.value.problems
    return line


# --- parsing and masking -------------------------------------------------------------------------------------


def test_several_urls_are_read_in_order_with_spaces_around_the_commas() -> None:
    settings = load_settings(amqp_url=THREE)
    assert settings.broker.amqp_urls == [
        f"amqp://bridge:{PASSWORDS[0]}@rabbit-0:5672/prod",
        f"amqp://bridge:{PASSWORDS[1]}@rabbit-1:5673/prod",
        f"amqp://bridge:{PASSWORDS[2]}@[::1]/prod",
    ]
    assert [settings.broker.amqp_node(i).amqp_urls for i in range(3)] == [[url] for url in settings.broker.amqp_urls]
    assert settings.broker.amqp_node(4).amqp_urls == [settings.broker.amqp_urls[1]], "the index wraps around"


def test_one_url_is_one_node() -> None:
    settings = load_settings(amqp_url="amqp://bridge:pw-single@rabbit:5672/")
    assert settings.broker.amqp_urls == ["amqp://bridge:pw-single@rabbit:5672/"]
    assert settings.broker.amqp_node(0) is settings.broker
    assert settings.broker.amqp_url_masked == "amqp://bridge:***@rabbit:5672/"


def test_a_comma_inside_a_password_needs_no_escape() -> None:
    settings = load_settings(amqp_url="amqp://u:pa,ss-word@h1/,amqp://u:other,pw@h2/")
    assert settings.broker.amqp_urls == ["amqp://u:pa,ss-word@h1/", "amqp://u:other,pw@h2/"]
    assert settings.broker.amqp_url_masked == "amqp://u:***@h1/, amqp://u:***@h2/"


def test_the_masked_form_shows_every_host_and_hides_every_password() -> None:
    settings = load_settings(amqp_url=THREE)
    masked = "amqp://bridge:***@rabbit-0:5672/prod, amqp://bridge:***@rabbit-1:5673/prod, amqp://bridge:***@[::1]/prod"
    assert settings.broker.amqp_url_masked == masked
    assert settings.masked()["amqp_url"] == masked
    text = f"failed: {THREE} / {settings.broker.amqp_urls[1]} / password {PASSWORDS[2]}"
    scrubbed = settings.scrub(text)
    assert not any(password in scrubbed for password in PASSWORDS)
    shown = [repr(settings), str(settings), settings.model_dump_json()]
    assert not any(password in text for text in shown for password in PASSWORDS)


def test_a_url_without_a_password_stays_readable_in_messages() -> None:
    settings = load_settings(amqp_url="amqp://rabbit-0/,amqp://bridge:pw-two@rabbit-1/")
    assert settings.scrub("cannot connect to amqp://rabbit-0/") == "cannot connect to amqp://rabbit-0/"
    assert "pw-two" not in settings.scrub("amqp://bridge:pw-two@rabbit-1/")


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("amqp://u:pw-secret@h1/,", "BRIDGE_AMQP_URL: has a ',' after its host"),
        ("amqp://u:pw-secret@h1/, ,amqp://u:pw-secret@h2/", "URL 1 of 2 has a ',' after its host"),
        ("amqp://u:pw-secret@h1/,http://u:pw-secret@h2/", "has a ',' after its host"),
        ("amqp://u:pw-secret@h1/,amqp://u:pw-secret@h2:99999/", "URL 2 of 2 does not parse"),
        ("amqp://u:pw-secret@h1/,amqp://u:pw-secret@/v", "URL 2 of 2 names no host"),
        ("amqp://u:pw-secret@h1/,amqp://u:pw-secret@h2/?heartbeat=5", "URL 2 of 2 option 'heartbeat'"),
        ("amqp://u:pw-secret@h1/,amqps://u:pw-secret@h2/", "mixes amqp and amqps"),
    ],
)
def test_a_bad_url_of_the_list_is_named_by_its_position_never_shown(url: str, why: str) -> None:
    line = _problem(url)
    assert line.startswith("BRIDGE_AMQP_URL: "), line
    assert why in line
    assert "pw-secret" not in line
    assert "h1" not in line and "h2" not in line


def test_a_list_can_come_from_the_file_variant(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "amqp-url"
    path.write_text(THREE + "\n", encoding="utf-8")
    monkeypatch.setenv("BRIDGE_AMQP_URL_FILE", str(path))
    settings = load_settings()
    assert len(settings.broker.amqp_urls) == 3
    assert PASSWORDS[0] not in settings.broker.amqp_url_masked


def test_a_bad_url_from_the_file_variant_is_named_never_shown(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "amqp-url"
    path.write_text(f"amqp://u:{PASSWORDS[0]}@h1/,amqp://u:{PASSWORDS[1]}@/v\n", encoding="utf-8")
    monkeypatch.setenv("BRIDGE_AMQP_URL_FILE", str(path))
    with pytest.raises(SettingsError) as caught:
        load_settings()
    (line,) = caught.value.problems
    assert line.startswith("BRIDGE_AMQP_URL: URL 2 of 2 names no host")
    assert not any(password in line for password in PASSWORDS)


# --- connecting to each in turn (the machine's broker, read-only use) ----------------------------------------


def _closed_url(password: str = "pw-closed") -> str:
    return f"amqp://guest:{password}@127.0.0.1:{free_port()}/"


def _settings(*urls: str) -> Settings:
    return bridge_settings("test.unused", ", ".join(urls), publish_timeout_s=2.0)


@pytest.mark.broker
async def test_connect_goes_on_to_the_next_node_when_one_does_not_answer(
    broker_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="bridge.amqp")
    closed = _closed_url()
    settings = _settings(closed, broker_url)
    connection = await amqp.connect(settings.broker)
    try:
        assert connection.node_index == 1
        assert connection.broker == broker_url.replace(":guest@", ":***@")
    finally:
        await connection.close()
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "bridge.amqp"]
    assert "trying the next URL" in warning and f":{amqp_port(closed)}/" in warning
    assert "pw-closed" not in warning


async def test_a_port_nobody_listens_on_is_unavailable_not_a_broker_error() -> None:
    # Unavailable is retried with backoff (and a cluster's next node tried); a plain BrokerError stops the bridge.
    url = _closed_url()
    with pytest.raises(BrokerUnavailableError) as caught:
        await refusals.connect(_settings(url).broker)
    assert str(caught.value).startswith(f"cannot connect to amqp://guest:***@127.0.0.1:{amqp_port(url)}/")


@pytest.mark.broker
async def test_every_node_down_is_one_line_naming_each(broker_url: str) -> None:
    first, second = _closed_url("pw-one"), _closed_url("pw-two")
    with pytest.raises(BrokerUnavailableError) as caught:
        await refusals.connect(_settings(first, second).broker)
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith("no node of BRIDGE_AMQP_URL took the connection (2 tried)")
    assert f"node 1: cannot connect to amqp://guest:***@127.0.0.1:{amqp_port(first)}/" in text
    assert f"node 2: cannot connect to amqp://guest:***@127.0.0.1:{amqp_port(second)}/" in text
    assert "pw-one" not in text and "pw-two" not in text


@pytest.mark.broker
async def test_a_refusal_while_the_other_nodes_are_down_is_a_refusal(broker_url: str) -> None:
    # Users are the same on every node of a cluster: the nodes that did not answer would have refused too.
    wrong = broker_url.replace(":guest@", ":not-the-pw@")
    with pytest.raises(BrokerRefusedError) as caught:
        await refusals.connect(_settings(_closed_url(), wrong).broker)
    text = str(caught.value)
    assert "node 2: the broker at amqp://guest:***@127.0.0.1:5672/ refused the login of user 'guest'" in text
    assert "not-the-pw" not in text


@pytest.mark.broker
async def test_the_publisher_moves_to_the_next_node_on_each_reconnect(broker_url: str, exchange_name: str) -> None:
    async with TcpProxy(amqp_port(broker_url)) as proxy:
        other = proxy.url(broker_url)
        settings = bridge_settings(exchange_name, f"{broker_url},{other}")
        publisher = Publisher(settings.broker, Metrics())
        seen = []
        try:
            for _ in range(3):
                await publisher.connect()
                seen.append(publisher.broker)
        finally:
            await publisher.close()
    first, second = (url.replace(":guest@", ":***@") for url in (broker_url, other))
    assert seen == [first, second, first]
    assert publisher.broker is None


async def test_a_connection_that_never_opened_is_closed_once_aborted() -> None:
    # Otherwise aio-pika's __del__ schedules a close() that a finished event loop never runs: a warning (an
    # error under filterwarnings=error) after every failed attempt, whenever the garbage collector finds it.
    connection = amqp.BrokerConnection(
        _closed_url(), heartbeat_s=6, ssl_context=None, on_blocked=print, on_unblocked=print
    )
    with pytest.raises(aiormq.exceptions.AMQPConnectionError):
        await connection.connect(timeout=2)
    assert not connection.is_closed
    connection.abort()
    assert connection.is_closed
