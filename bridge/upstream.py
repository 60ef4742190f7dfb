"""The upstream client: PollTaskResult and AcknowledgeTaskResult of Alibaba Cloud's Domain API.

:class:`UpstreamClient` signs each call (V3 or V1, from the settings), sends it as the official SDKs do (POST
to ``/``, every API parameter in the query string, ``AcknowledgeTaskResult``'s ids as ``TaskDetailNo.N`` too,
an empty body, the SDK's headers) over an injected :class:`httpx.AsyncClient`, reads each answer within
``upstream_max_response_bytes`` while it streams in, and turns every failure into the typed tree of
:mod:`bridge.errors` at this boundary (an HTTP 200 whose body is an error object counts as that error):

- ``Throttling``, ``Throttling.*``, HTTP 429                 -> :class:`ThrottledError` (with ``Retry-After``)
- ``ServiceUnavailable``, ``InternalError``, ``UnknownError``,
  ``SignatureNonceUsed``, any 5xx, timeouts, transport errors,
  an unknown code in an HTTP 200                             -> :class:`RetryableUpstreamError`
- a 2xx body over the size cap, not JSON, nested too deep,
  not an object, or a page without its records               -> :class:`MalformedResponseError`
- ``InvalidParameter*`` with HTTP 400 (or 200), HTTP 413, 414 -> :class:`RefusedParametersError`
- ``SignatureDoesNotMatch``, ``InvalidAccessKeyId.*``, ``Missing*``,
  ``InvalidTimeStamp.*``, TLS verification failures,
  any other 4xx or 3xx                                       -> :class:`FatalUpstreamError`

A single record holding a value Python cannot represent (an integer past 4300 digits, ``1e999``, ``NaN``, a
lone surrogate) does not spoil its page: it comes back as a :class:`RawRecord` with ``problem`` set.
See docs/upstream.md.

It never retries by itself: the retry policy lives in the run loop. Error messages never carry the access key
secret or the STS token (on a signature mismatch the gateway echoes its string to sign, holding the token).
"""

from __future__ import annotations

import asyncio
import html
import json
import math
import re
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar
from urllib.parse import quote, quote_plus

import httpx

from bridge import __version__
from bridge.errors import (
    FatalUpstreamError,
    MalformedResponseError,
    RefusedParametersError,
    RetryableUpstreamError,
    ThrottledError,
    UpstreamError,
)
from bridge.metrics import AccountMetrics
from bridge.records import RawRecord
from bridge.settings import AccountSettings, UpstreamSettings, env_name
from bridge.signing import SignatureV1Auth, SignatureV3Auth, percent_encode

__all__ = [
    "ACKNOWLEDGE_ACTION",
    "ACK_IDS_MAX_BYTES",
    "ERROR_BODY_MAX_BYTES",
    "POLL_ACTION",
    "AckResult",
    "Page",
    "RawRecord",
    "UpstreamClient",
    "ack_id_query_bytes",
]

_T = TypeVar("_T")

POLL_ACTION = "PollTaskResult"
ACKNOWLEDGE_ACTION = "AcknowledgeTaskResult"
# Most bytes the ``TaskDetailNo.N=<id>&`` parameters of one AcknowledgeTaskResult may take, so its request line
# stays within 8 KiB with V1's common parameters and an STS token of up to ~1.5 KiB beside them (docs/upstream.md).
ACK_IDS_MAX_BYTES = 6 * 1024
# An error body is read only for its Code, Message and RequestId: the rest of a larger one is left unread.
ERROR_BODY_MAX_BYTES = 64 * 1024

# Codes whose meaning does not depend on the HTTP status the gateway paired them with.
_RETRYABLE_CODES = frozenset({"ServiceUnavailable", "InternalError", "UnknownError", "SignatureNonceUsed"})
_FATAL_CODES = frozenset({"SignatureDoesNotMatch", "IncompleteSignature", "Forbidden.RAM"})
_FATAL_PREFIXES = ("InvalidAccessKeyId", "InvalidTimeStamp", "Missing", "InvalidSecurityToken")
# A ``Code`` some gateways put in successful answers; any other code in a 200 without its payload is an error.
_SUCCESS_CODES = frozenset({"", "200", "0", "OK", "Success"})
# What each operation's successful answer carries; a 200 with a Code and without it is an error object.
_PAYLOAD = {POLL_ACTION: "Data", ACKNOWLEDGE_ACTION: "Result"}

