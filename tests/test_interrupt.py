"""Ctrl-C and group stops: the terminal (and supervisord's `stopasgroup`) signals the whole
process group, master and workers alike.  One such signal is one graceful stop; a second,
distinct one exits at once (CONTRACT.md §5).

Every daemon here runs in a process group of its own (as a shell's foreground job, or a
supervisord program), and the signals go to that group with os.killpg."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from conftest import Sink
from test_lifecycle import alive, wait_until
from test_processes import fresh, worker_pids
from test_reload import descendants

DELAY = 1.0  # seconds each delivery takes at the slow sink


@dataclass
class SlowSink(Sink):
    """A Sink that also records which requests were answered to a daemon still there to read
    the answer: a delivery, not merely a request that arrived."""

    completed: list[str] = field(default_factory=list)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        response = await super()._handle(request)  # records the arrival, waits `delay`
        if request.transport is not None and not request.transport.is_closing():
            self.completed.append(request.path_qs)
        return response


@pytest.fixture
def slow_sink(make_sink):
    return lambda delay=DELAY: make_sink(SlowSink, delay=delay)


@pytest.fixture
async def group_daemon(make_daemon):
    """A daemon that leads a process group of its own; that whole group is killed at the end,
    and every pid seen below it too (should one have left the group)."""
    made = []

    async def make(config: dict, *args: str):
        d = await make_daemon(config, *args, preexec=os.setpgrp)
        made.append(d)
        return d

    yield make
    for d in made:
        d.pids |= descendants(d.pids)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(d.proc.pid, signal.SIGKILL)


MODES = {
    # (config, extra args, worker processes)
    "processes-2": ({"processes": 2, "pool": {"size": 4}}, (), 2),
    "master-1": ({"pool": {"size": 2}}, ("--master",), 1),
}


async def start(group_daemon, mode: str, drain_timeout: float = 30):
    config, args, n = MODES[mode]
    d = await group_daemon({**config, "drain_timeout": drain_timeout}, *args)
    # the workers answer before the master says it serves and takes its signals
    await wait_until(lambda: "master serving" in d.output(), timeout=10, what="master serving")
    workers = await worker_pids(d, n)
    d.pids |= workers
    assert len(workers) == n and d.proc.pid not in workers, d.output()
    assert all(os.getpgid(pid) == d.proc.pid for pid in workers)  # all in the daemon's group
    return d, workers


async def submit(d, sink: Sink, count: int) -> list[str]:
    """`count` jobs, one per new connection (so each worker gets some), more than the workers
    can run at once: some run, the others wait in the queues."""
    ids = []
    for i in range(count):
        status, body = await fresh(d, "POST", "/post/http", {"url": sink.url(f"/{i}"), "id": f"j{i}"})
        assert status == 200, body
        ids += body["ids"]
    return ids


def abandon_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if "abandoning" in line or "abandoned job" in line]


# SIGTERM to the group with --master is what test_supervisor.py's stopasgroup test sends
@pytest.mark.parametrize(("sig", "mode"), [
    pytest.param(signal.SIGINT, "processes-2", id="SIGINT-processes-2"),
    pytest.param(signal.SIGINT, "master-1", id="SIGINT-master-1"),
    pytest.param(signal.SIGTERM, "processes-2", id="SIGTERM-processes-2")])
async def test_one_group_signal_is_one_graceful_stop(group_daemon, slow_sink, mode, sig):
    """Ctrl-C (SIGINT) or supervisord's stopasgroup (SIGTERM) reaches master and workers; the
    master's own word to the workers must not count as a second signal."""
    sink = await slow_sink()
    d, workers = await start(group_daemon, mode)
    count = 6 if mode == "processes-2" else 4  # slots: 4 (2 per worker), 2
    await submit(d, sink, count)
    await sink.wait_for(2)  # some are under way, the rest queued
    await asyncio.sleep(0.2)
    t0 = time.monotonic()
    os.killpg(d.proc.pid, sig)
    assert await asyncio.wait_for(d.proc.wait(), 25) == 0, d.output()
    took = time.monotonic() - t0
    out = d.output()
    assert not abandon_lines(out), out
    assert sorted(sink.completed) == sorted(f"/{i}" for i in range(count)), out
    assert took >= DELAY - 0.5  # it did wait for the deliveries under way
    assert out.count("stopped (0 jobs abandoned)") == len(workers), out
    assert "master stopped" in out
    for pid in workers:
        await wait_until(lambda p=pid: not alive(p), timeout=5, what=f"worker {pid} exit")


