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
import string
import uuid
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
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
_UNRESERVED = string.ascii_letters + string.digits + "-_.~"


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
    # Most names and values (ids, numbers, dates) need no escape: one C-level scan tells, without quote()'s work.
    return value if not value.rstrip(_UNRESERVED) else quote(value, safe="~")


def canonical_query(params: Iterable[tuple[str, str]]) -> str:
    """``k1=v1&k2=v2`` over the parameters sorted by name, names and values percent-encoded."""
    return "&".join(f"{percent_encode(k)}={percent_encode(v)}" for k, v in sorted(params))


def request_params(request: httpx.Request) -> list[tuple[str, str]]:
    """Every parameter of a request: its query and, for a form body, the form fields."""
    return list(request.url.params.multi_items()) + _form_params(request)


def _form_params(request: httpx.Request) -> list[tuple[str, str]]:
    if request.headers.get("content-type", "").split(";")[0].strip() != _FORM:
        return []
    return parse_qsl(request.content.decode("utf-8"), keep_blank_values=True)


def v1_string_to_sign(method: str, params: Iterable[tuple[str, str]]) -> str:
    return _v1_string_to_sign(method, canonical_query(params))


def _v1_string_to_sign(method: str, canonical: str) -> str:
    # percent_encode(canonical), done by hand: a canonical query holds only unreserved characters, escapes and
    # the separators, so these three replacements are its whole encoding (and far cheaper on 5 KB of ids).
    encoded = canonical.replace("%", "%25").replace("=", "%3D").replace("&", "%26")
    return f"{method.upper()}&%2F&{encoded}"


def sign_v1(secret: str, method: str, params: Iterable[tuple[str, str]]) -> str:
    """The V1 ``Signature`` of a request (``Signature`` itself must not be among ``params``)."""
    return _v1_signature(secret, _v1_string_to_sign(method, canonical_query(params)))


def _v1_signature(secret: str, string_to_sign: str) -> str:
    digest = hmac.new(f"{secret}&".encode(), string_to_sign.encode(), hashlib.sha1).digest()
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
    return _v3_canonical_request(method, canonical_query(params), headers, signed, body_sha256, path)


def _v3_canonical_request(
    method: str, query: str, headers: Mapping[str, str], signed: list[str], body_sha256: str, path: str
) -> str:
    lowered = {k.lower(): v for k, v in headers.items()}
    canonical_headers = "".join(f"{name}:{lowered[name].strip()}\n" for name in signed)
    return "\n".join([method.upper(), path, query, canonical_headers, ";".join(signed), body_sha256])


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

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        self.sign(request, request.url.params.multi_items())
        yield request

    def sign(self, request: httpx.Request, query: Sequence[tuple[str, str]]) -> None:
        """Sign ``request`` in place: add the method's headers and give it the query string made of ``query``.

        ``query`` stands for the request's query parameters, which :meth:`auth_flow` reads from its URL. A
        caller that has them at hand passes them and leaves the request's URL without a query: the query
        string is then encoded once and the URL parsed once (an acknowledgement's hundred ids make that
        worth it), with the same bytes on the wire as through :meth:`auth_flow`.
        """
        raise NotImplementedError


class SignatureV1Auth(_SigningAuth):
    """Adds the V1 common parameters (``Format`` included) and the HMAC-SHA1 ``Signature`` to the query.

    ``response_format`` is ``JSON`` as the API reference writes it; the upstream client passes ``json``, as the
    official SDKs send it (the gateway reads either).
    """

    def __init__(self, credentials: Credentials, *, response_format: str = "JSON", **options: Any) -> None:
        super().__init__(credentials, **options)
        self._format = response_format

    def sign(self, request: httpx.Request, query: Sequence[tuple[str, str]]) -> None:
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
        params = [(k, v) for k, v in query if k not in common]
        params.extend(common.items())
        canonical = canonical_query(params)
        body_params = _form_params(request)
        # The query string sent is the canonical one the signature covers, unless form fields are signed too.
        signed = canonical_query(params + body_params) if body_params else canonical
        secret = creds.access_key_secret.get_secret_value()
        signature = _v1_signature(secret, _v1_string_to_sign(request.method, signed))
        raw_query = f"{canonical}&Signature={percent_encode(signature)}"
        request.url = request.url.copy_with(query=raw_query.encode("ascii"))


class SignatureV3Auth(_SigningAuth):
    """Signs with ``ACS3-HMAC-SHA256``; ``Action``/``Version`` move from the query into ``x-acs-*`` headers."""

    def sign(self, request: httpx.Request, query: Sequence[tuple[str, str]]) -> None:
        creds = self._credentials
        headers = request.headers
        params: list[tuple[str, str]] = []
        identity: dict[str, str] = {}
        for name, value in query:
            if name == "Action" or name == "Version":
                identity.setdefault(name, value)  # the first one, as a query parameter's lookup gives
            else:
                params.append((name, value))
        if "Action" in identity:
            headers["x-acs-action"] = identity["Action"]
        if "Version" in identity:
            headers["x-acs-version"] = identity["Version"]
        headers["x-acs-date"] = _utc_timestamp(self._clock())
        headers["x-acs-signature-nonce"] = self._nonce()
        body_sha256 = hashlib.sha256(request.content).hexdigest()
        headers["x-acs-content-sha256"] = body_sha256
        # V3 has no Format parameter: the gateway answers XML unless the client asks for JSON.
        headers["accept"] = "application/json"
        if creds.security_token is not None:
            headers["x-acs-security-token"] = creds.security_token.get_secret_value()
        canonical = canonical_query(params)
        request.url = request.url.copy_with(query=canonical.encode("ascii") or None)
        plain = dict(headers.items())
        signed = v3_signed_headers(plain)
        canonical_request = _v3_canonical_request(request.method, canonical, plain, signed, body_sha256, "/")
        signature = sign_v3(creds.access_key_secret.get_secret_value(), canonical_request)
        headers["authorization"] = (
            f"{V3_ALGORITHM} Credential={creds.access_key_id},SignedHeaders={';'.join(signed)},Signature={signature}"
        )
