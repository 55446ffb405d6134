"""supervisord runs `bwp serve --master`: a reload keeps the pid supervisord tracks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from conftest import ROOT, free_port

pytestmark = pytest.mark.skipif(
    shutil.which("supervisord") is None,
    reason="supervisord is not installed (apt-get install supervisor; .ci/run does)")


async def health_pid(base: str) -> int | None:
    with contextlib.suppress(aiohttp.ClientError, OSError):
        async with aiohttp.ClientSession() as s, s.get(base + "/healthz") as r:
            if r.status == 200:
                return (await r.json())["pid"]
    return None


def supervisord_conf(tmp_path: Path, cfg: Path, stopping: str) -> Path:
    """supervisord running `bwp serve --master -c CFG`, with the program's `stopping` lines."""
    conf = tmp_path / "supervisord.conf"
    conf.write_text(f"""
[unix_http_server]
file={tmp_path}/supervisor.sock
[supervisord]
logfile={tmp_path}/supervisord.log
pidfile={tmp_path}/supervisord.pid
nodaemon=true
[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
[supervisorctl]
serverurl=unix://{tmp_path}/supervisor.sock
[program:bwp]
command={sys.executable} -m bwp serve --master -c {cfg}
directory={ROOT}
stopsignal=TERM
{stopping}
autorestart=true
startsecs=1
redirect_stderr=true
stdout_logfile={tmp_path}/bwp.log
""")
    return conf


@contextlib.contextmanager
def supervised(tmp_path: Path, cfg: Path, stopping: str,
               timeout: float) -> Iterator[tuple[Callable[..., str], set[int]]]:
    """supervisord running bwp; yields supervisorctl and a set for every bwp pid seen, all
    stopped (by pid) at the end."""
    conf = supervisord_conf(tmp_path, cfg, stopping)
    sup = subprocess.Popen(["supervisord", "-c", str(conf)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    seen: set[int] = set()

    def ctl(*args: str) -> str:
        return subprocess.run(["supervisorctl", "-c", str(conf), *args], capture_output=True,
                              text=True, timeout=timeout).stdout.strip()

    try:
        yield ctl, seen
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            ctl("shutdown")
        try:
            sup.wait(timeout)
        except subprocess.TimeoutExpired:
            sup.kill()
            sup.wait()
        for pid in seen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def test_supervisord_reload_without_wrapper(tmp_path, sink):
    port = free_port()
    cfg = tmp_path / "bwp.yaml"
    cfg.write_text(yaml.safe_dump({"listen": [f"127.0.0.1:{port}"]}))
    base = f"http://127.0.0.1:{port}"
    with supervised(tmp_path, cfg, "stopwaitsecs=20", timeout=20) as (ctl, seen):
        deadline = time.monotonic() + 20
        while (first := await health_pid(base)) is None:
            assert time.monotonic() < deadline, (tmp_path / "bwp.log").read_text()
            await asyncio.sleep(0.1)
        seen.add(first)
        master = int(ctl("pid", "bwp"))
        seen.add(master)
        assert master != first

        ctl("signal", "HUP", "bwp")
        while (second := await health_pid(base)) in (None, first):
            assert time.monotonic() < deadline + 20, (tmp_path / "bwp.log").read_text()
            await asyncio.sleep(0.1)
        seen.add(second)
        await asyncio.sleep(1.5)  # supervisord would notice a dead program by now
        assert int(ctl("pid", "bwp")) == master
        assert "RUNNING" in ctl("status", "bwp")
        async with aiohttp.ClientSession() as s, s.post(
                base + "/post/http", data=json.dumps({"url": sink.url("/sup")})) as r:
            assert r.status == 200
        await sink.wait_for(1)
        assert "worker" in (tmp_path / "bwp.log").read_text()


async def test_supervisorctl_stop_with_stopasgroup_drains(tmp_path):
    """stopasgroup=true: supervisord sends its SIGTERM to the program's whole process group,
    master and workers; that is one stop, so every job under way or queued is delivered."""
    from test_interrupt import SlowSink, abandon_lines, submit

    sink = await SlowSink(delay=2).start()
    port = free_port()
    cfg = tmp_path / "bwp.yaml"
    cfg.write_text(yaml.safe_dump({"listen": [f"127.0.0.1:{port}"], "processes": 2,
                                   "pool": {"size": 4}, "drain_timeout": 30}))
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "bwp.log"
    d = types.SimpleNamespace(base=base)  # what submit() needs
    stopping = "stopasgroup=true\nkillasgroup=true\nstopwaitsecs=25"
    try:
        with supervised(tmp_path, cfg, stopping, timeout=40) as (ctl, seen):
            deadline = time.monotonic() + 20
            while await health_pid(base) is None:
                assert time.monotonic() < deadline, log.read_text() if log.exists() else ""
                await asyncio.sleep(0.1)
            master = int(ctl("pid", "bwp"))
            seen.add(master)
            while len(seen) < 3:  # both workers answered
                assert time.monotonic() < deadline, log.read_text()
                pids = await asyncio.gather(*(health_pid(base) for _ in range(10)))
                seen.update(p for p in pids if p is not None)
            await submit(d, sink, 6)
            await sink.wait_for(2)
            await asyncio.sleep(0.2)
            t0 = time.monotonic()
            out = await asyncio.to_thread(ctl, "stop", "bwp")
            assert "stopped" in out, (out, log.read_text())
            text = log.read_text()
            assert not abandon_lines(text), text
            assert time.monotonic() - t0 >= 1.5  # it waited for the deliveries under way
            assert sorted(sink.completed) == sorted(f"/{i}" for i in range(6)), text
            assert text.count("stopped (0 jobs abandoned)") == 2 and "master stopped" in text, text
            assert "exit status 0" in (tmp_path / "supervisord.log").read_text()
    finally:
        await sink.stop()
