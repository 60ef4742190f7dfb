"""JSON bytes for message bodies: compact UTF-8 as the contract specifies, and a way to keep any record.

:func:`encode` writes compact JSON (``,`` and ``:`` without spaces, keys in insertion order, non-ASCII as
UTF-8, a lone surrogate as its ``\\u`` escape) and raises for what JSON cannot carry. :func:`encode_as_text`
never raises: it writes the same bytes for every JSON value and renders what JSON cannot carry as a string, so a
record that cannot be an event still reaches the invalid route whole. :func:`find_unencodable` names the first such
value, one line, for the validation error.
"""

from __future__ import annotations

import decimal
import json
import math
from collections.abc import Callable
from json.encoder import encode_basestring, encode_basestring_ascii
from typing import Any, Final

import orjson

__all__ = ["encode", "encode_as_text", "find_unencodable", "int_text", "short_json"]

ENCODE_ERRORS: Final = (ValueError, TypeError, RecursionError)
"""What :func:`encode` raises for a value JSON cannot carry (RecursionError: nested too deep for the encoder)."""

# Encoders built once: json.dumps with keyword arguments would build a new encoder per call.
_JSON: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_JSON_ASCII: Final = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), allow_nan=False)
_JSON_LENIENT: Final = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), allow_nan=True)
# orjson writes exactly what _JSON writes for strings, integers, booleans and null (tests/test_events.py checks it
# over generated records) but not for floats (1e-05 becomes 0.00001) and NaN (becomes null): only values of these
# types take the fast path.
_ORJSON_SAFE: Final = frozenset({str, int, bool, type(None)})
_MAX_DECIMAL_BITS: Final = 1 << 17  # ~39,000 digits; decimal text of longer integers costs quadratic time
_NON_FINITE: Final = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
_SHOWN_CHARS: Final = 80  # a value quoted in an error message is cut here, so errors stay short


def encode(value: Any, flat: dict[Any, Any] | None = None) -> bytes:
    """``value`` as compact UTF-8 JSON; raises one of :data:`ENCODE_ERRORS` for what JSON cannot carry.

    ``flat`` names the one nested dict of ``value`` that may hold anything (an event's ``data``); when every one
    of its values is a string, an integer, a boolean or null, the fast encoder runs.
    """
    if flat is not None and _ORJSON_SAFE.issuperset(map(type, flat.values())):
        try:
            # A copy of exactly the body's size: orjson's own buffer, kept while the event waits for its confirm,
            # cost one page fault per event (measured by bench/convert_bench.py: 2.0 µs kept vs 0.5 µs copied).
            return bytes(memoryview(orjson.dumps(value)))
        except TypeError:  # a lone surrogate, an integer beyond 64 bits, a key that is not a string
            pass
    text = _JSON.encode(value)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (legal in a JSON \\u escape, not in UTF-8): escape it again, the value is unchanged.
        return _JSON_ASCII.encode(value).encode("ascii")


def encode_as_text(value: Any) -> bytes:
    """Like :func:`encode`, but never raises: what JSON cannot carry becomes a string.

    NaN and the infinities become ``"NaN"``, ``"Infinity"``, ``"-Infinity"``; an integer too long for
    Python's decimal conversion its digits as a string (hexadecimal, ``0x...``, beyond ~39,000 digits); any
    other object its ``str``; a key that is not a string its text. Nesting depth is unlimited.
    """
    try:
        return encode(value)
    except ENCODE_ERRORS:
        pass
    text = _Writer(encode_basestring).write(value)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return _Writer(encode_basestring_ascii).write(value).encode("ascii")


def short_json(value: Any) -> str:
    """``value`` as one line of ASCII JSON for an error message (NaN as ``NaN``), cut at 80 characters."""
    try:
        text = _JSON_LENIENT.encode(value)
    except ENCODE_ERRORS:
        text = _Writer(encode_basestring_ascii).write(value)
    return cut(text)


def cut(text: str) -> str:
    """``text`` cut to 80 characters, ending in ``…`` when cut."""
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 1] + "…"


def int_text(value: int) -> str:
    """Decimal digits of ``value``, also beyond Python's 4,300-digit conversion limit."""
    try:
        return int.__repr__(value)
    except ValueError:
        if value.bit_length() > _MAX_DECIMAL_BITS:
            return ("-0x" if value < 0 else "0x") + format(abs(value), "x")
        return str(decimal.Decimal(value))


def find_unencodable(value: Any, exc: BaseException) -> str:
    """One line naming the first value in ``value`` that JSON cannot carry, its path, and why.

    ``exc`` is what :func:`encode` raised; a :class:`RecursionError` names the most deeply nested field.
    """
    deepest = (0, "")  # (containers around the deepest value, its path)
    stack: list[tuple[str, Any, int]] = [("", value, 0)]
    while stack:
        path, item, depth = stack.pop()
        problem = _scalar_problem(path or "TaskDetail", item)
        if problem is None and isinstance(item, dict | list | tuple):
            problem = _push_children(path, item, depth, stack)
        if problem is not None:
            return problem
        deepest = max(deepest, (depth, path))
    if isinstance(exc, RecursionError):
        depth, path = deepest
        field = path.split(".", 1)[0].split("[", 1)[0]
        if isinstance(value, dict) and field:  # count the levels inside the field, not the record around it
            return f"{field}: nested {depth - 1} levels deep, too deep to encode as JSON"
        return f"TaskDetail: nested {depth} levels deep, too deep to encode as JSON"
    return cut(" ".join(f"TaskDetail: cannot be encoded as JSON ({type(exc).__name__}: {exc})".splitlines()))


