"""The upstream client: PollTaskResult and AcknowledgeTaskResult of Alibaba Cloud's Domain API.

:class:`UpstreamClient` signs each call (V3 or V1, from the settings), sends it as the current SDKs do (POST,
every API parameter in the query, empty body) over an injected :class:`httpx.AsyncClient`, and turns every
failure into the typed tree of :mod:`bridge.errors` at this boundary:

- ``Throttling``, ``Throttling.*``, HTTP 429                 -> :class:`ThrottledError` (with ``Retry-After``)
- ``ServiceUnavailable``, ``InternalError``, ``UnknownError``,
  ``SignatureNonceUsed``, any 5xx, timeouts, transport errors,
  a 2xx body that is not a JSON object                       -> :class:`RetryableUpstreamError`
- ``InvalidParameter*`` with HTTP 400, HTTP 413 or 414       -> :class:`RefusedParametersError`
- ``SignatureDoesNotMatch``, ``InvalidAccessKeyId.*``, ``Missing*``,
  ``InvalidTimeStamp.*``, any other 4xx or 3xx               -> :class:`FatalUpstreamError`

It never retries by itself: the retry policy lives in the run loop. Error messages never carry the access key
secret or the STS token (on a signature mismatch the gateway echoes its string to sign, holding the token).
"""

from __future__ import annotations

import asyncio
import html
import json
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, quote_plus, urlencode

import httpx

from bridge.errors import (
    FatalUpstreamError,
    RefusedParametersError,
    RetryableUpstreamError,
    ThrottledError,
    UpstreamError,
)
from bridge.metrics import Metrics
from bridge.records import RawRecord
from bridge.settings import Settings
from bridge.signing import Credentials, SignatureV1Auth, SignatureV3Auth, percent_encode

__all__ = ["ACKNOWLEDGE_ACTION", "POLL_ACTION", "AckResult", "Page", "RawRecord", "UpstreamClient"]

POLL_ACTION = "PollTaskResult"
ACKNOWLEDGE_ACTION = "AcknowledgeTaskResult"

# Codes whose meaning does not depend on the HTTP status the gateway paired them with.
_RETRYABLE_CODES = frozenset({"ServiceUnavailable", "InternalError", "UnknownError", "SignatureNonceUsed"})
_FATAL_CODES = frozenset({"SignatureDoesNotMatch", "IncompleteSignature", "Forbidden.RAM"})
_FATAL_PREFIXES = ("InvalidAccessKeyId", "InvalidTimeStamp", "Missing", "InvalidSecurityToken")

_FORM_HEADERS = {"content-type": "application/x-www-form-urlencoded"}
_DETAIL_NO = "TaskDetailNo"
_DETAIL_NO_LOWER = _DETAIL_NO.lower()
_MISSING: Any = object()
_SNIPPET_CHARS = 200
_XML_FIELD = {name: re.compile(rf"<{name}>(.*?)</{name}>", re.DOTALL) for name in ("Code", "Message", "RequestId")}
# The token's value inside an echoed V1 string to sign (any level of encoding) or V3 canonical request.
_TOKEN_IN_ECHO = re.compile(r"(SecurityToken(?:=|%3D|%253D)|x-acs-security-token:)(.*?)(?=&|%26|\s|\\n|$)", re.I)


@dataclass(frozen=True, slots=True)
class Page:
    """One PollTaskResult page.

    ``page_num`` and ``page_size`` fall back to what was asked for when the response omits them; the totals
    and ``has_next`` are ``None`` when the response does not say.
    """

    request_id: str | None
    page_num: int
    page_size: int
    total_items: int | None
    total_pages: int | None
    records: list[RawRecord] = field(default_factory=list)
    has_next: bool | None = None


@dataclass(frozen=True, slots=True)
class AckResult:
    """The outcome of acknowledging a list of ids: how many were sent and how many the upstream confirmed."""

    sent: int
    confirmed: int
    request_ids: list[str] = field(default_factory=list)


