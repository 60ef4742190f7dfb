"""The event contract: routing keys, validation, CloudEvents bodies and the AMQP messages built from them."""

from __future__ import annotations

import asyncio
import decimal
import itertools
import json
import re
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import pamqp.commands
import pamqp.header
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.encoding import encode
from bridge.events import (
    ACCOUNT_PATTERN,
    APP_ID,
    EVENT_CONTENT_TYPE,
    EVENT_TYPE,
    INVALID_CONTENT_TYPE,
    MAX_HEADER_CHARS,
    ROUTING_KEY_PATTERN,
    TASK_STATUS_CODES,
    VALIDATION_ERROR_HEADER,
    Event,
    InvalidRecord,
    convert,
    routing_key,
)
from bridge.records import RawRecord
from bridge.simulator.generator import DetailGenerator
from tests import events_reference
from tests.samples import DETAIL_NO
from tests.samples import task_detail as sample

SOURCE = "urn:alibabacloud:domain"
ACCOUNT = "reseller-eu"  # not the default: a test cannot pass by a default it forgot to replace
STATUSES = "WAITING_EXECUTE, EXECUTING, EXECUTE_SUCCESS, EXECUTE_FAILURE"


def event_of(raw: Any, detail_no: str | None = DETAIL_NO) -> Event:
    item = convert(RawRecord(raw, detail_no), source=SOURCE, account=ACCOUNT)
    assert isinstance(item, Event), getattr(item, "error", item)
    return item


def invalid_of(raw: Any, detail_no: str | None = DETAIL_NO) -> InvalidRecord:
    item = convert(RawRecord(raw, detail_no), source=SOURCE, account=ACCOUNT)
    assert isinstance(item, InvalidRecord), item
    return item


def body_of(item: Event | InvalidRecord) -> Any:
    return json.loads(item.body.decode("utf-8"))


def assert_amqp_encodable(message: aio_pika.Message) -> None:
    """Marshal the properties as the client would: fails on over-long short strings, bad header values etc."""
    properties: pamqp.commands.Basic.Properties = message.properties
    assert pamqp.header.ContentHeader(0, len(message.body), properties).marshal()


# --- routing keys ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task_type", "task_status", "expected"),
    [
        ("CHG_DNS", "EXECUTE_SUCCESS", "chg_dns.execute_success"),
        ("chg_dns", "execute_failure", "chg_dns.execute_failure"),
        ("A-b_C9", "EXECUTING", "a-b_c9.executing"),
        ("chg.dns", "x y", "chg_dns.x_y"),
        ("a*#b", "c>d", "a__b.c_d"),
        ("", "EXECUTING", "unknown.executing"),
        ("CHG_DNS", "", "chg_dns.unknown"),
        (None, None, "unknown.unknown"),
        ("Überweisung", "OK", "_berweisung.ok"),
        ("域名", "完成", "__.__"),
        ("\U0001f642x", "y", "_x.y"),  # one code point, one "_"
        ("\u212a", "S", "_.s"),  # Kelvin sign: str.lower() would give "k"; ASCII-only lower-casing does not
        ("Straße", "ÉTAT", "stra_e._tat"),
        ("\ud800", "x", "_.x"),  # lone surrogate
        (5, True, "5.true"),
        (" ", "\t", "_._"),
    ],
)
def test_routing_key_rules(task_type: object, task_status: object, expected: str) -> None:
    key = routing_key(task_type, task_status)
    assert key == expected
    assert re.fullmatch(ROUTING_KEY_PATTERN, key)


def test_routing_key_parts_are_cut_to_fit_amqp() -> None:
    key = routing_key("T" * 500, "é" * 500)
    assert key == "t" * 127 + "." + "_" * 127
    assert len(key.encode()) <= 255
    assert re.fullmatch(ROUTING_KEY_PATTERN, key)


# --- valid events -----------------------------------------------------------------------------------------------


def test_sample_record_becomes_the_documented_event() -> None:
    raw = sample()
    event = event_of(raw)
    assert event.message_id == DETAIL_NO
    assert event.routing_key == "chg_dns.execute_success"
    assert body_of(event) == {
        "specversion": "1.0",
        "id": DETAIL_NO,
        "source": SOURCE,
        "type": EVENT_TYPE,
        "subject": "example.com",
        "time": "2018-03-26T07:22:18Z",
        "datacontenttype": "application/json",
        "account": ACCOUNT,
        "data": raw,
    }
    # Compact UTF-8 JSON, CloudEvents attributes first, the account extension after them, data last and in the
    # upstream's key order.
    assert event.body.startswith(b'{"specversion":"1.0","id":"15fee9d10d514bada66bd08c5723c583","source":')
    assert list(body_of(event)) == [
        "specversion",
        "id",
        "source",
        "type",
        "subject",
        "time",
        "datacontenttype",
        "account",
        "data",
    ]
    assert b'"datacontenttype":"application/json","account":"reseller-eu","data":{' in event.body
    assert list(body_of(event)["data"]) == list(raw)
    assert event.timestamp == datetime(2018, 3, 26, 7, 22, 18, tzinfo=UTC)


def test_conversion_is_deterministic() -> None:
    first, second = event_of(sample()), event_of(sample())
    assert first == second
    assert first.message().body == second.message().body


