"""The upstream client: request shape, response parsing, error mapping, batching, metrics, secrecy.

The first part fakes the gateway with :class:`httpx.MockTransport`, one behaviour at a time. The second part
talks to the project's simulator over ASGI and asserts on the simulator's own state.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from bridge.errors import (
    FatalUpstreamError,
    MalformedResponseError,
    RefusedParametersError,
    RetryableUpstreamError,
    SettingsError,
    ThrottledError,
    UpstreamError,
)
from bridge.metrics import Metrics
from bridge.settings import Settings, load_settings
from bridge.signing import percent_encode, request_params, v1_string_to_sign
from bridge.simulator import Faults, Simulator
from bridge.upstream import AckResult, Page, RawRecord, UpstreamClient
from tests.harness import sample, upstream_client

ACCESS_KEY_ID = "test-access-key-id"
SECRET = "test-Secret+/=value"
TOKEN = "STS.NUgYrLnoC+token/with=odd&chars"
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

Handler = Callable[[httpx.Request], httpx.Response]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """No variable or ``.env`` of the machine running the tests leaks into the settings."""
    for name in list(os.environ):
        if name.startswith(("BRIDGE_", "ALIBABA_CLOUD_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"access_key_id": ACCESS_KEY_ID, "access_key_secret": SECRET}
    values.update(overrides)
    return load_settings(**values)


class Recorder:
    """A MockTransport handler that records each request and answers from a callable."""

    def __init__(self, answer: Handler) -> None:
        self.answer = answer
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.answer(request)

    def params(self, index: int = -1) -> dict[str, str]:
        return dict(self.requests[index].url.params.multi_items())


MakeClient = Callable[..., tuple[UpstreamClient, Recorder]]


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    """``make_client(answer, metrics=None, **settings)`` -> (client, recorder); closes every http client."""
    opened: list[httpx.AsyncClient] = []

    def factory(
        answer: Handler, *, metrics: Metrics | None = None, **overrides: Any
    ) -> tuple[UpstreamClient, Recorder]:
        recorder = Recorder(answer)
        http = httpx.AsyncClient(transport=httpx.MockTransport(recorder))
        opened.append(http)
        client = upstream_client(http, make_settings(**overrides), metrics=metrics, clock=lambda: NOW)
        return client, recorder

    yield factory
    for http in opened:
        await http.aclose()


def page_body(details: Any = None, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "RequestId": "REQ-1",
        "CurrentPageNum": 1,
        "PageSize": 1000,
        "TotalItemNum": 0,
        "TotalPageNum": 0,
        "PrePage": False,
        "NextPage": False,
        "Data": {"TaskDetail": details if details is not None else []},
    }
    body.update(fields)
    return body


def ok(body: Any) -> Handler:
    return lambda request: httpx.Response(200, json=body)


def detail(detail_no: Any = "d1", **fields: Any) -> dict[str, Any]:
    return {"TaskDetailNo": detail_no, "TaskNo": "t1", "TaskType": "CHG_DNS", "TaskStatusCode": 2, **fields}


# --- request shape ---
async def test_poll_request_shape_v3(make_client: MakeClient) -> None:
    client, rec = make_client(ok(page_body()))
    await client.poll()
    request = rec.requests[0]
    assert request.method == "POST"
    assert str(request.url).startswith("https://domain-intl.aliyuncs.com/?")
    assert request.content == b""
    assert rec.params() == {"PageNum": "1", "PageSize": "1000", "Lang": "en"}
    assert request.headers["x-acs-action"] == "PollTaskResult"
    assert request.headers["x-acs-version"] == "2017-12-18"
    assert request.headers["authorization"].startswith(f"ACS3-HMAC-SHA256 Credential={ACCESS_KEY_ID},")
    assert request.headers["x-acs-date"] == "2026-01-02T03:04:05Z"
    assert request.extensions["timeout"] == httpx.Timeout(10.0).as_dict()


async def test_poll_request_shape_v1_with_filters(make_client: MakeClient) -> None:
    client, rec = make_client(
        ok(page_body()),
        signature_version="v1",
        upstream_api="domain",
        lang="zh",
        task_result_status=3,
        domain_name="example.com",
        instance_id="S2018",
        task_no="t-1",
        user_client_ip="10.0.0.1",
        request_timeout_s=2.5,
    )
    await client.poll(page_num=3, page_size=20)
    params = rec.params()
    assert str(rec.requests[0].url).startswith("https://domain.aliyuncs.com/?")
    assert {k: params[k] for k in ("Action", "Version", "Format", "SignatureMethod", "SignatureVersion")} == {
        "Action": "PollTaskResult",
        "Version": "2018-01-29",
        "Format": "json",
        "SignatureMethod": "HMAC-SHA1",
        "SignatureVersion": "1.0",
    }
    assert {k: params[k] for k in ("PageNum", "PageSize", "Lang")} == {"PageNum": "3", "PageSize": "20", "Lang": "zh"}
    assert {k: params[k] for k in ("TaskResultStatus", "DomainName", "InstanceId", "TaskNo", "UserClientIp")} == {
        "TaskResultStatus": "3",
        "DomainName": "example.com",
        "InstanceId": "S2018",
        "TaskNo": "t-1",
        "UserClientIp": "10.0.0.1",
    }
    assert params["AccessKeyId"] == ACCESS_KEY_ID
    assert "Signature" in params
    assert "SecurityToken" not in params
    assert rec.requests[0].extensions["timeout"]["read"] == 2.5


async def test_endpoint_override_is_used(make_client: MakeClient) -> None:
    client, rec = make_client(ok(page_body()), upstream_endpoint="http://127.0.0.1:9999/")
    await client.poll()
    assert rec.requests[0].url.host == "127.0.0.1"
    assert rec.requests[0].url.port == 9999
    assert rec.requests[0].url.path == "/"


@pytest.mark.parametrize("version", ["v1", "v3"])
async def test_sts_token_is_carried_and_never_shown(make_client: MakeClient, version: str) -> None:
    client, rec = make_client(ok(page_body()), signature_version=version, security_token=TOKEN)
    await client.poll()
    request = rec.requests[0]
    if version == "v1":
        assert rec.params()["SecurityToken"] == TOKEN
        assert "x-acs-security-token" not in request.headers
    else:
        assert request.headers["x-acs-security-token"] == TOKEN
        assert "x-acs-security-token" in request.headers["authorization"]
        assert "SecurityToken" not in rec.params()
    for text in (repr(client), str(client)):
        assert TOKEN not in text
        assert SECRET not in text


def test_credentials_are_required() -> None:
    with pytest.raises(SettingsError) as caught:
        upstream_client(httpx.AsyncClient(), load_settings(access_key_id="only-the-id"))
    assert caught.value.problems[0].startswith("ALIBABA_CLOUD_ACCESS_KEY_SECRET:")


# --- parsing ---
@pytest.mark.parametrize(
    ("body", "expected_ids"),
    [
        (page_body([detail("a"), detail("b")]), ["a", "b"]),
        (page_body(detail("only")), ["only"]),  # one detail rendered as an object
        (page_body([]), []),
        (page_body({}), []),
        ({**page_body(), "Data": {}}, []),  # TaskDetail missing
        ({**page_body(), "Data": None}, []),
        ({k: v for k, v in page_body().items() if k != "Data"}, []),
        ({**page_body(), "Data": [detail("bare")]}, ["bare"]),  # the list without its wrapper
        ({"RequestId": "R", "Data": {"TaskDetail": [detail("x")]}}, ["x"]),  # no paging fields
    ],
    ids=["list", "object", "empty-list", "empty-object", "no-taskdetail", "data-null", "no-data", "bare", "lean"],
)
async def test_page_shapes(make_client: MakeClient, body: dict[str, Any], expected_ids: list[str]) -> None:
    client, _ = make_client(ok(body))
    page = await client.poll(page_num=1, page_size=50)
    assert isinstance(page, Page)
    assert [r.detail_no for r in page.records] == expected_ids


async def test_records_keep_the_element_as_received(make_client: MakeClient) -> None:
    elements = [
        detail("a", TaskResult=12.5, Extra={"nested": [1, None]}),
        "not-an-object",
        17,
        None,
        [1, 2],
    ]
    client, _ = make_client(ok(page_body(elements)))
    page = await client.poll()
    assert [r.raw for r in page.records] == elements
    assert [r.detail_no for r in page.records] == ["a", None, None, None, None]


@pytest.mark.parametrize(
    ("element", "expected"),
    [
        ({"TaskDetailNo": "abc"}, "abc"),
        ({"TaskDetailNo": "  padded \t"}, "  padded \t"),  # byte for byte: no strip
        ({"TaskDetailNo": "trailing\n"}, "trailing\n"),
        ({"TaskDetailNo": "MiXeD"}, "MiXeD"),  # no case folding
        ({"taskDetailNo": "lower-camel"}, "lower-camel"),
        ({"TASKDETAILNO": "upper"}, "upper"),
        ({"taskdetailno": "lower", "Other": 1}, "lower"),
        ({"TaskDetailNo": 12345}, "12345"),
        ({"TaskDetailNo": 0}, "0"),
        ({"TaskDetailNo": ""}, None),
        ({"TaskDetailNo": "   "}, "   "),  # spaces are what the upstream sent; only "" is no id
        ({"TaskDetailNo": None}, None),
        ({"TaskDetailNo": True}, None),
        ({"TaskDetailNo": 1.5}, None),
        ({"TaskDetailNo": ["a"]}, None),
        ({"TaskDetailNo": {"id": "a"}}, None),
        ({"TaskNo": "no-detail-no"}, None),
        ({}, None),
    ],
)
async def test_detail_no_lookup(make_client: MakeClient, element: dict[str, Any], expected: str | None) -> None:
    client, _ = make_client(ok(page_body([element])))
    (record,) = (await client.poll()).records
    assert record == RawRecord(raw=element, detail_no=expected)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"CurrentPageNum": 2, "PageSize": 20, "TotalItemNum": 41, "TotalPageNum": 3, "NextPage": True},
            (2, 20, 41, 3, True),
        ),
        (
            {"CurrentPageNum": "2", "PageSize": "20", "TotalItemNum": " 41 ", "TotalPageNum": "3", "NextPage": "false"},
            (2, 20, 41, 3, False),
        ),
        (
            {"CurrentPageNum": None, "PageSize": "x", "TotalItemNum": None, "TotalPageNum": True, "NextPage": None},
            (7, 50, None, None, None),
        ),
    ],
    ids=["numbers", "strings", "garbage"],
)
async def test_paging_fields(make_client: MakeClient, fields: dict[str, Any], expected: tuple[Any, ...]) -> None:
    client, _ = make_client(ok(page_body([detail()], **fields)))
    page = await client.poll(page_num=7, page_size=50)
    assert (page.page_num, page.page_size, page.total_items, page.total_pages, page.has_next) == expected
    assert page.request_id == "REQ-1"


async def test_paging_fields_missing_fall_back_to_the_request(make_client: MakeClient) -> None:
    client, _ = make_client(ok({"Data": {"TaskDetail": []}}))
    page = await client.poll(page_num=4, page_size=10)
    assert (page.request_id, page.page_num, page.page_size, page.total_items, page.total_pages) == (
        None,
        4,
        10,
        None,
        None,
    )


async def test_a_full_page_parses_quickly(make_client: MakeClient) -> None:
    # The hot path: 1000 records per page, thousands of pages in a drain.
    body = json.dumps(page_body([detail(f"{i:032x}", TaskResult="ok" * 20) for i in range(1000)])).encode()
    client, _ = make_client(lambda request: httpx.Response(200, content=body))
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _ in range(20):
        page = await client.poll()
    per_page_s = (loop.time() - started) / 20
    assert len(page.records) == 1000
    assert page.records[-1].detail_no == f"{999:032x}"
    assert per_page_s < 0.05, per_page_s  # measured ~1.1 ms (0.4 ms of it the records), 2 cores


# --- errors ---
def error_body(code: str, message: str = "some message", request_id: str = "ERR-REQ") -> dict[str, str]:
    return {"RequestId": request_id, "HostId": "domain.aliyuncs.com", "Code": code, "Message": message}


ERROR_CASES = [
    (400, "Throttling", ThrottledError),
    (400, "Throttling.User", ThrottledError),
    (400, "Throttling.Api", ThrottledError),
    (503, "ServiceUnavailable", RetryableUpstreamError),
    (500, "InternalError", RetryableUpstreamError),
    (500, "UnknownError", RetryableUpstreamError),
    (502, "BadGateway", RetryableUpstreamError),
    (504, "GatewayTimeout", RetryableUpstreamError),
    (400, "SignatureNonceUsed", RetryableUpstreamError),
    (400, "SignatureDoesNotMatch", FatalUpstreamError),
    (404, "InvalidAccessKeyId.NotFound", FatalUpstreamError),
    (400, "MissingParameter", FatalUpstreamError),
    (400, "MissingPageNum", FatalUpstreamError),
    (400, "InvalidTimeStamp.Expired", FatalUpstreamError),
    (400, "InvalidTimeStamp.Format", FatalUpstreamError),
    (400, "IncompleteSignature", FatalUpstreamError),
    (400, "InvalidParameter", RefusedParametersError),
    (400, "InvalidParameter.TaskDetailNo", RefusedParametersError),
    (413, "RequestEntityTooLarge", RefusedParametersError),
    (414, "RequestURITooLong", RefusedParametersError),
    (403, "Forbidden.RAM", FatalUpstreamError),
    (409, "SomethingNew", FatalUpstreamError),
]


@pytest.mark.parametrize("fmt", ["json", "xml"])
@pytest.mark.parametrize(("status", "code", "kind"), ERROR_CASES)
async def test_error_codes_map_to_the_tree(
    make_client: MakeClient, fmt: str, status: int, code: str, kind: type[UpstreamError]
) -> None:
    message = f"Message for {code} & <friends>"
    if fmt == "json":
        answer: Handler = lambda request: httpx.Response(status, json=error_body(code, message))  # noqa: E731
    else:
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?><Error><RequestId>ERR-REQ</RequestId>'
            f"<HostId>domain.aliyuncs.com</HostId><Code>{code}</Code>"
            "<Message>" + message.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") + "</Message>"
            "</Error>"
        )
        answer = lambda request: httpx.Response(  # noqa: E731
            status, content=xml.encode(), headers={"content-type": "text/xml"}
        )
    client, _ = make_client(answer)
    with pytest.raises(UpstreamError) as caught:
        await client.poll()
    exc = caught.value
    assert type(exc) is kind
    assert (exc.code, exc.upstream_message, exc.request_id, exc.status_code, exc.action) == (
        code,
        message,
        "ERR-REQ",
        status,
        "PollTaskResult",
    )
    assert str(exc).startswith(f"PollTaskResult failed, HTTP {status}, Code={code}, RequestId=ERR-REQ: ")


@pytest.mark.parametrize(
    ("status", "content", "headers", "kind"),
    [
        (502, b"<html><body>Bad Gateway</body></html>", {"content-type": "text/html"}, RetryableUpstreamError),
        (503, b"", {}, RetryableUpstreamError),
        (500, b"{not json", {}, RetryableUpstreamError),
        (429, b"", {}, ThrottledError),
        (403, b"Forbidden", {}, FatalUpstreamError),
        (404, b"", {"x-acs-request-id": "HDR-REQ"}, FatalUpstreamError),
        (301, b"", {"location": "https://elsewhere/"}, FatalUpstreamError),
        (413, b"Request Entity Too Large", {}, RefusedParametersError),
        (414, b"", {}, RefusedParametersError),
    ],
)
async def test_error_bodies_without_a_code(
    make_client: MakeClient, status: int, content: bytes, headers: dict[str, str], kind: type[UpstreamError]
) -> None:
    client, _ = make_client(lambda request: httpx.Response(status, content=content, headers=headers))
    with pytest.raises(UpstreamError) as caught:
        await client.poll()
    assert type(caught.value) is kind
    assert caught.value.code is None
    assert caught.value.status_code == status
    assert f"HTTP {status}" in str(caught.value)
    if "x-acs-request-id" in headers:
        assert caught.value.request_id == "HDR-REQ"


@pytest.mark.parametrize(
    ("content", "what"),
    [
        (b"<html>maintenance</html>", "not valid JSON"),
        (b"[1, 2]", "array"),
        (b'"text"', "string"),
        (b"\xff\xfe", "JSON"),
    ],
)
async def test_a_2xx_body_that_is_not_a_json_object_is_malformed(
    make_client: MakeClient, content: bytes, what: str
) -> None:
    client, _ = make_client(lambda request: httpx.Response(200, content=content))
    with pytest.raises(RetryableUpstreamError) as caught:
        await client.poll()
    assert type(caught.value) is MalformedResponseError
    assert caught.value.status_code == 200
    assert what in str(caught.value)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("7", 7.0),
        ("1.5", 1.5),
        ("-3", 0.0),
        ("Fri, 02 Jan 2026 03:04:35 GMT", 30.0),  # 30 s after the injected clock
        ("Fri, 02 Jan 2026 03:00:00 GMT", 0.0),  # in the past
        ("soon", None),
        ("nan", None),
        (None, None),
    ],
)
async def test_throttling_carries_retry_after(make_client: MakeClient, header: str | None, expected: float) -> None:
    headers = {"Retry-After": header} if header is not None else {}
    client, _ = make_client(lambda request: httpx.Response(400, json=error_body("Throttling.User"), headers=headers))
    with pytest.raises(ThrottledError) as caught:
        await client.poll()
    assert caught.value.retry_after_s == expected


@pytest.mark.parametrize(
    ("raised", "text"),
    [
        (httpx.ConnectError("[Errno 111] Connection refused"), "transport error (ConnectError"),
        (httpx.RemoteProtocolError("peer closed connection"), "transport error (RemoteProtocolError"),
        (httpx.ReadTimeout("read timed out"), "timed out after 10s"),
        (httpx.ConnectTimeout(""), "timed out after 10s"),
        (httpx.DecodingError("bad gzip"), "request failed (DecodingError"),
    ],
)
async def test_transport_failures_are_retryable(make_client: MakeClient, raised: Exception, text: str) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        raise raised

    client, _ = make_client(answer)
    with pytest.raises(RetryableUpstreamError) as caught:
        await client.poll()
    assert type(caught.value) is RetryableUpstreamError
    assert caught.value.code is None
    assert caught.value.status_code is None
    assert text in str(caught.value)
    assert caught.value.__cause__ is raised


async def test_a_hanging_upstream_times_out_within_the_setting() -> None:
    async def hang(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(30)
        raise AssertionError("not reached")

    async with httpx.AsyncClient(transport=httpx.MockTransport(hang)) as http:
        client = upstream_client(http, make_settings(request_timeout_s=0.05))
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(RetryableUpstreamError, match=r"timed out after 0\.05s"):
            await client.poll()
        assert loop.time() - started < 1.0


@pytest.mark.parametrize("version", ["v1", "v3"])
async def test_signature_mismatch_message_never_leaks_the_token(make_client: MakeClient, version: str) -> None:
    """The gateway appends its string to sign (V1: holds the token, encoded twice) to the message."""

    def answer(request: httpx.Request) -> httpx.Response:
        if version == "v1":
            params = [(k, v) for k, v in request_params(request) if k != "Signature"]
            echo = v1_string_to_sign(request.method, params)
            assert percent_encode(percent_encode(TOKEN)) in echo  # the test provokes the real danger
        else:
            echo = f"POST\n/\n\nx-acs-security-token:{TOKEN}\nx-acs-version:2017-12-18\n"
        message = f"Specified signature is not matched with our calculation. server string to sign is:{echo}"
        return httpx.Response(400, json=error_body("SignatureDoesNotMatch", message))

    client, _ = make_client(answer, signature_version=version, security_token=TOKEN)
    with pytest.raises(FatalUpstreamError) as caught:
        await client.poll()
    exc = caught.value
    assert "server string to sign is:" in str(exc)
    for leaked in (TOKEN, percent_encode(TOKEN), percent_encode(percent_encode(TOKEN)), SECRET, "NUgYrLnoC"):
        assert leaked not in str(exc)
        assert leaked not in exc.upstream_message
        assert leaked not in repr(exc)
    assert "***" in str(exc)


async def test_transport_error_text_is_scrubbed(make_client: MakeClient) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"cannot reach {request.url}")  # a message that quotes the signed URL

    client, rec = make_client(answer, signature_version="v1", security_token=TOKEN)
    with pytest.raises(RetryableUpstreamError) as caught:
        await client.poll()
    assert "SecurityToken" in str(rec.requests[0].url)
    assert "cannot reach" in str(caught.value)
    for leaked in (TOKEN, percent_encode(TOKEN), "NUgYrLnoC"):
        assert leaked not in str(caught.value)


# --- acknowledge ---
def ack_answer(result: Callable[[list[str]], Any] | None = None) -> Handler:
    """Answers AcknowledgeTaskResult with ``Result`` = ``result(ids)`` (default: all of them)."""

    def answer(request: httpx.Request) -> httpx.Response:
        ids = sent_ids(request)
        count = len(ids) if result is None else result(ids)
        return httpx.Response(200, json={"RequestId": f"ACK-{ids[0]}", "Result": count})

    return answer


def sent_ids(request: httpx.Request) -> list[str]:
    """The ids of an AcknowledgeTaskResult request: ``TaskDetailNo.N`` in the query string, nothing in a body."""
    assert request.content == b""
    assert "content-type" not in request.headers
    params = dict(request.url.params.multi_items())
    return [params[f"TaskDetailNo.{n}"] for n in range(1, len(params) + 1) if f"TaskDetailNo.{n}" in params]


IDS = [f"id-{i:04d}" for i in range(250)]


@pytest.mark.parametrize("version", ["v3", "v1"])
async def test_acknowledge_sends_exactly_one_call_with_the_ids_in_the_query(
    make_client: MakeClient, version: str
) -> None:
    client, rec = make_client(ack_answer(), signature_version=version, ack_batch_size=100, user_client_ip="192.0.2.7")
    result = await client.acknowledge(IDS)  # more than ack_batch_size: batching is the acknowledger's job
    assert result == AckResult(sent=250, confirmed=250, request_id="ACK-id-0000")
    (request,) = rec.requests
    assert request.method == "POST"
    assert request.url.path == "/"
    assert sent_ids(request) == IDS
    names = [k for k in request.url.params if k.startswith("TaskDetailNo")]
    assert sorted(names) == sorted(f"TaskDetailNo.{n}" for n in range(1, 251))  # from 1, contiguous
    assert request.url.params["UserClientIp"] == "192.0.2.7"
    assert request.url.params["Lang"] == "en"
    assert request.headers["x-acs-action"] == "AcknowledgeTaskResult"


async def test_acknowledge_nothing_sends_nothing(make_client: MakeClient) -> None:
    client, rec = make_client(ack_answer())
    assert await client.acknowledge([]) == AckResult(sent=0, confirmed=0)
    assert rec.requests == []


async def test_acknowledge_sends_ids_byte_for_byte(make_client: MakeClient) -> None:
    odd = ["trailing-newline\n", "  spaced  ", "MiXeD-Case", "é中/+&=?#", "tab\tinside"]
    client, rec = make_client(ack_answer(), signature_version="v1")
    await client.acknowledge(odd)
    assert sent_ids(rec.requests[0]) == odd


@pytest.mark.parametrize(
    ("result", "confirmed"),
    [
        (7, 7),
        (0, 0),
        ("3", 3),
        (" 3 ", 3),
        (3.0, 3),
        (-1, None),
        ("-1", None),
        (None, None),
        ("three", None),
        (True, None),
        (2.5, None),
        ([], None),
        ({"n": 1}, None),
        ("9" * 5000, None),
        ("1e999", None),
    ],
)
async def test_acknowledge_result_believed_only_when_it_is_a_count(
    make_client: MakeClient, result: Any, confirmed: int | None
) -> None:
    client, _ = make_client(ok({"RequestId": "R", "Result": result}))
    assert await client.acknowledge(["a", "b", "c"]) == AckResult(sent=3, confirmed=confirmed, request_id="R")


async def test_acknowledge_result_missing_or_unparsable_is_none(make_client: MakeClient) -> None:
    for content in (b'{"RequestId": "R"}', b'{"RequestId": "R", "Result": ' + b"9" * 5000 + b"}"):
        client, _ = make_client(lambda request, content=content: httpx.Response(200, content=content))
        assert await client.acknowledge(["a"]) == AckResult(sent=1, confirmed=None, request_id="R")


# --- metrics ---
async def test_metrics_count_each_request_by_outcome(make_client: MakeClient) -> None:
    metrics = Metrics()
    answers = iter(
        [
            httpx.Response(200, json=page_body([detail()], TotalItemNum=1234)),
            httpx.Response(400, json=error_body("Throttling")),
            httpx.Response(503, json=error_body("ServiceUnavailable")),
            httpx.Response(400, json=error_body("SignatureDoesNotMatch")),
            httpx.Response(200, json={"RequestId": "A", "Result": 1}),
        ]
    )
    client, _ = make_client(lambda request: next(answers), metrics=metrics)
    await client.poll()
    for _ in range(3):
        with pytest.raises(UpstreamError):
            await client.poll()
    await client.acknowledge(["x"])

    def requests(action: str, outcome: str) -> float:
        return sample(metrics, "bridge_upstream_requests_total", action=action, outcome=outcome)

    assert [requests("PollTaskResult", o) for o in ("ok", "throttled", "retryable_error", "fatal_error")] == [
        1,
        1,
        1,
        1,
    ]
    assert requests("AcknowledgeTaskResult", "ok") == 1
    assert sample(metrics, "bridge_upstream_request_duration_seconds_count", action="PollTaskResult") == 4
    assert sample(metrics, "bridge_upstream_request_duration_seconds_count", action="AcknowledgeTaskResult") == 1
    assert sample(metrics, "bridge_upstream_backlog") == 1234


async def test_backlog_is_left_alone_when_the_page_does_not_say(make_client: MakeClient) -> None:
    metrics = Metrics()
    metrics.account("default").upstream_backlog.set(99)
    client, _ = make_client(ok({"Data": {"TaskDetail": []}}), metrics=metrics)
    await client.poll()
    assert sample(metrics, "bridge_upstream_backlog") == 99
    assert sample(metrics, "bridge_upstream_requests_total", action="PollTaskResult", outcome="ok") == 1


async def test_timeouts_count_as_retryable_errors(make_client: MakeClient) -> None:
    metrics = Metrics()

    def answer(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow")

    client, _ = make_client(answer, metrics=metrics)
    with pytest.raises(RetryableUpstreamError):
        await client.acknowledge(["a"])
    assert (
        sample(metrics, "bridge_upstream_requests_total", action="AcknowledgeTaskResult", outcome="retryable_error")
        == 1
    )


def test_metrics_never_carry_secrets() -> None:
    from prometheus_client import generate_latest

    metrics = Metrics()
    upstream_client(httpx.AsyncClient(), make_settings(security_token=TOKEN), metrics=metrics)
    exposition = generate_latest(metrics.registry).decode()
    assert SECRET not in exposition
    assert TOKEN not in exposition


# =============================================================================================================
# Against the project's simulator, over ASGI: the assertions read the simulator's own state.
# =============================================================================================================

SIM_ID = "sim-access-key-id"
SIM_SECRET = "sim-access-key-secret"
SIM_TOKEN = "STS.sim+token/==&x"
SIGNATURES = ["v3", "v1"]


@pytest.fixture
async def sim_client() -> AsyncIterator[Callable[..., UpstreamClient]]:
    """``sim_client(sim, metrics=None, clock=None, nonce=None, **settings)``: a client wired to ``sim`` by ASGI."""
    opened: list[httpx.AsyncClient] = []

    def factory(
        sim: Simulator,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], datetime] | None = None,
        nonce: Callable[[], str] | None = None,
        **overrides: Any,
    ) -> UpstreamClient:
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=sim))
        opened.append(http)
        values: dict[str, Any] = {
            "access_key_id": SIM_ID,
            "access_key_secret": SIM_SECRET,
            "upstream_endpoint": "http://simulator.test",
        }
        values.update(overrides)
        return upstream_client(http, load_settings(**values), metrics=metrics, clock=clock, nonce=nonce)

    yield factory
    for http in opened:
        await http.aclose()


SimClient = Callable[..., UpstreamClient]


@pytest.mark.parametrize("api", ["domain-intl", "domain"])
@pytest.mark.parametrize("signature", SIGNATURES)
async def test_sim_paging(sim_client: SimClient, signature: str, api: str) -> None:
    sim = Simulator(seed=1)
    ids = sim.add_details(25)
    client = sim_client(sim, signature_version=signature, upstream_api=api, page_size=10)
    pages = [await client.poll(page_num=n) for n in (1, 2, 3, 4)]
    assert [len(p.records) for p in pages] == [10, 10, 5, 0]
    assert [r.detail_no for p in pages for r in p.records] == ids
    first = pages[0]
    assert (first.page_num, first.page_size, first.total_items, first.total_pages, first.has_next) == (
        1,
        10,
        25,
        3,
        True,
    )
    assert pages[2].has_next is False
    assert first.request_id
    # The raw record is the simulator's detail, untouched.
    assert first.records[0].raw == sim.detail(ids[0])
    assert sim.pending_count == 25  # polling alone removes nothing


@pytest.mark.parametrize("sts", [False, True], ids=["keys", "sts"])
@pytest.mark.parametrize("signature", SIGNATURES)
async def test_sim_drain_by_page_one_and_acknowledge(sim_client: SimClient, signature: str, sts: bool) -> None:
    sim = Simulator(seed=2, security_token=SIM_TOKEN if sts else None)
    ids = sim.add_details(230)
    metrics = Metrics()
    client = sim_client(
        sim,
        metrics=metrics,
        signature_version=signature,
        security_token=SIM_TOKEN if sts else None,
        page_size=100,
    )
    seen: list[str] = []
    while True:
        page = await client.poll()
        assert sample(metrics, "bridge_upstream_backlog") == sim.pending_count
        if not page.records:
            break
        batch = [r.detail_no for r in page.records if r.detail_no is not None]
        seen.extend(batch)
        result = await client.acknowledge(batch)
        assert (result.sent, result.confirmed) == (len(batch), len(batch))
        assert result.request_id
    assert seen == ids
    assert sim.pending_count == 0
    assert sim.acknowledged_count == 230
    assert sim.ack_counts == dict.fromkeys(ids, 1)
    assert sample(metrics, "bridge_upstream_requests_total", action="PollTaskResult", outcome="ok") == 4
    assert sample(metrics, "bridge_upstream_requests_total", action="AcknowledgeTaskResult", outcome="ok") == 3
    assert sample(metrics, "bridge_upstream_backlog") == 0


@pytest.mark.parametrize("signature", SIGNATURES)
async def test_sim_filters(sim_client: SimClient, signature: str) -> None:
    sim = Simulator(seed=3)
    ids = sim.add_details(200)
    details = {i: sim.detail(i) for i in ids}
    failed = [i for i, d in details.items() if d is not None and d["TaskStatusCode"] == 3]
    assert 0 < len(failed) < len(ids)  # the seed gives both kinds
    client = sim_client(sim, signature_version=signature, task_result_status=3, user_client_ip="192.0.2.1")
    page = await client.poll()
    assert [r.detail_no for r in page.records] == failed
    assert page.total_items == len(failed)

    some = details[ids[17]]
    assert some is not None
    by_domain = sim_client(sim, signature_version=signature, domain_name=some["DomainName"])
    page = await by_domain.poll()
    assert ids[17] in [r.detail_no for r in page.records]
    assert {r.raw["DomainName"] for r in page.records} == {some["DomainName"]}

    by_task = sim_client(sim, signature_version=signature, task_no=some["TaskNo"], instance_id=some["InstanceId"])
    page = await by_task.poll()
    assert [r.detail_no for r in page.records] == [
        i for i, d in details.items() if d is not None and d["TaskNo"] == some["TaskNo"]
    ]


@pytest.mark.parametrize("signature", SIGNATURES)
async def test_sim_acknowledge_and_repeat(sim_client: SimClient, signature: str) -> None:
    sim = Simulator(seed=4)
    ids = sim.add_details(50)
    client = sim_client(sim, signature_version=signature)
    first = await client.acknowledge(ids[:30])
    assert (first.sent, first.confirmed) == (30, 30)
    assert sim.pending_count == 20
    # Again, plus unknown ids: fewer confirmed than sent is information, not an error.
    again = await client.acknowledge([*ids[:10], "no-such-id", "another-unknown"])
    assert (again.sent, again.confirmed) == (12, 0)
    assert sim.pending_count == 20
    assert [sim.ack_counts.get(i, 0) for i in ids] == [2] * 10 + [1] * 20 + [0] * 20
    assert "no-such-id" not in sim.ack_counts


async def test_sim_a_full_acknowledge_batch_fits_the_gateway(sim_client: SimClient) -> None:
    sim = Simulator(seed=5)
    ids = sim.add_details(1000)
    client = sim_client(sim, ack_batch_size=1000, signature_version="v1")
    result = await client.acknowledge(ids)
    assert (result.confirmed, sim.pending_count) == (1000, 0)


async def test_sim_malformed_and_odd_records(sim_client: SimClient) -> None:
    sim = Simulator(seed=6, faults=Faults(malformed_ratio=1.0))
    ids = sim.add_details(10)
    sim.add_raw({"TaskNo": "no-detail-no"})
    sim.add_raw({"TaskDetailNo": 42, "TaskNo": "int-id"})
    sim.add_raw("just a string")
    client = sim_client(sim)
    page = await client.poll()
    assert set(ids) == sim.malformed_ids
    # Malformed details keep their id: the bridge can still route them and acknowledge them.
    assert [r.detail_no for r in page.records] == [*ids, None, "42", None]
    assert page.records[-1].raw == "just a string"


# --- every error class, provoked in the simulator ---
@pytest.mark.parametrize(
    ("fault", "kind", "code", "status"),
    [
        ("throttling_ratio", ThrottledError, "Throttling", 400),
        ("unavailable_ratio", RetryableUpstreamError, "ServiceUnavailable", 503),
        ("internal_error_ratio", RetryableUpstreamError, "InternalError", 500),
    ],
)
@pytest.mark.parametrize("signature", SIGNATURES)
async def test_sim_faults(
    sim_client: SimClient, signature: str, fault: str, kind: type[UpstreamError], code: str, status: int
) -> None:
    sim = Simulator(seed=7)
    ids = sim.add_details(5)
    metrics = Metrics()
    client = sim_client(sim, signature_version=signature, metrics=metrics)
    setattr(sim.faults, fault, 1.0)
    for call in (client.poll(), client.acknowledge(ids)):
        with pytest.raises(UpstreamError) as caught:
            await call
        exc = caught.value
        assert type(exc) is kind
        assert (exc.code, exc.status_code) == (code, status)
        assert exc.request_id
    assert sim.pending_count == 5
    assert sim.ack_counts == {}
    outcome = "throttled" if kind is ThrottledError else "retryable_error"
    for action in ("PollTaskResult", "AcknowledgeTaskResult"):
        assert sample(metrics, "bridge_upstream_requests_total", action=action, outcome=outcome) == 1
    # The fault lifted, the same client works again.
    setattr(sim.faults, fault, 0.0)
    assert len((await client.poll()).records) == 5


async def test_sim_hang_times_out(sim_client: SimClient) -> None:
    sim = Simulator(seed=8, faults=Faults(hang_ratio=1.0, hang_s=30.0))
    sim.add_details(3)
    client = sim_client(sim, request_timeout_s=0.1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(RetryableUpstreamError) as caught:
        await client.poll()
    assert loop.time() - started < 2.0
    assert "timed out after 0.1s" in str(caught.value)
    assert caught.value.code is None


async def test_sim_latency_within_the_timeout_is_fine(sim_client: SimClient) -> None:
    sim = Simulator(seed=8, faults=Faults(latency_s=0.05, actions=frozenset({"PollTaskResult"})))
    sim.add_details(3)
    client = sim_client(sim, request_timeout_s=1.0)
    assert len((await client.poll()).records) == 3


@pytest.mark.parametrize("signature", SIGNATURES)
async def test_sim_wrong_secret_is_fatal_and_leaks_no_token(sim_client: SimClient, signature: str) -> None:
    sim = Simulator(seed=10, security_token=SIM_TOKEN)
    sim.add_details(1)
    wrong_secret = "wrong-secret+/="
    client = sim_client(sim, signature_version=signature, access_key_secret=wrong_secret, security_token=SIM_TOKEN)
    with pytest.raises(FatalUpstreamError) as caught:
        await client.poll()
    exc = caught.value
    assert (exc.code, exc.status_code) == ("SignatureDoesNotMatch", 400)
    assert "server string to sign is:" in str(exc)
    if signature == "v1":  # the simulator echoes the string to sign, which holds the token: it was scrubbed
        assert "SecurityToken" in str(exc)
    for leaked in (SIM_TOKEN, percent_encode(SIM_TOKEN), percent_encode(percent_encode(SIM_TOKEN)), "sim+token"):
        assert leaked not in str(exc)
    assert wrong_secret not in str(exc)


@pytest.mark.parametrize(
    ("settings", "code", "status"),
    [
        ({"access_key_id": "LTAI-unknown"}, "InvalidAccessKeyId.NotFound", 404),
        ({"security_token": None}, None, 400),  # Missing<the token's parameter>
        ({"security_token": "STS.other-token"}, "InvalidSecurityToken.Mismatch", 400),
    ],
    ids=["unknown-key", "missing-token", "wrong-token"],
)
@pytest.mark.parametrize("signature", SIGNATURES)
async def test_sim_credential_errors_are_fatal(
    sim_client: SimClient, signature: str, settings: dict[str, Any], code: str | None, status: int
) -> None:
    sim = Simulator(seed=11, security_token=SIM_TOKEN)
    ids = sim.add_details(2)
    metrics = Metrics()
    client = sim_client(sim, metrics=metrics, signature_version=signature, **{"security_token": SIM_TOKEN, **settings})
    for call in (client.poll(), client.acknowledge(ids)):
        with pytest.raises(FatalUpstreamError) as caught:
            await call
        assert caught.value.status_code == status
        if code is None:
            assert caught.value.code is not None
            assert caught.value.code.startswith("Missing")
        else:
            assert caught.value.code == code
        assert SIM_TOKEN not in str(caught.value)
    assert sim.pending_count == 2
    assert sample(metrics, "bridge_upstream_requests_total", action="PollTaskResult", outcome="fatal_error") == 1


@pytest.mark.parametrize("signature", SIGNATURES)
async def test_sim_clock_skew_is_fatal(sim_client: SimClient, signature: str) -> None:
    sim = Simulator(seed=12)
    client = sim_client(sim, signature_version=signature, clock=lambda: datetime.now(UTC).replace(year=2020))
    with pytest.raises(FatalUpstreamError) as caught:
        await client.poll()
    assert caught.value.code == "InvalidTimeStamp.Expired"


@pytest.mark.parametrize("signature", SIGNATURES)
async def test_sim_reused_nonce_is_retryable(sim_client: SimClient, signature: str) -> None:
    sim = Simulator(seed=13)
    sim.add_details(1)
    client = sim_client(sim, signature_version=signature, nonce=lambda: "always-the-same-nonce")
    assert len((await client.poll()).records) == 1
    with pytest.raises(RetryableUpstreamError) as caught:
        await client.poll()
    assert type(caught.value) is RetryableUpstreamError
    assert caught.value.code == "SignatureNonceUsed"


async def test_sim_lang_reaches_the_gateway(sim_client: SimClient) -> None:
    sim = Simulator(seed=14)
    sim.add_details(20)
    english = await sim_client(sim).poll()
    chinese = await sim_client(sim, lang="zh").poll()
    pairs = {
        (e.raw["TaskTypeDescription"], c.raw["TaskTypeDescription"])
        for e, c in zip(english.records, chinese.records, strict=True)
    }
    assert any(en != zh for en, zh in pairs)