def _push_children(
    path: str, item: dict[Any, Any] | list[Any] | tuple[Any, ...], depth: int, stack: list[tuple[str, Any, int]]
) -> str | None:
    """Put the children of ``item`` on ``stack``, first child on top; a problem when a key is not a JSON key."""
    if isinstance(item, dict):
        children = []
        for key, child in item.items():
            if not isinstance(key, str | int | float | bool | type(None)):
                return f"{path or 'TaskDetail'}: key {cut(_text_of(key))} is not a string"
            name = _text_of(key)
            children.append((f"{path}.{name}" if path else name, child, depth + 1))
    else:
        children = [(f"{path or 'TaskDetail'}[{index}]", child, depth + 1) for index, child in enumerate(item)]
    stack.extend(reversed(children))
    return None


def _scalar_problem(path: str, item: Any) -> str | None:
    if isinstance(item, float) and not math.isfinite(item):
        return f"{path}: {_NON_FINITE[repr(item)]} is not a finite number, which JSON cannot carry"
    if isinstance(item, int) and not isinstance(item, bool):
        try:
            int.__repr__(item)
        except ValueError:
            digits = len(int_text(abs(item)))
            return f"{path}: {cut(int_text(item))} ({digits} digits) is too long to represent"
        return None
    if item is None or isinstance(item, str | bool | float | dict | list | tuple):
        return None
    return f"{path}: {cut(_text_of(item))} ({type(item).__name__}) is not a JSON value"


def _text_of(item: Any) -> str:
    """``str(item)``, or its type's name when even that fails."""
    try:
        return str(item)
    except Exception:
        return f"<{type(item).__name__}>"


class _Close:
    """A piece of text that closes a container: leaving it takes the container off the path (cycle check)."""

    __slots__ = ("container_id", "text")

    def __init__(self, text: str, container_id: int) -> None:
        self.text = text
        self.container_id = container_id


class _Piece:
    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


class _Writer:
    """A JSON writer with an explicit stack (so depth is unlimited) that renders non-JSON values as strings."""

    def __init__(self, quote: Callable[[str], str]) -> None:
        self._quote = quote
        self._parts: list[str] = []
        self._open: set[int] = set()  # ids of the containers on the current path

    def write(self, value: Any) -> str:
        stack: list[Any] = [value]
        while stack:
            item = stack.pop()
            if type(item) is _Piece:
                self._parts.append(item.text)
            elif type(item) is _Close:
                self._parts.append(item.text)
                self._open.discard(item.container_id)
            elif isinstance(item, dict | list | tuple) and id(item) not in self._open:
                self._push_container(item, stack)
            elif isinstance(item, dict | list | tuple):
                self._parts.append(self._quote("(circular reference)"))
            else:
                self._parts.append(self._scalar(item))
        return "".join(self._parts)

    def _push_container(self, item: dict[Any, Any] | list[Any] | tuple[Any, ...], stack: list[Any]) -> None:
        self._open.add(id(item))
        if isinstance(item, dict):
            pieces: list[Any] = ["{"]
            for index, (key, child) in enumerate(item.items()):
                pieces.append(_Piece(("," if index else "") + self._quote(self._key(key)) + ":"))
                pieces.append(child)
            pieces.append(_Close("}", id(item)))
        else:
            pieces = ["["]
            for index, child in enumerate(item):
                if index:
                    pieces.append(_Piece(","))
                pieces.append(child)
            pieces.append(_Close("]", id(item)))
        self._parts.append(pieces[0])
        stack.extend(reversed(pieces[1:]))

    def _scalar(self, item: Any) -> str:
        if item is None:
            return "null"
        if item is True or item is False:
            return "true" if item else "false"
        if isinstance(item, int):
            try:
                return int.__repr__(item)
            except ValueError:  # too long for JSON readers: digits as a string
                return self._quote(int_text(item))
        if isinstance(item, float):
            return float.__repr__(item) if math.isfinite(item) else self._quote(_NON_FINITE[repr(item)])
        if isinstance(item, str):
            return self._quote(item)
        return self._quote(_text_of(item))

    def _key(self, key: Any) -> str:
        if isinstance(key, str):
            return key
        if key is None or isinstance(key, bool):
            return self._scalar(key)
        if isinstance(key, float) and not math.isfinite(key):
            return _NON_FINITE[repr(key)]
        if isinstance(key, int | float):
            return self._scalar(key).strip('"')
        return _text_of(key)