def test_unknown_task_type_and_extra_fields_are_kept() -> None:
    raw = sample(
        TaskType="SOMETHING_NEW_2030",
        Extra={"nested": [1, 2.5, None, True]},
        Émoji="🙂",
        TaskResult=42,  # a number where the doc says string: not validated, kept as is
        BigNumber=2**70,
    )
    event = event_of(raw)
    data = body_of(event)["data"]
    assert data == raw
    assert list(data) == list(raw)
    assert event.routing_key == "something_new_2030.execute_success"
    assert "🙂".encode() in event.body  # ensure_ascii=False: UTF-8, not \\u escapes


@pytest.mark.parametrize(("status", "code"), list(TASK_STATUS_CODES.items()))
def test_every_status_with_its_code_is_valid(status: str, code: int) -> None:
    event = event_of(sample(TaskStatus=status, TaskStatusCode=code))
    assert event.routing_key == f"chg_dns.{status.lower()}"
    assert event.task_status == status


@pytest.mark.parametrize(
    "changes",
    [
        {"TaskStatusCode": ...},
        {"TaskStatusCode": None},
        {"TryCount": ...},
        {"TryCount": None},
        {"TryCount": 10**12},
        {"CreateTime": ...},
        {"CreateTime": None},
        {"TaskNo": ..., "InstanceId": ..., "ErrorMsg": ..., "TaskResult": ..., "TaskTypeDescription": ...},
        {"TaskResult": None, "ErrorMsg": None, "TaskNo": 7},
        {"TaskDetailNo": "  padded  "},
    ],
)
def test_optional_fields_may_be_missing_or_null(changes: dict[str, Any]) -> None:
    raw = sample(**changes)
    assert body_of(event_of(raw))["data"] == raw


@pytest.mark.parametrize("domain_name", [..., None, ""])
def test_no_subject_and_no_header_without_a_domain_name(domain_name: Any) -> None:
    event = event_of(sample(DomainName=domain_name))
    assert "subject" not in body_of(event)
    assert event.domain_name is None
    assert "domain_name" not in event.message().headers


@pytest.mark.parametrize("update_time", [..., None])
def test_no_time_without_update_time_and_timestamp_is_conversion_time(update_time: Any) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    event = event_of(sample(UpdateTime=update_time))
    after = datetime.now(UTC)
    assert "time" not in body_of(event)
    assert before <= event.timestamp <= after
    assert event.timestamp.tzinfo is UTC


@pytest.mark.parametrize(
    ("update_time", "expected"),
    [
        ("2018-03-26 15:22:18", "2018-03-26T07:22:18Z"),
        ("2018-03-26 08:00:00", "2018-03-26T00:00:00Z"),
        ("2018-03-27 07:59:59", "2018-03-26T23:59:59Z"),  # across midnight
        ("2019-01-01 00:00:00", "2018-12-31T16:00:00Z"),  # across the year boundary
        ("2020-03-01 03:00:00", "2020-02-29T19:00:00Z"),  # back into a leap day
        ("2021-03-01 07:30:00", "2021-02-28T23:30:00Z"),
        ("1970-01-01 08:00:00", "1970-01-01T00:00:00Z"),
        ("9999-12-31 23:59:59", "9999-12-31T15:59:59Z"),
    ],
)
def test_update_time_is_converted_from_utc8_to_utc(update_time: str, expected: str) -> None:
    event = event_of(sample(UpdateTime=update_time))
    assert body_of(event)["time"] == expected
    assert event.timestamp == datetime.fromisoformat(expected.replace("Z", "+00:00"))
    assert event.message().timestamp == event.timestamp


@pytest.mark.parametrize(
    ("update_time", "expected"),
    [("1969-12-31 10:00:00", "1969-12-31T02:00:00Z"), ("0001-01-01 08:00:00", "0001-01-01T00:00:00Z")],
)
def test_update_time_before_1970_keeps_time_but_amqp_timestamp_is_conversion_time(
    update_time: str, expected: str
) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    event = event_of(sample(UpdateTime=update_time))
    assert body_of(event)["time"] == expected
    assert event.timestamp >= before  # AMQP timestamps are unsigned seconds since 1970
    assert_amqp_encodable(event.message())


@pytest.mark.parametrize("spelling", ["Taskstatuscode", "taskStatusCode", "TASKSTATUSCODE"])
def test_task_status_code_spelling_is_looked_up_ignoring_case(spelling: str) -> None:
    raw = sample(TaskStatusCode=...)
    raw[spelling] = 2
    assert body_of(event_of(raw))["data"][spelling] == 2
    raw[spelling] = 3
    assert invalid_of(raw).error == (f"{spelling}: 3 does not agree with TaskStatus 'EXECUTE_SUCCESS' (expects 2)")


def test_other_field_names_are_looked_up_ignoring_case_too() -> None:
    raw = sample(TaskType=..., TaskStatus=..., UpdateTime=...)
    raw.update(tasktype="chg_holder", TASKSTATUS="EXECUTE_FAILURE", updatetime="2018-01-01 00:00:00")
    raw["TaskStatusCode"] = 3
    event = event_of(raw)
    assert event.routing_key == "chg_holder.execute_failure"
    assert body_of(event)["time"] == "2017-12-31T16:00:00Z"
    assert invalid_of(dict(raw, TASKSTATUS="DONE")).error.startswith("TASKSTATUS: 'DONE' is not one of")


def test_exact_spelling_wins_over_a_case_variant() -> None:
    raw = sample(taskstatuscode="garbage", tasktype=5)
    assert body_of(event_of(raw))["data"]["taskstatuscode"] == "garbage"


def test_only_ascii_case_variants_match() -> None:
    raw = sample(TaskType=...)
    raw["Tas\u212aType"] = "CHG_DNS"  # Kelvin sign: lower() would make it "tasktype"
    assert invalid_of(raw).error == "TaskType: required, missing"


