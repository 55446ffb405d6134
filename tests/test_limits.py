"""Hostile-input limits and unix socket access, against a real daemon on 127.0.0.1.

Each limit: one over it is a 4xx JSON message naming the key, and nothing of that request
reaches the sink (not even its valid jobs); one at it is accepted and delivered.  The shared
daemon has one worker, so jobs are delivered in the order they were accepted: once the
accepted request's jobs have arrived, a refused one's would have arrived before them.
"""

from __future__ import annotations

import asyncio
import grp
import json
import os
import stat
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from conftest import Sink, SyncDaemon, free_port, run_cli, sync_daemon

LIMITS = {"max_jobs_per_request": 3, "max_clones": 2, "max_headers": 2, "max_header_size": 20,
          "max_url_length": 60, "max_json_depth": 5, "read_timeout": 0.5,
          "keepalive_timeout": 1.0, "max_request_headers": 20}
SLACK = 1.5  # seconds: a loaded CI machine's scheduling, not the daemon's own delay


@pytest.fixture(scope="module")
def daemon(tmp_path_factory) -> Iterator[SyncDaemon]:
    with sync_daemon(tmp_path_factory.mktemp("limits"), {"pool": {"size": 1}, "limits": LIMITS}) as d:
        yield d


async def post(d: SyncDaemon, payload: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
    data = raw if raw is not None else json.dumps(payload).encode()
    async with aiohttp.ClientSession() as s, s.post(d.base + "/post/http", data=data) as r:
        return r.status, await r.json(content_type=None)


async def refused_then_accepted(d: SyncDaemon, sink: Sink, over: Any, at: Any, status: int,
                                key: str) -> None:
    """`over` is refused with `status` naming `key`; `at` is accepted; only `at` arrives."""
    code, doc = await post(d, over)
    assert code == status and doc["success"] is False, (code, doc)
    assert f"limits.{key}" in doc["error"], doc
    code, doc = await post(d, at)
    assert code == 200 and doc["success"] is True, (code, doc)
    received = await sink.wait_for(len(doc["ids"]))
    assert all(r.path_qs.startswith("/at") for r in received), [r.path_qs for r in received]


async def test_max_jobs_per_request(daemon, sink):
    ok, over = {"url": sink.url("/at")}, {"url": sink.url("/over")}
    # clones count: 2 clones + 2 plain jobs = 4
    await refused_then_accepted(daemon, sink, [{**over, "clones": [{}, {}]}, over, over],
                                [{**ok, "clones": [{}, {}]}, ok], 413, "max_jobs_per_request")


async def test_max_clones(daemon, sink):
    await refused_then_accepted(daemon, sink, {"url": sink.url("/over"), "clones": [{}] * 3},
                                {"url": sink.url("/at"), "clones": [{}] * 2}, 413, "max_clones")


async def test_max_headers(daemon, sink):
    # the limit applies to a clone's headers merged with the root's
    over = {"url": sink.url("/over"), "headers": {"A": "1", "B": "2"}, "clones": [{"headers": {"C": "3"}}]}
    at = {"url": sink.url("/at"), "headers": {"A": "1", "B": "2"}, "clones": [{"headers": {"B": "3"}}]}
    await refused_then_accepted(daemon, sink, [{"url": sink.url("/over")}, over], at, 400, "max_headers")


async def test_max_header_size(daemon, sink):
    over = [{"url": sink.url("/over")}, {"url": sink.url("/over"), "headers": {"X-Ab": "c" * 17}}]
    at = {"url": sink.url("/at"), "headers": {"X-Ab": "c" * 16}}
    await refused_then_accepted(daemon, sink, over, at, 400, "max_header_size")
    assert sink.received[0].headers["X-Ab"] == "c" * 16


async def test_max_url_length(daemon, sink):
    def url(path: str) -> str:
        return sink.url(path + "?" + "x" * (60 - len(sink.url(path)) - 1))

    assert len(url("/at")) == 60
    await refused_then_accepted(daemon, sink, [{"url": sink.url("/over")}, {"url": url("/over") + "y"}],
                                {"url": url("/at")}, 400, "max_url_length")
    code, doc = await post(daemon, {"url": sink.url("/over"), "callback": url("/over") + "y"})
    assert code == 400 and "callback" in doc["error"] and "limits.max_url_length" in doc["error"]


async def test_max_json_depth(daemon, sink):
    # [ {job} ] is 2 levels; "json" adds 3 more at the limit (5), 4 over it
    await refused_then_accepted(daemon, sink, [{"url": sink.url("/over"), "json": [[[[1]]]]}],
                                [{"url": sink.url("/at"), "json": [[[1]]]}], 400, "max_json_depth")
    # far past Python's recursion limit: a 400, never a 500 or a crash
    for deep in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
                 b"[" * 100_000):
        code, doc = await post(daemon, raw=deep)
        assert code == 400 and "limits.max_json_depth" in doc["error"], (code, doc)
    assert daemon.proc.poll() is None


