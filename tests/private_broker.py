"""A private RabbitMQ node for the tests that must break a broker: restart it, alarm it, give it TLS or users.

The machine's broker on 127.0.0.1:5672 is shared with other programs, so no test restarts, stops or alarms it.
A test that needs to do so starts a node of its own here: its own node name, AMQP port, distribution port,
data and log directories and config file, driven with ``rabbitmqctl -n NODE ...``, and stopped when the test
is done. Starting one takes a few seconds (several on a loaded machine), so the tests that can share a plain node
share one per session (``shared_node`` in conftest.py); the others start theirs per module.

Each ``rabbitmqctl`` call boots an Erlang VM of its own (1-2 s here), so the node's own log says when it has
started ("Server startup complete"), and a stop signals the node's process rather than running ``rabbitmqctl stop``.

Under ``CI=true`` a missing RabbitMQ installation fails the test; elsewhere it skips.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

__all__ = ["PrivateNode", "free_port", "private_cluster", "private_node", "require_rabbitmq_server"]

# RabbitMQ's CLI tools take distribution ports from 35672-35682; 25672 is the machine broker's distribution port.
_RESERVED = set(range(35672, 35683)) | {4369, 5672, 15672, 25672}
_START_TIMEOUT_S = 90
_STARTED = "Server startup complete"  # the node's log line once the broker has booted (and its listeners are up)
_STOP_GRACE_S = 10.0


def require_rabbitmq_server() -> None:
    """Fail under CI, skip elsewhere, when rabbitmq-server or rabbitmqctl is not installed."""
    if shutil.which("rabbitmq-server") and shutil.which("rabbitmqctl"):
        return
    message = "rabbitmq-server and rabbitmqctl are needed to start a private broker node"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, outside the ports RabbitMQ and its CLI tools use."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port not in _RESERVED:
            return port


@dataclass
class PrivateNode:
    """One RabbitMQ node of a test's own. ``config`` holds extra ``rabbitmq.conf`` lines."""

    config: Sequence[str] = ()
    name: str = field(default_factory=lambda: f"tb-{uuid.uuid4().hex[:10]}@localhost")
    port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tb-node-")))

    @property
    def url(self) -> str:
        """The AMQP URL of the node's plain listener, as the default guest user (allowed from loopback)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def log_file(self) -> Path:
        return self.base / "log" / f"{self.name}.log"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "RABBITMQ_NODENAME": self.name,
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
                "RABBITMQ_LOG_BASE": str(self.base / "log"),
                "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
                "RABBITMQ_PID_FILE": str(self.base / "node.pid"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            }
        )
        return env

    def write_file(self, name: str, text: str) -> Path:
        """A file in the node's directory, readable by the broker (which runs as the ``rabbitmq`` user)."""
        path = self.base / name
        path.write_text(text, encoding="utf-8")
        _give_to_broker(path)
        return path

    def start(self) -> None:
        """Start the node and wait until it has booted and accepts AMQP connections."""
        require_rabbitmq_server()
        for sub in ("mnesia", "log"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        lines = [f"listeners.tcp.1 = 127.0.0.1:{self.port}", "loopback_users.guest = true", *self.config]
        self.write_file("rabbitmq.conf", "\n".join(lines) + "\n")
        if not (self.base / "enabled_plugins").exists():
            self.write_file("enabled_plugins", "[].\n")
        _give_to_broker(self.base)
        subprocess.run(["rabbitmq-server", "-detached"], env=self._env(), check=True, capture_output=True)
        self.wait_for_startup(1)

    def startups(self) -> int:
        """How many times the node's log says the broker finished starting (a ``start_app`` adds one)."""
        try:
            return self.log_file.read_text(encoding="utf-8", errors="replace").count(_STARTED)
        except FileNotFoundError:
            return 0

    def wait_for_startup(self, count: int, timeout_s: float = _START_TIMEOUT_S) -> None:
        """Wait until the log says the broker started ``count`` times and the AMQP port answers.

        Fails at once, with the end of the log, when the node's process has exited.
        """
        deadline = time.monotonic() + timeout_s
        while self.startups() < count:
            pid = self.pid()
            if pid is not None and not _running(pid):
                raise RuntimeError(f"{self.name} exited while starting: {self._log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start within {timeout_s:g}s: {self._log_tail()}")
            time.sleep(0.05)
        self.wait_for_port(max(1.0, deadline - time.monotonic()))

    def pid(self) -> int | None:
        """The operating system process of the node (from its pid file), or None before it wrote one."""
        with contextlib.suppress(FileNotFoundError, ValueError):
            return int((self.base / "node.pid").read_text().strip())
        return None

    def _log_tail(self) -> str:
        try:
            return self.log_file.read_text(encoding="utf-8", errors="replace")[-800:]
        except FileNotFoundError:
            return f"(no log at {self.log_file})"

    def wait_for_port(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    message = f"{self.name} does not answer on port {self.port}; see {self.log_file}"
                    raise RuntimeError(message) from None
                time.sleep(0.05)

    def ctl(self, *args: str, timeout_s: float = 60.0) -> str:
        """``rabbitmqctl -n NODE args...``; its standard output, or RuntimeError naming what failed."""
        process = subprocess.run(
            ["rabbitmqctl", "-n", self.name, *args], capture_output=True, text=True, timeout=timeout_s
        )
        if process.returncode != 0:
            output = (process.stdout + process.stderr)[-800:]
            raise RuntimeError(f"rabbitmqctl -n {self.name} {' '.join(args)}: {output}")
        return process.stdout

    def stop_app(self) -> None:
        self.ctl("stop_app")

    def start_app(self) -> None:
        # start_app returns once the broker has booted; the log and the port say so without another CLI call.
        started = self.startups()
        self.ctl("start_app", timeout_s=_START_TIMEOUT_S + 10)
        self.wait_for_startup(started + 1)

    def stop(self) -> None:
        """Stop the node (if running) and remove its files.

        The node is thrown away, so its process is signalled (SIGTERM, then SIGKILL after a grace period) rather
        than stopped with ``rabbitmqctl stop``; the pid comes from the node's own pid file and is checked to be
        this node's Erlang VM (its ``RABBITMQ_NODENAME``), so no other broker is ever touched.
        """
        pid = self.pid()
        if pid is not None and _node_name(pid) == self.name:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + _STOP_GRACE_S
                while _running(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
                if _running(pid):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.base, ignore_errors=True)


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _node_name(pid: int) -> str | None:
    """The ``RABBITMQ_NODENAME`` that process ``pid`` was started with (None when unreadable or unset)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for entry in environ:
        if entry.startswith(b"RABBITMQ_NODENAME="):
            return entry.partition(b"=")[2].decode(errors="replace")
    return None


def _give_to_broker(path: Path) -> None:
    # rabbitmq-server started as root switches to the rabbitmq user, which must read the config and own its dirs.
    with contextlib.suppress(KeyError, PermissionError, LookupError, OSError):
        shutil.chown(path, "rabbitmq", "rabbitmq")
        if path.is_dir():
            for child in path.rglob("*"):
                shutil.chown(child, "rabbitmq", "rabbitmq")


@contextlib.contextmanager
def private_node(config: Sequence[str] = (), files: Mapping[str, str] | None = None) -> Iterator[PrivateNode]:
    """A started private node, stopped afterwards. ``files`` are written into its directory before it starts."""
    node = PrivateNode(config=config)
    try:
        for name, text in (files or {}).items():
            node.base.mkdir(parents=True, exist_ok=True)
            node.write_file(name, text)
        node.start()
        yield node
    finally:
        node.stop()


@contextlib.contextmanager
def private_cluster(size: int = 3) -> Iterator[list[PrivateNode]]:
    """``size`` private nodes joined into one RabbitMQ cluster (the first is the seed), all stopped afterwards.

    The nodes share the Erlang cookie of the ``rabbitmq`` user they all run as. They start in parallel; the
    others then join the first (``stop_app``, ``join_cluster`` one by one, ``start_app``). About 20 s.
    """
    nodes = [PrivateNode() for _ in range(size)]
    try:
        with ThreadPoolExecutor(size) as pool:
            list(pool.map(PrivateNode.start, nodes))
            joining = nodes[1:]
            list(pool.map(PrivateNode.stop_app, joining))
            for node in joining:  # one at a time: each join changes the cluster's membership
                node.ctl("join_cluster", nodes[0].name)
            list(pool.map(PrivateNode.start_app, joining))
        running = nodes[0].ctl("eval", "length(rabbit_nodes:all_running()).").strip()
        if running != str(size):
            raise RuntimeError(f"the cluster runs {running} nodes, not {size}")
        yield nodes
    finally:
        with ThreadPoolExecutor(size) as pool:
            list(pool.map(PrivateNode.stop, nodes))