# --- invalid records ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"TaskDetailNo": ...}, "TaskDetailNo: required, missing"),
        ({"TaskDetailNo": ""}, "TaskDetailNo: '' is not a non-empty string"),
        ({"TaskDetailNo": 123}, "TaskDetailNo: 123 is not a non-empty string"),
        ({"TaskType": ...}, "TaskType: required, missing"),
        ({"TaskType": ""}, "TaskType: '' is not a non-empty string"),
        ({"TaskType": None}, "TaskType: null is not a non-empty string"),
        ({"TaskType": 5}, "TaskType: 5 is not a non-empty string"),
        ({"TaskType": ["CHG_DNS"]}, 'TaskType: ["CHG_DNS"] is not a non-empty string'),
        ({"TaskStatus": ...}, "TaskStatus: required, missing"),
        ({"TaskStatus": None, "TaskStatusCode": ...}, "TaskStatus: null is not a non-empty string"),
        ({"TaskStatus": 2, "TaskStatusCode": ...}, "TaskStatus: 2 is not a non-empty string"),
        ({"TaskStatus": "DONE"}, f"TaskStatus: 'DONE' is not one of {STATUSES}"),
        ({"TaskStatus": "execute_success"}, f"TaskStatus: 'execute_success' is not one of {STATUSES}"),
        ({"TaskStatus": "EXECUTE_SUCCESS "}, f"TaskStatus: 'EXECUTE_SUCCESS ' is not one of {STATUSES}"),
        (
            {"TaskStatusCode": 3},
            "TaskStatusCode: 3 does not agree with TaskStatus 'EXECUTE_SUCCESS' (expects 2)",
        ),
        (
            {"TaskStatus": "WAITING_EXECUTE", "TaskStatusCode": 1},
            "TaskStatusCode: 1 does not agree with TaskStatus 'WAITING_EXECUTE' (expects 0)",
        ),
        ({"TaskStatusCode": 4}, "TaskStatusCode: 4 is not an integer 0-3"),
        ({"TaskStatusCode": -1}, "TaskStatusCode: -1 is not an integer 0-3"),
        ({"TaskStatusCode": True}, "TaskStatusCode: true is not an integer 0-3"),
        ({"TaskStatusCode": "2"}, "TaskStatusCode: '2' is not an integer 0-3"),
        ({"TaskStatusCode": 2.0}, "TaskStatusCode: 2.0 is not an integer 0-3"),
        ({"TryCount": -1}, "TryCount: -1 is not a non-negative integer"),
        ({"TryCount": False}, "TryCount: false is not a non-negative integer"),
        ({"TryCount": "0"}, "TryCount: '0' is not a non-negative integer"),
        ({"TryCount": 1.5}, "TryCount: 1.5 is not a non-negative integer"),
        ({"TryCount": {}}, "TryCount: {} is not a non-negative integer"),
        ({"CreateTime": "2018-03-26T15:08:20"}, "CreateTime: '2018-03-26T15:08:20' does not match yyyy-MM-dd HH:mm:ss"),
        ({"CreateTime": "2018-3-26 15:08:20"}, "CreateTime: '2018-3-26 15:08:20' does not match yyyy-MM-dd HH:mm:ss"),
        ({"CreateTime": "2018-03-26"}, "CreateTime: '2018-03-26' does not match yyyy-MM-dd HH:mm:ss"),
        (
            {"CreateTime": "2018-03-26 15:08:20\n"},
            "CreateTime: '2018-03-26 15:08:20\\n' does not match yyyy-MM-dd HH:mm:ss",
        ),
        (  # full-width digits
            {"CreateTime": "\uff12\uff10\uff11\uff18-03-26 15:08:20"},
            "CreateTime: '\uff12\uff10\uff11\uff18-03-26 15:08:20' does not match yyyy-MM-dd HH:mm:ss",
        ),
        ({"CreateTime": 1522048100000}, "CreateTime: 1522048100000 does not match yyyy-MM-dd HH:mm:ss"),
        ({"CreateTime": "2018-02-30 10:00:00"}, "CreateTime: '2018-02-30 10:00:00' is not a real date-time"),
        ({"UpdateTime": "2019-02-29 10:00:00"}, "UpdateTime: '2019-02-29 10:00:00' is not a real date-time"),
        ({"UpdateTime": "2018-03-26 24:00:00"}, "UpdateTime: '2018-03-26 24:00:00' is not a real date-time"),
        ({"UpdateTime": "2018-03-26 23:59:60"}, "UpdateTime: '2018-03-26 23:59:60' is not a real date-time"),
        ({"UpdateTime": "2018-13-01 00:00:00"}, "UpdateTime: '2018-13-01 00:00:00' is not a real date-time"),
        ({"UpdateTime": "0001-01-01 07:59:59"}, "UpdateTime: '0001-01-01 07:59:59' is before year 1 in UTC"),
        ({"UpdateTime": ""}, "UpdateTime: '' does not match yyyy-MM-dd HH:mm:ss"),
        ({"DomainName": 5}, "DomainName: 5 is not a string"),
        ({"DomainName": {"a": 1}}, 'DomainName: {"a":1} is not a string'),
    ],
)
def test_validation_rules_name_field_and_value(changes: dict[str, Any], error: str) -> None:
    raw = sample(**changes)
    invalid = invalid_of(raw)
    assert invalid.error == error
    assert "\n" not in invalid.error
    assert json.loads(invalid.body) == raw


