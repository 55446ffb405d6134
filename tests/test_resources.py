"""Local resources under attack: the fd table, inbound connections, slow request heads.

Real sockets on 127.0.0.1 against `bwp serve` subprocesses; the daemon's fd limit is set in the
child (preexec).  Every wait is bounded and every connection opened here is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from conftest import Daemon, run_cli

from bwp.config import ConfigError, parse_config

SLACK = 1.5  # seconds: a loaded machine's scheduling, not the daemon's own delay

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def nofile(limit: int) -> Callable[[], None]:
    """preexec: the child's RLIMIT_NOFILE, soft and hard (so bwp cannot raise it)."""
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    return apply


async def connect(d: Daemon, timeout: float = 2.0) -> Stream:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", d.port), timeout)


async def exchange(stream: Stream, method: str, path: str, body: Any = None,
                   timeout: float = 5.0) -> tuple[int, Any]:
    """One request on a kept-alive connection, its answer read by Content-Length."""
    reader, writer = stream
    data = b"" if body is None else json.dumps(body).encode()
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: bwp\r\nContent-Length: {len(data)}\r\n"
                 "Content-Type: application/json\r\n\r\n".encode() + data)

    async def read() -> tuple[int, Any]:
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        m = re.search(rb"(?im)^content-length: *(\d+)", head)
        raw = await reader.readexactly(int(m.group(1))) if m else b""
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    return await asyncio.wait_for(read(), timeout)


