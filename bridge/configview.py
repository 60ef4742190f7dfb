"""``task-bridge config``: the effective settings, each with where its value came from, secrets masked.

One row per setting in the order of the settings table (docs/operating.md): the variable, the value the bridge
uses, and its origin (``environment``, ``file <path> (<VAR>_FILE)``, ``.env file``, ``config file <path>`` or
``default``). Secrets show as ``***`` and the AMQP URL with its password masked; an unset optional setting shows
what the bridge does instead. With several accounts (a config file's ``[[accounts]]``), each account's keys
follow as ``accounts.<name>.<key>`` rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from bridge.settings import AccountSettings, Settings, env_name

__all__ = ["ConfigRow", "config_rows", "format_json", "format_table"]


@dataclass(frozen=True, slots=True)
class ConfigRow:
    """One setting: its ``variable``, the masked ``value`` (``None`` when unset), its ``origin`` and a ``note``."""

    variable: str
    value: Any
    origin: str
    note: str | None = None


def _note(account: AccountSettings, field: str) -> str | None:
    """What an unset optional setting means."""
    if field in ("upstream_endpoint", "endpoint"):
        return f"{account.base_url}, of {'BRIDGE_UPSTREAM_API' if field == 'upstream_endpoint' else 'api'}"
    if field == "log_format":
        return "text on a terminal, JSON otherwise"
    if field in ("access_key_id", "access_key_secret"):
        return "required by run, check and peek"
    return None


def config_rows(settings: Settings, origins: dict[str, str]) -> list[ConfigRow]:
    """A row per setting of ``settings``; ``origins`` comes from :func:`bridge.settings.origins`."""
    rows = []
    masked = settings.masked()
    listed = masked.pop("accounts", None)
    for field, value in masked.items():
        note = _note(settings.account, field) if value is None else None
        rows.append(ConfigRow(env_name(field), value, origins.get(field, "default"), note))
    for account, values in zip(settings.accounts, listed or (), strict=False):
        for field, value in values.items():
            note = _note(account, field) if value is None else None
            variable = f"accounts.{account.name}.{field}"
            rows.append(ConfigRow(variable, value, origins.get(variable, "config file"), note))
    return rows


def _shown(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value:g}" if isinstance(value, float) else str(value)


def format_table(rows: list[ConfigRow]) -> str:
    """Aligned columns: variable, value, origin; then, for an unset setting, what the bridge does instead."""
    values = [_shown(row.value) for row in rows]
    name_width = max(len(row.variable) for row in rows)
    value_width = max(len(value) for value in values)
    lines = [
        f"{row.variable:<{name_width}}  {value:<{value_width}}  {row.origin}" + (f"  ({row.note})" if row.note else "")
        for row, value in zip(rows, values, strict=True)
    ]
    return "\n".join(lines) + "\n"


def format_json(rows: list[ConfigRow]) -> str:
    """One JSON object per line: ``variable``, ``value``, ``origin`` (and ``note`` when unset means something)."""
    lines = []
    for row in rows:
        entry: dict[str, Any] = {"variable": row.variable, "value": row.value, "origin": row.origin}
        if row.note is not None:
            entry["note"] = row.note
        lines.append(json.dumps(entry, ensure_ascii=False))
    return "\n".join(lines) + "\n"