def test_several_problems_are_joined_in_one_line() -> None:
    invalid = invalid_of(sample(TaskType="", TaskStatusCode=9, TryCount=-2, UpdateTime="yesterday"))
    assert invalid.error == (
        "TaskType: '' is not a non-empty string; TaskStatusCode: 9 is not an integer 0-3; "
        "TryCount: -2 is not a non-negative integer; UpdateTime: 'yesterday' does not match yyyy-MM-dd HH:mm:ss"
    )


def test_long_values_are_cut_in_error_messages() -> None:
    invalid = invalid_of(sample(TaskStatus="X" * 5000))
    assert invalid.error == f"TaskStatus: '{'X' * 78}… is not one of {STATUSES}"


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ([1, 2], "[1,2]"),
        ("CHG_DNS", "'CHG_DNS'"),
        (42, "42"),
        (None, "null"),
        (True, "true"),
        ([{"TaskDetailNo": DETAIL_NO}], f'[{{"TaskDetailNo":"{DETAIL_NO}"}}]'),
    ],
)
def test_a_record_that_is_not_an_object_is_invalid(raw: Any, shown: str) -> None:
    invalid = invalid_of(raw)
    assert invalid.error == f"TaskDetail: {shown} is not a JSON object"
    assert json.loads(invalid.body) == raw
    assert invalid.message_id == DETAIL_NO
    assert invalid.routing_key == "unknown.unknown"


def test_invalid_record_message_properties() -> None:
    raw = sample(TaskStatusCode=3, Extra="ü")
    before = datetime.now(UTC).replace(microsecond=0)
    invalid = invalid_of(raw)
    message = invalid.message()
    assert message.delivery_mode is aio_pika.DeliveryMode.PERSISTENT
    assert message.message_id == DETAIL_NO
    assert message.content_type == INVALID_CONTENT_TYPE == "application/json"
    assert message.app_id == APP_ID
    assert message.timestamp is not None and before <= message.timestamp <= datetime.now(UTC)
    assert message.headers == {
        VALIDATION_ERROR_HEADER: "TaskStatusCode: 3 does not agree with TaskStatus 'EXECUTE_SUCCESS' (expects 2)",
        "account": ACCOUNT,
    }
    assert message.body == invalid.body == json.dumps(raw, ensure_ascii=False, separators=(",", ":")).encode()
    assert invalid.routing_key == "chg_dns.execute_success"  # best effort, informative only
    assert_amqp_encodable(message)


def test_validation_error_header_is_capped() -> None:
    long = "é" * 300
    invalid = invalid_of(
        {
            "TaskDetailNo": "x" * 300,
            "TaskType": [long],
            "TaskStatus": long,
            "TaskStatusCode": long,
            "TryCount": long,
            "CreateTime": long,
            "UpdateTime": long,
            "DomainName": [long],
        },
        detail_no="x" * 300,
    )
    assert len(invalid.error) > MAX_HEADER_CHARS
    header = invalid.message().headers[VALIDATION_ERROR_HEADER]
    assert isinstance(header, str)
    assert len(header) == MAX_HEADER_CHARS
    assert header.endswith("…")
    assert invalid.error.startswith(header[:-1])
    assert_amqp_encodable(invalid.message())


def test_detail_no_too_long_for_amqp_is_invalid_with_a_stable_hashed_id() -> None:
    long_no = "ü" * 200  # 400 bytes of UTF-8
    first = invalid_of(sample(TaskDetailNo=long_no), detail_no=long_no)
    second = invalid_of(sample(TaskDetailNo=long_no), detail_no=long_no)
    assert first.error.startswith("TaskDetailNo: 'üüü")
    assert first.error.endswith("is longer than 255 bytes (AMQP message_id)")
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", first.message_id)
    assert first.message_id == second.message_id
    assert_amqp_encodable(first.message())


def test_record_without_usable_detail_no_is_invalid_with_a_stable_hashed_id() -> None:
    raw = sample(TaskDetailNo="   ")
    first, second = invalid_of(raw, detail_no=None), invalid_of(raw, detail_no=None)
    assert first.error == "TaskDetailNo: '   ' is not usable as an id"
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", first.message_id)
    assert first.message_id == second.message_id
    assert invalid_of(sample(TaskDetailNo="  "), detail_no=None).message_id != first.message_id


def strict_json(body: bytes) -> Any:
    """The body parsed as strict JSON: NaN and Infinity are not JSON."""

    def refuse(constant: str) -> Any:
        raise AssertionError(f"{constant} in a body")

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))  # bodies of records nested a few thousand levels deep
    try:
        return json.loads(body.decode("utf-8"), parse_constant=refuse)
    finally:
        sys.setrecursionlimit(limit)


@pytest.mark.parametrize(
    ("changes", "error", "kept"),
    [
        ({"Extra": float("nan")}, "Extra: NaN is not a finite number, which JSON cannot carry", {"Extra": "NaN"}),
        (
            {"TaskResult": float("-inf")},
            "TaskResult: -Infinity is not a finite number, which JSON cannot carry",
            {"TaskResult": "-Infinity"},
        ),
        (
            {"Extra": {"nested": [1, float("inf")]}},
            "Extra.nested[1]: Infinity is not a finite number, which JSON cannot carry",
            {"Extra": {"nested": [1, "Infinity"]}},
        ),
        (  # a value of a validated field: its own check says so first
            {"TryCount": float("nan")},
            "TryCount: nan is not a non-negative integer; "
            "TryCount: NaN is not a finite number, which JSON cannot carry",
            {"TryCount": "NaN"},
        ),
    ],
)
def test_non_finite_numbers_make_an_invalid_record_kept_as_strict_json(
    changes: dict[str, Any], error: str, kept: dict[str, Any]
) -> None:
    raw = sample(**changes)
    invalid = invalid_of(raw)
    assert invalid.error == error
    assert strict_json(invalid.body) == dict(raw, **kept)
    assert invalid.message_id == DETAIL_NO
    assert_amqp_encodable(invalid.message())


