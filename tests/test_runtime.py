"""Process-wide tuning: applied in a child process, since it changes the interpreter for good."""

from __future__ import annotations

import json
import subprocess
import sys

_PROBE = """
import gc, json
from bridge.runtime import tune_for_service
before = gc.get_threshold()
tune_for_service()
print(json.dumps({"before": before, "after": gc.get_threshold(), "frozen": gc.get_freeze_count()}))
"""


def test_tuning_freezes_start_up_objects_and_collects_less_often() -> None:
    probe = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, timeout=60)
    result = json.loads(probe.stdout)
    assert result["before"] == [700, 10, 10]
    assert result["after"] == [20_000, 50, 100]
    assert result["frozen"] > 10_000  # the modules, classes and schemas imported so far
