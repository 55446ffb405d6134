"""PID file, graceful stop, zero-downtime reload under load, sd_notify."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from conftest import ROOT, free_port

# The tests that load the daemon with hundreds of submits a second: each the heaviest CPU user
# of the suite while it runs, and its reload must not starve (see conftest._alone).
UNDER_LOAD = pytest.mark.alone


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z"):
            return False
    return True


async def wait_until(predicate, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def load(base: str, sink_url: str, rate: float, seconds: float,
               statuses: list[int], unix_path: str | None = None) -> int:
    """Submit `rate` jobs/s for `seconds`, each over a fresh connection as PHP does."""
    n = int(rate * seconds)
    start = time.monotonic()

    async def one(i: int) -> None:
        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        conn = (aiohttp.UnixConnector(path=unix_path, force_close=True) if unix_path
                else aiohttp.TCPConnector(force_close=True))
        try:
            async with aiohttp.ClientSession(connector=conn) as s, s.post(
                    base + "/post/http", json={"url": f"{sink_url}/{i}"}) as r:
                statuses.append(r.status)
        except aiohttp.ClientError as e:
            statuses.append(-1)
            print("submit failed:", i, repr(e))

    await asyncio.gather(*(one(i) for i in range(n)))
    return n


async def reload_under_load(make_daemon, sink, tmp_path, trigger, unix: bool = False) -> None:
    sock_path = str(tmp_path / "bwp.sock")
    d = await make_daemon({"pidfile": str(tmp_path / "bwp.pid"),
                           "listen": [f"127.0.0.1:{free_port()}", sock_path]})
    old = d.pidfile_pid()
    assert old == d.proc.pid
    statuses: list[int] = []
    base = "http://bwp" if unix else d.base
    task = asyncio.create_task(load(base, sink.base, 300, 4.0, statuses,
                                    sock_path if unix else None))
    await asyncio.sleep(1.5)
    await trigger(d, old)
    n = await task
    assert statuses.count(200) == n, f"non-200 answers: {[s for s in statuses if s != 200]}"
    await sink.wait_for(n, timeout=15)
    await sink.settle(0.5)
    paths = [r.path_qs for r in sink.received]
    assert sorted(paths) == sorted(f"/{i}" for i in range(n))  # each exactly once
    new = d.pidfile_pid()
    assert new != old and alive(new)
    assert await asyncio.wait_for(d.proc.wait(), 15) == 0  # the old one drained and left
    out = d.output()
    assert f"new process {new} serves" in out and f"bwp[{old}] INFO bwp: stopped" in out


@UNDER_LOAD
async def test_reload_sighup_under_load(make_daemon, sink, tmp_path):
    async def trigger(d, pid):
        os.kill(pid, signal.SIGHUP)

    await reload_under_load(make_daemon, sink, tmp_path, trigger)


@UNDER_LOAD
async def test_reload_sigusr2_under_load_unix_socket(make_daemon, sink, tmp_path):
    async def trigger(d, pid):
        os.kill(pid, signal.SIGUSR2)

    await reload_under_load(make_daemon, sink, tmp_path, trigger, unix=True)


@UNDER_LOAD
async def test_reload_command_under_load(make_daemon, sink, tmp_path):
    async def trigger(d, pid):
        cfg = str(tmp_path / f"bwp-{d.port}.yaml")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bwp", "reload", "-c", cfg, "--timeout", "20",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=str(ROOT))
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err
        assert f"reloaded: pid {pid} -> " in out.decode()

    await reload_under_load(make_daemon, sink, tmp_path, trigger)


async def test_reload_with_broken_config_keeps_old_process(make_daemon, sink, tmp_path):
    d = await make_daemon({"pidfile": str(tmp_path / "bwp.pid")})
    pid = d.proc.pid
    cfg = tmp_path / f"bwp-{d.port}.yaml"
    cfg.write_text(cfg.read_text() + "pool: {size: -1}\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bwp", "reload", "--pidfile", str(tmp_path / "bwp.pid"),
        "--timeout", "5", stderr=asyncio.subprocess.PIPE, cwd=str(ROOT))
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 1 and b"keeps serving" in err
    await wait_until(lambda: "reload failed, this process keeps serving" in d.output(),
                     what="reload failure logged")
    assert "pool.size" in d.output()  # the new process said why
    assert d.pidfile_pid() == pid and d.proc.returncode is None
    assert (await d.post({"url": sink.url("/still")}))[0] == 200
    await sink.wait_for(1)


async def test_pidfile_written_and_removed(make_daemon, tmp_path):
    pidfile = tmp_path / "run" / "bwp.pid"
    d = await make_daemon({"pidfile": str(pidfile)})
    assert int(pidfile.read_text()) == d.proc.pid
    # a live daemon's pidfile refuses a second one
    d2 = await make_daemon({"pidfile": str(pidfile)}, wait=False)
    assert await asyncio.wait_for(d2.proc.wait(), 10) == 1
    assert "already running" in d2.output()
    assert await d.stop() == 0
    assert not pidfile.exists()
    # a stale file (dead pid) does not block a start
    pidfile.write_text("999999\n")
    d3 = await make_daemon({"pidfile": str(pidfile)})
    assert int(pidfile.read_text()) == d3.proc.pid


async def test_second_signal_exits_at_once(make_daemon, make_sink):
    hang = await make_sink(delay=30)
    d = await make_daemon({"pool": {"size": 1}})
    await d.post([{"url": hang.url(f"/{i}"), "id": f"j{i}"} for i in range(3)])
    await hang.wait_for(1)
    os.kill(d.proc.pid, signal.SIGTERM)
    await asyncio.sleep(0.3)
    t0 = time.monotonic()
    os.kill(d.proc.pid, signal.SIGTERM)
    assert await asyncio.wait_for(d.proc.wait(), 5) == 1
    assert time.monotonic() - t0 < 2
    out = d.output()
    assert "abandoning 3 jobs" in out
    for i in range(3):
        assert f"abandoned job j{i} GET" in out


async def test_healthz_503_while_draining(make_daemon, make_sink):
    hang = await make_sink(delay=30)
    d = await make_daemon({"pool": {"size": 1}, "drain_timeout": 5})
    await d.post({"url": hang.url("/h")})
    await hang.wait_for(1)
    async with aiohttp.ClientSession() as s:
        async with s.get(d.base + "/healthz") as r:  # keep-alive connection, opened before
            assert r.status == 200
        os.kill(d.proc.pid, signal.SIGTERM)
        await asyncio.sleep(0.1)
        async with s.get(d.base + "/healthz") as r:
            assert r.status == 503


def read_notifications(sock: socket.socket) -> list[tuple[int, str]]:
    out = []
    while True:
        try:
            msg, anc, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except BlockingIOError:
            return out
        pid = None
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = int.from_bytes(data[:4], "little")
        out.append((pid, msg.decode()))


async def test_sd_notify_sequence(make_daemon, notify_socket, tmp_path):
    path, sock = notify_socket
    d = await make_daemon({"pidfile": str(tmp_path / "bwp.pid")}, env={"NOTIFY_SOCKET": path})
    old = d.proc.pid
    os.kill(old, signal.SIGHUP)
    await asyncio.wait_for(d.proc.wait(), 15)
    new = d.pidfile_pid()
    os.kill(new, signal.SIGTERM)
    await wait_until(lambda: not alive(new), what="new process exit")
    got = read_notifications(sock)
    assert got == [
        (old, f"MAINPID={old}\nREADY=1"),
        (old, "RELOADING=1"),
        (new, f"MAINPID={new}\nREADY=1"),
        (old, f"MAINPID={new}"),
        (new, "STOPPING=1"),
    ]


async def worker_pid(d) -> int:
    status, text = await d.get("/healthz")
    assert status == 200
    pid = json.loads(text)["pid"]
    d.pids.add(pid)  # cleaned up by pid, whatever happens to the master
    return pid


@UNDER_LOAD
async def test_master_mode_reload_keeps_the_main_pid(make_daemon, sink, tmp_path):
    d = await make_daemon({"pidfile": str(tmp_path / "bwp.pid")}, "--master")
    master = d.proc.pid
    # the worker may answer /healthz a moment before the master writes the PID file
    await wait_until(lambda: d.pidfile_pid() == master, what="PID file")
    first = await worker_pid(d)
    assert first != master
    status, _, _ = await d.post({"url": sink.url("/later"), "delay": 4})
    assert status == 200
    statuses: list[int] = []
    task = asyncio.create_task(load(d.base, sink.base, 300, 3.0, statuses))
    await asyncio.sleep(1.0)
    os.kill(master, signal.SIGHUP)
    # The old worker hands its delayed job to the new one instead of waiting for it.
    await wait_until(lambda: not alive(first), timeout=4, what="old worker exit")
    n = await task
    assert statuses.count(200) == n
    await sink.wait_for(n + 1, timeout=15)
    await sink.settle(0.5)
    assert sorted(r.path_qs for r in sink.received) == sorted([*(f"/{i}" for i in range(n)), "/later"])
    assert "handed 1 delayed/retrying jobs to the new process" in d.output()
    second = await worker_pid(d)
    assert second != first and d.pidfile_pid() == master
    assert await d.stop() == 0
    assert not (tmp_path / "bwp.pid").exists()
    await wait_until(lambda: not alive(second), what="worker exit")


async def test_master_restarts_a_dead_worker(make_daemon, sink):
    d = await make_daemon(None, "--master")
    first = await worker_pid(d)
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while True:
        with contextlib.suppress(aiohttp.ClientError, AssertionError, OSError):
            if await worker_pid(d) != first:
                break
        assert time.monotonic() < deadline, d.output()
        await asyncio.sleep(0.1)
    assert (await d.post({"url": sink.url("/after-crash")}))[0] == 200
    await sink.wait_for(1)
    assert "exited with status -9; starting another" in d.output()


async def test_workers_of_a_killed_master_stop_by_themselves(make_daemon):
    """kill -9 of the master (the OOM killer, say) leaves its workers without a supervisor:
    each notices within a second, drains, and exits."""
    d = await make_daemon(None, "--master")
    worker = await worker_pid(d)
    os.kill(d.proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _alive(worker):
        assert time.monotonic() < deadline, "the worker outlived its master"
        await asyncio.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(ChildProcessError, OSError):  # not our child: no zombie to reap
        os.waitpid(pid, os.WNOHANG)
    return True


async def test_reload_hands_delayed_and_retrying_jobs_to_the_new_process(
        make_daemon, make_sink, tmp_path):
    # Both jobs are due `due` s after the submit: the new process must serve before the old one's
    # drain deadline reaches that (a busy machine took up to 4.5 s to start one).
    due = 6
    sink, flaky = await make_sink(), await make_sink(script=[(503, {})])
    d = await make_daemon({"pidfile": str(tmp_path / "bwp.pid"), "drain_timeout": 0.5,
                           "pool": {"retry": {"attempts": 2, "backoff": due}}})
    old = d.proc.pid
    t0 = time.time()
    status, _, _ = await d.post([
        {"url": sink.url("/later"), "id": "later", "delay": due, "method": "POST",
         "body": "aGk=", "headers": {"X-Kept": "yes"}},
        {"url": flaky.url("/flaky"), "id": "flaky"},
    ])
    assert status == 200
    await d.wait_state("flaky", "retrying")
    os.kill(old, signal.SIGHUP)
    assert await asyncio.wait_for(d.proc.wait(), 10) == 0  # gone long before the jobs are due
    assert "handed 2 delayed/retrying jobs to the new process (0 kept here)" in d.output()
    assert "abandoned job" not in d.output()
    new = d.pidfile_pid()
    assert new != old
    doc = await d.wait_state("later", "delayed")  # the new process knows it now
    assert doc["attempts"] == 0
    (r,) = await sink.wait_for(1, timeout=10)
    assert r.at - t0 >= due and r.body == b"hi" and r.headers["X-Kept"] == "yes"
    await flaky.wait_for(2, timeout=10)
    doc = await d.wait_state("flaky", "succeeded")
    assert doc["attempts"] == 1  # the retry ran in the new process
    await sink.settle(0.5)
    assert len(sink.received) == 1