def test_a_non_finite_number_beside_validation_problems_is_named_last() -> None:
    invalid = invalid_of(sample(TaskStatusCode=3, Extra=float("inf")))
    assert invalid.error == (
        "TaskStatusCode: 3 does not agree with TaskStatus 'EXECUTE_SUCCESS' (expects 2); "
        "Extra: Infinity is not a finite number, which JSON cannot carry"
    )
    assert strict_json(invalid.body)["Extra"] == "Infinity"


# --- records the upstream parser could not fully represent, and values JSON cannot carry -------------------------

HUGE = 10**5000 + 7  # beyond Python's 4,300-digit limit for int <-> str


def test_the_parsers_problem_makes_an_invalid_record_that_keeps_the_record() -> None:
    problem = "Amount: '1234567890…' (5000 digits) is a number too long to represent"
    raw = sample(Amount="1" * 5000)  # the parser kept the number as its text
    invalid = convert(RawRecord(raw, DETAIL_NO, problem=problem), source=SOURCE, account=ACCOUNT)
    assert isinstance(invalid, InvalidRecord)
    assert invalid.error == problem
    assert strict_json(invalid.body) == raw
    assert invalid.message_id == DETAIL_NO
    assert invalid.routing_key == "chg_dns.execute_success"
    assert invalid.message().headers == {VALIDATION_ERROR_HEADER: problem, "account": ACCOUNT}


def test_the_parsers_problem_comes_first_then_the_validation_problems() -> None:
    raw = sample(TaskStatus="DONE", Amount=HUGE)
    invalid = convert(
        RawRecord(raw, DETAIL_NO, problem="Amount: 1000… is too long\nto represent"), source=SOURCE, account=ACCOUNT
    )
    assert isinstance(invalid, InvalidRecord)
    # One line, and the value the parser named is not named twice.
    assert invalid.error == f"Amount: 1000… is too long to represent; TaskStatus: 'DONE' is not one of {STATUSES}"
    assert strict_json(invalid.body)["Amount"] == str(decimal.Decimal(HUGE))


def test_an_empty_problem_from_the_parser_still_says_why() -> None:
    invalid = convert(RawRecord(sample(), DETAIL_NO, problem=""), source=SOURCE, account=ACCOUNT)
    assert isinstance(invalid, InvalidRecord)
    assert invalid.error == "TaskDetail: holds a value the upstream parser could not represent"
    assert json.loads(invalid.body) == sample()


def test_an_integer_too_long_to_represent_is_invalid_and_kept_as_its_digits() -> None:
    raw = sample(Amount=HUGE, Nested={"list": [-HUGE]})
    invalid = invalid_of(raw)
    digits = str(decimal.Decimal(HUGE))
    assert invalid.error == f"Amount: {digits[:79]}… (5001 digits) is too long to represent"
    body = strict_json(invalid.body)
    assert body["Amount"] == digits
    assert body["Nested"] == {"list": ["-" + digits]}
    assert {key: value for key, value in body.items() if key not in ("Amount", "Nested")} == sample()


@pytest.mark.parametrize("field", ["TaskType", "TaskStatus", "TaskStatusCode", "TryCount", "UpdateTime", "DomainName"])
def test_an_integer_too_long_to_represent_in_a_validated_field(field: str) -> None:
    invalid = invalid_of(sample(**{field: HUGE}))
    assert invalid.error.startswith(f"{field}: 1000000")
    assert "\n" not in invalid.error
    assert strict_json(invalid.body)[field] == str(decimal.Decimal(HUGE))
    assert re.fullmatch(r"[a-z0-9_.-]{3,255}", invalid.routing_key)
    assert_amqp_encodable(invalid.message())


def nested(depth: int, leaf: Any = "x") -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("depth", [sys.getrecursionlimit(), 100_000])
def test_a_record_nested_too_deep_to_encode_is_invalid_and_kept(depth: int) -> None:
    raw = sample(Extra=nested(depth))
    invalid = invalid_of(raw)
    assert invalid.error == f"Extra: nested {depth} levels deep, too deep to encode as JSON"
    assert invalid.body.endswith(b',"Extra":' + b"[" * depth + b'"x"' + b"]" * depth + b"}")
    assert invalid.body.startswith(encode(sample())[:-1])
    assert invalid.message_id == DETAIL_NO


def test_a_validated_field_nested_too_deep_is_invalid_and_kept() -> None:
    raw = sample(TaskType=nested(100_000), DomainName=nested(100_000, leaf=5))
    invalid = invalid_of(raw)
    assert invalid.error.startswith("TaskType: [[[[")
    assert "is not a non-empty string; DomainName: [[[[" in invalid.error
    assert invalid.routing_key == "unknown.execute_success"
    assert invalid.body.count(b"[") == 200_000
    assert_amqp_encodable(invalid.message())


