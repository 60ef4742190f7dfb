"""The seeded generator of realistic TaskDetail records, and the corruptions of malformed ones.

Records look like the real PollTaskResult details: the known task types, success and failure with matching
``TaskStatus``/``TaskStatusCode``, several details sharing one ``TaskNo``, unicode and punycode domains, and
``yyyy-MM-dd HH:mm:ss`` times in Beijing time (UTC+8). The same seed gives the same records.
"""

from __future__ import annotations

import random
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

__all__ = ["BEIJING", "MALFORMATIONS", "TASK_STATUS_CODES", "TASK_TYPES", "DetailGenerator", "malform"]

BEIJING = timezone(timedelta(hours=8), "UTC+8")

# TaskType -> (English, Chinese) TaskTypeDescription; Lang=zh switches to the second.
TASK_TYPES: dict[str, tuple[str, str]] = {
    "CHG_HOLDER": ("Domain Holder Change", "过户"),
    "CHG_DNS": ("DNS Modification", "修改DNS"),
    "SET_WHOIS_PROTECT": ("WHOIS Privacy Protection", "设置隐私保护"),
    "UPDATE_ADMIN_CONTACT": ("Administrative Contact Update", "修改管理联系人"),
    "UPDATE_BILLING_CONTACT": ("Billing Contact Update", "修改付费联系人"),
    "UPDATE_TECH_CONTACT": ("Technical Contact Update", "修改技术联系人"),
    "SET_UPDATE_PROHIBITED": ("Update Prohibition Lock", "设置禁止更新锁"),
    "SET_TRANSFER_PROHIBITED": ("Transfer Prohibition Lock", "设置禁止转移锁"),
    "ORDER_ACTIVATE": ("Domain Registration", "注册"),
    "ORDER_RENEW": ("Domain Renewal", "续费"),
    "ORDER_REDEEM": ("Domain Redemption", "赎回"),
    "CREATE_DNSHOST": ("DNS Host Creation", "创建DNS主机"),
    "UPDATE_DNSHOST": ("DNS Host Modification", "修改DNS主机"),
    "SYNC_DNSHOST": ("DNS Host Synchronization", "同步DNS主机"),
}
TASK_STATUS_CODES: dict[str, int] = {
    "WAITING_EXECUTE": 0,
    "EXECUTING": 1,
    "EXECUTE_SUCCESS": 2,
    "EXECUTE_FAILURE": 3,
}
_SUCCESS_MESSAGE = "The operation is successful."
_FAILURE_MESSAGES = (
    "The domain name does not exist.",
    "The registry returned an error: 2306 Parameter value policy error.",
    "The registry did not answer in time.",
    "The DNS server is not registered: ns1.{domain}",
    "Real-name verification of the domain holder has not been completed.",
    "The domain name is locked against this operation (clientUpdateProhibited).",
    "Insufficient account balance.",
    "The contact information failed the registry's validation.",
)
_WORDS = (
    "acme", "alpha", "blue", "cloud", "delta", "fast", "green", "happy", "jade", "lotus", "maple", "nova",
    "orbit", "pixel", "quant", "river", "solar", "tiger", "urban", "vivid", "wave", "zen", "panda", "lucky",
)  # fmt: skip
_TLDS = ("com", "net", "org", "cn", "com.cn", "xyz", "top", "info", "shop", "online", "site", "tech")
_UNICODE_DOMAINS = (
    "例子.中国", "中文网.com", "测试.公司", "bücher.de", "münchen.de", "café.fr", "пример.рф", "例え.jp",
    "日本語.jp", "한국.kr", "δοκιμή.gr", "søk.no", "ñandú.es",
)  # fmt: skip
_PUNYCODE_DOMAINS = tuple(d.encode("idna").decode("ascii") for d in _UNICODE_DOMAINS)
_SUCCESS_RESULTS = ("", "success", "OK", None)
_FAILURE_RESULTS = ("", "failed", None)

