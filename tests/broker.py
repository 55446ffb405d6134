"""A real RabbitMQ node for tests: one per session, on 127.0.0.1 only, in its own temp dir.

Registered as a pytest plugin from conftest.py. Each test process boots its node before the
first test that needs it (`rabbitmq_node`, `rabbitmq_url`, a "rabbitmq" parameter) and stops it
at the session's end;
`rabbitmq` (per test) hands out the controller and puts the node back up if the test broke it.
Skips, saying why, when Debian's rabbitmq-server is not installed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from bwp.lifecycle import pid_alive

BIN = Path("/usr/lib/rabbitmq/bin")  # not the /usr/sbin wrappers: they su to the rabbitmq user's cookie
EPMD_PORT = 4369
LOOPBACK_ERL = "-kernel inet_dist_use_interface {127,0,0,1}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class RabbitMQ:
    """One rabbitmq-server process: start, stop, kill -9, SIGSTOP/SIGCONT, always by pid."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.port = _free_port()
        self.dist_port = _free_port()
        self.pidfile = base / "rabbit.pid"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self.pid = 0  # the Erlang VM's (beam.smp) pid, from the pid file
        self.frozen = False
        self._shell: subprocess.Popen[bytes] | None = None  # the rabbitmq-server script wrapping the VM
        self._watchdog: subprocess.Popen[bytes] | None = None
        self.env = dict(
            os.environ,
            HOME=str(base),  # the Erlang cookie lives here, shared by the node and the CLI
            RABBITMQ_NODENAME=f"bwptest-{secrets.token_hex(4)}@localhost",
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            ERL_EPMD_ADDRESS="127.0.0.1",
            RABBITMQ_MNESIA_BASE=str(base / "mnesia"),
            RABBITMQ_LOG_BASE=str(base / "log"),
            RABBITMQ_CONFIG_FILE=str(base / "rabbitmq.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(base / "enabled_plugins"),
            RABBITMQ_CONF_ENV_FILE="/dev/null",
            RABBITMQ_PID_FILE=str(self.pidfile),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=LOOPBACK_ERL,
            # the CLI is an Erlang node too: keep its distribution port on loopback as well
            RABBITMQ_CTL_ERL_ARGS=LOOPBACK_ERL,
        )
        (base / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
            "loopback_users = none\n"
            "log.console = false\n"
            "log.file.level = warning\n"
            "management.tcp.ip = 127.0.0.1\n"
            "prometheus.tcp.ip = 127.0.0.1\n")
        (base / "enabled_plugins").write_text("[].\n")

    def ctl(self, *args: str, timeout: float = 70.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "rabbitmqctl"), *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    @property
    def running(self) -> bool:
        return self._shell is not None and self._shell.poll() is None

    def start(self) -> None:
        """Start the node (same port, same data dir) and wait until it accepts AMQP."""
        if self.running:
            return
        self.pidfile.unlink(missing_ok=True)
        t0 = time.monotonic()
        out = open(self.base / "server.out", "ab")  # noqa: SIM115 - the child keeps it
        try:
            # own session: a ^C in pytest does not reach the VM, teardown stops it by pid
            self._shell = subprocess.Popen([str(BIN / "rabbitmq-server")], env=self.env, stdout=out,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           start_new_session=True)
        finally:
            out.close()
        r = self.ctl("wait", str(self.pidfile), "--timeout", "60")
        if r.returncode != 0:
            log = (self.base / "server.out").read_text(errors="replace")[-2000:]
            self._reap(kill=True)
            raise RuntimeError(f"rabbitmq-server did not start: {r.stdout}{r.stderr}\n{log}")
        self.pid = int(self.pidfile.read_text().strip())
        self._watch()
        # `wait` returns once the app runs; make sure the listener is there too
        deadline = time.monotonic() + 10
        while not _listening(self.port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"rabbitmq-server is up but not listening on {self.port}")
            time.sleep(0.05)
        self.last_start_seconds = time.monotonic() - t0
        self.started_at = time.monotonic()

    def stop(self) -> None:
        """Clean stop (connections get 320 CONNECTION_FORCED); SIGKILL if it does not exit."""
        if not self.running:
            return
        self.thaw()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.ctl("stop", str(self.pidfile), timeout=30)
        self._reap(kill=True)

    def kill(self) -> None:
        """kill -9 the VM: no goodbye to clients, the data dir stays as it was."""
        if not self.running:
            return
        if self.pid and pid_alive(self.pid):
            os.kill(self.pid, signal.SIGKILL)
        self.frozen = False
        self._reap(kill=True)

    def freeze(self, seconds: float | None = None) -> None:
        """SIGSTOP the VM: sockets stay open but nothing answers (a network black hole).
        With `seconds`, a timer thread sends SIGCONT then, so the test's event loop runs on."""
        if self.running and not self.frozen:
            os.kill(self.pid, signal.SIGSTOP)
            self.frozen = True
            self._wait_stopped()
            if seconds is not None:
                timer = threading.Timer(seconds, self.thaw)
                timer.daemon = True
                timer.start()

    def _wait_stopped(self, timeout: float = 2.0) -> None:
        """Until every thread of the VM has stopped: kill() returns before a thread running on
        the other core takes the signal, and it could still confirm a publish (seen in CI)."""
        deadline = time.monotonic() + timeout
        tasks = Path(f"/proc/{self.pid}/task")
        while time.monotonic() < deadline:
            states = []
            for stat in tasks.glob("*/stat"):
                with contextlib.suppress(OSError):  # a thread that just ended
                    states.append(stat.read_text().rpartition(")")[2].split()[0])
            if states and all(state in ("T", "t") for state in states):
                return
            time.sleep(0.005)

    def thaw(self) -> None:
        if self.frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)
            self.frozen = False

    @contextlib.contextmanager
    def frozen_for(self) -> Iterator[None]:
        self.freeze()
        try:
            yield
        finally:
            self.thaw()

    def restart(self) -> None:
        self.stop()
        self.start()

    def _watch(self) -> None:
        """If pytest dies without its teardown (SIGKILL, an outer timeout), kill -9 the VM:
        a leaked node would hold ~150 MB and its ports for good."""
        self._unwatch()
        script = f"while kill -0 {os.getpid()} 2>/dev/null; do sleep 1; done; kill -9 {self.pid} 2>/dev/null"
        self._watchdog = subprocess.Popen(["sh", "-c", script], stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True)

    def _unwatch(self) -> None:
        if self._watchdog is not None:
            self._watchdog.kill()
            self._watchdog.wait(timeout=5)
            self._watchdog = None

    def _reap(self, kill: bool) -> None:
        """Wait for the VM and its wrapper script to exit; SIGKILL both (by pid) if they linger."""
        deadline = time.monotonic() + 15
        while self.pid and pid_alive(self.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if kill and self.pid and pid_alive(self.pid):
            os.kill(self.pid, signal.SIGKILL)
        if self._shell is not None:
            try:
                self._shell.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._shell.kill()
                self._shell.wait(timeout=5)
        self._shell = None
        self.pid = 0
        self._unwatch()


def installed() -> bool:
    return (BIN / "rabbitmq-server").exists() and (BIN / "rabbitmqctl").exists()


DELETE_AFTER_START = 10.0  # s: deleting queues sooner after a node start breaks it (amqp.py)


async def remove_prefix(node: RabbitMQ, prefix: str, queues: Iterable[str]) -> None:
    """Delete what bwp declared under `prefix` for `queues`: a test's ~30 quorum queues would
    otherwise pile up on the session's node and slow every later restart of it.  Skipped
    while the node is down or has just started."""
    from bwp.amqp import Broker, BrokerError

    if not node.running or time.monotonic() - getattr(node, "started_at", 0.0) < DELETE_AFTER_START:
        return
    b = Broker(node.url, prefix)
    with contextlib.suppress(BrokerError):
        await b.connect(timeout=5)
        await b.delete_prefix(queues)
    await b.close()


INSTALL_HINT = "rabbitmq-server is not installed (apt-get install rabbitmq-server)"


@contextlib.contextmanager
def running_node() -> Iterator[RabbitMQ]:
    """A node for the duration of the block (the tests' session; scripts/bench.py, soak.py)."""
    # epmd outlives the node; stop it at the end only if this block is the one that started it
    epmd_was_running = _listening(EPMD_PORT)
    base = Path(tempfile.mkdtemp(prefix="bwp-rabbitmq-"))
    node = RabbitMQ(base)
    try:
        node.start()
        yield node
    finally:
        node.thaw()
        node.stop()
        if not epmd_was_running and shutil.which("epmd"):
            subprocess.run(["epmd", "-kill"], env={**os.environ, "ERL_EPMD_ADDRESS": "127.0.0.1"},
                           capture_output=True, timeout=10, stdin=subprocess.DEVNULL)
        if not os.environ.get("BWP_TEST_KEEP_RABBITMQ"):  # for a post-mortem of its logs
            shutil.rmtree(base, ignore_errors=True)


class _SessionNode:
    """This process's node, booted before the first test that needs it is timed: a boot on a
    loaded CI machine can take longer than a test's own timeout (it is bounded by the node's
    own waits instead), and its failure becomes that test's error, not an internal one."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self.node: RabbitMQ | None = None
        self.error: BaseException | None = None

    def boot(self) -> None:
        if self.node is None and self.error is None and installed():
            try:
                self.node = self._stack.enter_context(running_node())
            except Exception as e:  # reported by the fixture, test by test
                self.error = e

    def close(self) -> None:
        self._stack.close()


_session = _SessionNode()


def _needs_broker(item: pytest.Item) -> bool:
    params = getattr(item, "callspec", None)
    return "rabbitmq_node" in getattr(item, "fixturenames", ()) or (
        params is not None and "rabbitmq" in params.params.values())


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    if _needs_broker(item):  # outside pytest-timeout's wrapper (tryfirst: the outer one)
        _session.boot()
    yield


def pytest_sessionfinish(session: pytest.Session) -> None:
    _session.close()


@pytest.fixture(scope="session")
def rabbitmq_node() -> RabbitMQ:
    if not installed():
        pytest.skip(INSTALL_HINT)
    _session.boot()  # already done by the hook unless the test asked for it dynamically
    if _session.error is not None:
        raise RuntimeError(f"the test session's RabbitMQ node did not start: {_session.error}")
    assert _session.node is not None
    return _session.node


@pytest.fixture(scope="session")
def rabbitmq_url(rabbitmq_node: RabbitMQ) -> str:
    return rabbitmq_node.url


@pytest.fixture
def rabbitmq(rabbitmq_node: RabbitMQ) -> Iterator[RabbitMQ]:
    """The session's node, for tests that stop, kill or freeze it: running again afterwards."""
    yield rabbitmq_node
    rabbitmq_node.thaw()
    if not rabbitmq_node.running:
        rabbitmq_node.start()


@pytest.fixture
def amqp_prefix() -> str:
    """Names of this test's own exchanges and queues, so tests never see each other's messages."""
    return f"bwp-test-{secrets.token_hex(4)}"