_DETAIL_NO = "TaskDetailNo"
_DETAIL_NO_LOWER = _DETAIL_NO.lower()
_MISSING: Any = object()
_SNIPPET_CHARS = 200
_PROBLEM_VALUE_CHARS = 40
_PROBLEM_PATH_CHARS = 100
_XML_FIELD = {name: re.compile(rf"<{name}>(.*?)</{name}>", re.DOTALL) for name in ("Code", "Message", "RequestId")}
# The token's value inside an echoed V1 string to sign (any level of encoding) or V3 canonical request.
_TOKEN_IN_ECHO = re.compile(r"(SecurityToken(?:=|%3D|%253D)|x-acs-security-token:)(.*?)(?=&|%26|\s|\\n|$)", re.I)
_SURROGATE = re.compile("[\ud800-\udfff]")
# A JSON escape that may produce a lone surrogate (only then are the records' strings searched for one).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
# Strings (skipped whole, escapes included) and brackets: what :func:`_cut_deep` needs to track nesting.
_STRUCTURE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)
# Deeper than this, in a body the parser could not take at all, a value is cut out and its record is invalid.
_MAX_DEPTH = 100
# What stands in for a cut value: noncharacters (U+FDD0) around it, so no upstream text can look the same.
_TOO_DEEP = f"\ufdd0nested deeper than {_MAX_DEPTH} levels\ufdd0"
_TOO_DEEP_JSON = json.dumps(_TOO_DEEP)
# Headers the official SDKs do not send (httpx adds them by default); ``identity`` as the SDKs ask, which also
# keeps a compressed answer from expanding past the size cap between two reads.
_DROPPED_HEADERS = ("connection",)
_DROPPED_HEADERS_V1 = ("connection", "accept")


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
    """The outcome of one AcknowledgeTaskResult call.

    ``sent`` ids went out; ``confirmed`` is the upstream's ``Result`` (how many it acknowledged), or ``None``
    when the answer had none usable (missing, negative, not a number); ``request_id`` is the answer's.
    """

    sent: int
    confirmed: int | None
    request_id: str | None = None


def ack_id_query_bytes(detail_no: str, number: int) -> int:
    """Bytes ``TaskDetailNo.<number>=<id>&`` adds to an AcknowledgeTaskResult request line."""
    encoded = len(detail_no) if detail_no.isascii() and detail_no.isalnum() else len(percent_encode(detail_no))
    return len(_DETAIL_NO) + 2 + len(str(number)) + encoded + 1


