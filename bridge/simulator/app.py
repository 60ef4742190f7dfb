"""The simulator: an ASGI app that answers PollTaskResult and AcknowledgeTaskResult like Alibaba's gateway.

Routes: ``/`` (the signed API, GET or POST, parameters in the query or a form body), ``GET /_state`` (an
unsigned view of the backlog) and ``POST /_control`` (unsigned steering: faults, more details). Every answer is
JSON; a client that does not ask for JSON gets an error naming the fix, since the real gateway would send XML.

Bad input never gets a 500: API parameters get the gateway's 400 (``MissingParameter``, ``InvalidParameter``),
``/_control`` a 413 over :data:`MAX_CONTROL_BYTES` and a 400 naming the field for anything else it cannot take,
and ``/_state`` lists at most :data:`STATE_LIST_LIMIT` ids per list, so it stays cheap with a large backlog.
"""

from __future__ import annotations

import heapq
import itertools
import json
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from bridge.simulator.backlog import FILTER_FIELDS, Backlog
from bridge.simulator.faults import ACTIONS, FaultInjector, Faults
from bridge.simulator.gateway_errors import ApiError, invalid_parameter, missing_parameter
from bridge.simulator.generator import DetailGenerator, malform
from bridge.simulator.request import ApiRequest
from bridge.simulator.verify import Verifier

