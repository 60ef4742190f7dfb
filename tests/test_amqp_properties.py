"""The bridge's message properties marshal to pamqp's bytes, byte for byte, whatever they hold."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pamqp.commands import Basic

from bridge.amqp_properties import Properties
from bridge.events import Event, InvalidRecord, convert
from bridge.records import RawRecord
from bridge.simulator.generator import DetailGenerator

_TEXT = [*"abcXYZ09-_. :/é中😀", "\x00", "\u00a0", "x" * 300]


def _text(rng: random.Random, *, empty: bool = True) -> str:
    if empty and rng.random() < 0.1:
        return ""
    return "".join(rng.choice(_TEXT) for _ in range(rng.randint(1, 12)))[:200]


def _header_value(rng: random.Random) -> Any:
    kind = rng.random()
    if kind < 0.6:
        return _text(rng)
    # Shapes the bridge does not send, left to pamqp's encoders.
    return rng.choice([7, -(2**40), True, 2.5, None, {"nested": "x"}, ["a", 1], datetime(2026, 1, 2, tzinfo=UTC)])


def _random_fields(rng: random.Random) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name in ("content_type", "content_encoding", "correlation_id", "reply_to", "expiration"):
        if rng.random() < 0.3:
            fields[name] = _text(rng)
    for name in ("message_id", "message_type", "user_id", "app_id"):
        if rng.random() < 0.7:
            fields[name] = _text(rng)
    if rng.random() < 0.8:
        keys = [_text(rng, empty=False) for _ in range(rng.randint(0, 4))]
        if rng.random() < 0.05:
            keys.append("k" * 130)  # pamqp cuts keys past 128 bytes
        fields["headers"] = {key: _header_value(rng) for key in keys}
    for name in ("delivery_mode", "priority"):
        if rng.random() < 0.7:
            fields[name] = rng.choice([0, 1, 2, 9])
    if rng.random() < 0.7:
        fields["timestamp"] = datetime(2026, 11, 30, tzinfo=UTC) + timedelta(seconds=rng.randint(-(10**9), 10**9))
    return fields


def test_generated_properties_marshal_to_pamqps_bytes() -> None:
    rng = random.Random(20261130)
    for _ in range(3000):
        fields = _random_fields(rng)
        try:
            expected = Basic.Properties(**fields).marshal()
        except (TypeError, ValueError) as exc:
            with pytest.raises(type(exc)):
                Properties(**fields).marshal()
            continue
        assert Properties(**fields).marshal() == expected, fields


def _same_as_pamqp(properties: Basic.Properties) -> None:
    assert isinstance(properties, Properties)
    plain = Basic.Properties(**{name: getattr(properties, name) for name in Basic.Properties.__slots__})
    assert properties.marshal() == plain.marshal()


def test_the_events_and_invalid_records_of_a_page_marshal_to_pamqps_bytes() -> None:
    generator = DetailGenerator(3)
    details = json.loads(json.dumps([generator.next(1_790_000_000.0) for _ in range(500)]))
    details += [{"TaskDetailNo": "bad", "TaskType": 7}, {"TaskType": "x" * 400, "TaskStatus": "é" * 200}]
    kinds = set()
    for detail in details:
        item = convert(RawRecord(detail, detail.get("TaskDetailNo")), source="urn:test", account="reseller-eu")
        kinds.add(type(item))
        _same_as_pamqp(item.properties())
    assert kinds == {Event, InvalidRecord}