@pytest.mark.parametrize(
    ("value", "error", "kept"),
    [
        (decimal.Decimal("1.5"), "Extra: 1.5 (Decimal) is not a JSON value", "1.5"),
        ({("a", 1): "b"}, "Extra: key ('a', 1) is not a string", {"('a', 1)": "b"}),
        ([b"\xff"], "Extra[0]: b'\\xff' (bytes) is not a JSON value", ["b'\\xff'"]),
    ],
)
def test_a_value_the_encoder_rejects_is_invalid_and_kept_as_text(value: Any, error: str, kept: Any) -> None:
    raw = sample(Extra=value)
    invalid = invalid_of(raw)
    assert invalid.error == error
    assert strict_json(invalid.body)["Extra"] == kept


def test_a_value_the_encoder_rejects_in_a_record_that_is_not_an_object() -> None:
    invalid = invalid_of([decimal.Decimal("2"), float("nan")], detail_no=None)
    assert invalid.error == (
        'TaskDetail: ["2","NaN"] is not a JSON object; TaskDetail[0]: 2 (Decimal) is not a JSON value'
    )
    assert strict_json(invalid.body) == ["2", "NaN"]
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", invalid.message_id)


def test_a_failure_inside_the_conversion_still_gives_an_invalid_record() -> None:
    class Hostile(dict[str, Any]):
        def get(self, key: Any, default: Any = None) -> Any:
            raise RuntimeError("boom\nagain")

    raw = Hostile(sample())
    invalid = invalid_of(raw)
    assert invalid.error == "TaskDetail: could not be converted (RuntimeError: boom again)"
    assert json.loads(invalid.body) == sample()


def test_lone_surrogates_give_valid_utf8_json_and_headers() -> None:
    raw = sample(TaskType="CHG_\ud800", DomainName="bad\udfff.com")
    event = event_of(raw)
    event.body.decode("utf-8")  # strict: raises on invalid UTF-8
    assert body_of(event)["data"] == raw  # the \\u escape brings the same value back
    assert event.routing_key == "chg__.execute_success"
    message = event.message()
    assert message.headers["task_type"] == "CHG_\\ud800"
    assert_amqp_encodable(message)


# --- event messages -------------------------------------------------------------------------------------------


def test_event_message_properties() -> None:
    event = event_of(sample())
    message = event.message()
    assert message.body == event.body
    assert message.delivery_mode is aio_pika.DeliveryMode.PERSISTENT
    assert message.message_id == DETAIL_NO
    assert message.content_type == EVENT_CONTENT_TYPE == "application/cloudevents+json"
    assert message.type == EVENT_TYPE
    assert message.app_id == APP_ID
    assert message.timestamp == datetime(2018, 3, 26, 7, 22, 18, tzinfo=UTC)
    assert message.headers == {
        "task_type": "CHG_DNS",
        "task_status": "EXECUTE_SUCCESS",
        "domain_name": "example.com",
        "account": ACCOUNT,
    }
    assert all(isinstance(value, str) for value in message.headers.values())
    assert_amqp_encodable(message)


def test_each_message_call_builds_a_fresh_message() -> None:
    event = event_of(sample())
    first = event.message()
    first.lock()  # aio-pika locks a message once it is published
    second = event.message()
    assert second is not first and not second.locked
    second.headers["x"] = "y"
    assert "x" not in event.message().headers


def test_header_values_are_capped() -> None:
    long_type = "T" * 5000
    event = event_of(sample(TaskType=long_type, DomainName="d" * 1001))
    headers = event.message().headers
    assert headers["task_type"] == "T" * (MAX_HEADER_CHARS - 1) + "…"
    assert headers["domain_name"] == "d" * (MAX_HEADER_CHARS - 1) + "…"
    assert body_of(event)["data"]["TaskType"] == long_type  # only the header is cut
    assert event.routing_key == "t" * 127 + ".execute_success"
    assert_amqp_encodable(event.message())


ODD_VALUES: list[Any] = [..., None, "", "x", "\ud800", 0, 3, -1, True, 2.5, float("inf"), [], {}, "é" * 300]


def test_convert_never_raises_and_every_message_encodes() -> None:
    fields = ["TaskType", "TaskStatus", "TaskStatusCode", "UpdateTime", "DomainName"]
    kinds = {Event: 0, InvalidRecord: 0}
    for values in itertools.product(ODD_VALUES, repeat=2):
        for first, second in itertools.pairwise(fields):
            item = convert(
                RawRecord(sample(**{first: values[0], second: values[1]}), DETAIL_NO), source=SOURCE, account=ACCOUNT
            )
            kinds[type(item)] += 1
            assert_amqp_encodable(item.message())
            assert re.fullmatch(r"[a-z0-9_.-]{3,255}", item.routing_key)
    assert kinds[Event] > 0 and kinds[InvalidRecord] > 0


