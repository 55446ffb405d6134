"""Real sockets only: the daemon runs as a subprocess, the sink is a real aiohttp server.

Every process a test starts is stopped by pid in teardown; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

pytest_plugins = ["broker"]  # tests/broker.py: a real RabbitMQ node (tests/ is on sys.path)

ROOT = Path(__file__).resolve().parent.parent


# Listening ports come from below the kernel's ephemeral range (32768-60999 by default), so no
# outgoing connection takes one between free_port() and the daemon's bind; each pytest-xdist
# worker draws from its own slice (gw0: 16000-17999, gw1: 18000-19999, ...), so workers never
# race for one. A random start within the slice keeps two concurrent sessions apart.
_PORT_BASE, _PORT_SLICE, _PORT_SLICES = 16000, 2000, 8
_worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0) % _PORT_SLICES
_port_next = random.randrange(_PORT_SLICE)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on, not ephemeral, and this worker's alone (see above)."""
    global _port_next
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(_PORT_SLICE):
        port = _PORT_BASE + _worker * _PORT_SLICE + _port_next % _PORT_SLICE
        _port_next += 1
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))  # no SO_REUSEADDR: a port with TIME_WAIT leftovers is skipped
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port in this worker's slice on {host}")


@dataclass
class Received:
    method: str
    path_qs: str
    headers: dict[str, str]
    raw_headers: list[tuple[bytes, bytes]]
    body: bytes
    peer: str
    at: float = 0.0  # time.time() of arrival


@dataclass
class Sink:
    """A scripted destination: records every request, answers with `status` after `delay`."""

    host: str = "127.0.0.1"
    port: int = 0
    status: int = 200
    delay: float = 0.0
    response_body: bytes = b"ok"
    # answers for the first requests, in order: (status, headers); then `status`
    script: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    _event: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def base(self) -> str:
        h = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{h}:{self.port}"

    def url(self, path: str = "/") -> str:
        return self.base + path

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(Received(
            request.method, request.path_qs, dict(request.headers), list(request.raw_headers),
            body, request.transport.get_extra_info("peername")[0], time.time()))
        self._event.set()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.script:
            status, headers = self.script.pop(0)
            return web.Response(status=status, headers=headers, body=self.response_body)
        return web.Response(status=self.status, body=self.response_body)

    async def start(self) -> Sink:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        self.port = self.port or free_port(self.host)
        await web.TCPSite(self._runner, self.host, self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"sink got {len(self.received)} requests, expected {count}")
            self._event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), min(left, 0.5))
        return self.received

    async def settle(self, quiet: float = 0.3) -> None:
        """Wait until nothing new has arrived for `quiet` seconds (to assert absence)."""
        n = -1
        while n != len(self.received):
            n = len(self.received)
            await asyncio.sleep(quiet)


class Daemon:
    """`bwp serve` as a subprocess on its own port."""

    def __init__(self, tmp: Path, config: dict[str, Any] | None, args: list[str],
                 env: dict[str, str] | None = None, preexec: Callable[[], None] | None = None):
        self.tmp, self.args, self.env, self.preexec = tmp, args, env, preexec
        self.port = free_port()
        self.config = {"listen": [f"127.0.0.1:{self.port}"], **(config or {})}
        for addr in self.config["listen"]:  # a test's own listen list: talk to its first TCP one
            if addr.startswith("127.0.0.1:"):
                self.port = int(addr.rsplit(":", 1)[1])
                break
        self.proc: asyncio.subprocess.Process | None = None
        self.log_path = tmp / f"bwp-{self.port}.log"
        self.pids: set[int] = set()  # every generation seen (reloads start new processes)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, wait: bool = True) -> Daemon:
        cfg_path = self.tmp / f"bwp-{self.port}.yaml"
        cfg_path.write_text(yaml.safe_dump(self.config))
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bwp", "serve", "-c", str(cfg_path), *self.args,
            stdout=self.log, stderr=self.log, cwd=str(ROOT),
            env={**os.environ, **self.env} if self.env else None, preexec_fn=self.preexec)
        self.pids.add(self.proc.pid)
        if wait:
            await self.wait_ready()
        return self

    async def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                if self.proc and self.proc.returncode is not None:
                    raise AssertionError(f"bwp exited {self.proc.returncode}: {self.output()}")
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with s.get(self.base + "/healthz") as r:
                        if r.status == 200:
                            return
                await asyncio.sleep(0.05)
        raise AssertionError(f"bwp did not become ready: {self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def post(self, payload: Any, *, raw: bytes | None = None,
                   headers: dict[str, str] | None = None,
                   path: str = "/post/http") -> tuple[int, Any, dict[str, str]]:
        data = raw if raw is not None else json.dumps(payload).encode()
        async with aiohttp.ClientSession() as s, s.post(
                self.base + path, data=data, headers=headers) as r:
            text = await r.text()
            try:
                body = json.loads(text)
            except ValueError:
                body = text
            return r.status, body, dict(r.headers)

    async def get(self, path: str) -> tuple[int, str]:
        async with aiohttp.ClientSession() as s, s.get(self.base + path) as r:
            return r.status, await r.text()

    async def delete(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as s, s.delete(self.base + path, headers=headers) as r:
            return r.status, json.loads(await r.text())

    async def job(self, job_id: str) -> tuple[int, Any]:
        status, text = await self.get(f"/jobs/{job_id}")
        return status, json.loads(text)

    async def wait_state(self, job_id: str, *states: str, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            status, doc = await self.job(job_id)
            if status == 200 and doc["state"] in states:
                return doc
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id}: {status} {doc}, wanted {states}")
            await asyncio.sleep(0.05)

    async def metric(self, name: str, **labels: str) -> float:
        _, text = await self.get("/metrics")
        want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
                       if labels else "")
        for line in text.splitlines():
            if line.startswith(want + " "):
                return float(line.split()[-1])
        raise AssertionError(f"metric {want} not found")

    def pidfile_pid(self) -> int | None:
        path = self.config.get("pidfile")
        try:
            pid = int(Path(path).read_text().strip()) if path else None
        except (OSError, ValueError):
            return None
        if pid:
            self.pids.add(pid)
        return pid

    def kill_all(self) -> None:
        """Last-resort cleanup of every generation, by pid."""
        self.pidfile_pid()
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                os.kill(self.proc.pid, signal.SIGKILL)
                await self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture(autouse=True)
