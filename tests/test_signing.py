"""Request signing: Alibaba's published vectors, then a cross-check against the official implementation.

The official implementation is ``alibabacloud_openapi_util.client.Client`` (``get_rpcsignature`` for V1,
``get_authorization`` for V3), the code every current Alibaba Cloud Python SDK signs with. The cross-check
feeds it the parameters as the *server* decodes them from our wire request, so it also proves our encoding
round-trips.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from alibabacloud_openapi_util.client import Client as OfficialUtil
from pydantic import SecretStr

from bridge.signing import (
    Credentials,
    SignatureV1Auth,
    SignatureV3Auth,
    canonical_query,
    percent_encode,
    sign_v1,
    sign_v3,
    v1_string_to_sign,
    v3_canonical_request,
    v3_signed_headers,
)

EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def _signed(auth: httpx.Auth, request: httpx.Request) -> httpx.Request:
    """Run an auth flow once and return the request it sends."""
    return next(auth.sync_auth_flow(request))


# --- V1: the two official DescribeRegions / DescribeDedicatedHosts examples ---
V1_EXAMPLE_1 = {
    "AccessKeyId": "testid",
    "Action": "DescribeRegions",
    "Format": "XML",
    "SignatureMethod": "HMAC-SHA1",
    "SignatureNonce": "3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf",
    "SignatureVersion": "1.0",
    "Timestamp": "2016-02-23T12:46:24Z",
    "Version": "2014-05-26",
}
V1_EXAMPLE_2 = {
    "AccessKeyId": "testid",
    "Action": "DescribeDedicatedHosts",
    "Format": "JSON",
    "RegionId": "cn-beijing",
    "SignatureMethod": "HMAC-SHA1",
    "SignatureNonce": "edb2b34af0af9a6d14deaf7c1a5315eb",
    "SignatureVersion": "1.0",
    "Timestamp": "2023-03-13T08:34:30Z",
    "Version": "2014-05-26",
}


@pytest.mark.parametrize(
    ("params", "expected"),
    [(V1_EXAMPLE_1, "OLeaidS1JvxuMvnyHOwuJ+uX5qY="), (V1_EXAMPLE_2, "9NaGiOspFP5UPcwX8Iwt2YJXXuk=")],
)
def test_v1_official_examples(params: dict[str, str], expected: str) -> None:
    assert sign_v1("testsecret", "GET", params.items()) == expected


def test_v1_string_to_sign_of_the_first_example() -> None:
    # The documented string to sign, so a failure says whether encoding or hashing broke.
    assert v1_string_to_sign("GET", V1_EXAMPLE_1.items()) == (
        "GET&%2F&AccessKeyId%3Dtestid%26Action%3DDescribeRegions%26Format%3DXML"
        "%26SignatureMethod%3DHMAC-SHA1%26SignatureNonce%3D3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf"
        "%26SignatureVersion%3D1.0%26Timestamp%3D2016-02-23T12%253A46%253A24Z%26Version%3D2014-05-26"
    )


def test_v1_auth_reproduces_the_second_example() -> None:
    auth = SignatureV1Auth(
        Credentials("testid", SecretStr("testsecret")),
        clock=lambda: datetime(2023, 3, 13, 8, 34, 30, tzinfo=UTC),
        nonce=lambda: "edb2b34af0af9a6d14deaf7c1a5315eb",
    )
    request = httpx.Request(
        "GET",
        "https://ecs.aliyuncs.com/",
        params={"Action": "DescribeDedicatedHosts", "Version": "2014-05-26", "RegionId": "cn-beijing"},
    )
    sent = _signed(auth, request)
    params = dict(sent.url.params.multi_items())
    assert params.pop("Signature") == "9NaGiOspFP5UPcwX8Iwt2YJXXuk="
    assert params == V1_EXAMPLE_2


def test_percent_encoding_rules() -> None:
    assert percent_encode("a b*c~d/e+f=g&h") == "a%20b%2Ac~d%2Fe%2Bf%3Dg%26h"
    assert percent_encode("é中") == "%C3%A9%E4%B8%AD"
    assert canonical_query([("b", "2"), ("a", "x y")]) == "a=x%20y&b=2"


# --- V3: the official ECS RunInstances example ---
V3_QUERY = [("ImageId", "win2019_1809_x64_dtc_zh-cn_40G_alibase_20230811.vhd"), ("RegionId", "cn-shanghai")]
V3_HEADERS = {
    "host": "ecs.cn-shanghai.aliyuncs.com",
    "x-acs-action": "RunInstances",
    "x-acs-version": "2014-05-26",
    "x-acs-date": "2023-10-26T10:22:32Z",
    "x-acs-signature-nonce": "3156853299f313e23d1673dc12e1703d",
    "x-acs-content-sha256": EMPTY_SHA256,
}
V3_CANONICAL_SHA256 = "7ea06492da5221eba5297e897ce16e55f964061054b7695beedaac1145b1e259"
V3_SIGNATURE = "06563a9e1b43f5dfe96b81484da74bceab24a1d853912eee15083a6f0f3283c0"
V3_SIGNED = "host;x-acs-action;x-acs-content-sha256;x-acs-date;x-acs-signature-nonce;x-acs-version"


def test_v3_official_example_with_the_pure_functions() -> None:
    signed = v3_signed_headers(V3_HEADERS)
    assert ";".join(signed) == V3_SIGNED
    canonical = v3_canonical_request("POST", V3_QUERY, V3_HEADERS, signed, EMPTY_SHA256)
    assert hashlib.sha256(canonical.encode()).hexdigest() == V3_CANONICAL_SHA256
    assert sign_v3("YourAccessKeySecret", canonical) == V3_SIGNATURE


def test_v3_official_example_with_the_auth_class() -> None:
    auth = SignatureV3Auth(
        Credentials("YourAccessKeyId", SecretStr("YourAccessKeySecret")),
        clock=lambda: datetime(2023, 10, 26, 10, 22, 32, tzinfo=UTC),
        nonce=lambda: "3156853299f313e23d1673dc12e1703d",
    )
    request = httpx.Request(
        "POST",
        "https://ecs.cn-shanghai.aliyuncs.com/",
        params=[*V3_QUERY, ("Action", "RunInstances"), ("Version", "2014-05-26")],
    )
    sent = _signed(auth, request)
    assert sent.headers["authorization"] == (
        f"ACS3-HMAC-SHA256 Credential=YourAccessKeyId,SignedHeaders={V3_SIGNED},Signature={V3_SIGNATURE}"
    )
    # Action and Version moved into headers; the API parameters stay in the query.
    assert list(sent.url.params.multi_items()) == V3_QUERY
    assert sent.headers["x-acs-action"] == "RunInstances"
    assert sent.headers["x-acs-version"] == "2014-05-26"
    assert sent.headers["accept"] == "application/json"


def test_v3_auth_signs_the_sts_token_header() -> None:
    auth = SignatureV3Auth(Credentials("id", SecretStr("secret"), SecretStr("the-token")))
    sent = _signed(auth, httpx.Request("POST", "https://domain.aliyuncs.com/", params={"Action": "X"}))
    assert sent.headers["x-acs-security-token"] == "the-token"
    assert "x-acs-security-token" in sent.headers["authorization"].split("SignedHeaders=")[1].split(",")[0]


def test_auth_reprs_hide_the_secret_and_token() -> None:
    creds = Credentials("visible-id", SecretStr("hidden-secret"), SecretStr("hidden-token"))
    for text in (repr(creds), repr(SignatureV1Auth(creds)), repr(SignatureV3Auth(creds))):
        assert "hidden" not in text


# --- cross-check against the official implementation on generated inputs ---
# Characters that tend to break encoders: reserved and sub-delims, the unreserved "~", "*" (which
# urlencode keeps but Alibaba encodes), space, percent, non-ASCII in 2, 3 and 4 UTF-8 bytes.
_TRICKY = [*" *~/+=&%?#:;,@!$'()[]\"<>é中😀ß\t", "  "]
_PLAIN = list("abcXYZ019-_.")


def _value(rng: random.Random) -> str:
    if rng.random() < 0.1:
        return ""
    return "".join(rng.choice(_TRICKY if rng.random() < 0.4 else _PLAIN) for _ in range(rng.randint(1, 24)))


def _name(rng: random.Random, plain: bool) -> str:
    # V3's official canonical query leaves names unencoded (real API names never need it): keep them plain.
    pool = _PLAIN if plain else _PLAIN + list("*~ é+")
    return rng.choice("ABCDEFGHabcdef") + "".join(rng.choice(pool) for _ in range(rng.randint(0, 12)))


def _params(rng: random.Random, plain_names: bool) -> dict[str, str]:
    reserved = {"Action", "Version", "Signature", "AccessKeyId", "Format", "SecurityToken", "Timestamp"}
    names = {_name(rng, plain_names) for _ in range(rng.randint(0, 8))} - reserved
    return {name: _value(rng) for name in names}


def _credentials(rng: random.Random, *, for_headers: bool = False) -> Credentials:
    secret = _value(rng) or "s"
    if for_headers:
        # V3 carries the id and the token in headers, which are ASCII; real tokens are base64 with "+/=".
        ident = _name(rng, plain=True)
        token = "".join(rng.choice("AbZ09+/=") for _ in range(rng.randint(1, 40)))
    else:
        ident, token = _value(rng) or "id", _value(rng) or "t"
    return Credentials(ident, SecretStr(secret), SecretStr(token) if rng.random() < 0.5 else None)


CASES = 300


def test_v1_matches_the_official_rpc_signature() -> None:
    rng = random.Random(20240229)
    with_token = 0
    for _ in range(CASES):
        creds = _credentials(rng)
        with_token += creds.security_token is not None
        params = {"Action": "PollTaskResult", "Version": "2018-01-29", **_params(rng, plain_names=False)}
        method = rng.choice(["GET", "POST"])
        sent = _signed(SignatureV1Auth(creds), httpx.Request(method, "https://domain.aliyuncs.com/", params=params))
        # What the server decodes from the wire: our parameters unchanged, plus the common ones.
        received = dict(sent.url.params.multi_items())
        signature = received.pop("Signature")
        assert {k: received[k] for k in params} == params
        if creds.security_token is not None:
            assert received["SecurityToken"] == creds.security_token.get_secret_value()
        expected = OfficialUtil.get_rpcsignature(received, method, creds.access_key_secret.get_secret_value())
        assert signature == expected, (params, method)
    assert 0 < with_token < CASES


@dataclass
class _OfficialRequest:
    """The shape ``get_authorization`` reads (a Tea request: method, pathname, query, headers)."""

    method: str
    query: dict[str, str]
    headers: dict[str, str] = field(default_factory=dict)
    pathname: str = "/"


def test_v3_matches_the_official_authorization() -> None:
    rng = random.Random(20240301)
    for _ in range(CASES):
        creds = _credentials(rng, for_headers=True)
        params = {
            "Action": "AcknowledgeTaskResult",
            "Version": "2017-12-18",
            **_params(rng, plain_names=True),
        }
        method = rng.choice(["GET", "POST"])
        body = _value(rng).encode() if method == "POST" and rng.random() < 0.3 else b""
        request = httpx.Request(method, "https://domain-intl.aliyuncs.com/", params=params, content=body)
        sent = _signed(SignatureV3Auth(creds), request)
        received = dict(sent.url.params.multi_items())
        assert received == {k: v for k, v in params.items() if k not in ("Action", "Version")}
        signed_names = sent.headers["authorization"].split("SignedHeaders=")[1].split(",")[0].split(";")
        assert {"host", "x-acs-action", "x-acs-version", "x-acs-date", "x-acs-signature-nonce"} <= set(signed_names)
        official = _OfficialRequest(method, received, {name: sent.headers[name] for name in signed_names})
        expected = OfficialUtil.get_authorization(
            official,
            "ACS3-HMAC-SHA256",
            hashlib.sha256(body).hexdigest(),
            creds.access_key_id,
            creds.access_key_secret.get_secret_value(),
        )
        assert sent.headers["authorization"] == expected, (params, method, body)


def _wire(request: httpx.Request) -> tuple[str, bytes, list[tuple[bytes, bytes]], bytes]:
    """What goes on the wire of a request: method, target, headers in order, body."""
    return request.method, request.url.raw_path, list(request.headers.raw), request.content


@pytest.mark.parametrize("auth_class", [SignatureV1Auth, SignatureV3Auth])
def test_signing_from_parameters_sends_what_the_auth_flow_sends(auth_class: type[SignatureV1Auth]) -> None:
    # The upstream client signs from the parameters it holds (no query parsed back out of a URL); the bytes
    # must be those of the auth flow, which the official vectors above pin.
    rng = random.Random(20261130)
    for _ in range(CASES):
        creds = _credentials(rng, for_headers=True)
        params = [("Action", "AcknowledgeTaskResult"), ("Version", "2018-01-29"), *_params(rng, True).items()]
        params += [(f"TaskDetailNo.{n}", _value(rng)) for n in range(1, rng.randint(1, 120))]
        rng.shuffle(params)
        method = rng.choice(["GET", "POST"])
        fixed: dict[str, Any] = {
            "clock": lambda: datetime(2026, 11, 30, 7, 0, tzinfo=UTC),
            "nonce": lambda: "0123456789abcdef0123456789abcdef",
        }
        by_flow = _signed(auth_class(creds, **fixed), httpx.Request(method, "https://d.example/", params=params))
        direct = httpx.Request(method, "https://d.example/")
        auth_class(creds, **fixed).sign(direct, params)
        assert _wire(direct) == _wire(by_flow), (params, method)