@pytest.mark.broker
async def test_messages_round_trip_through_rabbitmq(broker_url: str, exchange_name: str) -> None:
    """Header values, timestamps and ids survive a real broker as the contract says."""
    event = event_of(sample(TaskType="CHG_DNS", DomainName="例子.com"))
    invalid = invalid_of(sample(TaskStatusCode=0))
    connection = await aio_pika.connect(broker_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(exchange_name, aio_pika.ExchangeType.TOPIC, auto_delete=True)
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, routing_key="chg_dns.*")
        await exchange.publish(event.message(), routing_key=event.routing_key, mandatory=True, timeout=10)
        await exchange.publish(invalid.message(), routing_key=invalid.routing_key, mandatory=True, timeout=10)
        received = []
        async with asyncio.timeout(10):
            async with queue.iterator() as messages:
                async for message in messages:
                    await message.ack()
                    received.append(message)
                    if len(received) == 2:
                        break
    got_event, got_invalid = received
    assert got_event.routing_key == "chg_dns.execute_success"
    assert got_event.message_id == DETAIL_NO
    assert got_event.delivery_mode is aio_pika.DeliveryMode.PERSISTENT
    assert got_event.content_type == EVENT_CONTENT_TYPE and got_event.type == EVENT_TYPE
    assert got_event.app_id == APP_ID
    assert got_event.timestamp == datetime(2018, 3, 26, 7, 22, 18, tzinfo=UTC)
    assert got_event.headers == {
        "task_type": "CHG_DNS",
        "task_status": "EXECUTE_SUCCESS",
        "domain_name": "例子.com",
        "account": ACCOUNT,
    }
    assert got_event.body == event.body
    assert got_invalid.content_type == INVALID_CONTENT_TYPE
    assert got_invalid.headers[VALIDATION_ERROR_HEADER] == invalid.error
    assert got_invalid.headers["account"] == ACCOUNT
    assert got_invalid.timestamp is not None
    assert abs(got_invalid.timestamp - datetime.now(UTC)) < timedelta(minutes=1)
    assert got_invalid.body == invalid.body


def test_properties_are_exactly_what_the_message_would_send() -> None:
    # The publisher sends properties() directly; message() is what aio-pika users (and the contract) see.
    event = convert(RawRecord(sample(), DETAIL_NO), source=SOURCE, account=ACCOUNT)
    invalid = convert(RawRecord(sample(TaskStatusCode=3), DETAIL_NO), source=SOURCE, account=ACCOUNT)
    assert isinstance(event, Event)
    assert isinstance(invalid, InvalidRecord)
    for item in (event, invalid):
        assert item.properties() == item.message().properties


# --- the account ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("account", ["default", "reseller-eu", "0", "-", "a" * 40, "a-1-b"])
def test_the_account_is_an_attribute_of_every_event_and_a_header_of_every_message(account: str) -> None:
    event = convert(RawRecord(sample(), DETAIL_NO), source=SOURCE, account=account)
    invalid = convert(RawRecord(sample(TaskStatusCode=3), DETAIL_NO), source=SOURCE, account=account)
    assert isinstance(event, Event)
    assert isinstance(invalid, InvalidRecord)
    assert event.account == invalid.account == account
    assert body_of(event)["account"] == account
    assert event.message().headers["account"] == account
    assert invalid.message().headers["account"] == account
    assert json.loads(invalid.body) == sample(TaskStatusCode=3)  # the invalid body stays the record as received
    for item in (event, invalid):
        assert item.properties() == item.message().properties
        assert_amqp_encodable(item.message())


def test_the_account_changes_neither_the_routing_key_nor_the_message_id() -> None:
    eu = event_of(sample())
    us = convert(RawRecord(sample(), DETAIL_NO), source=SOURCE, account="reseller-us")
    assert isinstance(us, Event)
    assert (eu.message_id, eu.routing_key, eu.timestamp) == (us.message_id, us.routing_key, us.timestamp)
    assert eu.body.replace(b'"account":"reseller-eu"', b'"account":"reseller-us"') == us.body


def test_a_record_that_cannot_be_converted_keeps_its_account() -> None:
    class Hostile(dict[str, Any]):
        def get(self, key: Any, default: Any = None) -> Any:
            raise RuntimeError("boom")

    invalid = invalid_of(Hostile(sample()))
    assert invalid.error.startswith("TaskDetail: could not be converted")
    assert invalid.message().headers["account"] == ACCOUNT


@pytest.mark.parametrize("account", ["", "Default", "a_b", "a.b", "a b", "é", "a" * 41, "default\n"])
def test_an_account_outside_the_pattern_is_refused(account: str) -> None:
    assert re.fullmatch(ACCOUNT_PATTERN, account) is None
    with pytest.raises(ValueError, match=r"^account: "):
        convert(RawRecord(sample(), DETAIL_NO), source=SOURCE, account=account)


# --- the refactored converter gives what the old one gave (tests/events_reference.py) ---------------------------

_CHARS = st.characters(exclude_categories=())  # surrogates and control characters included
_TEXT = st.text(_CHARS, max_size=12) | st.sampled_from(["", " ", "\ud800", "é" * 300, 'a\x00\x1f"\\\u2028b'])
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)  # inside and beyond 64 bits
    | st.floats(allow_nan=False, allow_infinity=False)
    | _TEXT
)


def _containers_of(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3)


_JSON = st.recursive(_SCALARS, _containers_of, max_leaves=6)
_ACCOUNTS = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789-"), min_size=1, max_size=40)
_TIMES = st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59)).map(
    lambda moment: moment.strftime("%Y-%m-%d %H:%M:%S").rjust(19, "0")
)
_FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "TaskDetailNo": st.text(st.sampled_from("0123456789abcdef"), min_size=1, max_size=32) | _TEXT,
    "TaskType": st.sampled_from(["CHG_DNS", "ORDER_RENEW", "x.y z"]) | _TEXT,
    "TaskStatus": st.sampled_from(list(TASK_STATUS_CODES)) | _TEXT,
    "TaskStatusCode": st.integers(min_value=-1, max_value=4),
    "TryCount": st.integers(min_value=-2, max_value=10**12),
    "CreateTime": _TIMES | _TEXT,
    "UpdateTime": _TIMES | st.sampled_from(["1970-01-01 07:59:59", "0001-01-01 07:59:59", "2019-02-29 10:00:00"]),
    "DomainName": st.sampled_from(["example.com", "例子.中国", "bad\udfff.com"]) | _TEXT,
}


