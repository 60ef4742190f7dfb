"""TLS to the upstream: the simulator served over HTTPS with a certificate from a private CA (trustme).

With ``BRIDGE_UPSTREAM_CA_FILE`` naming that CA the bridge polls; without it the call fails in one line that
names TLS, the host and the setting to use, and it is fatal (a certificate the configured CAs do not accept is
a setting to fix, which no retry changes).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from bridge.app import App, upstream_http_client
from bridge.errors import FatalUpstreamError, SettingsError
from bridge.metrics import Metrics
from bridge.serving import serve_in_background
from bridge.settings import Settings, load_settings
from bridge.simulator import Simulator
from bridge.upstream import UpstreamClient
from tests.harness import SIM_KEY_ID, SIM_KEY_SECRET, bridge_settings, sample


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A private CA, a server certificate for ``localhost`` signed by it, and a CA that signed nothing here."""
    where = tmp_path_factory.mktemp("pki")
    ca, stranger = trustme.CA(), trustme.CA()
    server = ca.issue_cert("localhost")
    files = {name: where / f"{name}.pem" for name in ("ca", "stranger", "cert", "key")}
    ca.cert_pem.write_to_path(str(files["ca"]))
    stranger.cert_pem.write_to_path(str(files["stranger"]))
    server.private_key_pem.write_to_path(str(files["key"]))
    for index, blob in enumerate(server.cert_chain_pems):
        blob.write_to_path(str(files["cert"]), append=index > 0)
    return files


@pytest.fixture
async def https_sim(pki: dict[str, Path]) -> AsyncIterator[tuple[Simulator, str]]:
    sim = Simulator(tasks=7, seed=71)
    served = serve_in_background(sim, "127.0.0.1", 0, ssl_certfile=str(pki["cert"]), ssl_keyfile=str(pki["key"]))
    async with served as (_host, port):
        yield sim, f"https://localhost:{port}"


def upstream_settings(url: str, **overrides: Any) -> Settings:
    return load_settings(access_key_id=SIM_KEY_ID, access_key_secret=SIM_KEY_SECRET, upstream_endpoint=url, **overrides)


async def test_the_ca_file_verifies_the_upstream(https_sim: tuple[Simulator, str], pki: dict[str, Path]) -> None:
    sim, url = https_sim
    settings = upstream_settings(url, upstream_ca_file=pki["ca"])
    async with upstream_http_client(settings.upstream) as http:
        page = await UpstreamClient(http, settings.upstream, settings.account).poll()
    assert len(page.records) == 7
    assert sim.pending_count == 7


@pytest.mark.parametrize("ca", [None, "stranger"], ids=["system-cas", "wrong-ca"])
async def test_a_verification_failure_is_one_fatal_line_naming_the_setting(
    https_sim: tuple[Simulator, str], pki: dict[str, Path], ca: str | None
) -> None:
    sim, url = https_sim
    settings = upstream_settings(url, upstream_ca_file=pki[ca] if ca else None)
    metrics = Metrics()
    async with upstream_http_client(settings.upstream) as http:
        with pytest.raises(FatalUpstreamError) as caught:
            await UpstreamClient(
                http, settings.upstream, settings.account, metrics=metrics.account(settings.account.name)
            ).poll()
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith("PollTaskResult failed: TLS verification of localhost failed (")
    assert "(certificate verify failed: " in text
    assert text.endswith("; set BRIDGE_UPSTREAM_CA_FILE to the CA that signs it")
    assert sample_value(metrics, "fatal_error") == 1
    assert sim.pending_count == 7


def sample_value(metrics: Metrics, outcome: str) -> float:
    return sample(metrics, "bridge_upstream_requests_total", action="PollTaskResult", outcome=outcome)


@pytest.mark.broker
async def test_run_stops_at_once_with_that_line(
    https_sim: tuple[Simulator, str], broker_url: str, exchange_name: str
) -> None:
    sim, url = https_sim
    settings = bridge_settings(exchange_name, broker_url, upstream_endpoint=url)
    with pytest.raises(FatalUpstreamError, match="TLS verification of localhost failed"):
        await asyncio.wait_for(App(settings).run(asyncio.Event(), once=True), 20)
    assert sim.pending_count == 7


@pytest.mark.parametrize(
    ("content", "why"),
    [(None, "no such file"), (b"not a certificate\n", "holds no PEM CA certificate")],
    ids=["missing", "not-pem"],
)
def test_a_bad_ca_file_is_a_settings_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, content: bytes | None, why: str
) -> None:
    path = tmp_path / "ca.pem"
    if content is not None:
        path.write_bytes(content)
    monkeypatch.setenv("BRIDGE_UPSTREAM_CA_FILE", str(path))
    with pytest.raises(SettingsError) as caught:
        load_settings()
    (problem,) = caught.value.problems
    assert problem.startswith(f"BRIDGE_UPSTREAM_CA_FILE: {why}")


def test_an_unreadable_ca_file_is_a_settings_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BRIDGE_UPSTREAM_CA_FILE", str(tmp_path))  # a directory: exists, cannot be read as a file
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert caught.value.problems[0].startswith("BRIDGE_UPSTREAM_CA_FILE: ")


def test_the_ca_file_setting_is_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, pki: dict[str, Path]
) -> None:
    monkeypatch.setenv("BRIDGE_UPSTREAM_CA_FILE", str(pki["ca"]))
    assert load_settings().upstream.upstream_ca_file == pki["ca"]
    monkeypatch.setenv("BRIDGE_UPSTREAM_CA_FILE", "")
    assert load_settings().upstream.upstream_ca_file is None