async def post(d: Daemon, payload: Any, timeout: float = 5.0) -> tuple[int, Any]:
    """POST /post/http on a new connection, bounded (conftest's post has no timeout)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s, \
            s.post(d.base + "/post/http", json=payload) as r:
        return r.status, await r.json(content_type=None)


async def closed_after(stream: Stream, timeout: float) -> float:
    """Seconds until the daemon closes the connection (EOF); fails past `timeout`."""
    start = time.monotonic()
    try:
        data = await asyncio.wait_for(stream[0].read(), timeout)
    except ConnectionError:  # a write of ours met the close (EPIPE, reset)
        data = b""
    assert data == b"", data
    return time.monotonic() - start


def close_all(streams: list[Stream]) -> None:
    for _, writer in streams:
        writer.close()


def cap_in_log(d: Daemon) -> int:
    m = re.search(r"at most (\d+) API connections", d.output())
    assert m, d.output()
    return int(m.group(1))


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in metrics"
    return float(m.group(1))


# ---------------------------------------------------------------- 1. the connection cap


async def test_idle_connections_cannot_starve_submits(make_daemon, sink):
    """The attack: fd limit 256, 300 idle kept-alive connections.  With the cap ("auto": the
    limit less 3 x 50 workers + 64 + 1 listener = 41) each new connection closes the longest
    idle one, so every connection is answered, and a submit after them is accepted and
    delivered: the workers kept their sockets."""
    d = await make_daemon({"limits": {"max_connections": "auto"}}, preexec=nofile(256))
    cap = cap_in_log(d)
    assert cap == 256 - (3 * 50 + 64 + 1), d.output()
    held: list[Stream] = []
    failures = []
    try:
        for i in range(300):
            try:
                held.append(await connect(d))
                status, _ = await exchange(held[-1], "GET", "/healthz", timeout=2)
                assert status == 200
            except (OSError, TimeoutError, asyncio.IncompleteReadError, AssertionError) as e:
                failures.append((i, repr(e)))
                if len(failures) >= 3:
                    break
        status, doc = await post(d, {"url": sink.url("/after-300")})
        assert status == 200 and doc["success"], (status, doc)
        assert [r.path_qs for r in await sink.wait_for(1)] == ["/after-300"]
        assert not failures, failures
        _, text = await d.get("/metrics")
        assert metric(text, 'bwp_connections_closed_total{reason="evicted"}') >= 300 - cap
        assert metric(text, "bwp_connections") <= cap
        assert metric(text, "bwp_connections_max") == cap
        assert "EMFILE" not in d.output() and "Too many open files" not in d.output()
    finally:
        close_all(held)


async def test_full_table_evicts_the_idle_and_refuses_when_all_are_busy(make_daemon, make_sink):
    """At the cap an idle connection makes room (never one with a request under way); when
    every connection has one, a new connection gets a 503 at once and is closed."""
    slow = await make_sink(delay=2.0)
    d = await make_daemon({"limits": {"max_connections": 2}})
    streams: list[Stream] = []
    try:
        idle = await connect(d)
        streams.append(idle)
        assert (await exchange(idle, "GET", "/healthz"))[0] == 200
        # a request-reply submit holds its connection's request under way for 2 s
        busy1 = await connect(d)
        streams.append(busy1)
        waiting1 = asyncio.create_task(exchange(busy1, "POST", "/post/http",
                                                {"url": slow.url("/1"), "wait": 10}, timeout=10))
        await slow.wait_for(1)
        newer = await connect(d)
        streams.append(newer)
        assert (await exchange(newer, "GET", "/healthz"))[0] == 200
        assert await closed_after(idle, 2) < 2  # the idle one made room
        busy2 = await connect(d)
        streams.append(busy2)
        waiting2 = asyncio.create_task(exchange(busy2, "POST", "/post/http",
                                                {"url": slow.url("/2"), "wait": 10}, timeout=10))
        await slow.wait_for(2)  # `newer` made room for it
        # every connection has a request under way: the new one is answered 503 and closed
        refused = await connect(d)
        streams.append(refused)
        start = time.monotonic()
        answer = await asyncio.wait_for(refused[0].read(), 2)
        assert time.monotonic() - start < 1
        assert answer.startswith(b"HTTP/1.1 503"), answer
        assert b"limits.max_connections" in answer and b"Retry-After: 1" in answer
        # the busy ones were left alone and get their answers
        for task in (waiting1, waiting2):
            status, doc = await task
            assert status == 200 and doc["results"][0]["state"] == "succeeded", doc
        _, text = await d.get("/metrics")
        assert metric(text, 'bwp_connections_closed_total{reason="evicted"}') >= 2
        assert metric(text, 'bwp_connections_closed_total{reason="refused"}') == 1
    finally:
        close_all(streams)


# ---------------------------------------------------------------- 3. local resource errors


async def test_jobs_due_while_fds_are_exhausted_are_not_failed(make_daemon, sink):
    """The fd table full (limit 48, the cap set above it so inbound connections take every fd):
    delayed jobs that fall due cannot get a socket; they stay `retrying` with 0 attempts, even
    with retries 0, and are all delivered once the fds are free again."""
    d = await make_daemon({"pool": {"size": 2},
                           "limits": {"max_connections": 1000, "header_timeout": 60}},
                          preexec=nofile(48))
    assert d.proc is not None
    fds = f"/proc/{d.proc.pid}/fd"
    ask = await connect(d)  # kept open: new connections will not be accepted for a while
    fillers: list[Stream] = []
    try:
        status, doc = await exchange(ask, "POST", "/post/http", [
            {"url": sink.url(f"/due{i}"), "delay": 1.5, "retries": 0} for i in range(4)])
        assert status == 200, doc
        ids = doc["ids"]
        for _ in range(60):  # more than the fds left: the daemon accepts until EMFILE
            fillers.append(await connect(d))
        deadline = time.monotonic() + 5
        while len(os.listdir(fds)) < 48 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert len(os.listdir(fds)) >= 47, os.listdir(fds)
        # the jobs fall due at 1.5 s and find no fd; after 0.5 and 1 s more still none
        await asyncio.sleep(3.0)
        for job_id in ids:
            status, job = await exchange(ask, "GET", f"/jobs/{job_id}")
            assert status == 200, job
            assert job["state"] in ("retrying", "queued") and job["attempts"] == 0, job
            assert "EMFILE" in (job["error"] or ""), job
        assert not sink.received
        status, text = await exchange(ask, "GET", "/metrics")
        assert metric(text, "bwp_local_errors_total") >= 2 * len(ids)
        assert metric(text, 'bwp_jobs_failed_total{queue="default"}') == 0
        assert metric(text, "bwp_outbound_errors_total") == 0
        close_all(fillers)  # the daemon sees EOF and closes them: fds come back
        fillers.clear()
        received = await sink.wait_for(len(ids), timeout=20)
        assert sorted(r.path_qs for r in received) == [f"/due{i}" for i in range(4)]
        for job_id in ids:
            job = await d.wait_state(job_id, "succeeded")
            assert job["attempts"] == 1, job
        assert "not counted as an attempt" in d.output()
    finally:
        close_all(fillers)
        ask[1].close()


async def test_no_ephemeral_port_is_not_an_attempt(sink):
    """EADDRNOTAVAIL (no ephemeral port left) at connect, in the delivery path itself: the job
    with no retries waits 0.5 s, then 1 s, keeps 0 attempts, and is delivered after."""
    import errno

    from bwp.client import HttpClient
    from bwp.index import LocalIndex
    from bwp.jobs import Job
    from bwp.metrics import Metrics
    from bwp.pool import Pool
    from bwp.router import Router
    from bwp.store import MemoryStore

    cfg = parse_config({"pool": {"size": 1}})
    router = Router.from_config(cfg)
    real, failures = router.socket_factory, [0]

    def factory(addr_info: tuple) -> Any:
        if failures[0] < 2:
            failures[0] += 1
            raise OSError(errno.EADDRNOTAVAIL, os.strerror(errno.EADDRNOTAVAIL))
        return real(addr_info)

    router.socket_factory = factory  # type: ignore[method-assign]
    metrics = Metrics(cfg.all_queues)
    client = HttpClient(cfg.client, router, metrics, max_connections=1)
    pool = Pool([cfg.pool], MemoryStore([cfg.pool]), client.send, metrics, LocalIndex(100, 60))
    await client.start()
    await pool.start()
    try:
        job = Job("no-port", sink.url("/port"), "GET", None, None, "default", retries=0)
        start = time.monotonic()
        pool.submit([job])
        await asyncio.sleep(0.2)
        assert job.state == "retrying" and job.attempts == 0, (job.state, job.attempts)
        assert job.outcome is not None and job.outcome.local
        assert "EADDRNOTAVAIL" in (job.outcome.error or "")
        await sink.wait_for(1, timeout=5)
        assert 1.5 - 0.1 <= time.monotonic() - start < 1.5 + SLACK  # 0.5 s, then 1 s
        for _ in range(50):
            if job.state == "succeeded":
                break
            await asyncio.sleep(0.02)
        assert (job.state, job.attempts) == ("succeeded", 1)
        assert metrics.local_errors._value.get() == 2
        assert metrics.errors._value.get() == 0
    finally:
        await pool.drain(0)
        await client.close()


# ---------------------------------------------------------------- 2. the request head deadline


async def test_a_slow_request_head_is_cut_at_header_timeout(make_daemon):
    """header_timeout 1 s, keepalive_timeout 5 s: a head that does not come whole in 1 s is
    closed, from connecting or from the first byte of the next request on a kept-alive
    connection, however it trickles; an idle kept-alive connection lives on."""
    d = await make_daemon({"limits": {"header_timeout": 1, "keepalive_timeout": 5}})
    timeout = 1.0
    streams: list[Stream] = []
    try:
        half = await connect(d)
        silent = await connect(d)
        trickle = await connect(d)
        kept_half = await connect(d)
        kept_idle = await connect(d)
        streams += [half, silent, trickle, kept_half, kept_idle]
        for s in (kept_half, kept_idle):
            assert (await exchange(s, "GET", "/healthz"))[0] == 200
        await asyncio.sleep(0.5)  # the kept-alive ones' next head starts later than connecting
        half[1].write(b"POST /post/http HTTP/1.1\r\nHost: bwp\r\nContent-Le")
        kept_half[1].write(b"GET /healthz HTTP/1.1\r\nHo")
        start = time.monotonic()

        async def dribble() -> None:
            with contextlib.suppress(OSError):
                for byte in b"GET /healthz HTTP/1.1\r\nHost: bwp\r\n":
                    trickle[1].write(bytes([byte]))
                    await asyncio.sleep(0.1)

        dribbler = asyncio.create_task(dribble())
        for s in (half, kept_half, silent, trickle):
            await closed_after(s, timeout + SLACK)
        elapsed = time.monotonic() - start
        assert elapsed < timeout + SLACK, elapsed
        dribbler.cancel()
        # the one idle since its answer: still there past header_timeout, and serving
        await asyncio.sleep(max(0.0, 2 * timeout + 0.5 - (time.monotonic() - start)))
        assert (await exchange(kept_idle, "GET", "/healthz"))[0] == 200
        _, text = await d.get("/metrics")
        assert metric(text, 'bwp_connections_closed_total{reason="header_timeout"}') == 4
    finally:
        close_all(streams)


async def test_heads_in_pieces_within_header_timeout_are_served(make_daemon):
    """The deadline is per head: a connection older than header_timeout whose every head
    comes in pieces, each head whole within it, is served throughout (no false positive)."""
    d = await make_daemon({"limits": {"header_timeout": 1.5}})
    reader, writer = await connect(d)
    try:
        for _ in range(3):
            writer.write(b"GET /healthz HTTP/1.1\r\n")
            await asyncio.sleep(0.6)
            writer.write(b"Host: bwp\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
            assert head.startswith(b"HTTP/1.1 200"), head
            m = re.search(rb"(?i)content-length: *(\d+)", head)
            assert m
            await reader.readexactly(int(m.group(1)))
            await asyncio.sleep(0.3)
    finally:
        writer.close()


# ---------------------------------------------------------------- 4. configuration


@pytest.mark.parametrize(("key", "value"), [
    ("max_connections", 0), ("max_connections", -1), ("max_connections", "many"),
    ("max_connections", 2.5), ("max_connections", True), ("max_connections", None),
    ("header_timeout", 0), ("header_timeout", -1), ("header_timeout", "10s"),
    ("header_timeout", False),
])
def test_bad_values_are_config_errors(key, value):
    with pytest.raises(ConfigError) as e:
        parse_config({"limits": {key: value}})
    assert e.value.key == f"limits.{key}", e.value
    assert "unknown key" not in e.value.message, e.value  # a known key, refused for its value
    if key == "max_connections":
        assert e.value.message.startswith("must be an integer >= 1 or 'auto', got "), e.value
    else:
        assert e.value.message.startswith("must be "), e.value


def test_defaults_and_good_values():
    lim = parse_config({}).limits
    assert (lim.max_connections, lim.header_timeout) == (None, 10.0)
    lim = parse_config({"limits": {"max_connections": "auto", "header_timeout": 2.5}}).limits
    assert (lim.max_connections, lim.header_timeout) == (None, 2.5)
    assert parse_config({"limits": {"max_connections": 500}}).limits.max_connections == 500


def test_check_names_the_line_and_prints_the_keys(tmp_path):
    p = tmp_path / "bwp.yaml"
    p.write_text("limits:\n  header_timeout: 3\n  max_connections: lots\n")
    code, out, err = run_cli("check", "-c", str(p))
    assert code == 1 and f"{p}:3: limits.max_connections: must be an integer >= 1 or 'auto'" in err
    p.write_text("limits:\n  header_timeout: 3\n  max_connections: 700\n")
    code, out, err = run_cli("check", "-c", str(p))
    assert code == 0, err
    assert "connection: 700 connections per process, request head 3s, body read 30s" in out
    p.write_text("pool:\n  size: 10\n")
    code, out, err = run_cli("check", "-c", str(p))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert (f"connection: {max(8, hard - 95)} connections per process (auto: open files limit "
            f"{hard} here, less 95 for outbound sockets and files), request head 10s") in out, out
