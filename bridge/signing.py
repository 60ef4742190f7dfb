"""Alibaba Cloud request signing, both methods the gateway accepts, as :class:`httpx.Auth`.

- :class:`SignatureV1Auth`: HMAC-SHA1 over the sorted query and form parameters (``SignatureVersion=1.0``).
- :class:`SignatureV3Auth`: ``ACS3-HMAC-SHA256`` over a canonical request, carried in headers.

The upstream client always sends the RPC identity as ``Action`` and ``Version`` query parameters; V1 signs them
where they are, V3 moves them into the ``x-acs-action`` / ``x-acs-version`` headers where that method carries
them. The pure functions (:func:`percent_encode`, :func:`v1_string_to_sign`, :func:`v3_canonical_request` …) are
shared with the simulator, which verifies what the auth classes sign.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid
from collections.abc import Callable, Generator, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, quote

import httpx
from pydantic import SecretStr

__all__ = [
    "V3_ALGORITHM",
    "Credentials",
    "SignatureV1Auth",
    "SignatureV3Auth",
    "canonical_query",
    "percent_encode",
    "request_params",
    "sign_v1",
    "sign_v3",
    "v1_string_to_sign",
    "v3_canonical_request",
    "v3_signed_headers",
]

V3_ALGORITHM = "ACS3-HMAC-SHA256"
_FORM = "application/x-www-form-urlencoded"


class Credentials:
    """An access key pair and optional STS token. The repr never shows the secret or the token."""

    __slots__ = ("access_key_id", "access_key_secret", "security_token")

    def __init__(self, access_key_id: str, access_key_secret: SecretStr, security_token: SecretStr | None = None):
        self.access_key_id = access_key_id
        self.access_key_secret = access_key_secret
        self.security_token = security_token

    def __repr__(self) -> str:
        return f"Credentials(access_key_id={self.access_key_id!r}, access_key_secret='**********')"


def percent_encode(value: str) -> str:
    """RFC 3986 encoding as Alibaba signs it: UTF-8, only ``A-Z a-z 0-9 - _ . ~`` kept (space is ``%20``)."""
    return quote(value, safe="~")


def canonical_query(params: Iterable[tuple[str, str]]) -> str:
    """``k1=v1&k2=v2`` over the parameters sorted by name, names and values percent-encoded."""
    return "&".join(f"{percent_encode(k)}={percent_encode(v)}" for k, v in sorted(params))


def request_params(request: httpx.Request) -> list[tuple[str, str]]:
    """Every parameter of a request: its query and, for a form body, the form fields."""
    params = list(request.url.params.multi_items())
    if request.headers.get("content-type", "").split(";")[0].strip() == _FORM:
        params.extend(parse_qsl(request.content.decode("utf-8"), keep_blank_values=True))
    return params


def v1_string_to_sign(method: str, params: Iterable[tuple[str, str]]) -> str:
    return f"{method.upper()}&{percent_encode('/')}&{percent_encode(canonical_query(params))}"


def sign_v1(secret: str, method: str, params: Iterable[tuple[str, str]]) -> str:
    """The V1 ``Signature`` of a request (``Signature`` itself must not be among ``params``)."""
    digest = hmac.new(f"{secret}&".encode(), v1_string_to_sign(method, params).encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def v3_signed_headers(headers: Mapping[str, str]) -> list[str]:
    """Header names V3 signs: ``host``, ``content-type`` and every ``x-acs-*``, lower case and sorted."""
    names = {k.lower() for k in headers}
    return sorted(n for n in names if n in ("host", "content-type") or n.startswith("x-acs-"))


def v3_canonical_request(
    method: str,
    params: Iterable[tuple[str, str]],
    headers: Mapping[str, str],
    signed: list[str],
    body_sha256: str,
    path: str = "/",
) -> str:
    lowered = {k.lower(): v for k, v in headers.items()}
    canonical_headers = "".join(f"{name}:{lowered[name].strip()}\n" for name in signed)
    return "\n".join([method.upper(), path, canonical_query(params), canonical_headers, ";".join(signed), body_sha256])


def sign_v3(secret: str, canonical_request: str) -> str:
    """The hex V3 signature of a canonical request."""
    string_to_sign = f"{V3_ALGORITHM}\n{hashlib.sha256(canonical_request.encode()).hexdigest()}"
    return hmac.new(secret.encode(), string_to_sign.encode(), hashlib.sha256).hexdigest()


def _utc_timestamp(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _SigningAuth(httpx.Auth):
    requires_request_body = True

    def __init__(
        self,
        credentials: Credentials,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        nonce: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        self._credentials = credentials
        self._clock = clock
        self._nonce = nonce

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._credentials!r})"


class SignatureV1Auth(_SigningAuth):
    """Adds the V1 common parameters (``Format`` included) and the HMAC-SHA1 ``Signature`` to the query.

    ``response_format`` is ``JSON`` as the API reference writes it; the upstream client passes ``json``, as the
    official SDKs send it (the gateway reads either).
    """

    def __init__(self, credentials: Credentials, *, response_format: str = "JSON", **options: Any) -> None:
        super().__init__(credentials, **options)
        self._format = response_format

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        creds = self._credentials
        common = {
            "Format": self._format,
            "AccessKeyId": creds.access_key_id,
            "SignatureMethod": "HMAC-SHA1",
            "SignatureVersion": "1.0",
            "SignatureNonce": self._nonce(),
            "Timestamp": _utc_timestamp(self._clock()),
        }
        if creds.security_token is not None:
            common["SecurityToken"] = creds.security_token.get_secret_value()
        query = [(k, v) for k, v in request.url.params.multi_items() if k not in common]
        query.extend(common.items())
        body_params = request_params(request)[len(request.url.params.multi_items()) :]
        signature = sign_v1(creds.access_key_secret.get_secret_value(), request.method, query + body_params)
        raw_query = f"{canonical_query(query)}&Signature={percent_encode(signature)}"
        request.url = request.url.copy_with(query=raw_query.encode("ascii"))
        yield request


class SignatureV3Auth(_SigningAuth):
    """Signs with ``ACS3-HMAC-SHA256``; ``Action``/``Version`` move from the query into ``x-acs-*`` headers."""

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        creds = self._credentials
        params = request.url.params
        query = [(k, v) for k, v in params.multi_items() if k not in ("Action", "Version")]
        if "Action" in params:
            request.headers["x-acs-action"] = params["Action"]
        if "Version" in params:
            request.headers["x-acs-version"] = params["Version"]
        request.headers["x-acs-date"] = _utc_timestamp(self._clock())
        request.headers["x-acs-signature-nonce"] = self._nonce()
        body_sha256 = hashlib.sha256(request.content).hexdigest()
        request.headers["x-acs-content-sha256"] = body_sha256
        # V3 has no Format parameter: the gateway answers XML unless the client asks for JSON.
        request.headers["accept"] = "application/json"
        if creds.security_token is not None:
            request.headers["x-acs-security-token"] = creds.security_token.get_secret_value()
        request.url = request.url.copy_with(query=canonical_query(query).encode("ascii") or None)
        headers = {k: v for k, v in request.headers.items()}
        signed = v3_signed_headers(headers)
        canonical = v3_canonical_request(request.method, query, headers, signed, body_sha256)
        signature = sign_v3(creds.access_key_secret.get_secret_value(), canonical)
        request.headers["authorization"] = (
            f"{V3_ALGORITHM} Credential={creds.access_key_id},SignedHeaders={';'.join(signed)},Signature={signature}"
        )
        yield request
