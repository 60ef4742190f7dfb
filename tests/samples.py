"""The upstream documentation's sample TaskDetail, for tests that need a valid record to vary."""

from __future__ import annotations

from typing import Any

DETAIL_NO = "15fee9d10d514bada66bd08c5723c583"


def task_detail(**changes: Any) -> dict[str, Any]:
    """The upstream doc's sample TaskDetail; a change to ``...`` (Ellipsis) removes the field."""
    record: dict[str, Any] = {
        "TaskDetailNo": DETAIL_NO,
        "TaskNo": "b95bc334-f7d8-4f39-8a62-4c4302a243d8",
        "TaskType": "CHG_DNS",
        "TaskTypeDescription": "DNS Modification",
        "InstanceId": "S201817141000000",
        "DomainName": "example.com",
        "TaskStatus": "EXECUTE_SUCCESS",
        "TaskStatusCode": 2,
        "TaskResult": "test",
        "ErrorMsg": "The operation is successful.",
        "TryCount": 0,
        "CreateTime": "2018-03-26 15:08:20",
        "UpdateTime": "2018-03-26 15:22:18",
    }
    for key, value in changes.items():
        if value is ...:
            record.pop(key, None)
        else:
            record[key] = value
    return record
