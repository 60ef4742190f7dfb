"""Verification of signed requests, V1 (HMAC-SHA1 parameters) and V3 (``ACS3-HMAC-SHA256`` headers).

The canonical forms come from :mod:`bridge.signing`, the same functions the bridge signs with; what the
gateway checks besides (known access key, STS token, clock skew, nonce reuse) lives here.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime

from bridge.signing import V3_ALGORITHM, sign_v1, sign_v3, v1_string_to_sign, v3_canonical_request
from bridge.simulator.gateway_errors import ApiError, incomplete_signature
from bridge.simulator.request import ApiRequest

__all__ = ["MAX_SKEW_S", "NonceCache", "Verifier"]

MAX_SKEW_S = 15 * 60
_TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_AUTHORIZATION = re.compile(
    r"^(?P<algorithm>\S+)\s+Credential=(?P<key>[^,\s]+)\s*,\s*SignedHeaders=(?P<signed>[^,\s]*)\s*,"
    r"\s*Signature=(?P<signature>[0-9a-fA-F]+)\s*$"
)
_V1_COMMON = ("AccessKeyId", "SignatureMethod", "SignatureVersion", "SignatureNonce", "Timestamp")


class NonceCache:
    """Nonces seen within the skew window, bounded in count; the oldest are forgotten first."""

    def __init__(self, *, ttl_s: float = MAX_SKEW_S, capacity: int = 200_000) -> None:
        self._ttl_s = ttl_s
        self._capacity = capacity
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def check_and_add(self, key_id: str, nonce: str, now_s: float) -> bool:
        """Record ``nonce`` for ``key_id``; ``False`` when it was already used."""
        while self._seen:
            oldest, seen_at = next(iter(self._seen.items()))
            if now_s - seen_at <= self._ttl_s and len(self._seen) < self._capacity:
                break
            del self._seen[oldest]
        if (key_id, nonce) in self._seen:
            return False
        self._seen[(key_id, nonce)] = now_s
        return True


def _signature_mismatch(string_to_sign: str) -> ApiError:
    # Like the real gateway, the message ends with the server's string to sign, for the client to compare.
    return ApiError(
        400,
        "SignatureDoesNotMatch",
        f"Specified signature is not matched with our calculation. server string to sign is:{string_to_sign}",
    )


class Verifier:
    """Checks a request's signature against one access key pair (and STS token, when one is required)."""

    def __init__(
        self,
        access_key_id: str,
        access_key_secret: str,
        security_token: str | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key_id = access_key_id
        self._secret = access_key_secret
        self._token = security_token
        self._clock = clock
        self.nonces = NonceCache()

    def __repr__(self) -> str:
        return f"Verifier(access_key_id={self._key_id!r})"

    def verify(self, request: ApiRequest) -> None:
        """Return when ``request`` is correctly signed, else raise the gateway's :class:`ApiError`."""
        authorization = request.headers.get("authorization")
        if authorization is not None and authorization.startswith("ACS3-"):
            self._verify_v3(request, authorization)
        else:
            self._verify_v1(request)

    def _check_key(self, key_id: str) -> None:
        if not hmac.compare_digest(key_id.encode(), self._key_id.encode()):
            raise ApiError(404, "InvalidAccessKeyId.NotFound", "Specified access key is not found.")

    def _check_token(self, token: str | None, name: str) -> None:
        if self._token is None:
            return
        if not token:
            raise ApiError(400, f"Missing{name}", f"{name} is mandatory for this action.")
        if not hmac.compare_digest(token.encode(), self._token.encode()):
            # Never echo the token: the message only says which parameter was wrong.
            raise ApiError(400, "InvalidSecurityToken.Mismatch", f"Specified {name} is not valid.")

    def _check_time(self, stamp: str) -> None:
        try:
            sent = datetime.strptime(stamp, _TIMESTAMP_FORMAT).replace(tzinfo=UTC).timestamp()
        except ValueError:
            raise ApiError(
                400, "InvalidTimeStamp.Format", "Specified time stamp or date value is not well formatted."
            ) from None
        if abs(self._clock() - sent) > MAX_SKEW_S:
            raise ApiError(400, "InvalidTimeStamp.Expired", "Specified time stamp or date value is expired.")

    def _check_nonce(self, key_id: str, nonce: str) -> None:
        if not self.nonces.check_and_add(key_id, nonce, self._clock()):
            raise ApiError(400, "SignatureNonceUsed", "Specified signature nonce was used already.")

    def _verify_v1(self, request: ApiRequest) -> None:
        params = request.params
        if "Signature" not in params:
            raise ApiError(400, "MissingSignature", "Signature is mandatory for this action.")
        for name in _V1_COMMON:
            if not params.get(name):
                raise ApiError(400, f"Missing{name}", f"{name} is mandatory for this action.")
        if params["SignatureMethod"] != "HMAC-SHA1" or params["SignatureVersion"] != "1.0":
            raise incomplete_signature("V1 signing needs SignatureMethod=HMAC-SHA1 and SignatureVersion=1.0.")
        self._check_key(params["AccessKeyId"])
        self._check_token(params.get("SecurityToken"), "SecurityToken")
        self._check_time(params["Timestamp"])
        signed = [(k, v) for k, v in request.query + request.form if k != "Signature"]
        expected = sign_v1(self._secret, request.method, signed)
        if not hmac.compare_digest(expected.encode(), params["Signature"].encode()):
            raise _signature_mismatch(v1_string_to_sign(request.method, signed))
        self._check_nonce(params["AccessKeyId"], params["SignatureNonce"])

    def _verify_v3(self, request: ApiRequest, authorization: str) -> None:
        headers = request.headers
        match = _AUTHORIZATION.match(authorization)
        if match is None:
            raise incomplete_signature("The Authorization header is malformed.")
        if match["algorithm"] != V3_ALGORITHM:
            raise incomplete_signature(f"The signature algorithm {match['algorithm']} is not supported here.")
        signed = match["signed"].split(";") if match["signed"] else []
        for name in ("x-acs-date", "x-acs-signature-nonce", "x-acs-content-sha256"):
            if not headers.get(name):
                raise ApiError(400, "MissingParameter", f"The header {name} is mandatory for this action.")
        unsigned = [n for n in headers if (n == "host" or n.startswith("x-acs-")) and n not in signed]
        if unsigned:
            raise incomplete_signature(f"These headers must be signed: {';'.join(sorted(unsigned))}.")
        absent = [n for n in signed if n not in headers]
        if absent or signed != sorted(signed):
            raise incomplete_signature("SignedHeaders must list present headers in lower case, sorted.")
        self._check_key(match["key"])
        self._check_token(headers.get("x-acs-security-token"), "x-acs-security-token")
        self._check_time(headers["x-acs-date"])
        body_sha256 = hashlib.sha256(request.body).hexdigest()
        if headers["x-acs-content-sha256"].lower() != body_sha256:
            raise ApiError(
                400, "SignatureDoesNotMatch", "The x-acs-content-sha256 header does not match the request body."
            )
        canonical = v3_canonical_request(request.method, request.query, headers, signed, body_sha256)
        expected = sign_v3(self._secret, canonical)
        if not hmac.compare_digest(expected, match["signature"].lower()):
            string_to_sign = f"{V3_ALGORITHM}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
            raise _signature_mismatch(string_to_sign)
        self._check_nonce(match["key"], headers["x-acs-signature-nonce"])
