"""AMQP message properties that marshal themselves without pamqp's per-field type dispatch.

pamqp's ``Basic.Properties.marshal`` looks up each of the fourteen fields' AMQP type by name and dispatches on
it, for every message: ~12 µs per event, the largest single cost of a publish after the event itself. The
bridge's properties are always the same handful of fields of known types, so :class:`Properties` (a
``Basic.Properties`` in every other respect) encodes them with pamqp's own encoders, chosen once per field, and
a header table of string values directly. The bytes are pamqp's, byte for byte (``tests/test_events.py``
compares them over generated events); any value of another shape is left to pamqp's encoders.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from pamqp import encode
from pamqp.commands import Basic

__all__ = ["Properties"]

_FLAGS = struct.Struct(">H")
_LONG = struct.Struct(">I")
_TABLE_KEY_MAX_BYTES = 128  # pamqp truncates longer keys (with a warning): left to it
_ENCODERS: dict[str, Callable[[Any], bytes]] = {
    "shortstr": encode.short_string,
    "octet": encode.octet,
    "timestamp": encode.timestamp,
    "table": lambda table: _table(table),
}
# Every property in wire order, with its flag bit and encoder.
_FIELDS = tuple(
    (name, Basic.Properties.flags[name], _ENCODERS[getattr(Basic.Properties, f"_{name}")])
    for name in Basic.Properties.__slots__
)


def _table(table: Any) -> bytes:
    """A field table as pamqp encodes it (keys sorted), string values written directly."""
    if not table or not isinstance(table, dict):
        return encode.field_table(table)
    parts = []
    for key, value in sorted(table.items()):
        if type(key) is not str or type(value) is not str:
            return encode.field_table(table)
        raw_key = key.encode()
        if len(raw_key) > _TABLE_KEY_MAX_BYTES:
            return encode.field_table(table)
        raw = value.encode()
        parts.append(b"%c%sS%s%s" % (len(raw_key), raw_key, _LONG.pack(len(raw)), raw))
    data = b"".join(parts)
    return _LONG.pack(len(data)) + data


class Properties(Basic.Properties):
    """``Basic.Properties`` with a faster :meth:`marshal` giving the same bytes."""

    def marshal(self) -> bytes:
        flags = 0
        parts = [b""]
        for name, flag, encoder in _FIELDS:
            value = getattr(self, name)
            if value is not None and value != "":
                flags |= flag
                parts.append(encoder(value))
        # Fourteen flags fit in one 16-bit word: the continuation bit is never needed.
        parts[0] = _FLAGS.pack(flags)
        return b"".join(parts)
