"""clients/php (the Composer package) tested with Debian's phpunit against a real bwp, a sink
that echoes what it received, and a stand-in that answers the way the Go daemon does.

Skipped, with the reason, when php (with curl) or phpunit is missing (.ci/run installs them).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess

import pytest
from aiohttp import web
from conftest import ROOT, free_port
from test_php import _php_with_curl

PACKAGE = ROOT / "clients" / "php"
TOKEN = "php-client-token-0123456789"


def _phpunit() -> str:
    _php_with_curl()
    phpunit = shutil.which("phpunit")
    if phpunit is None:
        pytest.skip("phpunit is not installed (Debian: apt-get install phpunit; .ci/run does this)")
    return phpunit


async def _echo(request: web.Request) -> web.Response:
    """What it received, as JSON; ?status= answers with that status, ?sleep= first waits."""
    body = await request.read()
    await asyncio.sleep(float(request.query.get("sleep", 0)))
    doc = {"method": request.method, "path": request.path_qs, "headers": dict(request.headers),
           "body": body.decode("utf-8", "replace"), "body_base64": base64.b64encode(body).decode()}
    return web.json_response(doc, status=int(request.query.get("status", 200)))


class GoStandIn:
    """Answers POST /post/http as xtrafrancyz/bwp does: `{"success":true}`, or a text/plain
    400 when the url is missing; a job for .../busy gets two 503s (Retry-After: 1) first."""

    def __init__(self) -> None:
        self.received: list[object] = []
        self.busy = 0

    async def submit(self, request: web.Request) -> web.Response:
        jobs = json.loads(await request.read())
        self.received.append(jobs)
        items = jobs if isinstance(jobs, list) else [jobs]
        if any(not j.get("url") for j in items):
            return web.Response(status=400, text="invalid request, url is not set")
        if any(j["url"].endswith("/busy") for j in items) and self.busy < 2:
            self.busy += 1
            return web.Response(status=503, text="queue is full", headers={"Retry-After": "1"})
        return web.json_response({"success": True})

    async def last(self, request: web.Request) -> web.Response:
        last = self.received[-1]
        return web.json_response(last if isinstance(last, list) else [last])

    async def count(self, request: web.Request) -> web.Response:
        word = request.query.get("url", "")
        n = sum(1 for jobs in self.received for j in (jobs if isinstance(jobs, list) else [jobs])
                if word in j.get("url", ""))
        return web.Response(text=str(n))


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


def test_the_package_is_a_valid_composer_package():
    composer = shutil.which("composer")
    if composer is None:
        pytest.skip("composer is not installed (Debian: apt-get install composer; .ci/run does this)")
    r = subprocess.run([composer, "validate", "--strict", "--no-check-publish"], cwd=PACKAGE,
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "COMPOSER_HOME": str(PACKAGE / ".composer-home")})
    shutil.rmtree(PACKAGE / ".composer-home", ignore_errors=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.timeout(120)
async def test_phpunit_against_a_running_daemon(make_daemon, tmp_path):
    phpunit = _phpunit()
    sink_app = web.Application()
    sink_app.router.add_route("*", "/{tail:.*}", _echo)
    go = GoStandIn()
    go_app = web.Application()
    go_app.router.add_post("/post/http", go.submit)
    go_app.router.add_get("/last", go.last)
    go_app.router.add_get("/count", go.count)
    socket_path = tmp_path / "bwp.sock"
    (sink, sink_url), (go_runner, go_url) = await _serve(sink_app), await _serve(go_app)
    try:
        d = await make_daemon({"auth": {"tokens": [TOKEN]}, "queues": {"hooks": {"size": 2}}})
        d.config["listen"] = [*d.config["listen"], str(socket_path)]
        await d.stop()
        d = await make_daemon(d.config)
        env = {**os.environ, "BWP_URL": d.base, "BWP_SOCKET": str(socket_path), "BWP_TOKEN": TOKEN,
               "SINK_URL": sink_url, "GO_URL": go_url, "CLOSED_URL": f"http://127.0.0.1:{free_port()}"}
        proc = await asyncio.create_subprocess_exec(
            phpunit, "--configuration", str(PACKAGE / "phpunit.xml"), cwd=str(PACKAGE), env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 100)
        text = out.decode(errors="replace")
        assert proc.returncode == 0, text
        assert "OK (" in text and "Skipped" not in text, text
    finally:
        await sink.cleanup()
        await go_runner.cleanup()
