"""One API request as the simulator sees it, read from an ASGI scope and body."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

__all__ = ["ApiRequest"]

_FORM = "application/x-www-form-urlencoded"


@dataclass(slots=True)
class ApiRequest:
    """Method, query and form parameters (decoded, in order), lower-cased headers and the raw body."""

    method: str
    query: list[tuple[str, str]]
    form: list[tuple[str, str]]
    headers: Mapping[str, str]
    body: bytes
    params: dict[str, str] = field(init=False)
    """Query and form parameters by name (the last one wins on repeats)."""

    def __post_init__(self) -> None:
        self.params = dict(self.query)
        self.params.update(self.form)

    @classmethod
    def from_scope(cls, scope: Mapping[str, Any], body: bytes) -> ApiRequest:
        """Decode an ASGI HTTP scope; repeated headers are joined with ``,`` as HTTP allows."""
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope["headers"]:
            name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
            headers[name] = f"{headers[name]},{value}" if name in headers else value
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        form: list[tuple[str, str]] = []
        if body and headers.get("content-type", "").split(";")[0].strip().lower() == _FORM:
            form = parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True)
        return cls(method=scope["method"].upper(), query=query, form=form, headers=headers, body=body)