class UpstreamClient:
    """Signed calls to the Domain API over an injected :class:`httpx.AsyncClient`.

    ``metrics`` (optional) receives one ``upstream_requests`` count and one latency observation per request,
    and the backlog (``TotalItemNum``) of each successful poll. ``clock`` and ``nonce`` are passed to the
    signer (tests use them to provoke clock skew or a reused nonce).
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        settings: UpstreamSettings,
        account: AccountSettings,
        *,
        metrics: AccountMetrics | None = None,
        clock: Callable[[], datetime] | None = None,
        nonce: Callable[[], str] | None = None,
    ) -> None:
        credentials = account.credentials
        auth_class: type[SignatureV1Auth | SignatureV3Auth] = SignatureV3Auth
        signer_options: dict[str, Any] = {}
        if account.signature_version == "v1":
            auth_class = SignatureV1Auth
            signer_options["response_format"] = "json"  # as the official SDKs send it
        if clock is not None:
            signer_options["clock"] = clock
        if nonce is not None:
            signer_options["nonce"] = nonce
        self._http = http
        self.settings = settings
        self.account = account
        self._metrics = metrics
        self._clock = clock or (lambda: datetime.now(UTC))
        self._signer = auth_class(credentials, **signer_options)
        self._url = account.base_url + "/"
        self._base_url = httpx.URL(self._url)  # parsed once; each call's query is added by the signer
        self._version = account.api_version
        self._timeout_s = settings.request_timeout_s
        self._timeout = httpx.Timeout(settings.request_timeout_s)
        self._max_bytes = settings.upstream_max_response_bytes
        self._secrets = _secret_forms(account.secret_values())
        self._poll_filters = _poll_filters(account)
        self._dropped = _DROPPED_HEADERS_V1 if account.signature_version == "v1" else _DROPPED_HEADERS
        # The headers every official SDK sends besides the signature's (x-acs-action/-version go with V1 too).
        self._headers = {
            "accept-encoding": "identity",
            "user-agent": f"task-bridge/{__version__}",
            "x-acs-version": self._version,
            "x-acs-credentials-provider": "static_sts" if account.security_token is not None else "static_ak",
        }
        if account.security_token is not None and account.signature_version == "v3":
            self._headers["x-acs-accesskey-id"] = credentials.access_key_id  # as the SDKs send it next to the token

    def __repr__(self) -> str:
        return (
            f"UpstreamClient(endpoint={self._url!r}, version={self._version!r}, "
            f"signature={self.account.signature_version!r})"
        )

    async def poll(self, page_num: int = 1, page_size: int | None = None) -> Page:
        """Fetch one page of finished task details (``PageNum`` from 1, ``PageSize`` up to 1000).

        Raises :class:`MalformedResponseError` for a page it cannot read, never returns it as empty.
        """
        size = self.settings.page_size if page_size is None else page_size
        params = [("PageNum", str(page_num)), ("PageSize", str(size)), *self._poll_filters]
        page = await self._call(POLL_ACTION, params, lambda body, suspect: _parse_page(body, suspect, page_num, size))
        if self._metrics is not None and page.total_items is not None:
            self._metrics.upstream_backlog.set(page.total_items)
        return page

    async def acknowledge(self, detail_nos: Sequence[str]) -> AckResult:
        """Acknowledge ``detail_nos`` in exactly one AcknowledgeTaskResult call (none for an empty list).

        Batching, retries and the batch size live in the acknowledger. The ids go out byte for byte as given,
        as ``TaskDetailNo.1`` … ``TaskDetailNo.N`` in the query string.
        """
        ids = list(detail_nos)
        if not ids:
            return AckResult(sent=0, confirmed=0)
        params = [(f"TaskDetailNo.{n}", detail_no) for n, detail_no in enumerate(ids, start=1)]
        if self.account.user_client_ip:
            params.append(("UserClientIp", self.account.user_client_ip))
        return await self._call(ACKNOWLEDGE_ACTION, params, lambda body, _: _ack_result(len(ids), body))

    # --- one request ---
    async def _call(
        self, action: str, params: list[tuple[str, str]], parse: Callable[[dict[str, Any], bool], _T]
    ) -> _T:
        """One signed request: ``parse`` of the JSON object of a successful answer (and :func:`_load_json`'s flag).

        ``parse`` runs inside the request's accounting: a page it cannot read counts as ``malformed``.
        """
        query = [("Action", action), ("Version", self._version), ("Lang", self.account.lang), *params]
        started = time.perf_counter()
        outcome: str | None = None
        try:
            body, suspect = await self._send(action, query)
            parsed = parse(body, suspect)
            outcome = "ok"
            return parsed
        except ThrottledError:
            outcome = "throttled"
            raise
        except MalformedResponseError:
            outcome = "malformed"
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

    async def _send(self, action: str, query: list[tuple[str, str]]) -> tuple[dict[str, Any], bool]:
        request = self._http.build_request(
            "POST", self._base_url, content=b"", headers=self._headers, timeout=self._timeout
        )
        request.headers["x-acs-action"] = action
        for name in self._dropped:
            request.headers.pop(name, None)
        # Signed here from the parameters at hand, not by an httpx auth flow that would parse them back out of
        # the URL: the query string of an acknowledgement's hundred ids is then encoded and parsed once.
        self._signer.sign(request, query)
        try:
            # httpx's timeout bounds each phase (and ASGITransport ignores it): this bounds the whole call.
            async with asyncio.timeout(self._timeout_s):
                response = await self._http.send(request, auth=None, stream=True)
                try:
                    limit = self._max_bytes if response.is_success else ERROR_BODY_MAX_BYTES
                    content, complete = await _read_bounded(response, limit)
                finally:
                    await response.aclose()
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise RetryableUpstreamError(f"timed out after {self._timeout_s:g}s", action=action) from exc
        except httpx.TransportError as exc:
            raise self._transport_error(action, request.url.host, exc) from exc
        except httpx.RequestError as exc:  # DecodingError, TooManyRedirects: a garbled answer, try again
            raise RetryableUpstreamError(
                self._scrub(f"request failed ({type(exc).__name__}: {exc})"), action=action
            ) from exc
        if not response.is_success:
            raise self._error_for(action, response, content)
        if not complete:
            raise MalformedResponseError(
                f"HTTP {response.status_code} body is larger than BRIDGE_UPSTREAM_MAX_RESPONSE_BYTES "
                f"({self._max_bytes} bytes); not read further",
                **_context(action, response),
            )
        return self._decode_success(action, response, content)

    def _transport_error(self, action: str, host: str, exc: httpx.TransportError) -> UpstreamError:
        verification = _certificate_error(exc)
        if verification is not None:
            # Fatal: a certificate the configured CAs do not accept is a setting to fix (or an interception),
            # which no retry can change; the one line says which setting.
            detail = verification.verify_message or str(verification)
            reason = f"certificate verify failed: {detail}" if verification.verify_message else detail
            return FatalUpstreamError(
                f"TLS verification of {host} failed ({reason}); set {env_name('upstream_ca_file')} to the CA "
                "that signs it",
                action=action,
            )
        return RetryableUpstreamError(self._scrub(f"transport error ({type(exc).__name__}: {exc})"), action=action)

    def _decode_success(self, action: str, response: httpx.Response, content: bytes) -> tuple[dict[str, Any], bool]:
        try:
            body, suspect = _load_json(content)
        except _Unreadable as exc:
            raise MalformedResponseError(
                f"HTTP {response.status_code} body {exc}: {self._snippet(content)}", **_context(action, response)
            ) from None
        if not isinstance(body, dict):
            raise MalformedResponseError(
                f"HTTP {response.status_code} body is a JSON {_json_type(body)}, not an object",
                **_context(action, response),
            )
        code = _as_str(_get(body, "Code"))
        if code is not None and code not in _SUCCESS_CODES and _get(body, _PAYLOAD[action]) is None:
            raise self._error_for(action, response, content, body=body)
        return body, suspect

    def _error_for(
        self, action: str, response: httpx.Response, content: bytes, *, body: dict[str, Any] | None = None
    ) -> UpstreamError:
        status = response.status_code
        if body is None:
            code, message, request_id = _error_fields(content)
        else:
            code, message, request_id = (_as_str(_get(body, name)) for name in ("Code", "Message", "RequestId"))
        request_id = request_id or response.headers.get("x-acs-request-id")
        text = self._scrub(message) if message else f"unexpected HTTP {status}: {self._snippet(content)}"
        common: dict[str, Any] = {
            "action": action,
            "code": code,
            "request_id": request_id,
            "status_code": status,
        }
        kind = _error_kind(code, status)
        if kind is ThrottledError:
            retry_after = _retry_after_s(response.headers.get("retry-after"), self._clock())
            return ThrottledError(text, retry_after_s=retry_after, **common)
        return kind(text, **common)

    def _snippet(self, content: bytes) -> str:
        text = " ".join(content[:_SNIPPET_CHARS].decode("utf-8", "replace").split())
        return self._scrub(text) if text else "(empty body)"

    def _scrub(self, text: str) -> str:
        """Remove every form of the secret and the token that the text could contain."""
        text = _TOKEN_IN_ECHO.sub(r"\1***", text)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


def _ack_result(sent: int, body: dict[str, Any]) -> AckResult:
    return AckResult(sent=sent, confirmed=_as_count(_get(body, "Result")), request_id=_as_str(_get(body, "RequestId")))


def _error_kind(code: str | None, status: int) -> type[UpstreamError]:
    """The class of an error answer; a 200 carrying an error object is read as its code would be with a 400."""
    if code == "Throttling" or code.startswith("Throttling.") if code else status == 429:
        return ThrottledError
    if code in _RETRYABLE_CODES:
        return RetryableUpstreamError
    if code is not None and (code in _FATAL_CODES or code.startswith(_FATAL_PREFIXES)):
        return FatalUpstreamError
    if status >= 500:
        return RetryableUpstreamError
    if status in (413, 414) or (status in (200, 400) and code is not None and code.startswith("InvalidParameter")):
        return RefusedParametersError
    if 200 <= status < 300:
        # An unknown code in a successful answer: the gateway did not refuse the request, so try it again.
        return RetryableUpstreamError
    return FatalUpstreamError


def _context(action: str, response: httpx.Response) -> dict[str, Any]:
    return {
        "action": action,
        "status_code": response.status_code,
        "request_id": response.headers.get("x-acs-request-id"),
    }


async def _read_bounded(response: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """The body, decoded, up to ``limit`` bytes; ``False`` with what was read when the body is longer.

    A ``Content-Length`` above the limit stops before reading anything; otherwise reading stops at the first
    chunk that passes it, so memory never holds more than the limit and one chunk.
    """
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and len(declared) < 20 and int(declared) > limit:
        return b"", False
    chunks: list[bytes] = []
    total = 0
    async for chunk in response.aiter_bytes():
        total += len(chunk)
        if total > limit:
            chunks.append(chunk[: len(chunk) - (total - limit)])
            return b"".join(chunks), False
        chunks.append(chunk)
    return b"".join(chunks), True


def _certificate_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLCertVerificationError):
            return current
        seen.add(id(current))
        nested = current.args[0] if current.args and isinstance(current.args[0], BaseException) else None
        current = current.__cause__ or current.__context__ or nested
    return None


# --- parsing, kept free of pydantic: a page holds up to 1000 records and a drain reads thousands of pages ---
class _Unreadable(Exception):
    """The body cannot be parsed at all (the message says why, in a few words)."""


class _Unrepresentable(str):
    """A number Python cannot hold (too many digits, infinite, NaN), kept as the text the upstream sent."""

    __slots__ = ()


class _Numbers:
    """``json.loads`` hooks that turn numbers Python cannot hold into :class:`_Unrepresentable` markers."""

    __slots__ = ("found",)

    def __init__(self) -> None:
        self.found = False

    def parse_float(self, text: str) -> Any:
        value = float(text)
        if math.isfinite(value):
            return value
        self.found = True
        return _Unrepresentable(text)

    def parse_constant(self, text: str) -> Any:  # NaN, Infinity, -Infinity: not JSON, and not representable
        self.found = True
        return _Unrepresentable(text)

    def parse_int(self, text: str) -> Any:
        try:
            return int(text)
        except ValueError:  # more digits than int() accepts (4300 by default)
            self.found = True
            return _Unrepresentable(text)


def _load_json(content: bytes) -> tuple[Any, bool]:
    """Parse ``content``; raise :class:`_Unreadable` for anything that is not a readable JSON document.

    The flag is True when the records may hold values that cannot be represented (see :func:`_problem`).

    Fast path: the C parser with hooks for floats and constants only (rare in a page). An integer too long for
    ``int()`` makes it fail; only then is the body parsed again with an integer hook too.
    """
    numbers = _Numbers()
    hooks: dict[str, Any] = {"parse_float": numbers.parse_float, "parse_constant": numbers.parse_constant}
    try:
        try:
            body = json.loads(content, **hooks)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise
        except ValueError:  # an integer past int()'s digit limit: parse again, keeping it as text
            body = json.loads(content, parse_int=numbers.parse_int, **hooks)
        except RecursionError:  # nested deeper than the parser goes: parse it with the deep parts cut out
            body = json.loads(_cut_deep(content.decode("utf-8")), parse_int=numbers.parse_int, **hooks)
            numbers.found = True
    except json.JSONDecodeError as exc:
        raise _Unreadable(f"is not valid JSON ({exc.msg} at byte {exc.pos})") from None
    except UnicodeDecodeError as exc:
        raise _Unreadable(f"is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise _Unreadable("is nested too deeply to parse") from None
    except ValueError as exc:
        raise _Unreadable(f"cannot be parsed ({' '.join(str(exc).split())[:100]})") from None
    return body, numbers.found or _SURROGATE_ESCAPE.search(content) is not None


def _cut_deep(text: str) -> str:
    """``text`` with every array or object nested deeper than ``_MAX_DEPTH`` replaced by a :data:`_TOO_DEEP` string.

    One pass of a regular expression over strings and brackets (no recursion), so one deep record is cut out
    of its page and the rest of the page parses; the cut record goes to the invalid route (see :func:`_problem`).
    """
    parts: list[str] = []
    depth = 0
    cut_from = -1
    kept_to = 0
    for match in _STRUCTURE.finditer(text):
        token = match.group()
        if token == "[" or token == "{":
            depth += 1
            if depth == _MAX_DEPTH + 1:
                cut_from = match.start()
        elif token == "]" or token == "}":
            if depth == _MAX_DEPTH + 1 and cut_from >= 0:
                parts.append(text[kept_to:cut_from])
                parts.append(_TOO_DEEP_JSON)
                kept_to = match.end()
                cut_from = -1
            depth -= 1
    parts.append(text[kept_to:])
    return "".join(parts)


def _parse_page(body: dict[str, Any], suspect: bool, page_num: int, page_size: int) -> Page:
    total_items = _as_int(_get(body, "TotalItemNum"))
    items = _page_items(body)
    if items is None:
        # No records container: an empty backlog only when the page says so (TotalItemNum 0).
        if total_items != 0:
            raise MalformedResponseError(
                "HTTP 200 page has no Data.TaskDetail while TotalItemNum is "
                + ("missing" if total_items is None else str(total_items)),
                action=POLL_ACTION,
                status_code=200,
                request_id=_as_str(_get(body, "RequestId")),
            )
        items = []
    records = [_record(item, suspect) for item in items]
    next_page = _get(body, "NextPage")
    return Page(
        request_id=_as_str(_get(body, "RequestId")),
        page_num=_as_int(_get(body, "CurrentPageNum")) or page_num,
        page_size=_as_int(_get(body, "PageSize")) or page_size,
        total_items=total_items,
        total_pages=_as_int(_get(body, "TotalPageNum")),
        records=records,
        has_next=_as_bool(next_page),
    )


def _page_items(body: dict[str, Any]) -> list[Any] | None:
    """The page's records, or ``None`` when it has no records container (no ``Data`` or ``Data.TaskDetail``)."""
    data = _get(body, "Data")
    if isinstance(data, list):  # the list without its wrapper
        return data
    if not isinstance(data, dict):
        return None
    details = _get(data, "TaskDetail")
    if isinstance(details, list):
        return details
    if isinstance(details, dict):  # a single detail rendered as an object (a doc quirk of sibling operations)
        return [details] if details else []
    return None


def _record(item: Any, suspect: bool) -> RawRecord:
    problem = _problem(item) if suspect else None
    detail_no = _detail_no(item)
    if detail_no is not None and _SURROGATE.search(detail_no):
        detail_no = None  # cannot be sent back (nor be a message id): it stays upstream
    return RawRecord(item, detail_no, problem)


def _problem(item: Any) -> str | None:
    """One line naming the first value of ``item`` that cannot be represented, or ``None``."""
    stack: list[tuple[str, Any]] = [("", item)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, _Unrepresentable):
            digits = f", {len(value)} characters" if len(value) > _PROBLEM_VALUE_CHARS else ""
            return f"{_path(path)}: number {_cut(value)} cannot be represented{digits}"
        if isinstance(value, str):
            if value == _TOO_DEEP:
                return f"{_path(path)}: nested deeper than {_MAX_DEPTH} levels, cannot be represented"
            if _SURROGATE.search(value):
                return f"{_path(path)}: text {_cut(value)!a} holds a lone surrogate, not valid Unicode"
        elif isinstance(value, dict):
            for key, child in reversed(value.items()):
                if _SURROGATE.search(key):
                    return f"{_path(path)}: key {_cut(key)!a} holds a lone surrogate, not valid Unicode"
                stack.append((f"{path}.{key}" if path else key, child))
        elif isinstance(value, list):
            stack.extend((f"{path}[{index}]", child) for index, child in reversed(list(enumerate(value))))
    return None


def _path(path: str) -> str:
    return _cut(path, _PROBLEM_PATH_CHARS) if path else "record"


def _cut(text: str, limit: int = _PROBLEM_VALUE_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _json_type(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def _detail_no(item: Any) -> str | None:
    """``TaskDetailNo`` exactly as received (no strip, no case folding); ``None`` when it is no usable id."""
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
    if isinstance(value, _Unrepresentable):
        return None
    if isinstance(value, str):
        return value or None
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


def _as_count(value: Any) -> int | None:
    """A count the upstream reported (``Result``): ``None`` when it is missing, negative or not a number."""
    if isinstance(value, str):  # digits only (no sign), and few enough to be a count
        text = value.strip()
        return int(text) if text.isascii() and text.isdigit() and len(text) < 19 else None
    number = _as_int(value)
    return number if number is not None and number >= 0 else None


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


def _error_fields(content: bytes) -> tuple[str | None, str | None, str | None]:
    """``Code``, ``Message`` and ``RequestId`` of a JSON or XML error body, each ``None`` when absent."""
    try:
        body = json.loads(content)
    except (ValueError, RecursionError):
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


def _poll_filters(account: AccountSettings) -> list[tuple[str, str]]:
    filters = {
        "TaskResultStatus": account.task_result_status,
        "DomainName": account.domain_name,
        "InstanceId": account.instance_id,
        "TaskNo": account.task_no,
        "UserClientIp": account.user_client_ip,
    }
    return [(name, str(value)) for name, value in filters.items() if value is not None and value != ""]