class UpstreamClient:
    """Signed calls to the Domain API over an injected :class:`httpx.AsyncClient`.

    ``metrics`` (optional) receives one ``upstream_requests`` count and one latency observation per request,
    and the backlog (``TotalItemNum``) of each successful poll. ``clock`` and ``nonce`` are passed to the
    signer (tests use them to provoke clock skew or a reused nonce).
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        settings: Settings,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], datetime] | None = None,
        nonce: Callable[[], str] | None = None,
    ) -> None:
        settings.require_credentials()
        # require_credentials raised when either is missing; the asserts are for the type checker.
        assert settings.access_key_id is not None
        assert settings.access_key_secret is not None
        credentials = Credentials(
            settings.access_key_id.get_secret_value(), settings.access_key_secret, settings.security_token
        )
        auth_class = SignatureV3Auth if settings.signature_version == "v3" else SignatureV1Auth
        signer_options: dict[str, Any] = {}
        if clock is not None:
            signer_options["clock"] = clock
        if nonce is not None:
            signer_options["nonce"] = nonce
        self._http = http
        self._settings = settings
        self._metrics = metrics
        self._clock = clock or (lambda: datetime.now(UTC))
        self._auth: httpx.Auth = auth_class(credentials, **signer_options)
        self._url = settings.endpoint + "/"
        self._version = settings.api_version
        self._timeout_s = settings.request_timeout_s
        self._timeout = httpx.Timeout(settings.request_timeout_s)
        self._secrets = _secret_forms(settings.secret_values())
        self._poll_filters = _poll_filters(settings)

    def __repr__(self) -> str:
        return (
            f"UpstreamClient(endpoint={self._url!r}, version={self._version!r}, "
            f"signature={self._settings.signature_version!r})"
        )

    async def poll(self, page_num: int = 1, page_size: int | None = None) -> Page:
        """Fetch one page of finished task details (``PageNum`` from 1, ``PageSize`` up to 1000)."""
        size = self._settings.page_size if page_size is None else page_size
        params = [("PageNum", str(page_num)), ("PageSize", str(size)), *self._poll_filters]
        body = await self._call(POLL_ACTION, params)
        page = _parse_page(body, page_num, size)
        if self._metrics is not None and page.total_items is not None:
            self._metrics.upstream_backlog.set(page.total_items)
        return page

    async def acknowledge(self, detail_nos: Sequence[str], *, concurrency: int | None = None) -> AckResult:
        """Acknowledge ``detail_nos`` in batches of ``ack_batch_size``, up to ``concurrency`` calls at a time.

        ``concurrency`` defaults to the ``ack_concurrency`` setting. ``confirmed`` is the sum of the
        upstream's ``Result``; fewer than ``sent`` is information (unknown or already acknowledged ids), not a
        failure.
        When a batch fails, no further batch is started, the ones in flight finish, and the first failure (in
        batch order) is raised with ``acknowledged``: the ids of every batch that did succeed (maybe ``[]``).
        """
        ids = list(detail_nos)
        if not ids:
            return AckResult(sent=0, confirmed=0)
        step = self._settings.ack_batch_size
        batches = [ids[i : i + step] for i in range(0, len(ids), step)]
        results: list[tuple[int, str | None] | UpstreamError | None] = [None] * len(batches)
        next_batch = 0
        failed = False

        async def worker() -> None:
            nonlocal next_batch, failed
            while not failed and next_batch < len(batches):
                index = next_batch
                next_batch += 1
                try:
                    results[index] = await self._acknowledge_batch(batches[index])
                except UpstreamError as exc:
                    results[index] = exc
                    failed = True

        workers = max(1, min(concurrency or self._settings.ack_concurrency, len(batches)))
        if workers == 1:
            await worker()
        else:
            async with asyncio.TaskGroup() as group:
                for _ in range(workers):
                    group.create_task(worker())

        confirmed = 0
        request_ids: list[str] = []
        acknowledged: list[str] = []
        first_error: UpstreamError | None = None
        for batch, outcome in zip(batches, results, strict=True):
            if isinstance(outcome, UpstreamError):
                first_error = first_error or outcome
            elif outcome is not None:
                confirmed += outcome[0]
                if outcome[1]:
                    request_ids.append(outcome[1])
                acknowledged.extend(batch)
        if first_error is not None:
            # The caller retries only what is not in here.
            first_error.acknowledged = acknowledged
            raise first_error
        return AckResult(sent=len(ids), confirmed=confirmed, request_ids=request_ids)

    async def _acknowledge_batch(self, batch: list[str]) -> tuple[int, str | None]:
        # The ids go in a form body, which both signature methods cover: a URL holding hundreds of ids could
        # pass a proxy's URL length limit, and httpx re-parses a long URL several times per request.
        form = [(f"TaskDetailNo.{n}", detail_no) for n, detail_no in enumerate(batch, start=1)]
        params = [("UserClientIp", self._settings.user_client_ip)] if self._settings.user_client_ip else []
        body = await self._call(ACKNOWLEDGE_ACTION, params, form=form)
        return _as_int(body.get("Result")) or 0, _as_str(body.get("RequestId"))

    # --- one request ---
    async def _call(
        self, action: str, params: list[tuple[str, str]], *, form: list[tuple[str, str]] | None = None
    ) -> dict[str, Any]:
        """One signed request (``form`` as a form body); the JSON object of a 2xx answer, or a typed error."""
        query = [("Action", action), ("Version", self._version), ("Lang", self._settings.lang), *params]
        content = urlencode(form, quote_via=quote).encode("ascii") if form else b""
        started = time.perf_counter()
        outcome: str | None = None
        try:
            body = await self._send(action, tuple(query), content)
            outcome = "ok"
            return body
        except ThrottledError:
            outcome = "throttled"
            raise
        except RetryableUpstreamError:
            outcome = "retryable_error"
            raise
        except FatalUpstreamError:
            outcome = "fatal_error"
            raise
        finally:
            if self._metrics is not None:
                self._metrics.upstream_latency.labels(action).observe(time.perf_counter() - started)
                if outcome is not None:
                    self._metrics.upstream_requests.labels(action, outcome).inc()

    async def _send(self, action: str, query: tuple[tuple[str, str], ...], content: bytes) -> dict[str, Any]:
        headers = _FORM_HEADERS if content else None
        try:
            # httpx's timeout bounds each phase (and ASGITransport ignores it): this bounds the whole call.
            async with asyncio.timeout(self._timeout_s):
                response = await self._http.post(
                    self._url, params=query, content=content, headers=headers, auth=self._auth, timeout=self._timeout
                )
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise RetryableUpstreamError(f"timed out after {self._timeout_s:g}s", action=action) from exc
        except httpx.TransportError as exc:
            raise RetryableUpstreamError(
                self._scrub(f"transport error ({type(exc).__name__}: {exc})"), action=action
            ) from exc
        except httpx.RequestError as exc:  # DecodingError, TooManyRedirects: a garbled answer, try again
            raise RetryableUpstreamError(
                self._scrub(f"request failed ({type(exc).__name__}: {exc})"), action=action
            ) from exc
        if response.is_success:
            return self._decode_success(action, response)
        raise self._error_for(action, response)

    def _decode_success(self, action: str, response: httpx.Response) -> dict[str, Any]:
        try:
            body = json.loads(response.content)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError both are ValueErrors
            raise RetryableUpstreamError(
                f"HTTP {response.status_code} body is not valid JSON: {self._snippet(response)}",
                action=action,
                status_code=response.status_code,
                request_id=response.headers.get("x-acs-request-id"),
            ) from exc
        if not isinstance(body, dict):
            raise RetryableUpstreamError(
                f"HTTP {response.status_code} body is a JSON {type(body).__name__}, not an object",
                action=action,
                status_code=response.status_code,
                request_id=response.headers.get("x-acs-request-id"),
            )
        return body

    def _error_for(self, action: str, response: httpx.Response) -> UpstreamError:
        status = response.status_code
        code, message, request_id = _error_fields(response)
        request_id = request_id or response.headers.get("x-acs-request-id")
        text = self._scrub(message) if message else f"unexpected HTTP {status}: {self._snippet(response)}"
        common: dict[str, Any] = {
            "action": action,
            "code": code,
            "request_id": request_id,
            "status_code": status,
        }
        throttled = code == "Throttling" or code.startswith("Throttling.") if code else status == 429
        if throttled:
            retry_after = _retry_after_s(response.headers.get("retry-after"), self._clock())
            return ThrottledError(text, retry_after_s=retry_after, **common)
        if code in _RETRYABLE_CODES:
            return RetryableUpstreamError(text, **common)
        if code is not None and (code in _FATAL_CODES or code.startswith(_FATAL_PREFIXES)):
            return FatalUpstreamError(text, **common)
        if status >= 500:
            return RetryableUpstreamError(text, **common)
        if status in (413, 414) or (status == 400 and code is not None and code.startswith("InvalidParameter")):
            return RefusedParametersError(text, **common)
        return FatalUpstreamError(text, **common)

    def _snippet(self, response: httpx.Response) -> str:
        text = " ".join(response.content[:_SNIPPET_CHARS].decode("utf-8", "replace").split())
        return self._scrub(text) if text else "(empty body)"

    def _scrub(self, text: str) -> str:
        """Remove every form of the secret and the token that the text could contain."""
        text = _TOKEN_IN_ECHO.sub(r"\1***", text)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


# --- parsing, kept free of pydantic: a page holds up to 1000 records and a drain reads thousands of pages ---
def _parse_page(body: dict[str, Any], page_num: int, page_size: int) -> Page:
    data = _get(body, "Data")
    details = data if isinstance(data, list) else _get(data, "TaskDetail") if isinstance(data, dict) else None
    if details is None or details == {}:
        items: list[Any] = []
    elif isinstance(details, list):
        items = details
    else:  # a single detail rendered as an object (a doc quirk of sibling operations)
        items = [details]
    records = [RawRecord(item, _detail_no(item)) for item in items]
    next_page = _get(body, "NextPage")
    return Page(
        request_id=_as_str(_get(body, "RequestId")),
        page_num=_as_int(_get(body, "CurrentPageNum")) or page_num,
        page_size=_as_int(_get(body, "PageSize")) or page_size,
        total_items=_as_int(_get(body, "TotalItemNum")),
        total_pages=_as_int(_get(body, "TotalPageNum")),
        records=records,
        has_next=_as_bool(next_page),
    )


def _detail_no(item: Any) -> str | None:
    if not isinstance(item, dict):
        return None
    value = item.get(_DETAIL_NO, _MISSING)
    if value is _MISSING:
        for key, candidate in item.items():
            if isinstance(key, str) and key.lower() == _DETAIL_NO_LOWER:
                value = candidate
                break
        else:
            return None
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _get(mapping: Any, key: str) -> Any:
    """``mapping[key]``, else the first key equal to it ignoring case, else ``None``."""
    if not isinstance(mapping, dict):
        return None
    value = mapping.get(key, _MISSING)
    if value is not _MISSING:
        return value
    lowered = key.lower()
    for name, candidate in mapping.items():
        if isinstance(name, str) and name.lower() == lowered:
            return candidate
    return None


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def _as_str(value: Any) -> str | None:
    if value is None or isinstance(value, dict | list):
        return None
    return str(value) or None


def _error_fields(response: httpx.Response) -> tuple[str | None, str | None, str | None]:
    """``Code``, ``Message`` and ``RequestId`` of a JSON or XML error body, each ``None`` when absent."""
    content = response.content
    try:
        body = json.loads(content)
    except ValueError:
        body = None
    if isinstance(body, dict):
        return _as_str(_get(body, "Code")), _as_str(_get(body, "Message")), _as_str(_get(body, "RequestId"))
    text = content.decode("utf-8", "replace")
    if "<Error" not in text:
        return None, None, None
    return _xml_field(text, "Code"), _xml_field(text, "Message"), _xml_field(text, "RequestId")


def _xml_field(text: str, name: str) -> str | None:
    # A regex, not an XML parser: error bodies are tiny, may be truncated, and need no entity expansion.
    match = _XML_FIELD[name].search(text)
    return (html.unescape(match.group(1)).strip() or None) if match else None


def _retry_after_s(value: str | None, now: datetime) -> float | None:
    """``Retry-After`` in seconds from now (delta-seconds or HTTP date); ``None`` if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return max(0.0, (when - now).total_seconds())
    return max(0.0, seconds) if seconds == seconds else None  # NaN is no hint


def _secret_forms(values: Iterable[str]) -> list[str]:
    """Each secret as it may appear in an echo: raw, percent-encoded once and twice, form-encoded."""
    forms: set[str] = set()
    for value in values:
        if value:
            once = percent_encode(value)
            forms.update({value, once, percent_encode(once), quote_plus(value), quote(value)})
    # Longest first, so a form never leaves the tail of a longer one behind.
    return sorted(forms, key=len, reverse=True)


def _poll_filters(settings: Settings) -> list[tuple[str, str]]:
    filters = {
        "TaskResultStatus": settings.task_result_status,
        "DomainName": settings.domain_name,
        "InstanceId": settings.instance_id,
        "TaskNo": settings.task_no,
        "UserClientIp": settings.user_client_ip,
    }
    return [(name, str(value)) for name, value in filters.items() if value is not None and value != ""]
