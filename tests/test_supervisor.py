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


async def test_supervisord_reload_without_wrapper(tmp_path, sink):
    port = free_port()
    cfg = tmp_path / "bwp.yaml"
    cfg.write_text(yaml.safe_dump({"listen": [f"127.0.0.1:{port}"]}))
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
stopwaitsecs=20
autorestart=true
startsecs=1
redirect_stderr=true
stdout_logfile={tmp_path}/bwp.log
""")
    sup = subprocess.Popen(["supervisord", "-c", str(conf)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    seen: set[int] = set()

    def ctl(*args: str) -> str:
        return subprocess.run(["supervisorctl", "-c", str(conf), *args], capture_output=True,
                              text=True, timeout=20).stdout.strip()

    try:
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
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            ctl("shutdown")
        try:
            sup.wait(20)
        except subprocess.TimeoutExpired:
            sup.kill()
            sup.wait()
        for pid in seen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
