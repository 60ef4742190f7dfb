"""The official Alibaba Cloud SDKs, both flavours and both signature versions, against the simulator over HTTP.

The SDK clients are synchronous: their calls run in a thread while the simulator serves in the test's loop.
``Config(signature_algorithm="v2")`` makes alibabacloud-tea-openapi sign with V1 (HMAC-SHA1 ``Signature``
parameter, ``do_rpcrequest``); the default signs with V3 (``ACS3-HMAC-SHA256`` header, ``do_request``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs

import pytest
from alibabacloud_domain20180129 import models as domain_models
from alibabacloud_domain20180129.client import Client as DomainClient
from alibabacloud_domain_intl20171218 import models as intl_models
from alibabacloud_domain_intl20171218.client import Client as IntlClient
from alibabacloud_tea_openapi.exceptions import ClientException
from alibabacloud_tea_openapi.utils_models import Config

from bridge.simulator import Simulator, running

KEY_ID, SECRET = "sim-access-key-id", "sim-access-key-secret"
FLAVOURS: dict[str, tuple[type[Any], ModuleType]] = {
    "domain-intl": (IntlClient, intl_models),
    "domain": (DomainClient, domain_models),
}
# signature_algorithm value -> the signing method the simulator must have seen
SIGNATURES = {None: "v3", "v2": "v1"}


class RecordingSimulator(Simulator):
    """Notes which signature method each API request carried, to prove the SDK signed as configured."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.methods: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/":
            headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
            query = parse_qs(scope["query_string"].decode())
            if headers.get("authorization", "").startswith("ACS3-HMAC-SHA256 "):
                self.methods.append("v3")
            elif "Signature" in query and query.get("SignatureMethod") == ["HMAC-SHA1"]:
                self.methods.append("v1")
            else:
                self.methods.append("unknown")
        await super().__call__(scope, receive, send)


@pytest.fixture
async def served() -> AsyncIterator[tuple[RecordingSimulator, str]]:
    sim = RecordingSimulator(tasks=30, seed=31)
    async with running(sim) as url:
        yield sim, url.removeprefix("http://")


def sdk_client(flavour: str, endpoint: str, algorithm: str | None, secret: str = SECRET) -> tuple[Any, Any]:
    client_class, models = FLAVOURS[flavour]
    config = Config(
        access_key_id=KEY_ID,
        access_key_secret=secret,
        endpoint=endpoint,
        protocol="http",
        signature_algorithm=algorithm,
    )
    return client_class(config), models


@pytest.mark.parametrize("flavour", list(FLAVOURS))
@pytest.mark.parametrize("algorithm", list(SIGNATURES))
async def test_the_official_sdk_polls_and_acknowledges(
    served: tuple[RecordingSimulator, str], flavour: str, algorithm: str | None
) -> None:
    sim, endpoint = served
    client, models = sdk_client(flavour, endpoint, algorithm)
    first = await asyncio.to_thread(client.poll_task_result, models.PollTaskResultRequest(page_num=1, page_size=4))
    body = first.body
    ids = [d.task_detail_no for d in body.data.task_detail]
    assert first.status_code == 200
    assert (body.total_item_num, body.page_size, body.current_page_num, body.total_page_num) == (30, 4, 1, 8)
    assert body.next_page is True and body.pre_page is False
    assert len(ids) == 4 and all(sim.detail(i) for i in ids)
    assert body.data.task_detail[0].task_status_code in (2, 3)

    acked = await asyncio.to_thread(
        client.acknowledge_task_result, models.AcknowledgeTaskResultRequest(task_detail_no=ids)
    )
    assert acked.body.result == 4

    failures = await asyncio.to_thread(
        client.poll_task_result,
        models.PollTaskResultRequest(page_num=1, page_size=100, task_result_status=3, lang="zh"),
    )
    remaining = [d.task_detail_no for d in failures.body.data.task_detail]
    assert set(ids).isdisjoint(remaining), "acknowledged details disappear"
    assert all(d.task_status_code == 3 for d in failures.body.data.task_detail)
    assert sim.pending_count == 26 and sim.ack_counts == dict.fromkeys(ids, 1)
    assert sim.methods == [SIGNATURES[algorithm]] * 3


@pytest.mark.parametrize("flavour", list(FLAVOURS))
@pytest.mark.parametrize("algorithm", list(SIGNATURES))
async def test_a_wrong_secret_gets_signature_does_not_match(
    served: tuple[RecordingSimulator, str], flavour: str, algorithm: str | None
) -> None:
    sim, endpoint = served
    client, models = sdk_client(flavour, endpoint, algorithm, secret="not-the-secret")
    with pytest.raises(ClientException) as caught:
        await asyncio.to_thread(client.poll_task_result, models.PollTaskResultRequest(page_num=1, page_size=4))
    assert caught.value.code == "SignatureDoesNotMatch"
    assert caught.value.status_code == 400
    assert "server string to sign is:" in caught.value.message
    assert sim.methods == [SIGNATURES[algorithm]]
    assert sim.pending_count == 30