async def test_errors_do_not_echo_huge_values(daemon, sink):
    huge = "q" * 1_000_000
    for job in ({"url": sink.url("/"), "queue": huge}, {"url": sink.url("/"), "at": huge},
                {"url": sink.url("/"), "delay": huge},
                {"url": sink.url("/"), "method": "POST", "parameters": {huge: 1}}):
        code, doc = await post(daemon, job)
        assert code == 400 and len(doc["error"]) < 300 and "qqq…" in doc["error"], (code, len(doc["error"]))


async def test_oversized_request_head_is_refused(daemon):
    """Too many headers, one too long, a request target too long: a JSON answer naming the
    limit, the connection closed, one log line each (never a traceback)."""
    for head, status, key in (
            (b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(
                b"X-%d: 1\r\n" % i for i in range(50)) + b"\r\n", b"431", "max_request_headers"),
            (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", b"431",
             "max_request_header_size"),
            (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", b"414", "max_request_line")):
        reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
        try:
            writer.write(head)
            answer = await asyncio.wait_for(reader.read(), 5)  # to EOF: closed after it
        finally:
            writer.close()
        first, _, body = answer.partition(b"\r\n\r\n")
        assert first.split()[1] == status, answer
        assert f"limits.{key}" in json.loads(body)["error"], body
    assert daemon.request("GET", "/healthz")[0] == 200
    log = daemon.log_path.read_text()
    assert "Traceback" not in log and "ERROR" not in log
    assert "INFO bwp.http: refused a request from 127.0.0.1: 431" in log
    assert "INFO bwp.http: refused a request from 127.0.0.1: 414" in log


async def test_slow_body_gets_408_and_others_are_served(daemon, sink):
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
    try:
        start = time.monotonic()
        writer.write(b"POST /post/http HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n[{")
        await writer.drain()
        # meanwhile, another client is served at once
        code, _ = await post(daemon, {"url": sink.url("/at")})
        assert code == 200 and time.monotonic() - start < LIMITS["read_timeout"]
        for _ in range(3):  # trickle: each byte within the timeout, the whole body not
            await asyncio.sleep(0.2)
            writer.write(b" ")
        answer = await asyncio.wait_for(reader.read(), LIMITS["read_timeout"] + SLACK)
        elapsed = time.monotonic() - start
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer
    assert "limits.read_timeout" in json.loads(body)["error"]
    assert LIMITS["read_timeout"] <= elapsed < LIMITS["read_timeout"] + SLACK
    await sink.wait_for(1)


async def test_idle_connections_are_closed(daemon):
    keepalive = LIMITS["keepalive_timeout"]
    for first in (b"", b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /healthz HTTP/1.1\r\n"):
        # silent from the start, idle after a request, or a request head never finished
        reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
        try:
            writer.write(first)
            start = time.monotonic()
            data = await asyncio.wait_for(reader.read(), keepalive + SLACK)
            elapsed = time.monotonic() - start
        finally:
            writer.close()
        assert data == b"" or data.startswith(b"HTTP/1.1 200"), data  # then EOF: closed
        assert keepalive - 0.2 <= elapsed < keepalive + SLACK, elapsed


# ---------------------------------------------------------------- unix socket access


async def test_unix_socket_mode_and_group(make_daemon, tmp_path):
    path = tmp_path / "bwp.sock"
    group = grp.getgrgid(os.getgid()).gr_name
    d = await make_daemon({"listen": [f"127.0.0.1:{free_port()}", str(path)],
                           "unix_socket": {"mode": "0660", "group": group, "owner": os.getuid()}})
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path))) as s, \
            s.get("http://bwp/healthz") as r:
        assert r.status == 200
    await d.stop()


def test_unknown_unix_socket_group_is_a_config_error(tmp_path):
    p = tmp_path / "bwp.yaml"
    p.write_text(f"listen:\n  - {tmp_path}/bwp.sock\nunix_socket:\n  group: no-such-group-bwp\n")
    code, out, err = run_cli("check", "-c", str(p))
    assert code == 1 and "configuration ok" not in out
    assert f"{p}:4: unix_socket.group: no group named 'no-such-group-bwp'" in err, err