@st.composite
def _records(draw: st.DrawFn) -> RawRecord:
    if draw(st.integers(0, 19)) == 0:  # now and then not an object at all
        return RawRecord(draw(_JSON), draw(st.none() | _TEXT.filter(bool)))
    raw: dict[Any, Any] = {}
    for name, values in _FIELD_VALUES.items():
        kind = draw(st.sampled_from(["valid", "valid", "valid", "valid", "odd", "null", "missing"]))
        if kind == "missing":
            continue
        spelling = draw(st.sampled_from([name, name, name, name.lower(), name.upper()]))
        raw[spelling] = draw({"valid": values, "odd": _JSON, "null": st.none()}[kind])
    raw.update(draw(st.dictionaries(_TEXT, _JSON, max_size=4)))
    order = draw(st.permutations(list(raw)))
    raw = {key: raw[key] for key in order}
    value = next((raw[key] for key in raw if key.lower() == "taskdetailno"), None)
    usable = value if isinstance(value, str) and value else None
    # detail_no as the upstream client sets it: a non-empty string or None (sometimes not the field's value).
    return RawRecord(raw, draw(st.sampled_from([usable, usable, usable, None]) | _TEXT.filter(bool)))


def _properties(properties: pamqp.commands.Basic.Properties) -> dict[str, Any]:
    return {name: getattr(properties, name) for name in properties.__slots__}


def assert_same_conversion(new: Event | InvalidRecord, old: Event | InvalidRecord) -> None:
    assert type(new) is type(old)
    assert (new.message_id, new.routing_key, new.body) == (old.message_id, old.routing_key, old.body)
    if isinstance(new, InvalidRecord):
        assert isinstance(old, InvalidRecord)
        assert new.error == old.error
    new_properties, old_properties = _properties(new.properties()), _properties(events_reference.properties(old))
    if new_properties["timestamp"] != old_properties["timestamp"]:  # both the time of the conversion
        assert abs(new_properties["timestamp"] - old_properties["timestamp"]) <= timedelta(seconds=2)
        new_properties["timestamp"] = old_properties["timestamp"]
    assert new_properties == old_properties
    assert new.properties() == new.message().properties


@settings(max_examples=800, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=_records(), account=_ACCOUNTS)
def test_convert_gives_what_the_old_convert_gave(record: RawRecord, account: str) -> None:
    assert_same_conversion(
        convert(record, source=SOURCE, account=account),
        events_reference.convert(record, source=SOURCE, account=account),
    )


_FLAT_VALUES = (
    st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80) | st.text(_CHARS, max_size=40)
)


@settings(max_examples=800, deadline=None, database=None)
@given(data=st.dictionaries(st.text(_CHARS, max_size=12), _FLAT_VALUES, max_size=16), account=_ACCOUNTS)
def test_the_fast_encoder_writes_the_bytes_of_the_standard_one(data: dict[str, Any], account: str) -> None:
    """Records of strings, integers, booleans and nulls take orjson; its bytes are the standard encoder's."""
    envelope = {"specversion": "1.0", "id": "x", "account": account, "data": data}
    expected = events_reference._encode(envelope)
    assert encode(envelope, data) == expected
    record = RawRecord(dict(sample(), **data), DETAIL_NO)
    assert convert(record, source=SOURCE, account=account).body == (
        events_reference.convert(record, source=SOURCE, account=account).body
    )


def test_generated_details_convert_as_before() -> None:
    """The simulator's realistic details, the bench's page: every one an event, byte for byte as before."""
    generator = DetailGenerator(7)
    for _ in range(2000):
        detail = json.loads(json.dumps(generator.next(1_700_000_000.0)))
        record = RawRecord(detail, detail["TaskDetailNo"])
        new = convert(record, source=SOURCE, account=ACCOUNT)
        assert isinstance(new, Event)
        assert_same_conversion(new, events_reference.convert(record, source=SOURCE, account=ACCOUNT))


_UNCARRIABLE = [float("nan"), float("inf"), -float("inf"), HUGE, -HUGE, decimal.Decimal("1.5"), b"\xff"]


def _uncarriable(index: int) -> Any:
    """By index: hypothesis cannot repr() HUGE, so it must not appear in a strategy's description."""
    return _UNCARRIABLE[index]


_HOSTILE = st.recursive(
    _SCALARS
    | st.integers(0, len(_UNCARRIABLE) - 1).map(_uncarriable)
    | st.integers(min_value=1, max_value=2000).map(nested),
    _containers_of,
    max_leaves=6,
)


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=_records(), field=st.sampled_from([*_FIELD_VALUES, "Extra"]), value=_HOSTILE, problem=st.none() | _TEXT)
def test_convert_never_raises_and_keeps_every_record(record: RawRecord, field: str, value: Any, problem: Any) -> None:
    raw = dict(record.raw, **{field: value}) if isinstance(record.raw, dict) else value
    item = convert(RawRecord(raw, record.detail_no, problem=problem or None), source=SOURCE, account=ACCOUNT)
    assert_amqp_encodable(item.message())
    assert item.properties() == item.message().properties
    if isinstance(item, InvalidRecord):
        assert item.error and "\n" not in item.error and "\r" not in item.error
        if problem:
            assert item.error.startswith(" ".join(problem.splitlines()))
    strict_json(item.body)  # kept, as strict JSON, whatever it held
