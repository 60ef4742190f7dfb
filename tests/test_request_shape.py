"""The bridge's requests, field by field, against the official SDKs' for the same calls.

The official SDKs of both flavours (alibabacloud-domain-intl20171218, alibabacloud-domain20180129) and the
bridge send the same PollTaskResult and AcknowledgeTaskResult calls, signed with V3 (the SDKs' default) and V1
(``Config(signature_algorithm="v2")``), with and without an STS token, to the simulator served over real HTTP.
The simulator records each raw request as it arrived (method, path, query parameters, headers, body), and the
test compares the two requests of each call field by field, except:

- the nonce and the time (V1: ``SignatureNonce``, ``Timestamp``; V3: ``x-acs-signature-nonce``,
  ``x-acs-date``), different on every request by design;
- the signature (V1: ``Signature``; V3: ``authorization``): its value follows from the nonce and time. Of the
  ``authorization`` header the algorithm and the ``Credential`` are compared; its ``SignedHeaders`` differ on
  purpose: the SDK also signs ``accept`` and ``user-agent``, the bridge signs what the gateway requires
  (``host`` and every ``x-acs-*``), and both verify;
- ``user-agent``: each client names itself (the SDK ``AlibabaCloud (...) Core/...``, the bridge
  ``task-bridge/<version>``); only its presence is compared.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any
from urllib.parse import parse_qsl

import pytest
from alibabacloud_domain20180129 import models as domain_models
from alibabacloud_domain20180129.client import Client as DomainClient
from alibabacloud_domain_intl20171218 import models as intl_models
from alibabacloud_domain_intl20171218.client import Client as IntlClient
from alibabacloud_tea_openapi.utils_models import Config

from bridge.app import upstream_http_client
from bridge.settings import load_settings
from bridge.simulator import Simulator, running
from bridge.upstream import UpstreamClient

KEY_ID, SECRET, TOKEN = "sim-access-key-id", "sim-access-key-secret", "STS.shape+token/=="
FLAVOURS: dict[str, tuple[type[Any], ModuleType]] = {
    "domain-intl": (IntlClient, intl_models),
    "domain": (DomainClient, domain_models),
}
# the SDK's signature_algorithm -> the bridge's signature_version
SIGNATURES = {None: "v3", "v2": "v1"}
VOLATILE_QUERY = {"SignatureNonce", "Timestamp", "Signature"}
VOLATILE_HEADERS = {"x-acs-signature-nonce", "x-acs-date", "authorization", "user-agent"}


@dataclass
class Raw:
    method: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]
    body: bytes


class CapturingSimulator(Simulator):
    """Records every API request exactly as it arrived, before the simulator reads it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.captured: list[Raw] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/":
            await super().__call__(scope, receive, send)
            return
        messages = []
        body = b""
        while True:
            message = await receive()
            messages.append(message)
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            assert name.decode().lower() not in headers, f"header {name!r} sent twice"
            headers[name.decode().lower()] = value.decode()
        query = parse_qsl(scope["query_string"].decode(), keep_blank_values=True)
        self.captured.append(Raw(scope["method"], scope["path"], query, headers, body))
        replay = iter(messages)

        async def replayed() -> Any:
            return next(replay)

        await super().__call__(scope, replayed, send)


@pytest.fixture(params=[False, True], ids=["keys", "sts"])
async def served(request: pytest.FixtureRequest) -> AsyncIterator[tuple[CapturingSimulator, str, bool]]:
    """The capturing simulator over HTTP, demanding an STS token or not."""
    sts: bool = request.param
    sim = CapturingSimulator(tasks=12, seed=41, security_token=TOKEN if sts else None)
    async with running(sim) as url:
        yield sim, url, sts


