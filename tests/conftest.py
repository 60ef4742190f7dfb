"""Shared fixtures. Tests that need RabbitMQ fail (not skip) when ``CI=true`` and the broker is missing."""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import aio_pika
import pytest

from tests.private_broker import PrivateNode
from tests.shared_node import boot_shared_node

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


_SHARED_NODE = pytest.StashKey[Future[PrivateNode]]()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Boot the session's shared node in the background once the collected tests are known to need it.

    It boots (several seconds) while the tests before the first one that uses it run.
    """
    if session.config.option.collectonly:
        return
    if any("shared_node" in getattr(item, "fixturenames", ()) for item in session.items):
        pool = ThreadPoolExecutor(1, thread_name_prefix="shared-node")
        session.config.stash[_SHARED_NODE] = pool.submit(boot_shared_node)
        pool.shutdown(wait=False)  # the boot goes on; the fixture waits for its result


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Stop the shared node (booted or booting) at the end of the session, whether or not a test used it."""
    booting = session.config.stash.get(_SHARED_NODE, None)
    if booting is not None:
        with contextlib.suppress(BaseException):
            booting.result().stop()


@pytest.fixture(scope="session")
def shared_node(pytestconfig: pytest.Config) -> PrivateNode:
    """One plain private RabbitMQ node for the whole session (booted in the background, stopped at the end).

    Booting a node costs several seconds, so the modules whose tests can share one use this node: each test
    uses its own exchange (and users, where it needs some: ``tests/shared_node.py`` creates them at boot), and
    puts back what it changes (an alarm, a stopped application, permissions). Tests that need a node configured
    otherwise (TLS, plugins, a cluster) start their own. A failed boot fails (or, without RabbitMQ outside CI,
    skips) each test that asks for the node.
    """
    booting = pytestconfig.stash.get(_SHARED_NODE, None)
    if booting is None:  # not collected as needed (a plugin asked for it late): boot it now
        with ThreadPoolExecutor(1) as pool:
            booting = pytestconfig.stash[_SHARED_NODE] = pool.submit(boot_shared_node)
    return booting.result()


@pytest.fixture
async def exchange_name() -> AsyncIterator[str]:
    """A unique exchange name per test; whatever a bridge declared under it is deleted afterwards."""
    name = f"test.{uuid.uuid4().hex[:12]}"
    yield name
    # Quorum queues left behind would pile up on the shared broker run after run.
    with contextlib.suppress(Exception):
        connection = await aio_pika.connect(AMQP_URL, timeout=5)
        async with connection:
            channel = await connection.channel()
            for queue in (f"{name}.unrouted", f"{name}.invalid"):
                await channel.queue_delete(queue)
            for exchange in (name, f"{name}.unrouted", f"{name}.invalid"):
                await channel.exchange_delete(exchange)


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


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty temporary working directory (no stray ``.env``) and no ``BRIDGE_*`` or ``ALIBABA_CLOUD_*`` variable."""
    for name in list(os.environ):
        if name.startswith(("BRIDGE_", "ALIBABA_CLOUD_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path
