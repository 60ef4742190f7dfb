"""The upstream client against a broken or hostile upstream: bounded reads, unreadable bodies, error objects in
a 200, pages without their records, values Python cannot represent. Each answer is faked with
:class:`httpx.MockTransport` (or served over real HTTP where the transport matters), one misbehaviour at a time.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from bridge.app import upstream_http_client
from bridge.errors import (
    FatalUpstreamError,
    MalformedResponseError,
    RefusedParametersError,
    RetryableUpstreamError,
    ThrottledError,
    UpstreamError,
)
from bridge.metrics import Metrics
from bridge.serving import serve_in_background
from bridge.settings import Settings, UpstreamSettings, load_settings
from bridge.upstream import ACKNOWLEDGE_ACTION, ERROR_BODY_MAX_BYTES, POLL_ACTION, AckResult, UpstreamClient
from tests.harness import sample, upstream_client

MiB = 1024 * 1024
CAP = 256 * 1024  # a small cap keeps the tests fast; the default is 16 MiB

Handler = Callable[[httpx.Request], httpx.Response]


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"access_key_id": "id", "access_key_secret": "secret"}
    values.update(overrides)
    return load_settings(**values)


@pytest.fixture
async def client_for() -> AsyncIterator[Callable[..., UpstreamClient]]:
    opened: list[httpx.AsyncClient] = []

    def factory(answer: Handler, *, metrics: Metrics | None = None, **overrides: Any) -> UpstreamClient:
        http = httpx.AsyncClient(transport=httpx.MockTransport(answer))
        opened.append(http)
        values = {"upstream_max_response_bytes": CAP, **overrides}
        return upstream_client(http, settings(**values), metrics=metrics)

    yield factory
    for http in opened:
        await http.aclose()


ClientFor = Callable[..., UpstreamClient]


def page(details: list[Any], **fields: Any) -> dict[str, Any]:
    return {"RequestId": "R", "TotalItemNum": len(details), "Data": {"TaskDetail": details}, **fields}


def detail(detail_no: str, **fields: Any) -> dict[str, Any]:
    return {"TaskDetailNo": detail_no, "TaskNo": "t", "TaskType": "CHG_DNS", "TaskStatusCode": 2, **fields}


def raw(content: bytes, status: int = 200, **headers: str) -> Handler:
    return lambda request: httpx.Response(status, content=content, headers=headers)


# --- the size cap, enforced while streaming ---
class Endless:
    """An endless body in 64 KiB chunks, counting what the client pulled."""

    def __init__(self) -> None:
        self.sent = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        chunk = b'{"Data": {"TaskDetail": [' + b" " * (64 * 1024 - 25)
        while True:
            self.sent += len(chunk)
            yield chunk


@pytest.mark.parametrize("action", [POLL_ACTION, ACKNOWLEDGE_ACTION])
async def test_an_endless_body_is_cut_at_the_cap(client_for: ClientFor, action: str) -> None:
    body = Endless()
    metrics = Metrics()
    client = client_for(lambda request: httpx.Response(200, content=body), metrics=metrics)
    with pytest.raises(MalformedResponseError) as caught:
        await (client.poll() if action == POLL_ACTION else client.acknowledge(["a"]))
    assert body.sent <= CAP + 64 * 1024  # read no further than the cap and one chunk
    assert f"larger than BRIDGE_UPSTREAM_MAX_RESPONSE_BYTES ({CAP} bytes)" in str(caught.value)
    assert caught.value.action == action
    assert sample(metrics, "bridge_upstream_requests_total", action=action, outcome="malformed") == 1


async def test_a_declared_length_over_the_cap_is_refused_before_reading(client_for: ClientFor) -> None:
    body = Endless()
    client = client_for(lambda request: httpx.Response(200, content=body, headers={"content-length": str(500 * MiB)}))
    with pytest.raises(MalformedResponseError, match="larger than BRIDGE_UPSTREAM_MAX_RESPONSE_BYTES"):
        await client.poll()
    assert body.sent == 0


async def test_a_body_just_under_the_cap_is_read(client_for: ClientFor) -> None:
    details = [detail(f"{i:032x}", Padding="x" * 200) for i in range(780)]
    content = json.dumps(page(details)).encode()
    assert CAP - 64 * 1024 < len(content) < CAP
    client = client_for(raw(content))
    assert len((await client.poll()).records) == 780


async def test_a_full_page_fits_far_under_the_default_cap(client_for: ClientFor) -> None:
    # What the simulator serves for 1000 details (its generator's typical detail), against the default cap.
    from bridge.simulator import Simulator

    sim = Simulator(tasks=1000, seed=5)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=sim)) as http:
        client = upstream_client(
            http,
            settings(
                access_key_id="sim-access-key-id",
                access_key_secret="sim-access-key-secret",
                upstream_endpoint="http://simulator.test",
            ),
        )
        page_ = await client.poll(page_size=1000)
    size = len(json.dumps({"Data": {"TaskDetail": [r.raw for r in page_.records]}}))
    assert len(page_.records) == 1000
    assert size < 2 * MiB  # measured 0.42 MiB (434,355 bytes as served); the default cap is 16 MiB
    assert UpstreamSettings.model_fields["upstream_max_response_bytes"].default == 16 * MiB


async def test_an_error_body_is_read_only_so_far(client_for: ClientFor) -> None:
    body = Endless()
    client = client_for(lambda request: httpx.Response(503, content=body))
    with pytest.raises(RetryableUpstreamError) as caught:
        await client.poll()
    assert type(caught.value) is RetryableUpstreamError
    assert body.sent <= ERROR_BODY_MAX_BYTES + 64 * 1024
    assert caught.value.status_code == 503


async def test_the_cap_holds_over_real_http() -> None:
    """A server streaming without end over TCP: the client stops at the cap and closes the connection."""
    streamed = {"bytes": 0}
    gone = asyncio.Event()

    async def endless(scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.create_task(watch())
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        chunk = b" " * (64 * 1024)
        while not gone.is_set() and streamed["bytes"] < 200 * MiB:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            streamed["bytes"] += len(chunk)
            await asyncio.sleep(0)
        watcher.cancel()

    async with serve_in_background(endless, "127.0.0.1", 0) as (host, port):
        config = settings(upstream_endpoint=f"http://{host}:{port}", upstream_max_response_bytes=MiB)
        async with upstream_http_client(config.upstream) as http:
            with pytest.raises(MalformedResponseError):
                await upstream_client(http, config).poll()
            await asyncio.wait_for(gone.wait(), 5)
    assert streamed["bytes"] < 50 * MiB  # the client closed the connection; the server did not stream on


def test_the_cap_is_a_setting_with_a_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    from bridge.errors import SettingsError
    from bridge.settings import load_settings

    monkeypatch.setenv("BRIDGE_UPSTREAM_MAX_RESPONSE_BYTES", "1000")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert caught.value.problems[0].startswith("BRIDGE_UPSTREAM_MAX_RESPONSE_BYTES: ")
    monkeypatch.setenv("BRIDGE_UPSTREAM_MAX_RESPONSE_BYTES", str(4 * MiB))
    assert load_settings().upstream.upstream_max_response_bytes == 4 * MiB


# --- bodies that cannot be read at all ---
@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "array, not an object"),
        (b'{"Data": ' * 5000 + b"{}" + b"}" * 5000, "no Data.TaskDetail"),
        (b'{"Data": {"TaskDetail": [' + b"[" * 100_000, "nested too deeply"),
        (b'{"RequestId": "R", "Data": {"TaskDetail": [{"TaskDetailNo": "a\xff\xfe"}]}}', "not valid UTF-8"),
        (b'{"RequestId": "R", "Data": {"TaskDetail": [', "not valid JSON"),
        (b"", "not valid JSON"),
        (b"null", "null, not an object"),
        (b"42", "number, not an object"),
        (b"1" * 5000, "not an object"),
        (b"[]", "array, not an object"),
        (b"<Error><Code>X</Code></Error>", "not valid JSON"),
    ],
    ids=[
        "deep-array",
        "deep-object",
        "deep-truncated",
        "bad-utf8",
        "truncated",
        "empty",
        "null",
        "number",
        "huge-number",
        "list",
        "xml",
    ],
)
async def test_an_unreadable_body_is_a_malformed_response(client_for: ClientFor, content: bytes, why: str) -> None:
    metrics = Metrics()
    client = client_for(raw(content), metrics=metrics)
    with pytest.raises(MalformedResponseError) as caught:
        await client.poll()
    text = str(caught.value)
    assert why in text
    assert "\n" not in text and len(text) < 600  # one short line, whatever the body
    assert sample(metrics, "bridge_upstream_requests_total", action=POLL_ACTION, outcome="malformed") == 1


# --- a record that cannot be represented does not block its page ---
def huge(digits: int = 5000) -> bytes:
    return b"9" * digits


@pytest.mark.parametrize(
    ("value", "field", "shown"),
    [
        (huge(), "TaskStatusCode", "number 9999999999"),
        (b"-" + huge(), "TaskStatusCode", "number -999999999"),
        (b"1e999", "TaskResult", "number 1e999"),
        (b"-1e999", "TaskResult", "number -1e999"),
        (b"NaN", "TaskResult", "number NaN"),
        (b"Infinity", "TaskResult", "number Infinity"),
        (b'{"deep": [1, ' + huge() + b"]}", "Extra.deep[1]", "number 9999999999"),
        (b'"bad \\ud800 text"', "TaskResult", "lone surrogate"),
    ],
    ids=["huge-int", "huge-negative", "1e999", "-1e999", "nan", "infinity", "nested", "surrogate"],
)
async def test_one_unrepresentable_record_goes_invalid_and_the_page_flows(
    client_for: ClientFor, value: bytes, field: str, shown: str
) -> None:
    top = field.split(".")[0].split("[")[0]
    bad = b'{"TaskDetailNo": "bad-one", "TaskNo": "t", "' + top.encode() + b'": ' + value + b"}"
    goods = [json.dumps(detail(f"good-{i}")).encode() for i in range(3)]
    content = (
        b'{"RequestId": "R", "TotalItemNum": 4, "Data": {"TaskDetail": ['
        + b", ".join([goods[0], bad, goods[1], goods[2]])
        + b"]}}"
    )
    client = client_for(raw(content))
    records = (await client.poll()).records
    assert [r.detail_no for r in records] == ["good-0", "bad-one", "good-1", "good-2"]
    assert [r.problem is None for r in records] == [True, False, True, True]
    problem = records[1].problem
    assert problem is not None
    assert problem.startswith(f"{field}: ")
    assert shown in problem
    assert "\n" not in problem and len(problem) < 200  # the value cut short
    json.dumps(records[1].raw)  # what the invalid route will carry can be serialized
    assert [r.raw for r in records if r.problem is None] == [detail(f"good-{i}") for i in range(3)]


@pytest.mark.parametrize("depth", [2_000, 200_000])
async def test_one_record_nested_too_deep_goes_invalid_and_the_page_flows(client_for: ClientFor, depth: int) -> None:
    deep = b'{"TaskDetailNo": "deep-one", "TaskNo": "t", "Extra": {"x": ' + b"[" * depth + b"]" * depth + b"}}"
    goods = [json.dumps(detail(f"good-{i}", Text='has [ and { inside "quotes"')).encode() for i in range(3)]
    content = (
        b'{"RequestId": "R", "TotalItemNum": 4, "Data": {"TaskDetail": ['
        + b", ".join([goods[0], goods[1], deep, goods[2]])
        + b"]}}"
    )
    client = client_for(raw(content), upstream_max_response_bytes=4 * MiB)
    records = (await client.poll()).records
    assert [r.detail_no for r in records] == ["good-0", "good-1", "deep-one", "good-2"]
    assert [r.raw for r in records if r.problem is None] == [
        detail(f"good-{i}", Text='has [ and { inside "quotes"') for i in range(3)
    ]
    problem = records[2].problem
    assert problem is not None and problem.startswith("Extra.x")
    assert "nested deeper than 100 levels" in problem
    json.dumps(records[2].raw)


async def test_an_unrepresentable_id_stays_upstream(client_for: ClientFor) -> None:
    content = (
        b'{"TotalItemNum": 3, "Data": {"TaskDetail": [{"TaskDetailNo": '
        + huge()
        + b'}, {"TaskDetailNo": "\\udc00x"}, {"TaskDetailNo": "ok"}]}}'
    )
    client = client_for(raw(content))
    records = (await client.poll()).records
    assert [r.detail_no for r in records] == [None, None, "ok"]
    assert records[0].problem is not None and records[0].problem.startswith("TaskDetailNo: number 999")
    assert records[1].problem is not None and records[1].problem.startswith("TaskDetailNo: text")


async def test_totals_that_do_not_fit_are_unknown_not_fatal(client_for: ClientFor) -> None:
    content = (
        b'{"TotalItemNum": ' + huge() + b', "CurrentPageNum": 1e999, "Data": {"TaskDetail": [{"TaskDetailNo": "a"}]}}'
    )
    page_ = await client_for(raw(content)).poll(page_num=3, page_size=7)
    assert (page_.total_items, page_.page_num, [r.detail_no for r in page_.records]) == (None, 3, ["a"])


async def test_a_clean_page_is_not_searched(client_for: ClientFor) -> None:
    # The hot path: no hook fired, no surrogate escape: records carry no problem and cost no walk.
    content = json.dumps(page([detail(f"{i:032x}", TaskResult=1.5) for i in range(1000)])).encode()
    records = (await client_for(raw(content), upstream_max_response_bytes=16 * MiB).poll()).records
    assert len(records) == 1000 and all(r.problem is None for r in records)


# --- a page without its records is never an empty backlog ---
@pytest.mark.parametrize(
    "body",
    [
        {"RequestId": "R", "TotalItemNum": 5},
        {"RequestId": "R", "TotalItemNum": 5, "Data": {}},
        {"RequestId": "R", "TotalItemNum": 5, "Data": None},
        {"RequestId": "R", "TotalItemNum": 5, "Data": {"TaskDetail": None}},
        {"RequestId": "R", "TotalItemNum": "5", "Data": "nothing"},
        {"RequestId": "R"},
        {"RequestId": "R", "Data": {}},
        {"RequestId": "R", "TotalItemNum": "unknown"},
        {},
    ],
    ids=["no-data", "data-empty", "data-null", "taskdetail-null", "data-string", "bare", "bare-data", "garbage", "{}"],
)
async def test_a_page_without_its_records_is_malformed(client_for: ClientFor, body: dict[str, Any]) -> None:
    client = client_for(lambda request: httpx.Response(200, json=body))
    with pytest.raises(MalformedResponseError, match=r"no Data\.TaskDetail while TotalItemNum is"):
        await client.poll()


@pytest.mark.parametrize(
    "body",
    [
        {"TotalItemNum": 0},
        {"TotalItemNum": "0", "Data": {}},
        {"TotalItemNum": 0, "Data": None},
        {"TotalItemNum": 7, "Data": {"TaskDetail": []}},  # a page past the last one
        {"Data": {"TaskDetail": []}},
        {"Data": {"TaskDetail": {}}},
        {"Data": []},
    ],
)
async def test_what_counts_as_an_empty_page(client_for: ClientFor, body: dict[str, Any]) -> None:
    client = client_for(lambda request: httpx.Response(200, json=body))
    assert (await client.poll()).records == []


# --- an HTTP 200 whose body is an error object is that error ---
ERRORS_IN_A_200 = [
    ("Throttling", ThrottledError),
    ("Throttling.User", ThrottledError),
    ("ServiceUnavailable", RetryableUpstreamError),
    ("InternalError", RetryableUpstreamError),
    ("SignatureNonceUsed", RetryableUpstreamError),
    ("SomethingNew", RetryableUpstreamError),
    ("InvalidParameter", RefusedParametersError),
    ("InvalidParameter.TaskDetailNo", RefusedParametersError),
    ("SignatureDoesNotMatch", FatalUpstreamError),
    ("InvalidAccessKeyId.NotFound", FatalUpstreamError),
    ("MissingPageNum", FatalUpstreamError),
    ("Forbidden.RAM", FatalUpstreamError),
]


@pytest.mark.parametrize("action", [POLL_ACTION, ACKNOWLEDGE_ACTION])
@pytest.mark.parametrize(("code", "kind"), ERRORS_IN_A_200)
async def test_an_error_object_in_a_200_is_that_error(
    client_for: ClientFor, action: str, code: str, kind: type[UpstreamError]
) -> None:
    metrics = Metrics()
    body = {"RequestId": "ERR-200", "HostId": "domain.aliyuncs.com", "Code": code, "Message": f"{code} said no"}
    client = client_for(lambda request: httpx.Response(200, json=body, headers={"retry-after": "3"}), metrics=metrics)
    with pytest.raises(UpstreamError) as caught:
        await (client.poll() if action == POLL_ACTION else client.acknowledge(["a", "b"]))
    exc = caught.value
    assert type(exc) is kind
    assert (exc.code, exc.request_id, exc.status_code, exc.action) == (code, "ERR-200", 200, action)
    assert exc.upstream_message == f"{code} said no"
    if kind is ThrottledError:
        assert exc.retry_after_s == 3.0  # type: ignore[attr-defined]
    assert sample(metrics, "bridge_upstream_requests_total", action=action, outcome="ok") == 0


@pytest.mark.parametrize("code", ["Throttling", "InvalidParameter", "SignatureDoesNotMatch", "ServiceUnavailable"])
async def test_a_200_error_is_classified_as_with_a_4xx_or_5xx(client_for: ClientFor, code: str) -> None:
    body = {"RequestId": "E", "Code": code, "Message": "m"}
    kinds = []
    for status in (200, 400, 503):
        client = client_for(lambda request, status=status: httpx.Response(status, json=body))
        with pytest.raises(UpstreamError) as caught:
            await client.acknowledge(["a"])
        kinds.append(type(caught.value))
    assert kinds[0] in kinds[1:]


@pytest.mark.parametrize(
    "body",
    [
        {"RequestId": "R", "Code": "200", "Result": 1},
        {"RequestId": "R", "Code": "OK", "Result": 1},
        {"RequestId": "R", "Code": "SomethingOdd", "Result": 1},  # the payload is there: believe it
    ],
)
async def test_a_code_next_to_the_payload_is_no_error(client_for: ClientFor, body: dict[str, Any]) -> None:
    client = client_for(lambda request: httpx.Response(200, json=body))
    assert await client.acknowledge(["a"]) == AckResult(sent=1, confirmed=1, request_id="R")


async def test_a_malformed_answer_logs_nothing_itself(client_for: ClientFor, caplog: pytest.LogCaptureFixture) -> None:
    # One line per failed poll is the run loop's; the client only raises.
    caplog.set_level(logging.DEBUG)
    with pytest.raises(MalformedResponseError):
        await client_for(raw(b"[" * 100_000)).poll()
    assert [r for r in caplog.records if r.name.startswith("bridge")] == []
