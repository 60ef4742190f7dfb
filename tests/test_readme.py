"""The README and the operator's reference are part of the product: their tables list exactly what the code has.

The README is the short version per audience; the long tables (settings, metrics) live in ``docs/operating.md``.
"""

from __future__ import annotations

import re
from pathlib import Path

from bridge.leadership import Leadership
from bridge.metrics import Metrics
from bridge.settings import SETTING_NAMES, env_name

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
OPERATING = (ROOT / "docs" / "operating.md").read_text(encoding="utf-8")


def _table_first_column(heading: str) -> list[str]:
    section = OPERATING.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([A-Za-z_]+)` \|", section, flags=re.MULTILINE)


def _variables() -> set[str]:
    return {env_name(field) for field in SETTING_NAMES}


def test_settings_table_lists_every_setting_once() -> None:
    listed = _table_first_column("Settings")
    assert len(listed) == len(set(listed))
    assert set(listed) == _variables()


def test_metrics_table_lists_every_metric() -> None:
    listed = set(_table_first_column("Metrics"))
    metrics = Metrics()
    metrics.account("default")  # the per-account samples exist once an account has them
    # The election's metrics are labelled by account: an account's Leadership creates its samples.
    Leadership("default", "domain.tasks", metrics.leadership)
    samples = {name for name in metrics.names() if not name.endswith("_created")}
    exported = {re.sub(r"_(bucket|count|sum)$", "", name) for name in samples}
    assert listed == exported


def test_metrics_table_labels_per_account_metrics_first() -> None:
    # Several accounts in one process: the metrics of an account's work carry `account` as their first label,
    # the process-wide ones none (docs/operating.md#several-accounts).
    section = OPERATING.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \| \w+ \|([^|]*)\|", section, flags=re.MULTILINE)
    assert len(rows) > 20
    labelled = {name for name, labels in rows if labels.strip().startswith("`account`")}
    assert not [name for name, labels in rows if "`account`" in labels and name not in labelled], "account first"
    process_wide = {
        "bridge_publishes_in_flight",
        "bridge_publish_confirm_duration_seconds",
        "bridge_broker_connected",
        "bridge_broker_blocked",
        "bridge_operator_connections_dropped_total",
        "bridge_info",
    }
    bridge = {name for name, _ in rows if name.startswith("bridge_")}
    assert labelled == bridge - process_wide
    assert "bridge_account_failing" in labelled


def test_readme_test_command_is_what_ci_runs() -> None:
    command = "python -m pytest"
    assert f"pip install -e '.[test]' && {command}" in README
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(rf"^{re.escape(command)}\b", ci, flags=re.MULTILINE)


def test_readme_links_resolve() -> None:
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"
