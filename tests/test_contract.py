"""contract/ must not drift from the code: the event JSON Schema and the AsyncAPI document."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import aio_pika
import jsonschema
import pytest
import yaml

from bridge.events import (
    ACCOUNT_HEADER,
    ACCOUNT_PATTERN,
    APP_ID,
    EVENT_CONTENT_TYPE,
    EVENT_HEADERS,
    EVENT_TYPE,
    INVALID_CONTENT_TYPE,
    MAX_HEADER_CHARS,
    ROUTING_KEY_PATTERN,
    TASK_STATUS_CODES,
    VALIDATION_ERROR_HEADER,
    Event,
    InvalidRecord,
    convert,
)
from bridge.records import RawRecord
from bridge.schema import event_json_schema, main, schema_text
from bridge.settings import BrokerSettings
from bridge.topology import describe
from tests.samples import task_detail as detail

CONTRACT = Path(__file__).resolve().parents[1] / "contract"
SCHEMA_FILE = CONTRACT / "event.schema.json"
ASYNCAPI_FILE = CONTRACT / "asyncapi.yaml"
CONSUMERS_DOC = CONTRACT.parent / "docs" / "consumers.md"
# The defaults, not Settings(): the environment or a .env file must not change what the contract is checked against.
DEFAULT_EXCHANGE: str = BrokerSettings.model_fields["exchange"].default
DEFAULT_SOURCE: str = BrokerSettings.model_fields["event_source"].default
DEFAULT_ACCOUNT = "default"  # the account of a bridge that polls one, as the contract's examples show


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(
        event_json_schema(), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


@pytest.fixture(scope="module")
def asyncapi() -> dict[str, Any]:
    document = yaml.safe_load(ASYNCAPI_FILE.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


def resolve(document: dict[str, Any], ref: str) -> Any:
    """Follow a local ``#/a/b`` reference."""
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


# --- the JSON Schema --------------------------------------------------------------------------------------------


def test_schema_file_equals_the_code() -> None:
    assert json.loads(SCHEMA_FILE.read_text(encoding="utf-8")) == event_json_schema(), (
        "contract/event.schema.json drifted: run `python -m bridge.schema --write-contract`"
    )
    assert SCHEMA_FILE.read_text(encoding="utf-8") == schema_text()


def test_write_contract_regenerates_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--write-contract", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "event.schema.json").read_bytes() == SCHEMA_FILE.read_bytes()
    assert "event.schema.json" in capsys.readouterr().out
    assert main([]) == 0
    assert json.loads(capsys.readouterr().out) == event_json_schema()