def _alone(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """@pytest.mark.alone: no other test of this xdist session runs meanwhile (for the ones that
    load the daemon with hundreds of submits a second, whose reload races starve on a busy
    machine). Every other test holds a shared flock for its duration, an `alone` one the
    exclusive one; the gate keeps new shared holders out while an exclusive one waits."""
    if "PYTEST_XDIST_WORKER" not in os.environ:  # one test at a time anyway
        yield
        return
    shared = tmp_path_factory.getbasetemp().parent  # pytest-N/, above each popen-gwK/
    alone = request.node.get_closest_marker("alone") is not None
    with open(shared / "alone.gate", "a") as gate, open(shared / "alone.lock", "a") as lock:
        fcntl.flock(gate, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        fcntl.flock(lock, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        if not alone:
            fcntl.flock(gate, fcntl.LOCK_UN)
        yield  # both closed (so unlocked) after the test's other fixtures are torn down


@pytest.fixture
def notify_socket(tmp_path):
    """A datagram socket standing in for systemd's NOTIFY_SOCKET (sender pids attached)."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.setblocking(False)
    yield path, sock
    sock.close()


@pytest.fixture
async def sink():
    s = await Sink().start()
    yield s
    await s.stop()


@pytest.fixture
async def make_sink():
    sinks: list[Sink] = []

    async def make(kind: type[Sink] = Sink, **kw: Any) -> Sink:
        s = await kind(**kw).start()
        sinks.append(s)
        return s

    yield make
    for s in sinks:
        await s.stop()


@pytest.fixture
async def make_daemon(tmp_path):
    daemons: list[Daemon] = []

    async def make(config: dict[str, Any] | None = None, *args: str, wait: bool = True,
                   env: dict[str, str] | None = None,
                   preexec: Callable[[], None] | None = None) -> Daemon:
        d = Daemon(tmp_path, config, list(args), env, preexec)
        daemons.append(d)
        return await d.start(wait=wait)

    yield make
    for d in daemons:
        await d.stop(signal.SIGKILL)
        d.kill_all()


@pytest.fixture
async def daemon(make_daemon):
    return await make_daemon()


def run_cli(*args: str, timeout: float = 20) -> tuple[int, str, str]:
    """Run `python -m bwp ...` synchronously; returns (code, stdout, stderr)."""
    import subprocess

    p = subprocess.run([sys.executable, "-m", "bwp", *args], capture_output=True, text=True,
                       timeout=timeout, cwd=str(ROOT))
    return p.returncode, p.stdout, p.stderr


class SyncDaemon:
    """A daemon shared by a module's tests (started once: cheaper than one per test)."""

    def __init__(self, port: int, proc: subprocess.Popen[bytes], log_path: Path):
        self.port, self.proc, self.log_path = port, proc, log_path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body: bytes = b"",
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def accepted(self) -> float:
        _, text = self.request("GET", "/metrics")
        m = re.search(rb'^bwp_jobs_accepted_total\{queue="default"\} (\S+)$', text, re.M)
        assert m
        return float(m.group(1))


@contextlib.contextmanager
def sync_daemon(tmp: Path, config: dict[str, Any]) -> Iterator[SyncDaemon]:
    """`bwp serve` on 127.0.0.1 with `config`; killed on exit."""
    port = free_port()
    cfg = tmp / "bwp.yaml"
    cfg.write_text(yaml.safe_dump({"listen": [f"127.0.0.1:{port}"], **config}))
    log_path = tmp / "bwp.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "bwp", "serve", "-c", str(cfg)],
                                stdout=log, stderr=log, cwd=str(ROOT))
    d = SyncDaemon(port, proc, log_path)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError):
                if d.request("GET", "/healthz")[0] == 200:
                    break
            assert time.monotonic() < deadline and proc.poll() is None, \
                f"bwp did not start: {log_path.read_text()}"
            time.sleep(0.05)
        yield d
    finally:
        proc.kill()
        proc.wait()
