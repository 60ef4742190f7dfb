"""The upstream simulator: signing checks, paging, filters, acknowledgement, backlog, faults and serving.

Requests are signed with the bridge's own auth classes (verified against the official vectors elsewhere) and
sent through ``httpx.ASGITransport``, or over real HTTP where the server matters.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from bridge.signing import (
    Credentials,
    SignatureV1Auth,
    SignatureV3Auth,
    request_params,
    sign_v1,
    v1_string_to_sign,
    v3_canonical_request,
)
from bridge.simulator import Faults, Simulator, running
from bridge.simulator.generator import BEIJING, TASK_STATUS_CODES, TASK_TYPES
from bridge.simulator.verify import NonceCache

KEY_ID = "sim-access-key-id"
SECRET = "sim-access-key-secret"
INTL, DOMAIN = "2017-12-18", "2018-01-29"
POLL, ACK = "PollTaskResult", "AcknowledgeTaskResult"
AuthClass = type[SignatureV1Auth] | type[SignatureV3Auth]
SIGNERS: list[AuthClass] = [SignatureV1Auth, SignatureV3Auth]


def credentials(secret: str = SECRET, key_id: str = KEY_ID, token: str | None = None) -> Credentials:
    return Credentials(key_id, SecretStr(secret), SecretStr(token) if token is not None else None)


def asgi_client(sim: Simulator, auth: httpx.Auth | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=sim), base_url="http://domain-intl.aliyuncs.com", auth=auth
    )


def signer(auth_class: AuthClass = SignatureV3Auth, **options: Any) -> httpx.Auth:
    creds = options.pop("creds", None) or credentials()
    return auth_class(creds, **options)


async def poll(
    client: httpx.AsyncClient, version: str = INTL, page_num: int = 1, page_size: int = 1000, **params: Any
) -> httpx.Response:
    query = {"Action": POLL, "Version": version, "PageNum": page_num, "PageSize": page_size, **params}
    return await client.post("/", params={k: v for k, v in query.items() if v is not None})


async def ack(client: httpx.AsyncClient, ids: list[str], version: str = INTL) -> httpx.Response:
    numbered = {f"TaskDetailNo.{i}": detail_no for i, detail_no in enumerate(ids, start=1)}
    return await client.post("/", params={"Action": ACK, "Version": version, **numbered})


def details(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    records: list[dict[str, Any]] = response.json()["Data"]["TaskDetail"]
    return records


def detail_ids(response: httpx.Response) -> list[str]:
    return [record["TaskDetailNo"] for record in details(response)]


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["Code"] == code
    assert set(body) == {"RequestId", "HostId", "Code", "Message", "Recommend"}
    assert response.headers["x-acs-request-id"] == body["RequestId"]
    return body


class FakeClock:
    """A settable epoch clock for the backlog (detail times, arrivals)."""

    def __init__(self, now_s: float = 1_700_000_000.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


# --- signatures --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("auth_class", SIGNERS)
@pytest.mark.parametrize("version", [INTL, DOMAIN])
@pytest.mark.parametrize("mode", ["GET query", "POST query", "POST form"])
async def test_both_signatures_are_accepted_for_both_versions_and_every_request_shape(
    auth_class: AuthClass, version: str, mode: str
) -> None:
    sim = Simulator(tasks=5, seed=1)
    api = {"PageNum": "1", "PageSize": "2"}
    async with asgi_client(sim, signer(auth_class)) as client:
        query = {"Action": POLL, "Version": version}
        if mode == "GET query":
            response = await client.get("/", params={**query, **api})
        elif mode == "POST query":
            response = await client.post("/", params={**query, **api})
        else:
            response = await client.post("/", params=query, data=api)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["TotalItemNum"] == 5 and len(body["Data"]["TaskDetail"]) == 2
    assert response.headers["content-type"].startswith("application/json")


@pytest.mark.parametrize("auth_class", SIGNERS)
async def test_a_wrong_secret_is_signature_does_not_match_ending_with_the_servers_string_to_sign(
    auth_class: AuthClass,
) -> None:
    sim = Simulator(tasks=1)
    async with asgi_client(sim, signer(auth_class, creds=credentials(secret="wrong"))) as client:
        response = await poll(client, PageSize=10)
    body = assert_error(response, 400, "SignatureDoesNotMatch")
    server_string = body["Message"].split("server string to sign is:", 1)[1]
    request = response.request
    if auth_class is SignatureV1Auth:
        params = [(k, v) for k, v in request_params(request) if k != "Signature"]
        assert server_string == v1_string_to_sign("POST", params)
    else:
        headers = dict(request.headers)
        signed = re.search(r"SignedHeaders=([^,]+)", headers["authorization"])
        assert signed is not None
        canonical = v3_canonical_request(
            "POST",
            list(request.url.params.multi_items()),
            headers,
            signed[1].split(";"),
            hashlib.sha256(request.content).hexdigest(),
        )
        assert server_string == f"ACS3-HMAC-SHA256\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    assert SECRET not in response.text and "wrong" not in response.text
    assert sim.pending_count == 1


@pytest.mark.parametrize("auth_class", SIGNERS)
async def test_an_unknown_access_key_is_not_found(auth_class: AuthClass) -> None:
    async with asgi_client(Simulator(), signer(auth_class, creds=credentials(key_id="nobody"))) as client:
        response = await poll(client)
    assert_error(response, 404, "InvalidAccessKeyId.NotFound")


async def test_a_tampered_v3_body_fails_the_content_hash() -> None:
    sim = Simulator(tasks=1)
    request = httpx.Request(
        "POST",
        "http://domain-intl.aliyuncs.com/?Action=PollTaskResult&Version=2017-12-18",
        data={"PageNum": "1", "PageSize": "5"},
    )
    signed = next(signer().auth_flow(request))
    tampered = httpx.Request("POST", signed.url, headers=signed.headers, content=b"PageNum=2&PageSize=5")
    async with asgi_client(sim) as client:
        response = await client.send(tampered)
    body = assert_error(response, 400, "SignatureDoesNotMatch")
    assert "x-acs-content-sha256" in body["Message"]


@pytest.mark.parametrize("auth_class", SIGNERS)
@pytest.mark.parametrize(("skew", "accepted"), [(timedelta(minutes=-14), True), (timedelta(minutes=16), False)])
async def test_a_timestamp_more_than_15_minutes_off_is_expired(
    auth_class: AuthClass, skew: timedelta, accepted: bool
) -> None:
    auth = signer(auth_class, clock=lambda: datetime.now(UTC) + skew)
    async with asgi_client(Simulator(tasks=1), auth) as client:
        response = await poll(client)
    if accepted:
        assert response.status_code == 200, response.text
    else:
        assert_error(response, 400, "InvalidTimeStamp.Expired")


@pytest.mark.parametrize("auth_class", SIGNERS)
async def test_a_reused_nonce_is_rejected_and_a_fresh_one_accepted(auth_class: AuthClass) -> None:
    nonces = iter(["nonce-1", "nonce-1", "nonce-2"])
    async with asgi_client(Simulator(tasks=1), signer(auth_class, nonce=lambda: next(nonces))) as client:
        first, second, third = [await poll(client) for _ in range(3)]
    assert first.status_code == 200
    assert_error(second, 400, "SignatureNonceUsed")
    assert third.status_code == 200


def test_the_nonce_cache_is_bounded_in_count_and_time() -> None:
    cache = NonceCache(ttl_s=10, capacity=3)
    assert all(cache.check_and_add("k", f"n{i}", 0.0) for i in range(5))
    assert len(cache) == 3
    assert cache.check_and_add("k", "n0", 1.0), "the oldest was forgotten when the cache was full"
    assert not cache.check_and_add("k", "n4", 1.0)
    assert cache.check_and_add("other-key", "n4", 1.0), "nonces are per access key"
    assert cache.check_and_add("k", "n4", 20.0), "past the window a nonce may come back"
    assert len(cache) == 1


@pytest.mark.parametrize("auth_class", SIGNERS)
async def test_an_sts_token_is_required_when_the_simulator_has_one(auth_class: AuthClass) -> None:
    sim = Simulator(tasks=1, security_token="sts-token-value")
    async with asgi_client(sim, signer(auth_class)) as client:
        missing = await poll(client)
    async with asgi_client(sim, signer(auth_class, creds=credentials(token="other-token"))) as client:
        wrong = await poll(client)
    async with asgi_client(sim, signer(auth_class, creds=credentials(token="sts-token-value"))) as client:
        right = await poll(client)
    assert missing.status_code == 400 and missing.json()["Code"].startswith("Missing")
    assert_error(wrong, 400, "InvalidSecurityToken.Mismatch")
    assert "other-token" not in wrong.text and "sts-token-value" not in wrong.text
    assert right.status_code == 200


async def test_unsigned_unknown_version_unknown_action_and_no_json_are_refused() -> None:
    sim = Simulator(tasks=1)
    async with asgi_client(sim) as client:
        unsigned = await client.post("/", params={"Action": POLL, "Version": INTL, "Format": "JSON"})
    async with asgi_client(sim, signer()) as client:
        bad_version = await poll(client, version="2020-01-01")
        bad_action = await client.post("/", params={"Action": "DeleteEverything", "Version": INTL})
        bad_path = await client.post("/other", params={"Action": POLL, "Version": INTL})
        xml = await client.post(
            "/",
            params={"Action": POLL, "Version": INTL, "PageNum": 1, "PageSize": 1},
            headers={"accept": "*/*"},
        )
    assert_error(unsigned, 400, "MissingSignature")
    assert_error(bad_version, 400, "InvalidVersion")
    assert_error(bad_action, 404, "InvalidAction.NotFound")
    assert_error(bad_path, 404, "InvalidAction.NotFound")
    assert xml.status_code == 200, f"V3 signing always asks for JSON, whatever the client's default: {xml.text}"
    assert sim.pending_count == 1


async def test_a_v1_request_without_format_json_is_told_the_gateway_would_answer_xml() -> None:
    # Sign by hand without Format: the bridge's V1 signer always adds it.
    params = {
        "Action": POLL,
        "Version": INTL,
        "PageNum": "1",
        "PageSize": "1",
        "AccessKeyId": KEY_ID,
        "SignatureMethod": "HMAC-SHA1",
        "SignatureVersion": "1.0",
        "SignatureNonce": "n-1",
        "Timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    params["Signature"] = sign_v1(SECRET, "GET", params.items())
    async with asgi_client(Simulator(tasks=1)) as client:
        response = await client.get("/", params=params, headers={"accept": "*/*"})
    body = assert_error(response, 400, "Simulator.XmlNotSupported")
    assert "Format=JSON" in body["Message"]


# --- paging, filters, acknowledgement ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"PageSize": None}, "MissingParameter"),
        ({"PageNum": None}, "MissingParameter"),
        ({"PageSize": 1001}, "InvalidParameter"),
        ({"PageSize": 0}, "InvalidParameter"),
        ({"PageNum": 0}, "InvalidParameter"),
        ({"PageNum": "x"}, "InvalidParameter"),
        ({"TaskResultStatus": "success"}, "InvalidParameter"),
    ],
)
async def test_bad_paging_parameters_are_refused(params: dict[str, Any], code: str) -> None:
    async with asgi_client(Simulator(tasks=3), signer()) as client:
        response = await poll(client, **{"PageNum": 1, "PageSize": 10, **params})
    body = assert_error(response, 400, code)
    if params == {"PageSize": None}:
        assert body["Message"] == "PageSize is mandatory for this action."
    assert body["HostId"] == "domain-intl.aliyuncs.com"


async def test_pages_run_oldest_first_with_every_paging_field() -> None:
    sim = Simulator(seed=3)
    ids = sim.add_details(25)
    pages = []
    async with asgi_client(sim, signer()) as client:
        for page_num in (1, 2, 3, 4):
            pages.append((await poll(client, page_num=page_num, page_size=10)).json())
    for page_num, page in enumerate(pages, start=1):
        assert re.fullmatch(r"[0-9A-F-]{36}", page["RequestId"])
        assert (page["CurrentPageNum"], page["PageSize"], page["TotalItemNum"], page["TotalPageNum"]) == (
            page_num,
            10,
            25,
            3,
        )
        assert page["PrePage"] is (page_num > 1)
        assert page["NextPage"] is (page_num < 3)
    served = [d["TaskDetailNo"] for page in pages for d in page["Data"]["TaskDetail"]]
    assert served == ids
    assert pages[3]["Data"] == {"TaskDetail": []}


async def test_unordered_polls_serve_pending_details_in_another_order_and_every_poll_is_counted() -> None:
    sim = Simulator(seed=3, faults=Faults(unordered_ratio=1.0))
    ids = sim.add_details(40)
    async with asgi_client(sim, signer()) as client:
        first = detail_ids(await poll(client, page_num=1, page_size=40))
        halves = [detail_ids(await poll(client, page_num=n, page_size=20)) for n in (1, 2)]
        sim.faults.unordered_ratio = 0.0
        ordered = detail_ids(await poll(client, page_num=1, page_size=40))
    assert sorted(first) == sorted(ids) and first != ids
    assert all(len(half) == 20 and set(half) <= set(ids) for half in halves)
    assert ordered == ids
    assert sim.polls_by_page == {1: 3, 2: 1}
    assert sim.state()["polls_by_page"] == {"1": 3, "2": 1}


async def test_an_empty_backlog_gives_the_full_empty_page_shape() -> None:
    async with asgi_client(Simulator(), signer()) as client:
        body = (await poll(client, page_size=50)).json()
    del body["RequestId"]
    assert body == {
        "CurrentPageNum": 1,
        "PageSize": 50,
        "TotalItemNum": 0,
        "TotalPageNum": 0,
        "PrePage": False,
        "NextPage": False,
        "Data": {"TaskDetail": []},
    }


async def test_filters_select_matching_details_and_follow_acknowledgements() -> None:
    sim = Simulator(tasks=300, seed=4)
    records = [sim.detail(i) for i in (await _all_ids(sim))]
    by_task = Counter(r["TaskNo"] for r in records if r)
    task_no = by_task.most_common(1)[0][0]
    sample = records[7]
    assert sample is not None
    cases: list[tuple[dict[str, Any], Callable[[dict[str, Any]], bool]]] = [
        ({"TaskResultStatus": 2}, lambda r: r["TaskStatusCode"] == 2),
        ({"TaskResultStatus": 3}, lambda r: r["TaskStatusCode"] == 3),
        ({"DomainName": sample["DomainName"]}, lambda r: r["DomainName"] == sample["DomainName"]),
        ({"InstanceId": sample["InstanceId"]}, lambda r: r["InstanceId"] == sample["InstanceId"]),
        ({"TaskNo": task_no}, lambda r: r["TaskNo"] == task_no),
        (
            {"TaskResultStatus": sample["TaskStatusCode"], "TaskNo": sample["TaskNo"]},
            lambda r: r["TaskStatusCode"] == sample["TaskStatusCode"] and r["TaskNo"] == sample["TaskNo"],
        ),
    ]
    async with asgi_client(sim, signer()) as client:
        for params, predicate in cases:
            expected = [r["TaskDetailNo"] for r in records if r and predicate(r)]
            response = await poll(client, page_size=1000, **params)
            assert detail_ids(response) == expected, params
            assert response.json()["TotalItemNum"] == len(expected)
            assert len(expected) >= 1
        assert by_task[task_no] >= 2, "several details share a TaskNo"
        # Acknowledging updates the (now built) indexes; paging within a filter still works.
        failures = detail_ids(await poll(client, TaskResultStatus=3))
        assert (await ack(client, failures[:5])).json()["Result"] == 5
        page2 = await poll(client, page_num=2, page_size=10, TaskResultStatus=3)
        assert detail_ids(page2) == failures[15:25]
        assert page2.json()["TotalItemNum"] == len(failures) - 5


async def _all_ids(sim: Simulator) -> list[str]:
    async with asgi_client(sim, signer()) as client:
        return detail_ids(await poll(client))


@pytest.mark.parametrize("version", [INTL, DOMAIN])
async def test_acknowledge_removes_for_good_and_counts(version: str) -> None:
    sim = Simulator(tasks=10, seed=5)
    async with asgi_client(sim, signer(SignatureV1Auth)) as client:
        ids = detail_ids(await poll(client, version))
        first = await ack(client, [*ids[:4], "0" * 32], version)
        again = await ack(client, ids[:2], version)
        remaining = detail_ids(await poll(client, version))
        missing = await client.post("/", params={"Action": ACK, "Version": version})
    assert first.status_code == 200 and set(first.json()) == {"RequestId", "Result"}
    assert first.json()["Result"] == 4, "only pending ids count"
    assert again.json()["Result"] == 0
    assert remaining == ids[4:]
    assert sim.pending_count == 6 and sim.acknowledged_count == 4
    assert sim.ack_counts == {ids[0]: 2, ids[1]: 2, ids[2]: 1, ids[3]: 1}, "unknown ids are not counted"
    assert_error(missing, 400, "MissingParameter")
    assert sim.detail(ids[0]) is not None, "acknowledged details stay known"


async def test_a_thousand_ids_in_one_acknowledgement_over_real_http() -> None:
    sim = Simulator(tasks=1200, seed=6)
    async with running(sim) as url, httpx.AsyncClient(base_url=url, auth=signer()) as client:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url) and not url.endswith(":0")
        ids = detail_ids(await poll(client))
        response = await ack(client, ids)
        state = (await client.get("/_state")).json()
    assert len(ids) == 1000
    assert response.json()["Result"] == 1000
    assert state["pending"] == 200 and state["acknowledged"] == 1000


async def test_raw_records_are_served_as_they_are() -> None:
    sim = Simulator(tasks=1)
    sim.add_raw({"TaskNo": "no-detail-no", "TaskType": "CHG_DNS"})
    sim.add_raw("not an object")
    sim.add_raw({"TaskDetailNo": "raw-1", "TaskStatusCode": "two"})
    async with asgi_client(sim, signer()) as client:
        served = details(await poll(client))
        assert (await ack(client, ["raw-1"])).json()["Result"] == 1
    assert served[1:] == [
        {"TaskNo": "no-detail-no", "TaskType": "CHG_DNS"},
        "not an object",
        {"TaskDetailNo": "raw-1", "TaskStatusCode": "two"},
    ]
    assert sim.pending_count == 3 and sim.ack_counts["raw-1"] == 1


# --- the backlog ---------------------------------------------------------------------------------------------


def _well_formed(record: Any) -> bool:
    """What a strict consumer accepts as a finished TaskDetail."""
    if not isinstance(record, dict) or not re.fullmatch(r"[0-9a-f]{32}", str(record.get("TaskDetailNo"))):
        return False
    status, code = record.get("TaskStatus"), record.get("TaskStatusCode")
    if record.get("TaskType") not in TASK_TYPES or status not in TASK_STATUS_CODES:
        return False
    if not isinstance(code, int) or isinstance(code, bool) or TASK_STATUS_CODES[status] != code:
        return False
    tries = record.get("TryCount")
    if not isinstance(tries, int) or isinstance(tries, bool) or tries < 0:
        return False
    try:
        for name in ("CreateTime", "UpdateTime"):
            datetime.strptime(record[name], "%Y-%m-%d %H:%M:%S")
    except (KeyError, TypeError, ValueError):
        return False
    return True


async def test_the_backlog_is_realistic() -> None:
    clock = FakeClock()
    sim = Simulator(tasks=1000, seed=8, clock=clock)
    records = [sim.detail(i) for i in await _all_ids(sim)]
    assert all(r is not None and _well_formed(r) for r in records)
    ok = [r for r in records if r]
    assert len({r["TaskDetailNo"] for r in ok}) == 1000
    assert {r["TaskType"] for r in ok} == set(TASK_TYPES)
    assert {r["TaskStatus"] for r in ok} == {"EXECUTE_SUCCESS", "EXECUTE_FAILURE"}
    assert all(r["TaskTypeDescription"] == TASK_TYPES[r["TaskType"]][0] for r in ok)
    assert all(re.fullmatch(r"S20\d{13}", r["InstanceId"]) for r in ok)
    assert all(r["ErrorMsg"] for r in ok)
    assert all(r["TryCount"] >= 3 for r in ok if r["TaskStatusCode"] == 3)
    domains = {r["DomainName"] for r in ok}
    assert {"例子.中国", "bücher.de"} & domains
    assert any(d.startswith("xn--") for d in domains)
    assert max(Counter(r["TaskNo"] for r in ok).values()) >= 2
    now = datetime.fromtimestamp(clock.now_s, BEIJING).replace(tzinfo=None)
    for r in ok:
        created = datetime.strptime(r["CreateTime"], "%Y-%m-%d %H:%M:%S")
        updated = datetime.strptime(r["UpdateTime"], "%Y-%m-%d %H:%M:%S")
        assert now - timedelta(hours=2) <= created <= updated <= now, "Beijing time, shortly before now"


async def test_the_same_seed_gives_the_same_backlog_and_another_seed_another() -> None:
    def backlog(seed: int) -> list[dict[str, Any] | None]:
        sim = Simulator(tasks=200, seed=seed, clock=FakeClock(), faults=Faults(malformed_ratio=0.1))
        return [sim.detail(i) for i in sim.add_details(50)]

    same, again, other = backlog(9), backlog(9), backlog(10)
    assert same == again
    assert {d["TaskDetailNo"] for d in same if d}.isdisjoint(d["TaskDetailNo"] for d in other if d)


async def test_lang_zh_switches_the_task_type_description() -> None:
    sim = Simulator(tasks=20, seed=11)
    async with asgi_client(sim, signer()) as client:
        english = details(await poll(client, Lang="en"))
        chinese = details(await poll(client, Lang="zh"))
    assert [TASK_TYPES[r["TaskType"]][1] for r in english] == [r["TaskTypeDescription"] for r in chinese]
    assert [r["TaskDetailNo"] for r in english] == [r["TaskDetailNo"] for r in chinese]


async def test_details_arrive_at_the_rate_as_time_passes() -> None:
    clock = FakeClock()
    sim = Simulator(tasks=2, rate=10.0, clock=clock)
    async with asgi_client(sim, signer()) as client:
        before = (await poll(client)).json()["TotalItemNum"]
        clock.now_s += 1.5
        after = (await poll(client)).json()["TotalItemNum"]
        clock.now_s += 0.25
        assert sim.pending_count == 19
    assert (before, after) == (2, 17)


async def test_a_share_of_new_details_is_malformed_yet_carries_an_id() -> None:
    sim = Simulator(tasks=100, seed=12)
    sim.faults.malformed_ratio = 0.4
    sim.add_details(500)
    records = {i: sim.detail(i) for i in await _all_ids(sim)}
    assert len(records) == 600
    bad = {i for i, r in records.items() if not _well_formed(r)}
    assert bad == sim.malformed_ids
    assert 140 <= len(bad) <= 260
    assert all((records[i] or {}).get("TaskDetailNo") == i for i in bad)
    first_hundred = list(records)[:100]
    assert not bad & set(first_hundred), "the ratio applies to details generated after it was set"


# --- faults --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "status", "code"),
    [
        ("unavailable_ratio", 503, "ServiceUnavailable"),
        ("throttling_ratio", 400, "Throttling"),
        ("internal_error_ratio", 500, "InternalError"),
    ],
)
async def test_error_faults_answer_the_gateways_error_and_acknowledge_nothing(
    field: str, status: int, code: str
) -> None:
    sim = Simulator(tasks=5, seed=13)
    ids = await _all_ids(sim)
    async with asgi_client(sim, signer()) as client:
        setattr(sim.faults, field, 1.0)
        assert_error(await poll(client), status, code)
        assert_error(await ack(client, ids), status, code)
        setattr(sim.faults, field, 0.0)
        assert (await poll(client)).status_code == 200
    assert sim.pending_count == 5 and sim.ack_counts == {}


async def test_error_ratios_strike_about_that_share_of_requests() -> None:
    sim = Simulator(tasks=1, faults=Faults(unavailable_ratio=0.2, throttling_ratio=0.2, internal_error_ratio=0.1))
    async with asgi_client(sim, signer()) as client:
        statuses = Counter([(await poll(client)).status_code for _ in range(300)])
    assert 30 <= statuses[503] <= 90 and 30 <= statuses[400] <= 90 and 10 <= statuses[500] <= 50
    assert 100 <= statuses[200] <= 200


async def test_faults_apply_only_to_the_chosen_actions() -> None:
    sim = Simulator(tasks=3, faults=Faults(unavailable_ratio=1.0, actions=frozenset({ACK})))
    async with asgi_client(sim, signer()) as client:
        ids = detail_ids(await poll(client))
        assert_error(await ack(client, ids), 503, "ServiceUnavailable")
    assert sim.pending_count == 3


async def test_ack_failures_answer_503_and_remove_nothing() -> None:
    sim = Simulator(tasks=3, faults=Faults(ack_failure_ratio=1.0))
    async with asgi_client(sim, signer()) as client:
        ids = detail_ids(await poll(client))
        assert_error(await ack(client, ids), 503, "ServiceUnavailable")
        sim.faults.ack_failure_ratio = 0.0
        assert (await ack(client, ids)).json()["Result"] == 3
    assert sim.ack_counts == dict.fromkeys(ids, 1)


async def test_an_acknowledgement_over_the_id_limit_is_refused_and_removes_nothing() -> None:
    sim = Simulator(tasks=5, faults=Faults(ack_max_ids=3))
    async with asgi_client(sim, signer()) as client:
        ids = detail_ids(await poll(client))
        refused = await ack(client, ids)
        assert_error(refused, 400, "InvalidParameter")
        assert "5 ids in one request, at most 3" in refused.json()["Message"]
        assert sim.pending_count == 5
        assert (await ack(client, ids[:3])).json()["Result"] == 3
    assert sim.pending_count == 2


async def test_latency_delays_every_request() -> None:
    sim = Simulator(tasks=1, faults=Faults(latency_s=0.2))
    async with asgi_client(sim, signer()) as client:
        started = time.monotonic()
        response = await poll(client)
    assert response.status_code == 200
    assert time.monotonic() - started >= 0.2


async def test_a_hang_outlasts_the_clients_timeout_then_requests_pass_again() -> None:
    sim = Simulator(tasks=2, faults=Faults(hang_ratio=1.0, hang_s=30))
    async with running(sim) as url, httpx.AsyncClient(base_url=url, auth=signer(), timeout=0.3) as client:
        with pytest.raises(httpx.ReadTimeout):
            await poll(client)
        sim.faults.hang_ratio = 0.0
        assert detail_ids(await poll(client)) != []
    assert sim.pending_count == 2


# --- state, control, serving, CLI ----------------------------------------------------------------------------


async def test_state_and_control_are_unsigned_and_steer_the_simulator() -> None:
    sim = Simulator(tasks=4, seed=14, faults=Faults(malformed_ratio=1.0))
    async with asgi_client(sim) as client:
        changed = await client.post(
            "/_control", json={"faults": {"unavailable_ratio": 0.5, "actions": [POLL]}, "add_details": 3}
        )
        refused = await client.post("/_control", json={"faults": {"unavailable_ratio": 2}, "add_details": 1})
        unknown = await client.post("/_control", json={"faults": {"nonsense": 1}})
        state = (await client.get("/_state")).json()
    assert changed.status_code == 200 and len(changed.json()["added"]) == 3
    assert refused.status_code == 400 and unknown.status_code == 400
    assert sim.faults.unavailable_ratio == 0.5 and sim.faults.actions == frozenset({POLL})
    assert state["pending"] == 7 and state["acknowledged"] == 0 and state["ack_counts"] == {}
    assert state["malformed_ids"] == sorted(sim.malformed_ids) and len(state["malformed_ids"]) == 7
    assert state["faults"]["unavailable_ratio"] == 0.5


def test_the_simulators_repr_keeps_the_secret() -> None:
    sim = Simulator(access_key_secret="very-secret-value", security_token="token-value")
    assert "very-secret-value" not in repr(sim) and "token-value" not in repr(sim)
    assert "very-secret-value" not in repr(sim._verifier)


async def test_running_reports_a_taken_port() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError):
            async with running(Simulator(), port=port):
                pass


@pytest.fixture
async def simulate_process() -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    script = (
        "import argparse, sys\n"
        "from bridge.simulator.cli import add_parser, run\n"
        "parser = argparse.ArgumentParser()\n"
        "add_parser(parser.add_subparsers(dest='command'))\n"
        "sys.exit(run(parser.parse_args(sys.argv[1:])))\n"
    )
    args = [
        "simulate",
        "--port",
        "0",
        "--tasks",
        "7",
        "--seed",
        "3",
        "--throttling-ratio",
        "1",
        "--unordered-ratio",
        "1",
    ]
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", script, *args, stdout=asyncio.subprocess.PIPE)
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 20)).decode()
        match = re.fullmatch(r"simulator listening on (http://\S+)\n", line)
        assert match, line
        yield process, match[1]
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_the_simulate_command_serves_until_a_signal_and_exits_0(
    simulate_process: tuple[asyncio.subprocess.Process, str], sig: signal.Signals
) -> None:
    process, url = simulate_process
    async with httpx.AsyncClient(base_url=url, auth=signer()) as client:
        state = (await client.get("/_state")).json()
        throttled = await poll(client)
    assert state["pending"] == 7 and state["faults"]["throttling_ratio"] == 1.0
    assert state["faults"]["unordered_ratio"] == 1.0
    assert_error(throttled, 400, "Throttling")
    process.send_signal(sig)
    assert await asyncio.wait_for(process.wait(), 10) == 0


def test_state_is_json_serialisable() -> None:
    sim = Simulator(tasks=2, faults=Faults(malformed_ratio=1.0))
    assert json.loads(json.dumps(sim.state()))["pending"] == 2


# --- bad input: gateway errors, never a 500 ----------------------------------------------------------------------

_ODD_INTEGERS = st.one_of(
    st.sampled_from(
        [
            "",
            "0",
            "-1",
            "1e3",
            " 5",
            "+5",
            "5 ",
            "\u0665",
            "1_000",
            "0x10",
            "1.0",
            "9" * 5000,
            "2147483648",
            "9" * 20,
            "-2147483649",
        ]
    ),
    st.integers(min_value=1, max_value=1000).map(str),  # valid, so that the other parameters are reached
    st.integers().map(str),
    st.text(max_size=30),
)
_ODD_TEXT = st.one_of(st.text(max_size=30), st.sampled_from(["zh", "en", "ZH", "", "\x00", "zh\r\nX: y", "x" * 10_000]))
_FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_BAD_PARAMETER_CODES = {"InvalidParameter", "MissingParameter"}
_CONTENT_TYPES = [
    "application/x-www-form-urlencoded",
    "application/x-www-form-urlencoded; charset=latin-1",
    "application/json",
    "multipart/form-data; boundary=x",
    "text/plain",
    "application/octet-stream",
    "",
    "\x00/\xff",
]


def _assert_gateway_answer(response: httpx.Response) -> None:
    """A 200, or a gateway error with its JSON shape; never a 5xx."""
    assert response.status_code < 500, response.text
    body = response.json()
    if response.status_code != 200:
        assert set(body) == {"RequestId", "HostId", "Code", "Message", "Recommend"}, body


_FUZZ_SIM = Simulator(tasks=30, seed=40)


@_FUZZ
@given(page_num=_ODD_INTEGERS, page_size=_ODD_INTEGERS, status=_ODD_INTEGERS, lang=_ODD_TEXT)
async def test_odd_poll_parameters_get_400_gateway_errors_never_500(
    page_num: str, page_size: str, status: str, lang: str
) -> None:
    params = {"PageNum": page_num, "PageSize": page_size, "TaskResultStatus": status, "Lang": lang}
    async with asgi_client(_FUZZ_SIM, signer(SignatureV1Auth)) as client:
        response = await client.post("/", params={"Action": POLL, "Version": INTL, "Format": "JSON", **params})
    _assert_gateway_answer(response)
    if response.status_code != 200:
        assert response.status_code == 400 and response.json()["Code"] in _BAD_PARAMETER_CODES, response.text


@_FUZZ
@given(
    numbers=st.lists(
        st.one_of(
            st.integers(min_value=-5, max_value=3000).map(str),
            st.sampled_from(["", "0", "²", "٣", "1.5", "99999999999", "9" * 5000, "a", ".", "1 "]),
        ),
        min_size=1,
        max_size=12,
    ),
    values=st.lists(st.text(max_size=40), min_size=1, max_size=12),
    where=st.sampled_from(["query", "form", "both"]),
)
async def test_odd_acknowledgement_parameters_get_400_gateway_errors_never_500(
    numbers: list[str], values: list[str], where: str
) -> None:
    numbered = [(f"TaskDetailNo.{n}", v) for n, v in zip(numbers, values * len(numbers), strict=False)]
    query: list[tuple[str, str]] = [("Action", ACK), ("Version", INTL)]
    form: list[tuple[str, str]] = []
    if where == "query":
        query += numbered
    elif where == "form":
        form = numbered
    else:
        query += numbered[::2]
        form = numbered[1::2]
    async with asgi_client(_FUZZ_SIM, signer(SignatureV3Auth)) as client:
        response = await client.post("/", params=query, data=dict(form) if form else None)
    _assert_gateway_answer(response)
    if response.status_code != 200:
        assert response.status_code == 400 and response.json()["Code"] in _BAD_PARAMETER_CODES, response.text


@_FUZZ
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS"]),
    path=st.sampled_from(["/", "/_state", "/_control", "/x", "//", "/?"]),
    query=st.one_of(st.binary(max_size=300), st.just(b"PageNum=1&PageNum=2&Action=" + b"A" * 100_000)),
    content_type=st.sampled_from(_CONTENT_TYPES),
    body=st.one_of(st.binary(max_size=300), st.just(b"\xff\xfe" * 1000), st.just(b"TaskDetailNo.1=" + b"%ff" * 99)),
)
async def test_raw_requests_of_any_shape_never_get_a_500(
    method: str, path: str, query: bytes, content_type: str, body: bytes
) -> None:
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": query,
        "headers": [(b"content-type", content_type.encode("latin-1")), (b"host", b"domain-intl.aliyuncs.com")],
    }
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    await Simulator(tasks=2, seed=41)(scope, receive, send)
    assert sent[0]["status"] < 500
    json.loads(sent[1]["body"])


@pytest.mark.parametrize("auth_class", SIGNERS)
async def test_repeated_parameters_get_one_of_their_values_or_a_gateway_error(auth_class: AuthClass) -> None:
    sim = Simulator(tasks=5, seed=42)
    query = [("Action", POLL), ("Version", INTL), ("Format", "JSON"), ("PageNum", "1"), ("PageNum", "1")]
    async with asgi_client(sim, signer(auth_class)) as client:
        good = await client.post("/", params=[*query, ("PageSize", "3"), ("PageSize", "2")])
        bad = await client.post("/", params=[*query, ("PageSize", "x"), ("PageSize", "x")])
    assert len(details(good)) in (2, 3)
    assert_error(bad, 400, "InvalidParameter")


@pytest.mark.parametrize(
    ("name", "value"),
    [("PageNum", "99999999999999999999"), ("PageSize", "\u0665"), ("PageNum", "1_0"), ("TaskResultStatus", "+2")],
)
async def test_integers_out_of_the_gateways_range_or_form_are_invalid_parameter(name: str, value: str) -> None:
    sim = Simulator(tasks=5, seed=43)
    async with asgi_client(sim, signer()) as client:
        response = await poll(client, **{"PageNum": 1, "PageSize": 5, name: value})  # type: ignore[arg-type]
    body = assert_error(response, 400, "InvalidParameter")
    assert name in body["Message"]


@pytest.mark.parametrize("name", ["TaskDetailNo.²", "TaskDetailNo.0", "TaskDetailNo." + "9" * 5000, "TaskDetailNo."])
async def test_a_bad_n_in_task_detail_no_is_invalid_parameter(name: str) -> None:
    sim = Simulator(tasks=1, seed=44)
    async with asgi_client(sim, signer()) as client:
        response = await client.post("/", params={"Action": ACK, "Version": INTL, name: "x"})
    body = assert_error(response, 400, "InvalidParameter")
    assert "TaskDetailNo" in body["Message"] and len(body["Message"]) < 300


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
_CONTROL_COMMANDS = st.one_of(
    _JSON_VALUES,
    st.fixed_dictionaries(
        {},
        optional={
            "faults": st.one_of(
                _JSON_VALUES,
                st.dictionaries(
                    st.sampled_from(["latency_s", "hang_ratio", "ack_max_ids", "actions", "hang_s", "nope"]),
                    st.one_of(_JSON_VALUES, st.floats(min_value=0), st.lists(st.text(max_size=20), max_size=3)),
                    max_size=3,
                ),
            ),
            "add_details": st.one_of(st.integers(), _JSON_VALUES),
            "add_raw": st.one_of(st.lists(_JSON_VALUES, max_size=3), _JSON_VALUES),
        },
    ),
)


@_FUZZ
@given(command=_CONTROL_COMMANDS)
async def test_control_takes_what_it_can_and_refuses_the_rest_with_400(command: Any) -> None:
    sim = Simulator(tasks=0, seed=45)
    async with asgi_client(sim) as client:
        response = await client.post("/_control", content=json.dumps(command).encode())
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        assert response.json()["error"]
    assert sim.pending_count <= 100_000
    for limit in (sim.faults.latency_s, sim.faults.hang_s):
        assert 0 <= limit <= 3600


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b'{"add_raw": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "nested"),
        (b'{"add_details": 1', 400, "not JSON"),
        (b"\xff\xfe{}", 400, "not JSON"),
        (b'{"faults": {"latency_s": NaN}}', 400, "NaN"),
        (b'{"faults": {"latency_s": 1e999}}', 400, "latency_s"),
        (b'{"faults": {"ack_max_ids": 1' + b"0" * 400 + b"}}", 400, "ack_max_ids"),
        (b'{"faults": {"ack_max_ids": 2.5}}', 400, "ack_max_ids"),
        (b'{"faults": {"actions": ["Nope"]}}', 400, "Nope"),
        (b'{"add_details": 100001}', 400, "add_details"),
        (b'{"add_details": 99999, "add_raw": [1, 2]}', 400, "add_raw"),
        (b'{"add_raw": [1]}' + b" " * (1024 * 1024), 413, "1048576"),
    ],
)
async def test_control_refuses_bad_bodies_with_a_clear_message(body: bytes, status: int, words: str) -> None:
    sim = Simulator(tasks=0, seed=46)
    async with asgi_client(sim) as client:
        response = await client.post("/_control", content=body)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]
    assert sim.pending_count == 0 and sim.faults == Faults()


async def test_state_stays_cheap_with_a_large_backlog() -> None:
    sim = Simulator(tasks=3000, seed=47, faults=Faults(malformed_ratio=1.0))
    sim._backlog.acknowledge(list(sim._backlog.known)[:2500])
    async with asgi_client(sim) as client:
        started = time.monotonic()
        state = (await client.get("/_state")).json()
        elapsed = time.monotonic() - started
    assert len(state["ack_counts"]) == 1000 and len(state["malformed_ids"]) == 1000
    assert state["truncated"] == ["ack_counts", "malformed_ids"]
    assert state["pending"] == 500 and state["acknowledged"] == 2500
    assert state["malformed_ids"] == sorted(sim.malformed_ids)[:1000]
    assert elapsed < 0.5


def test_the_simulator_binds_loopback_unless_told_otherwise() -> None:
    from bridge.cli import build_parser

    assert build_parser().parse_args(["simulate"]).host == "127.0.0.1"
    assert build_parser().parse_args(["simulate", "--host", "0.0.0.0"]).host == "0.0.0.0"


async def test_huge_and_non_utf8_queries_over_real_http_get_4xx() -> None:
    async with running(Simulator(tasks=3, seed=48)) as url, httpx.AsyncClient(base_url=url) as client:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /?" + b"A=1&" * 600_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        huge = int((await asyncio.wait_for(reader.readline(), 10)).split()[1])
        writer.close()
        odd = await client.get("/?Action=%ff%fe&PageNum=%80&Version=%c3%28")
        control = await client.post("/_control?x=%ff", content=b"\xff" * 100)
    assert 400 <= huge < 500
    assert odd.status_code == 400 and odd.json()["Code"] in {"MissingParameter", "InvalidVersion"}
    assert control.status_code == 400 and "not JSON" in control.json()["error"]
