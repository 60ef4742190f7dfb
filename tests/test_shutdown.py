"""``task-bridge run`` as a process: signals mid-batch, exit codes, and what each side saw afterwards."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bridge.cli import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from bridge.simulator import Faults, Simulator, running
from tests.harness import BRIDGE_COMMAND, Broker, bridge_env, bridge_settings, broker_view, eventually

pytestmark = pytest.mark.broker


@pytest.fixture
async def broker(broker_url: str, exchange_name: str) -> AsyncIterator[Broker]:
    async with broker_view(broker_url, exchange_name) as view:
        yield view


async def _start(env: dict[str, str], log_path: Path, *args: str) -> asyncio.subprocess.Process:
    # Output goes to a file: a full pipe nobody reads would block the bridge.
    with log_path.open("wb") as log:
        return await asyncio.create_subprocess_exec(*BRIDGE_COMMAND, *args, env=env, stdout=log, stderr=log)


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


async def test_sigterm_mid_batch_exits_in_time_with_nothing_confirmed_left_unacknowledged(
    broker: Broker, broker_url: str, tmp_path: Path
) -> None:
    sim = Simulator(tasks=4000, seed=21, faults=Faults(latency_s=0.01))
    queue = await broker.bind("all")
    async with running(sim) as url:
        settings = bridge_settings(broker.exchange, broker_url, upstream_endpoint=url, page_size=200)
        process = await _start(bridge_env(settings), tmp_path / "bridge.log", "run")
        await eventually(lambda: sim.acknowledged_count >= 400, timeout_s=30, what="drain under way")
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        code = await asyncio.wait_for(process.wait(), settings.delivery.shutdown_timeout_s + 5)
        elapsed = time.monotonic() - signalled
        output = _read(tmp_path / "bridge.log")
    assert code == EXIT_OK, output[-2000:]
    assert elapsed < settings.delivery.shutdown_timeout_s
    assert 0 < sim.pending_count <= 4000 - 400, "the signal should land mid-drain"
    ids = [str(m.message_id) for m in await broker.take(queue.name)]
    assert len(ids) == len(set(ids))
    # Nothing acknowledged without a confirmed event, and nothing confirmed left unacknowledged.
    assert set(sim.ack_counts) == set(ids)


async def test_second_signal_exits_at_once(broker: Broker, broker_url: str, tmp_path: Path) -> None:
    # Acknowledgements hang, so the graceful stop after the first signal would wait its whole budget.
    hang = Faults(hang_ratio=1.0, hang_s=60, actions=frozenset({"AcknowledgeTaskResult"}))
    sim = Simulator(tasks=100, seed=22, faults=hang)
    async with running(sim) as url:
        settings = bridge_settings(broker.exchange, broker_url, upstream_endpoint=url, request_timeout_s=60)
        log_path = tmp_path / "bridge.log"
        process = await _start(bridge_env(settings), log_path, "run")
        await eventually(lambda: "task-bridge started" in _read(log_path), timeout_s=20, what="start")
        await asyncio.sleep(1.0)
        process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        assert process.returncode is None, "the graceful stop waits for the hanging acknowledgements"
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        code = await asyncio.wait_for(process.wait(), 5)
    assert code == EXIT_INTERRUPTED
    assert time.monotonic() - signalled < 2
    assert sim.acknowledged_count == 0


async def test_bad_settings_stop_at_start_with_one_line_each(broker_url: str, exchange_name: str) -> None:
    env = bridge_env(bridge_settings(exchange_name, broker_url))
    env.update({"BRIDGE_PAGE_SIZE": "5000", "BRIDGE_AMQP_URL": "http://x:pw@h"})
    process = await asyncio.create_subprocess_exec(
        *BRIDGE_COMMAND, "run", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _out, err = await asyncio.wait_for(process.communicate(), 20)
    lines = err.decode().strip().splitlines()
    assert process.returncode == EXIT_USAGE
    assert any("BRIDGE_PAGE_SIZE" in line and "5000" in line for line in lines)
    assert any("BRIDGE_AMQP_URL" in line for line in lines)
    assert "Traceback" not in err.decode()
    assert "pw" not in err.decode()


async def test_fatal_upstream_error_exits_1_with_one_clear_line_and_no_secret(
    broker_url: str, exchange_name: str, tmp_path: Path
) -> None:
    token = "sts-token-7Hq2ZpL0x"
    sim = Simulator(tasks=5, seed=23, security_token=token)
    async with running(sim) as url:
        env = bridge_env(bridge_settings(exchange_name, broker_url, upstream_endpoint=url))
        # V1 echoes every signed parameter (the STS token among them) in SignatureDoesNotMatch.
        env.update(
            {
                "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "wrong-secret-4kP9",
                "ALIBABA_CLOUD_SECURITY_TOKEN": token,
                "BRIDGE_SIGNATURE_VERSION": "v1",
            }
        )
        log_path = tmp_path / "bridge.log"
        process = await _start(env, log_path, "run", "--once")
        code = await asyncio.wait_for(process.wait(), 30)
    output = _read(log_path)
    last = json.loads(output.strip().splitlines()[-1])
    assert code == EXIT_FAILURE
    assert last["level"] == "error", output
    assert "SignatureDoesNotMatch" in last["message"]
    for secret in ("wrong-secret-4kP9", token):
        assert secret not in output
    assert sim.acknowledged_count == 0