def test_python_m_bridge_schema_writes_the_contract(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bridge.schema", "--write-contract", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "event.schema.json").read_bytes() == SCHEMA_FILE.read_bytes()


def test_schema_is_valid_2020_12() -> None:
    schema = event_json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["properties"]["type"] == {"const": EVENT_TYPE}
    assert schema["properties"]["data"]["properties"]["TaskStatus"] == {"enum": list(TASK_STATUS_CODES)}


def _varied_records() -> list[dict[str, Any]]:
    records = []
    statuses = list(TASK_STATUS_CODES.items())
    optional = [..., None]
    for (status, code), task_type, code_key, domain, update in itertools.product(
        statuses,
        ["CHG_DNS", "UNKNOWN_NEW_TYPE", "domain.ü", "\ud800"],
        ["TaskStatusCode", "Taskstatuscode", None],
        ["example.com", "例子.中国", "", *optional],
        ["2019-01-01 00:00:00", "1969-01-01 00:00:00", *optional],
    ):
        record = detail(TaskStatus=status, TaskType=task_type, DomainName=domain, UpdateTime=update)
        record.pop("TaskStatusCode")
        if code_key is not None:
            record[code_key] = code
        records.append(record)
    records += [
        detail(TryCount=None, CreateTime=None, TaskStatusCode=None, Extra={"a": [1, None]}),
        detail(TaskType=..., TaskStatus=..., tasktype="x", TASKSTATUS="EXECUTING", TaskStatusCode=1),
        detail(TaskNo=..., TaskResult=..., ErrorMsg=..., InstanceId=..., TaskTypeDescription=...),
        detail(taskstatuscode="ignored: the exact spelling wins"),
        detail(TaskDetailNo="ü" * 120),
    ]
    return records


def test_every_converted_event_validates_against_the_schema(validator: jsonschema.Draft202012Validator) -> None:
    events = 0
    for raw in _varied_records():
        item = convert(RawRecord(raw, raw.get("TaskDetailNo", "x")), source=DEFAULT_SOURCE, account=DEFAULT_ACCOUNT)
        assert isinstance(item, Event), (raw, getattr(item, "error", None))
        validator.validate(json.loads(item.body))
        events += 1
    assert events > 300


@pytest.mark.parametrize(
    "changes",
    [
        {"TaskType": ...},
        {"TaskDetailNo": ""},
        {"TaskStatus": "DONE"},
        {"TaskStatus": None},
        {"TaskStatusCode": 3},
        {"TaskStatusCode": True},
        {"TaskStatusCode": "2"},
        {"TaskStatusCode": 7},
        {"TryCount": -1},
        {"TryCount": 1.5},
        {"CreateTime": "2018-03-26T15:08:20"},
        {"UpdateTime": 1522048938000},
        {"DomainName": 5},
    ],
)
def test_schema_rejects_what_the_validator_rejects(
    validator: jsonschema.Draft202012Validator, changes: dict[str, Any]
) -> None:
    """Downstream teams can rely on the schema: a record the bridge refuses does not pass it either."""
    raw = detail(**changes)
    assert isinstance(convert(RawRecord(raw, "x"), source=DEFAULT_SOURCE, account=DEFAULT_ACCOUNT), InvalidRecord)
    body = json.loads(convert(RawRecord(detail(), "x"), source=DEFAULT_SOURCE, account=DEFAULT_ACCOUNT).body)
    body["data"] = raw
    assert not validator.is_valid(body)


@pytest.mark.parametrize(
    "changes",
    [
        {"specversion": "0.3"},
        {"type": "com.example.other"},
        {"time": "2018-03-26 07:22:18"},
        {"id": ""},
        {"subject": ""},
        {"datacontenttype": "text/plain"},
        {"data": [1]},
        {"account": ""},
        {"account": "Reseller_EU"},
        {"account": "a" * 41},
        {"account": 7},
    ],
)
def test_schema_rejects_a_wrong_envelope(validator: jsonschema.Draft202012Validator, changes: dict[str, Any]) -> None:
    body = json.loads(convert(RawRecord(detail(), "x"), source=DEFAULT_SOURCE, account=DEFAULT_ACCOUNT).body)
    assert validator.is_valid(body)
    body.update(changes)
    assert not validator.is_valid(body)


def test_schema_checks_the_account_and_accepts_events_from_before_it(
    validator: jsonschema.Draft202012Validator,
) -> None:
    body = json.loads(convert(RawRecord(detail(), "x"), source=DEFAULT_SOURCE, account="reseller-eu").body)
    assert validator.is_valid(body)
    assert event_json_schema()["properties"]["account"]["pattern"] == ACCOUNT_PATTERN
    assert not validator.is_valid({**body, "account": "Reseller EU"})
    del body["account"]
    assert validator.is_valid(body), "an event published before the account attribute is still valid"


# --- the AsyncAPI document --------------------------------------------------------------------------------------


def test_asyncapi_exchanges_match_the_topology(asyncapi: dict[str, Any]) -> None:
    topology = describe(DEFAULT_EXCHANGE)
    exchanges = {spec["name"]: spec for spec in topology["exchanges"]}
    events, unrouted, invalid = DEFAULT_EXCHANGE, f"{DEFAULT_EXCHANGE}.unrouted", f"{DEFAULT_EXCHANGE}.invalid"
    assert set(exchanges) == {events, unrouted, invalid}
    channels = asyncapi["channels"]

    main = channels["taskEvents"]["bindings"]["amqp"]
    assert main["is"] == "routingKey"
    assert main["exchange"]["name"] == events
    assert main["exchange"]["type"] == exchanges[events]["type"] == "topic"
    assert main["exchange"]["durable"] is exchanges[events]["durable"] is True
    assert main["exchange"]["autoDelete"] is exchanges[events]["auto_delete"]
    assert main["exchange"]["vhost"] == exchanges[events]["vhost"]
    assert channels["taskEvents"]["x-exchange-arguments"] == exchanges[events]["arguments"]
    assert exchanges[events]["arguments"] == {"alternate-exchange": unrouted}

    side = channels["invalidRecords"]["bindings"]["amqp"]
    assert side["exchange"]["name"] == invalid
    assert side["exchange"]["type"] == exchanges[invalid]["type"] == "fanout"
    assert side["exchange"]["durable"] is True
    queues = {spec["name"] for spec in topology["queues"]}
    assert channels["invalidRecords"]["x-queue"] in queues

    assert channels["unroutedEvents"]["x-exchange"] == {
        "name": unrouted,
        "type": exchanges[unrouted]["type"],
        "durable": exchanges[unrouted]["durable"],
    }
    unrouted_queue = channels["unroutedEvents"]["bindings"]["amqp"]["queue"]
    assert channels["unroutedEvents"]["address"] == unrouted_queue["name"] == unrouted
    assert unrouted_queue["name"] in queues and unrouted_queue["durable"] is True
    bound = {(b["source"], b["destination"]) for b in topology["bindings"]}
    assert (unrouted, unrouted) in bound and (invalid, channels["invalidRecords"]["x-queue"]) in bound


def test_asyncapi_routing_keys_match_the_code(asyncapi: dict[str, Any]) -> None:
    channel = asyncapi["channels"]["taskEvents"]
    assert channel["address"] == "{task_type}.{task_status}"
    assert channel["x-routing-key-pattern"] == ROUTING_KEY_PATTERN
    assert set(channel["parameters"]) == {"task_type", "task_status"}
    assert channel["parameters"]["task_status"]["enum"] == [s.lower() for s in TASK_STATUS_CODES]
    for example in channel["parameters"]["task_type"]["examples"]:
        assert re.fullmatch(r"[a-z0-9_-]+", example)


def test_asyncapi_event_message_matches_the_code(asyncapi: dict[str, Any]) -> None:
    assert asyncapi["asyncapi"].startswith("3.")
    assert asyncapi["defaultContentType"] == EVENT_CONTENT_TYPE
    message = resolve(asyncapi, asyncapi["channels"]["taskEvents"]["messages"]["taskFinished"]["$ref"])
    assert message["contentType"] == EVENT_CONTENT_TYPE
    assert message["bindings"]["amqp"]["messageType"] == EVENT_TYPE
    assert message["x-amqp-properties"]["delivery_mode"] == aio_pika.DeliveryMode.PERSISTENT.value
    assert message["x-amqp-properties"]["content_type"] == EVENT_CONTENT_TYPE
    assert message["x-amqp-properties"]["type"] == EVENT_TYPE
    assert message["x-amqp-properties"]["app_id"] == APP_ID
    headers = message["headers"]
    assert tuple(headers["properties"]) == EVENT_HEADERS
    assert headers["properties"]["task_status"]["enum"] == list(TASK_STATUS_CODES)
    assert headers["properties"]["task_type"]["maxLength"] == MAX_HEADER_CHARS
    assert headers["properties"]["domain_name"]["maxLength"] == MAX_HEADER_CHARS
    assert headers["properties"][ACCOUNT_HEADER]["pattern"] == ACCOUNT_PATTERN
    assert set(headers["required"]) == {"task_type", "task_status", ACCOUNT_HEADER}


def test_asyncapi_payload_is_the_schema_file(asyncapi: dict[str, Any]) -> None:
    payload = asyncapi["components"]["messages"]["taskFinished"]["payload"]
    assert payload["schemaFormat"] == "application/schema+json;version=draft-2020-12"
    target = (ASYNCAPI_FILE.parent / payload["schema"]["$ref"]).resolve()
    assert target == SCHEMA_FILE.resolve()
    assert json.loads(target.read_text(encoding="utf-8")) == event_json_schema()


def test_asyncapi_examples_are_what_the_code_builds(
    asyncapi: dict[str, Any], validator: jsonschema.Draft202012Validator
) -> None:
    (example,) = asyncapi["components"]["messages"]["taskFinished"]["examples"]
    event = convert(
        RawRecord(example["payload"]["data"], example["payload"]["id"]), source=DEFAULT_SOURCE, account=DEFAULT_ACCOUNT
    )
    assert isinstance(event, Event)
    assert json.loads(event.body) == example["payload"]
    assert event.message().headers == example["headers"]
    validator.validate(example["payload"])

    (bad,) = asyncapi["components"]["messages"]["invalidRecord"]["examples"]
    invalid = convert(
        RawRecord(bad["payload"], bad["payload"]["TaskDetailNo"]), source=DEFAULT_SOURCE, account=DEFAULT_ACCOUNT
    )
    assert isinstance(invalid, InvalidRecord)
    assert invalid.message().headers == bad["headers"]


def test_asyncapi_invalid_message_matches_the_code(asyncapi: dict[str, Any]) -> None:
    message = resolve(asyncapi, asyncapi["channels"]["invalidRecords"]["messages"]["invalidRecord"]["$ref"])
    assert message["contentType"] == INVALID_CONTENT_TYPE
    assert message["x-amqp-properties"]["content_type"] == INVALID_CONTENT_TYPE
    assert message["x-amqp-properties"]["app_id"] == APP_ID
    assert message["x-amqp-properties"]["delivery_mode"] == aio_pika.DeliveryMode.PERSISTENT.value
    assert list(message["headers"]["properties"]) == [VALIDATION_ERROR_HEADER, ACCOUNT_HEADER]
    assert message["headers"]["required"] == [VALIDATION_ERROR_HEADER, ACCOUNT_HEADER]
    assert message["headers"]["properties"][ACCOUNT_HEADER]["pattern"] == ACCOUNT_PATTERN
    assert message["headers"]["properties"][VALIDATION_ERROR_HEADER]["maxLength"] == MAX_HEADER_CHARS


def test_asyncapi_operations_publish_persistent_mandatory(asyncapi: dict[str, Any]) -> None:
    operations = asyncapi["operations"]
    assert {op["channel"]["$ref"] for op in operations.values()} == {
        "#/channels/taskEvents",
        "#/channels/invalidRecords",
    }
    for operation in operations.values():
        assert operation["action"] == "send"
        binding = operation["bindings"]["amqp"]
        assert binding["deliveryMode"] == aio_pika.DeliveryMode.PERSISTENT.value
        assert binding["mandatory"] is True and binding["timestamp"] is True


def test_asyncapi_local_refs_resolve(asyncapi: dict[str, Any]) -> None:
    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref" and isinstance(value, str) and value.startswith("#/"):
                    refs.append(value)
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(asyncapi)
    assert len(refs) >= 6
    for ref in refs:
        assert resolve(asyncapi, ref) is not None


# --- docs/consumers.md ------------------------------------------------------------------------------------------


def test_the_consumer_docs_show_the_event_the_code_builds(validator: jsonschema.Draft202012Validator) -> None:
    text = CONSUMERS_DOC.read_text(encoding="utf-8")
    example = json.loads(text.split("```json\n", 1)[1].split("```", 1)[0])
    event = convert(RawRecord(example["data"], example["id"]), source=DEFAULT_SOURCE, account=DEFAULT_ACCOUNT)
    assert isinstance(event, Event)
    assert json.loads(event.body) == example
    validator.validate(example)
    # The attribute table names the body's attributes in the body's order, and the header table every header.
    assert _first_column(text, "| attribute | value |") == list(json.loads(event.body))
    headers = _first_column(text, "| header | value | on |")
    assert headers[: len(EVENT_HEADERS)] == list(EVENT_HEADERS)
    assert headers[len(EVENT_HEADERS) :] == [VALIDATION_ERROR_HEADER]


def _first_column(text: str, heading: str) -> list[str]:
    """The names in the first column of the Markdown table under ``heading``, in order."""
    table = text.split(heading + "\n", 1)[1].split("\n\n", 1)[0]
    return [row.split("`")[1] for row in table.splitlines()[1:]]
