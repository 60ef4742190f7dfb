"""The JSON Schema of an event body, built from the event contract's constants, and the CLI that writes it.

Run ``python -m bridge.schema --write-contract [DIR]`` to regenerate ``DIR/event.schema.json`` (default
``contract``) from :func:`event_json_schema`; without arguments it prints the schema. tests/test_contract.py
fails when ``contract/event.schema.json`` drifts from the code.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bridge.events import (
    ACCOUNT_HEADER,
    ACCOUNT_PATTERN,
    APP_ID,
    DATA_CONTENT_TYPE,
    EVENT_CONTENT_TYPE,
    EVENT_TYPE,
    RFC3339_UTC_PATTERN,
    SPECVERSION,
    TASK_STATUS_CODES,
    UPSTREAM_TIME_PATTERN,
)

__all__ = ["event_json_schema", "main", "schema_text"]


def _any_case(name: str) -> str:
    """An ECMA-262 pattern matching ``name`` ignoring ASCII case (JSON Schema has no case-insensitive flag)."""
    return "^" + "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else re.escape(c) for c in name) + "$"


def event_json_schema() -> dict[str, Any]:
    """The JSON Schema (2020-12) of an event body, built from this module's constants.

    Every event :func:`bridge.events.convert` builds validates against it. Fields of ``data`` are described under their
    upstream spelling; as the validator looks them up ignoring case, a record that spells one differently is
    still valid (the required ones are checked by a pattern that ignores case).
    """
    nullable_int = ["integer", "null"]
    data_properties: dict[str, Any] = {
        "TaskDetailNo": {"type": "string", "minLength": 1, "description": "Task detail number; the event id."},
        "TaskNo": {"description": "Task number."},
        "TaskType": {
            "type": "string",
            "minLength": 1,
            "description": "Task type, e.g. CHG_DNS; the list is open, unknown types are valid.",
        },
        "TaskTypeDescription": {"description": "Task type in the language of the poll's Lang."},
        "InstanceId": {"description": "Domain instance id."},
        "DomainName": {"type": ["string", "null"], "description": "Domain name; the event subject."},
        "TaskStatus": {"enum": list(TASK_STATUS_CODES)},
        "TaskStatusCode": {
            "type": nullable_int,
            "minimum": 0,
            "maximum": 3,
            "description": "Agrees with TaskStatus: " + ", ".join(f"{c} {s}" for s, c in TASK_STATUS_CODES.items()),
        },
        "TaskResult": {"description": "Task result (a string, sometimes a number)."},
        "ErrorMsg": {"description": "Execution message."},
        "TryCount": {"type": nullable_int, "minimum": 0, "description": "Number of retries."},
        "CreateTime": {
            "type": ["string", "null"],
            "pattern": UPSTREAM_TIME_PATTERN,
            "description": "Creation time, yyyy-MM-dd HH:mm:ss, Beijing time (UTC+8).",
        },
        "UpdateTime": {
            "type": ["string", "null"],
            "pattern": UPSTREAM_TIME_PATTERN,
            "description": "Last update time, yyyy-MM-dd HH:mm:ss, Beijing time (UTC+8).",
        },
    }
    required_any_case = [
        {
            "$comment": f"requires a key equal to {name!r} ignoring ASCII case",
            "not": {"propertyNames": {"not": {"pattern": _any_case(name)}}},
        }
        for name in ("TaskDetailNo", "TaskType", "TaskStatus")
    ]
    agreement = [
        {
            "if": {"properties": {"TaskStatus": {"const": status}}, "required": ["TaskStatus"]},
            "then": {"properties": {"TaskStatusCode": {"enum": [code, None]}}},
        }
        for status, code in TASK_STATUS_CODES.items()
    ]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"urn:task-bridge:schema:{EVENT_TYPE}",
        "title": "Alibaba Cloud Domain task detail finished",
        "description": (
            "CloudEvents 1.0 structured-mode body of one TaskDetail from PollTaskResult, published by "
            f"{APP_ID} with content type {EVENT_CONTENT_TYPE}."
        ),
        "type": "object",
        # `account` is on every event since 1.1.0, yet not required: events published before it stay valid.
        "required": ["specversion", "id", "source", "type", "datacontenttype", "data"],
        "properties": {
            "specversion": {"const": SPECVERSION},
            "id": {
                "type": "string",
                "minLength": 1,
                "maxLength": 255,
                "description": "TaskDetailNo; also the AMQP message_id. Equal ids are the same event.",
            },
            "source": {"type": "string", "minLength": 1, "description": "Configured (BRIDGE_EVENT_SOURCE)."},
            "type": {"const": EVENT_TYPE},
            "subject": {
                "type": "string",
                "minLength": 1,
                "description": "DomainName; absent when the record has none.",
            },
            "time": {
                "type": "string",
                "format": "date-time",
                "pattern": RFC3339_UTC_PATTERN,
                "description": "UpdateTime (Beijing time) converted to UTC; absent when the record has none.",
            },
            "datacontenttype": {"const": DATA_CONTENT_TYPE},
            "account": {
                "type": "string",
                "pattern": ACCOUNT_PATTERN,
                "description": (
                    "CloudEvents extension attribute: the name of the Alibaba account the task detail was polled "
                    f"for ('default' with a single account); also the AMQP header {ACCOUNT_HEADER!r}."
                ),
            },
            "data": {
                "type": "object",
                "description": (
                    "The TaskDetail exactly as received: upstream field names and values, unknown fields kept. "
                    "null counts as absent for optional fields. Field names may differ in case from the "
                    "upstream spelling (the upstream doc spells TaskStatusCode as Taskstatuscode once)."
                ),
                "properties": data_properties,
                "additionalProperties": True,
                "allOf": required_any_case + agreement,
            },
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bridge.schema``: print the event schema, or write it with ``--write-contract [DIR]``."""
    parser = argparse.ArgumentParser(prog="python -m bridge.schema", description="The event contract's JSON Schema.")
    parser.add_argument(
        "--write-contract",
        metavar="DIR",
        nargs="?",
        const="contract",
        help="write DIR/event.schema.json from the code (default DIR: contract)",
    )
    args = parser.parse_args(argv)
    if args.write_contract is None:
        sys.stdout.write(schema_text())
        return 0
    path = Path(args.write_contract) / "event.schema.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(schema_text(), encoding="utf-8")
    print(f"wrote {path}")
    return 0


def schema_text() -> str:
    """:func:`event_json_schema` as the text of ``contract/event.schema.json``."""
    return json.dumps(event_json_schema(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