# Names of the corruptions malform() applies; a test can check each appears.
MALFORMATIONS = (
    "status_code_not_int",
    "try_count_negative",
    "try_count_not_int",
    "missing_task_type",
    "missing_task_status",
    "unknown_task_status",
    "bad_time_format",
    "status_code_mismatch",
)


def _beijing(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, BEIJING).strftime("%Y-%m-%d %H:%M:%S")


class DetailGenerator:
    """Yields well-formed details, grouped into tasks of 1-5 details sharing a ``TaskNo``, from ``seed``."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._task: tuple[str, str, str] | None = None  # (TaskNo, TaskType, InstanceId)
        self._task_left = 0

    def _next_task(self) -> tuple[str, str, str]:
        rng = self._rng
        if self._task is None or self._task_left == 0:
            task_no = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            instance_id = f"S{rng.randint(2018, 2025)}{rng.randrange(10**11):011d}"
            self._task = (task_no, rng.choice(tuple(TASK_TYPES)), instance_id)
            self._task_left = rng.randint(1, 5)
        self._task_left -= 1
        return self._task

    def _domain(self) -> str:
        rng = self._rng
        kind = rng.random()
        if kind < 0.12:
            return rng.choice(_UNICODE_DOMAINS)
        if kind < 0.24:
            return rng.choice(_PUNYCODE_DOMAINS)
        name = rng.choice(_WORDS) + rng.choice(("", "-" + rng.choice(_WORDS), str(rng.randrange(1000))))
        return f"{name}.{rng.choice(_TLDS)}"

    def next(self, now_s: float) -> dict[str, Any]:
        """The next detail, finished shortly before ``now_s`` (epoch seconds)."""
        rng = self._rng
        task_no, task_type, instance_id = self._next_task()
        domain = self._domain()
        success = rng.random() < 0.8
        updated = now_s - rng.uniform(0, 120)
        created = updated - rng.uniform(1, 3600)
        if success:
            status, message, tries = "EXECUTE_SUCCESS", _SUCCESS_MESSAGE, rng.choice((0, 0, 0, 1, 2))
            result = rng.choice(_SUCCESS_RESULTS)
        else:
            status = "EXECUTE_FAILURE"
            message = rng.choice(_FAILURE_MESSAGES).format(domain=domain)
            tries = rng.randint(3, 5)
            result = rng.choice(_FAILURE_RESULTS)
        return {
            "TaskDetailNo": f"{rng.getrandbits(128):032x}",
            "TaskNo": task_no,
            "TaskType": task_type,
            "TaskTypeDescription": TASK_TYPES[task_type][0],
            "InstanceId": instance_id,
            "DomainName": domain,
            "TaskStatus": status,
            "TaskStatusCode": TASK_STATUS_CODES[status],
            "TaskResult": result,
            "ErrorMsg": message,
            "TryCount": tries,
            "CreateTime": _beijing(created),
            "UpdateTime": _beijing(updated),
        }


def malform(record: dict[str, Any], rng: random.Random) -> str:
    """Corrupt ``record`` in place with one of :data:`MALFORMATIONS` (it keeps its TaskDetailNo); returns which."""
    kind = rng.choice(MALFORMATIONS)
    if kind == "status_code_not_int":
        record["TaskStatusCode"] = rng.choice(("two", "2.0", True))  # null would mean "absent", which is valid
    elif kind == "try_count_negative":
        record["TryCount"] = -1
    elif kind == "try_count_not_int":
        record["TryCount"] = "x"
    elif kind == "missing_task_type":
        del record["TaskType"]
    elif kind == "missing_task_status":
        del record["TaskStatus"]
    elif kind == "unknown_task_status":
        record["TaskStatus"] = rng.choice(("DONE", "execute_success", ""))
    elif kind == "bad_time_format":
        record["CreateTime"] = rng.choice(("2018/03/26 15:08", "26-03-2018 15:08:20", "yesterday"))
    else:  # status_code_mismatch
        record["TaskStatusCode"] = 3 if record["TaskStatusCode"] == 2 else 2
    return kind
