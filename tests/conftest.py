"""Shared fixtures. Tests that need RabbitMQ fail (not skip) when ``CI=true`` and the broker is missing."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest

AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def _broker_answers() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=2).close()
    except OSError:
        return False
    return True


@pytest.fixture(scope="session")
def broker_url() -> str:
    """The test broker's URL; fails under CI, skips elsewhere, when nothing answers on 127.0.0.1:5672."""
    if not _broker_answers():
        message = "RabbitMQ does not answer on 127.0.0.1:5672"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return AMQP_URL


@pytest.fixture
def exchange_name() -> str:
    """A unique exchange name per test, so tests never see each other's topology."""
    return f"test.{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def amqp(broker_url: str) -> AsyncIterator[aio_pika.abc.AbstractRobustConnection]:
    connection = await aio_pika.connect_robust(broker_url)
    try:
        yield connection
    finally:
        await connection.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """The fault-injection suite's table (also written to tests/.fault-table.md), when its scenarios ran."""
    from tests.faults_support import report_fault_table

    report_fault_table(terminalreporter, config)