def assert_same_request(sdk: Raw, bridge: Raw) -> None:
    assert (bridge.method, bridge.path, bridge.body) == (sdk.method, sdk.path, sdk.body) == ("POST", "/", b"")
    # Every API parameter in the query string, nothing repeated, nothing else.
    for raw in (sdk, bridge):
        names = [name for name, _ in raw.query]
        assert len(names) == len(set(names)), names
    assert {k: v for k, v in bridge.query if k not in VOLATILE_QUERY} == {
        k: v for k, v in sdk.query if k not in VOLATILE_QUERY
    }
    assert {k for k, _ in bridge.query} & VOLATILE_QUERY == {k for k, _ in sdk.query} & VOLATILE_QUERY
    # The same headers, with the same values but for the volatile ones, which both send.
    assert set(bridge.headers) == set(sdk.headers)
    assert {k: v for k, v in bridge.headers.items() if k not in VOLATILE_HEADERS} == {
        k: v for k, v in sdk.headers.items() if k not in VOLATILE_HEADERS
    }
    if "authorization" in sdk.headers:
        assert _credential(bridge.headers["authorization"]) == _credential(sdk.headers["authorization"])


def _credential(authorization: str) -> tuple[str, str]:
    algorithm, _, rest = authorization.partition(" ")
    return algorithm, rest.split(",")[0]


@pytest.mark.parametrize("algorithm", list(SIGNATURES), ids=["v3", "v1"])
@pytest.mark.parametrize("flavour", list(FLAVOURS))
async def test_the_bridge_sends_what_the_official_sdk_sends(
    served: tuple[CapturingSimulator, str, bool], flavour: str, algorithm: str | None
) -> None:
    sim, url, sts = served
    client_class, models = FLAVOURS[flavour]
    sdk = client_class(
        Config(
            access_key_id=KEY_ID,
            access_key_secret=SECRET,
            security_token=TOKEN if sts else None,
            endpoint=url.removeprefix("http://"),
            protocol="http",
            signature_algorithm=algorithm,
        )
    )
    common: dict[str, Any] = {
        "access_key_id": KEY_ID,
        "access_key_secret": SECRET,
        "security_token": TOKEN if sts else None,
        "upstream_endpoint": url,
        "upstream_api": flavour,
        "signature_version": SIGNATURES[algorithm],
    }
    plain = load_settings(**common, lang="en")
    filtered = load_settings(
        **common,
        lang="zh",
        task_result_status=2,
        domain_name="example.com",
        instance_id="S2018-1",
        task_no="T-7",
        user_client_ip="192.0.2.9",
    )
    filters = {
        "task_result_status": 2,
        "domain_name": "example.com",
        "instance_id": "S2018-1",
        "task_no": "T-7",
        "user_client_ip": "192.0.2.9",
    }

    async with upstream_http_client(plain.upstream) as http:
        bridge_plain, bridge_filtered = (
            UpstreamClient(http, plain.upstream, plain.account),
            UpstreamClient(http, filtered.upstream, filtered.account),
        )

        # PollTaskResult, every parameter the bridge sends.
        answer = await asyncio.to_thread(
            sdk.poll_task_result, models.PollTaskResultRequest(page_num=2, page_size=5, lang="en")
        )
        page = await bridge_plain.poll(page_num=2, page_size=5)
        assert [d.task_detail_no for d in answer.body.data.task_detail] == [r.detail_no for r in page.records]

        await asyncio.to_thread(
            sdk.poll_task_result, models.PollTaskResultRequest(page_num=1, page_size=3, lang="zh", **filters)
        )
        await bridge_filtered.poll(page_num=1, page_size=3)

        # AcknowledgeTaskResult: TaskDetailNo.1..N in the query, with and without UserClientIp.
        ids = [r.detail_no for r in page.records if r.detail_no is not None]
        acked = await asyncio.to_thread(
            sdk.acknowledge_task_result, models.AcknowledgeTaskResultRequest(task_detail_no=ids[:3], lang="en")
        )
        assert acked.body.result == 3
        again = await bridge_plain.acknowledge(ids[:3])
        assert (again.sent, again.confirmed) == (3, 0)  # the SDK's call took them already

        await asyncio.to_thread(
            sdk.acknowledge_task_result,
            models.AcknowledgeTaskResultRequest(task_detail_no=ids[3:], lang="zh", user_client_ip="192.0.2.9"),
        )
        await bridge_filtered.acknowledge(ids[3:])

    captured = sim.captured
    assert len(captured) == 8
    for sdk_request, bridge_request in zip(captured[0::2], captured[1::2], strict=True):
        assert_same_request(sdk_request, bridge_request)
    ack = captured[5]
    assert [v for k, v in ack.query if k.startswith("TaskDetailNo.")] == ids[:3]
    assert sim.ack_counts == dict.fromkeys(ids, 2)