@pytest.mark.parametrize("mode", MODES)
async def test_a_second_ctrl_c_exits_at_once(group_daemon, slow_sink, mode):
    hang = await slow_sink(delay=30)
    d, workers = await start(group_daemon, mode)
    count = 6 if mode == "processes-2" else 4
    ids = await submit(d, hang, count)
    await hang.wait_for(2)
    await asyncio.sleep(0.2)
    os.killpg(d.proc.pid, signal.SIGINT)
    await asyncio.sleep(0.5)
    # the first Ctrl-C drains: everybody is still there, nothing abandoned yet
    assert d.proc.returncode is None and all(alive(p) for p in workers), d.output()
    assert not abandon_lines(d.output()), d.output()
    t0 = time.monotonic()
    os.killpg(d.proc.pid, signal.SIGINT)
    code = await asyncio.wait_for(d.proc.wait(), 5)
    assert time.monotonic() - t0 < 3
    for pid in workers:
        await wait_until(lambda p=pid: not alive(p), timeout=2, what=f"worker {pid} exit")
    out = d.output()
    assert code == 1, out  # like a single process told twice: it did not finish its work
    # each job logged as abandoned by whichever worker held it, and counted
    for job_id in ids:
        assert re.search(rf"abandoned job {job_id} GET ", out), out
    counts = [int(n) for n in re.findall(r"exiting now, abandoning (\d+) jobs", out)]
    assert len(counts) == len(workers) and sum(counts) == count, out
    assert not hang.completed


async def test_a_single_process_keeps_its_ctrl_c(group_daemon, slow_sink):
    """No master: the daemon is the whole group; one Ctrl-C drains, the next exits at once."""
    sink = await slow_sink()
    d = await group_daemon({"pool": {"size": 2}, "drain_timeout": 30})
    await submit(d, sink, 4)
    await sink.wait_for(2)
    await asyncio.sleep(0.2)
    os.killpg(d.proc.pid, signal.SIGINT)
    assert await asyncio.wait_for(d.proc.wait(), 20) == 0, d.output()
    out = d.output()
    assert not abandon_lines(out) and "stopped (0 jobs abandoned)" in out, out
    assert sorted(sink.completed) == [f"/{i}" for i in range(4)]

    hang = await slow_sink(delay=30)
    d = await group_daemon({"pool": {"size": 2}, "drain_timeout": 30})
    ids = await submit(d, hang, 4)
    await hang.wait_for(2)
    os.killpg(d.proc.pid, signal.SIGINT)
    await asyncio.sleep(0.5)
    assert d.proc.returncode is None
    t0 = time.monotonic()
    os.killpg(d.proc.pid, signal.SIGINT)
    assert await asyncio.wait_for(d.proc.wait(), 5) == 1
    assert time.monotonic() - t0 < 2
    out = d.output()
    assert "abandoning 4 jobs" in out, out
    for job_id in ids:
        assert f"abandoned job {job_id} GET" in out


@pytest.mark.parametrize("mode", ["processes-2"])
async def test_ctrl_c_while_the_old_workers_of_a_reload_drain(group_daemon, slow_sink, mode):
    """The old workers drain already when the Ctrl-C reaches them: it is their first stop
    signal, not a second one."""
    sink = await slow_sink(delay=3)
    d, old = await start(group_daemon, mode)
    count = 6 if mode == "processes-2" else 4
    await submit(d, sink, count)
    await sink.wait_for(2)
    os.kill(d.proc.pid, signal.SIGHUP)
    await wait_until(lambda: "the old ones drain" in d.output(), timeout=10, what="reload")
    d.pids |= descendants({d.proc.pid})
    assert all(alive(p) for p in old), d.output()  # still draining
    os.killpg(d.proc.pid, signal.SIGINT)
    assert await asyncio.wait_for(d.proc.wait(), 25) == 0, d.output()
    out = d.output()
    assert not abandon_lines(out), out
    assert sorted(sink.completed) == sorted(f"/{i}" for i in range(count)), out
    for pid in old:
        await wait_until(lambda p=pid: not alive(p), timeout=5, what=f"old worker {pid} exit")


async def test_ctrl_c_before_a_dead_worker_is_started_again(group_daemon):
    """A worker died; the stop comes before its successor was started: none is started."""
    d, workers = await start(group_daemon, "processes-2")
    os.kill(min(workers), signal.SIGKILL)
    await wait_until(lambda: "starting another" in d.output(), timeout=5, what="the master noticing")
    os.killpg(d.proc.pid, signal.SIGINT)  # within its RESTART_DELAY
    assert await asyncio.wait_for(d.proc.wait(), 10) == 0, d.output()
    out = d.output()
    assert out.count("serving on") == 2, out  # the first two only
    assert not abandon_lines(out), out