__all__ = ["HOSTS", "MAX_CONTROL_BYTES", "MAX_CONTROL_DETAILS", "MAX_PAGE_SIZE", "STATE_LIST_LIMIT", "Simulator"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_PAGE_SIZE = 1000
# API version -> the gateway host it belongs to (the HostId of answers).
HOSTS = {"2017-12-18": "domain-intl.aliyuncs.com", "2018-01-29": "domain.aliyuncs.com"}
_MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_CONTROL_BYTES = 1024 * 1024
MAX_CONTROL_DETAILS = 100_000
"""Most records one ``POST /_control`` may add (``add_details`` plus ``add_raw``)."""
STATE_LIST_LIMIT = 1000
"""Most entries of each list or map in ``GET /_state`` (``truncated`` names the ones cut)."""
# The gateway's integer parameters are Java Integers: anything else is InvalidParameter.
_INTEGER = re.compile(r"-?[0-9]{1,10}")
_INT32 = range(-(2**31), 2**31)
_CONTROL_KEYS = frozenset({"faults", "add_details", "add_raw"})
_JSON = b"application/json;charset=utf-8"
_Response = tuple[int, bytes]


def _json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def _request_id() -> str:
    return str(uuid.uuid4()).upper()


def _int_param(params: dict[str, str], name: str, *, required: bool) -> int | None:
    raw = params.get(name)
    if raw is None or raw == "":
        if required:
            raise missing_parameter(name)
        return None
    if not _INTEGER.fullmatch(raw) or int(raw) not in _INT32:
        raise invalid_parameter(name, f"{_shorten(raw)!r} is not a 32-bit integer")
    return int(raw)


def _shorten(value: str, limit: int = 64) -> str:
    """A parameter value for an error message: a huge value is cut, with its length."""
    return value if len(value) <= limit else f"{value[:limit]}... ({len(value)} characters)"


def _detail_number(name: str) -> int | None:
    """N of a ``TaskDetailNo.N`` parameter name; None for any other name; InvalidParameter for a bad N."""
    prefix, dot, number = name.partition(".")
    if prefix != "TaskDetailNo" or not dot:
        return None
    if not _INTEGER.fullmatch(number) or not 1 <= int(number) < 2**31:
        raise invalid_parameter(_shorten(name), "N of TaskDetailNo.N must be an integer from 1")
    return int(number)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _control_command(body: bytes) -> tuple[dict[str, Any], int, list[Any]]:
    """``(faults, add_details, add_raw)`` of a ``/_control`` body; ValueError naming what is wrong."""
    try:
        command = json.loads(body or b"{}", parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("the JSON body is nested too deeply") from None
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError included
        raise ValueError(f"the body is not JSON: {exc}") from None
    if not isinstance(command, dict):
        raise ValueError("expected a JSON object")
    unknown = set(command) - _CONTROL_KEYS
    if unknown:
        raise ValueError(f"unknown keys: {', '.join(sorted(_shorten(k) for k in unknown))}")
    faults = command.get("faults", {})
    if not isinstance(faults, dict):
        raise ValueError("faults: expected an object")
    count = command.get("add_details", 0)
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_CONTROL_DETAILS:
        raise ValueError(f"add_details: expected an integer from 0 to {MAX_CONTROL_DETAILS}")
    raw = command.get("add_raw", [])
    if not isinstance(raw, list):
        raise ValueError("add_raw: expected a list of records")
    if count + len(raw) > MAX_CONTROL_DETAILS:
        raise ValueError(f"add_details and add_raw: at most {MAX_CONTROL_DETAILS} records per call")
    return faults, count, raw


def _first(values: Any, limit: int, *, smallest: bool = False) -> tuple[list[Any], bool]:
    """At most ``limit`` of ``values`` (the smallest, or the first), and whether some were left out."""
    if smallest:
        return heapq.nsmallest(limit, values), len(values) > limit
    return list(itertools.islice(values, limit)), len(values) > limit


class Simulator:
    """Alibaba Cloud's Domain API gateway for the two task-result operations, with a seeded backlog.

    ``tasks`` details are generated at start and ``rate`` more per second afterwards (computed on each request
    from the elapsed time, so no background task is needed). ``clock`` (epoch seconds) drives the backlog:
    detail times and arrivals; signature timestamps are always checked against the real clock.
    """

    def __init__(
        self,
        *,
        access_key_id: str = "sim-access-key-id",
        access_key_secret: str = "sim-access-key-secret",
        security_token: str | None = None,
        tasks: int = 0,
        seed: int = 0,
        rate: float = 0.0,
        faults: Faults | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.faults = faults if faults is not None else Faults()
        self._injector = FaultInjector(self.faults, seed)
        self._verifier = Verifier(access_key_id, access_key_secret, security_token)
        self._access_key_id = access_key_id
        self._backlog = Backlog()
        self._generator = DetailGenerator(seed)
        self._malformed_rng = random.Random(f"malformed-{seed}")
        self.malformed_ids: set[str] = set()
        """TaskDetailNo of every detail generated malformed."""
        self._clock = clock
        self._rate = rate
        self._started_s = clock()
        self._arrived = 0
        self.polls_by_page: Counter[int] = Counter()
        """PageNum -> how many PollTaskResult calls asked for it."""
        self.add_details(tasks)

    def __repr__(self) -> str:
        return (
            f"Simulator(access_key_id={self._access_key_id!r}, pending={len(self._backlog)}, "
            f"acknowledged={self._backlog.acknowledged})"
        )

    # --- the backlog -------------------------------------------------------------------------------------

    def add_details(self, n: int) -> list[str]:
        """Add ``n`` pending details from the seeded generator (``faults.malformed_ratio`` of them malformed)."""
        now_s = self._clock()
        ids: list[str] = []
        for _ in range(n):
            record = self._generator.next(now_s)
            while record["TaskDetailNo"] in self._backlog.known:  # 128 random bits: practically never
                record = self._generator.next(now_s)
            ratio = self.faults.malformed_ratio
            # A separate generator decides malformation, so the ids do not depend on the ratio.
            if ratio > 0 and self._malformed_rng.random() < ratio:
                malform(record, self._malformed_rng)
                self.malformed_ids.add(record["TaskDetailNo"])
            self._backlog.add(record)
            ids.append(record["TaskDetailNo"])
        return ids

    def add_raw(self, record: Any) -> None:
        """Append any JSON value as a pending record (it can lack a TaskDetailNo, or be no object at all)."""
        self._backlog.add(record)

    def _catch_up(self) -> None:
        """Add the details that arrived at ``rate`` per second since the start."""
        if self._rate > 0:
            due = int((self._clock() - self._started_s) * self._rate) - self._arrived
            if due > 0:
                self._arrived += due
                self.add_details(due)

    @property
    def pending_count(self) -> int:
        """Records still pending (arrivals at ``rate`` included)."""
        self._catch_up()
        return len(self._backlog)

    @property
    def acknowledged_count(self) -> int:
        """Pending records removed by acknowledgements."""
        return self._backlog.acknowledged

    @property
    def ack_counts(self) -> dict[str, int]:
        """TaskDetailNo -> how many times it was acknowledged (kept forever; unknown ids are not counted)."""
        return self._backlog.ack_counts

    def detail(self, detail_no: str) -> dict[str, Any] | None:
        """The record with this id as it was added (pending or acknowledged), or ``None``."""
        body = self._backlog.known.get(detail_no)
        return None if body is None else dict(json.loads(body))

    def state(self, limit: int | None = None) -> dict[str, Any]:
        """What ``GET /_state`` answers (with ``limit``: at most that many entries per list or map)."""
        if limit is None:
            return {
                "pending": self.pending_count,
                "acknowledged": self.acknowledged_count,
                "ack_counts": self.ack_counts,
                "malformed_ids": sorted(self.malformed_ids),
                "polls_by_page": {str(page): count for page, count in sorted(self.polls_by_page.items())},
                "faults": self.faults.to_dict(),
            }
        ack_ids, ack_cut = _first(self.ack_counts, limit)
        malformed, malformed_cut = _first(self.malformed_ids, limit, smallest=True)
        pages, pages_cut = _first(self.polls_by_page, limit, smallest=True)
        cut = {"ack_counts": ack_cut, "malformed_ids": malformed_cut, "polls_by_page": pages_cut}
        return {
            "pending": self.pending_count,
            "acknowledged": self.acknowledged_count,
            "ack_counts": {detail_no: self.ack_counts[detail_no] for detail_no in ack_ids},
            "malformed_ids": malformed,
            "polls_by_page": {str(page): self.polls_by_page[page] for page in pages},
            "faults": self.faults.to_dict(),
            "truncated": sorted(name for name, was_cut in cut.items() if was_cut),
        }

    # --- ASGI ----------------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI entry point (HTTP and lifespan)."""
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            raise RuntimeError(f"the simulator does not speak {scope['type']!r}")
        body = await _read_body(receive)
        if body is None:
            error = f"the request body is over {_MAX_BODY_BYTES} bytes, the most this simulator reads"
            status, payload, request_id = 413, _json({"error": error}), None
        else:
            status, payload, request_id = await self._route(scope, body)
        headers = [(b"content-type", _JSON), (b"content-length", str(len(payload)).encode())]
        if request_id is not None:
            headers.append((b"x-acs-request-id", request_id.encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    async def _route(self, scope: Scope, body: bytes) -> tuple[int, bytes, str | None]:
        path, method = scope["path"], scope["method"].upper()
        if path == "/_state" and method == "GET":
            return 200, _json(self.state(STATE_LIST_LIMIT)), None
        if path == "/_control" and method == "POST":
            return (*self._control(body), None)
        request_id = _request_id()
        request = ApiRequest.from_scope(scope, body)
        try:
            if path != "/":
                raise ApiError(404, "InvalidAction.NotFound", "Specified api is not found, please check your url.")
            if method not in ("GET", "POST"):
                raise ApiError(400, "UnsupportedHTTPMethod", f"The HTTP method {method} is not supported.")
            status, payload = await self._api(request, request_id)
        except ApiError as error:
            version = request.params.get("Version") or request.headers.get("x-acs-version", "")
            host_id = HOSTS.get(version) or request.headers.get("host", "domain.aliyuncs.com")
            status = error.status
            payload = _json(
                {
                    "RequestId": request_id,
                    "HostId": host_id,
                    "Code": error.code,
                    "Message": error.message,
                    "Recommend": f"https://api.aliyun.com/troubleshoot?q={error.code}&product=Domain",
                }
            )
        return status, payload, request_id

    async def _api(self, request: ApiRequest, request_id: str) -> _Response:
        params, headers = request.params, request.headers
        action = params.get("Action") or headers.get("x-acs-action")
        version = params.get("Version") or headers.get("x-acs-version")
        if not action:
            raise missing_parameter("Action")
        if not version:
            raise missing_parameter("Version")
        if version not in HOSTS:
            raise ApiError(400, "InvalidVersion", "Specified parameter Version is not valid.")
        if action not in ACTIONS:
            raise ApiError(404, "InvalidAction.NotFound", f"Specified api {action} is not found.")
        if params.get("Format", "").lower() != "json" and "json" not in headers.get("accept", "").lower():
            raise ApiError(
                400,
                "Simulator.XmlNotSupported",
                "The gateway answers XML unless asked for JSON: send Format=JSON (V1 signing) or the header "
                "Accept: application/json (V3 signing). This simulator only speaks JSON.",
            )
        self._verifier.verify(request)
        self._catch_up()
        # Faults strike after authentication, as a busy backend would: the nonce is already spent.
        await self._injector.apply(action)
        if action == "PollTaskResult":
            return 200, self._poll(params, request_id)
        return 200, self._acknowledge(request, request_id)

    def _poll(self, params: dict[str, str], request_id: str) -> bytes:
        page_num = _int_param(params, "PageNum", required=True)
        page_size = _int_param(params, "PageSize", required=True)
        assert page_num is not None and page_size is not None  # required=True raised otherwise
        if page_num < 1:
            raise invalid_parameter("PageNum", "it must be at least 1")
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise invalid_parameter("PageSize", f"it must be between 1 and {MAX_PAGE_SIZE}")
        filters: dict[str, str] = {}
        status = _int_param(params, "TaskResultStatus", required=False)
        if status is not None:
            filters["TaskResultStatus"] = str(status)
        for name in FILTER_FIELDS:
            if name != "TaskResultStatus" and params.get(name):
                filters[name] = params[name]
        lang = params.get("Lang", "en")
        self.polls_by_page[page_num] += 1
        shuffler = self._injector.unordered()
        if shuffler is None:
            total, entries = self._backlog.page(page_num, page_size, filters)
        else:
            total, entries = self._backlog.page(1, max(1, len(self._backlog)), filters)
            shuffler.shuffle(entries)
            entries = entries[(page_num - 1) * page_size : page_num * page_size]
        total_pages = -(-total // page_size)
        head = _json(
            {
                "RequestId": request_id,
                "CurrentPageNum": page_num,
                "PageSize": page_size,
                "TotalItemNum": total,
                "TotalPageNum": total_pages,
                "PrePage": page_num > 1,
                "NextPage": page_num < total_pages,
            }
        )
        items = b",".join(entry.body_for(lang) for entry in entries)
        return b"".join((head[:-1], b',"Data":{"TaskDetail":[', items, b"]}}"))

    def _acknowledge(self, request: ApiRequest, request_id: str) -> bytes:
        numbered: list[tuple[int, str]] = []
        for name, value in request.query + request.form:
            number = _detail_number(name)
            if number is not None:
                numbered.append((number, value))
        if not numbered:
            raise missing_parameter("TaskDetailNo")
        limit = int(self.faults.ack_max_ids)
        if limit and len(numbered) > limit:
            raise invalid_parameter("TaskDetailNo", f"{len(numbered)} ids in one request, at most {limit} allowed")
        numbered.sort()
        removed = self._backlog.acknowledge(value for _, value in numbered)
        return _json({"RequestId": request_id, "Result": removed})

    def _control(self, body: bytes) -> tuple[int, bytes]:
        if len(body) > MAX_CONTROL_BYTES:
            return 413, _json({"error": f"the body has {len(body)} bytes, at most {MAX_CONTROL_BYTES} are taken"})
        try:
            faults, count, raw = _control_command(body)
            self.faults.update(faults)
        except ValueError as exc:
            return 400, _json({"error": str(exc)})
        added = self.add_details(count)
        for record in raw:
            self.add_raw(record)
        return 200, _json({"added": added, **self.state(STATE_LIST_LIMIT)})


async def _read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > _MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
