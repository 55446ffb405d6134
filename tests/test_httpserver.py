"""The API's own HTTP/1.1 server (bwp/httpserver.py), from the wire: framing and smuggling,
pipelining, Expect: 100-continue, chunked and compressed bodies, the request limits, HTTP/1.0,
HEAD, and closing at drain and reload without cutting a request under way.

(Elsewhere, from the same wire: the job limits and the read timeout in test_limits.py; the
connection cap, header_timeout and slow heads in test_resources.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import re
import signal
import time
import zlib
from collections.abc import Iterator

import pytest
from conftest import Sink, SyncDaemon, sync_daemon

MAX_BODY = 64 * 1024
LIMITS = {"max_body_size": MAX_BODY, "max_request_line": 2000, "max_request_header_size": 1000,
          "max_request_headers": 30, "keepalive_timeout": 3.0, "read_timeout": 2.0}
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: bwp\r\n\r\n"
JOB = b'{"url":"http://127.0.0.1:9/never","delay":3600}'  # held, never sent (port 9: discard)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory) -> Iterator[SyncDaemon]:
    with sync_daemon(tmp_path_factory.mktemp("httpd"), {"limits": LIMITS}) as d:
        yield d


async def exchange(d: SyncDaemon, data: bytes | list[bytes], *, pause: float = 0.0,
                   timeout: float = 5.0) -> bytes:
    """Write `data` (pieces `pause` seconds apart), then read until the daemon closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", d.port)
    try:
        for piece in [data] if isinstance(data, bytes) else data:
            writer.write(piece)
            await writer.drain()
            if pause:
                await asyncio.sleep(pause)
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The responses in `data`, in order (each framed by its Content-Length)."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, data
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if status == 100:
            out.append((100, headers, b""))
            data = rest
            continue
        length = int(headers["content-length"])
        out.append((status, headers, rest[:length]))
        data = rest[length:]
    return out


def submit(body: bytes, *headers: str, version: str = "1.1") -> bytes:
    head = [f"POST /post/http HTTP/{version}", "Host: bwp", f"Content-Length: {len(body)}",
            *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


# ---------------------------------------------------------------- smuggling and framing

SMUGGLED = HEALTHZ  # a second request hidden behind the bad one: never answered
BAD_HEADS = {
    "CL then TE": b"POST /post/http HTTP/1.1\r\nHost: bwp\r\nContent-Length: 4\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "TE then CL": b"POST /post/http HTTP/1.1\r\nHost: bwp\r\nTransfer-Encoding: chunked\r\n"
                  b"Content-Length: 4\r\n\r\n0\r\n\r\n",
    "two CL, same": b"POST /post/http HTTP/1.1\r\nHost: bwp\r\nContent-Length: 2\r\n"
                    b"Content-Length: 2\r\n\r\n[]",
    "two CL, differing": b"POST /post/http HTTP/1.1\r\nHost: bwp\r\nContent-Length: 2\r\n"
                         b"Content-Length: 40\r\n\r\n[]",
    "CL list": b"POST /post/http HTTP/1.1\r\nHost: bwp\r\nContent-Length: 2, 2\r\n\r\n[]",
    "signed CL": b"POST /post/http HTTP/1.1\r\nHost: bwp\r\nContent-Length: +2\r\n\r\n[]",
    "negative CL": b"POST /post/http HTTP/1.1\r\nHost: bwp\r\nContent-Length: -2\r\n\r\n[]",
    "obs-fold": b"POST /post/http HTTP/1.1\r\nHost: bwp\r\nX-A: a\r\n b\r\n"
                b"Content-Length: 2\r\n\r\n[]",
    "bare LF, request line": b"POST /post/http HTTP/1.1\nHost: bwp\r\nContent-Length: 2\r\n\r\n[]",
    "bare LF, header": b"POST /post/http HTTP/1.1\r\nHost: bwp\nContent-Length: 2\r\n\r\n[]",
    "xchunked": b"POST /post/http HTTP/1.1\r\nHost: bwp\r\nTransfer-Encoding: xchunked\r\n\r\n"
                b"0\r\n\r\n",
    "chunked not last": b"POST /post/http HTTP/1.1\r\nHost: bwp\r\n"
                        b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "space before colon": b"POST /post/http HTTP/1.1\r\nHost: bwp\r\n"
                          b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "TE in HTTP/1.0": b"POST /post/http HTTP/1.0\r\nHost: bwp\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"0\r\n\r\n",
    "NUL in a value": b"GET /healthz HTTP/1.1\r\nHost: bwp\r\nX-A: a\x00b\r\n\r\n",
    "no Host": b"GET /healthz HTTP/1.1\r\n\r\n",
    "two Hosts": b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "two Authorizations": b"GET /jobs HTTP/1.1\r\nHost: bwp\r\nAuthorization: Bearer a\r\n"
                          b"Authorization: Bearer b\r\n\r\n",
    "lower-case method": b"get /healthz HTTP/1.1\r\nHost: bwp\r\n\r\n",
    "bad chunk size": b"POST /post/http HTTP/1.1\r\nHost: bwp\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"zz\r\n[]\r\n0\r\n\r\n",
    "chunk size overflow": b"POST /post/http HTTP/1.1\r\nHost: bwp\r\nTransfer-Encoding: chunked"
                           b"\r\n\r\nfffffffffffffffffff\r\n[]\r\n0\r\n\r\n",
    "chunk without CRLF": b"POST /post/http HTTP/1.1\r\nHost: bwp\r\nTransfer-Encoding: chunked"
                          b"\r\n\r\n2\r\n[]0\r\n\r\n",
}


@pytest.mark.parametrize("case", BAD_HEADS)
async def test_ambiguous_framing_is_400_and_the_connection_closes(daemon, case):
    """Each one answered once, 400 in JSON, then closed: the request behind it is never read
    (a proxy that framed it differently cannot smuggle it in), and nothing is queued."""
    before = daemon.accepted()
    answers = responses(await exchange(daemon, BAD_HEADS[case] + SMUGGLED))
    assert [a[0] for a in answers] == [400], (case, answers)
    _status, headers, body = answers[0]
    assert headers["connection"] == "close" and headers["content-type"] == "application/json"
    doc = json.loads(body)
    assert doc["success"] is False and doc["error"], doc
    assert daemon.accepted() == before


@pytest.mark.parametrize(("version", "status"), [(b"HTTP/2.0", 505), (b"HTTP/0.9", 505),
                                                  (b"HTTP/1.2", 400)])  # llhttp: no such version
async def test_other_http_versions_are_refused(daemon, version, status):
    answers = responses(await exchange(daemon, b"GET /healthz " + version + b"\r\nHost: bwp\r\n\r\n"))
    assert [a[0] for a in answers] == [status], answers
    assert "version" in json.loads(answers[0][2])["error"].lower()


async def test_a_body_holding_a_request_is_not_a_request(daemon):
    """Content-Length frames the body: a request inside it is data (here: malformed JSON)."""
    inner = HEALTHZ
    answers = responses(await exchange(daemon, submit(inner) + HEALTHZ + b"GET /x HTTP/1.1\r\n"
                                       b"Host: bwp\r\nConnection: close\r\n\r\n"))
    assert [a[0] for a in answers] == [400, 200, 404], answers
    assert "malformed JSON" in json.loads(answers[0][2])["error"]


async def test_unknown_expectation_is_417(daemon):
    answers = responses(await exchange(daemon, submit(b"[]", "Expect: something-else")))
    assert [a[0] for a in answers] == [417], answers


# ---------------------------------------------------------------- pipelining, HEAD, HTTP/1.0

async def test_every_answer_of_a_burst_goes_out(daemon):
    """Answers go out in bursts (bwp/outbox.py): 100 kept-alive connections asking at once, so
    that bursts fill; each is answered at once, none left until keepalive_timeout (3 s here)."""
    conns = [await asyncio.open_connection("127.0.0.1", daemon.port) for _ in range(100)]
    try:
        for _ in range(3):
            for _, writer in conns:
                writer.write(HEALTHZ)
            heads = await asyncio.wait_for(asyncio.gather(
                *(reader.readuntil(b"\r\n\r\n") for reader, _ in conns)), 2.0)
            assert all(h.startswith(b"HTTP/1.1 200") for h in heads)
            for (reader, _), head in zip(conns, heads, strict=True):
                await reader.readexactly(int(re.search(rb"Content-Length: (\d+)", head)[1]))
    finally:
        for _, writer in conns:
            writer.close()


async def test_pipelined_requests_are_answered_in_order(daemon):
    """Twenty requests in one write, more than are parsed ahead of the one answered (reading
    pauses and resumes): every answer, in order, on the one connection."""
    reqs = []
    for i in range(20):
        if i % 3 == 0:
            reqs.append(submit(b'{"url":"http://127.0.0.1:9/p%d","delay":3600,"id":"pipe-%d"}'
                               % (i, i)))
        elif i % 3 == 1:
            reqs.append(HEALTHZ)
        else:
            reqs.append(b"GET /jobs/pipe-%d HTTP/1.1\r\nHost: bwp\r\n\r\n" % (i - 2))
    reqs.append(b"GET /nothing HTTP/1.1\r\nHost: bwp\r\nConnection: close\r\n\r\n")
    answers = responses(await exchange(daemon, b"".join(reqs)))
    assert [a[0] for a in answers] == [200] * 20 + [404], answers
    for i, (_, _, body) in enumerate(answers[:20]):
        doc = json.loads(body)
        if i % 3 == 0:
            assert doc == {"success": True, "ids": [f"pipe-{i}"]}
        elif i % 3 == 1:
            assert doc["status"] == "ok"
        else:
            assert doc["id"] == f"pipe-{i - 2}" and doc["state"] == "delayed"
    assert answers[-1][1]["connection"] == "close"


async def test_head_is_get_without_a_body(daemon):
    answers = responses(await exchange(daemon, b"HEAD /healthz HTTP/1.1\r\nHost: bwp\r\n"
                                       b"Connection: close\r\n\r\n"))
    # responses() reads Content-Length bytes: there are none after the head
    assert len(answers) == 1 and answers[0][0] == 200 and answers[0][2] == b""
    assert int(answers[0][1]["content-length"]) > 0


async def test_http_1_0_closes_unless_kept_alive(daemon):
    plain = responses(await exchange(daemon, b"GET /healthz HTTP/1.0\r\n\r\n"))
    assert [a[0] for a in plain] == [200] and plain[0][1]["connection"] == "close"
    kept = b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    answers = responses(await exchange(daemon, kept + kept + b"GET /healthz HTTP/1.0\r\n\r\n"))
    assert [a[0] for a in answers] == [200, 200, 200], answers
    assert [a[1]["connection"] for a in answers] == ["keep-alive", "keep-alive", "close"]
    # a job submitted over HTTP/1.0 (no Host needed there)
    answers = responses(await exchange(daemon, submit(JOB, version="1.0")))
    assert answers[0][0] == 200 and json.loads(answers[0][2])["success"] is True


# ---------------------------------------------------------------- bodies

async def test_expect_100_continue(daemon):
    """As PHP's curl does for bodies over 1 KiB: the head, a wait for 100 Continue, the body."""
    body = json.dumps({"url": "http://127.0.0.1:9/big", "delay": 3600,
                       "body": "x" * 2000}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
    try:
        head, _, _ = submit(body, "Expect: 100-continue").partition(b"\r\n\r\n")
        writer.write(head + b"\r\n\r\n")
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body + HEALTHZ)
        answer = await asyncio.wait_for(reader.readuntil(b"}"), 5)
        assert answer.startswith(b"HTTP/1.1 200") and b'"success":true' in answer, answer
        assert (await asyncio.wait_for(reader.readuntil(b"}"), 5)).startswith(b"HTTP/1.1 200")
    finally:
        writer.close()


async def test_expect_100_continue_for_a_body_too_large_gets_413_without_100(daemon):
    head = submit(b"", "Expect: 100-continue").replace(b"Content-Length: 0",
                                                        b"Content-Length: %d" % (MAX_BODY + 1))
    data = await exchange(daemon, head)  # the body never sent: the answer comes anyway
    answers = responses(data)
    assert [a[0] for a in answers] == [413], answers
    assert "limits.max_body_size" in json.loads(answers[0][2])["error"]


def chunked(body: bytes, size: int) -> bytes:
    out = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size])
                   for i in range(0, len(body), size))
    return out + b"0\r\nTrailer: x\r\n\r\n"


async def test_chunked_bodies_in_pieces(daemon):
    before = daemon.accepted()
    body = json.dumps([{"url": "http://127.0.0.1:9/c", "delay": 3600, "body": "y" * 300}] * 3)
    head = b"POST /post/http HTTP/1.1\r\nHost: bwp\r\nTransfer-Encoding: chunked\r\n\r\n"
    payload = chunked(body.encode(), 100)
    pieces = [head] + [payload[i:i + 77] for i in range(0, len(payload), 77)] + [
        b"GET /healthz HTTP/1.1\r\nHost: bwp\r\nConnection: close\r\n\r\n"]
    answers = responses(await exchange(daemon, pieces, pause=0.01))
    assert [a[0] for a in answers] == [200, 200], answers
    assert len(json.loads(answers[0][2])["ids"]) == 3
    assert daemon.accepted() == before + 3


async def test_chunked_body_over_the_limit_is_413(daemon):
    head = b"POST /post/http HTTP/1.1\r\nHost: bwp\r\nTransfer-Encoding: chunked\r\n\r\n"
    big = chunked(b"[" + b" " * (MAX_BODY + 10) + b"]", 8192)
    answers = responses(await exchange(daemon, [head, big]))
    assert [a[0] for a in answers] == [413], answers
    assert answers[0][1]["connection"] == "close"


async def test_content_length_body_over_the_limit_is_413_and_read_to_the_end(daemon):
    """The client sends its whole body anyway: it still reads its 413 (no reset)."""
    body = b"[" + b" " * (MAX_BODY * 3) + b"]"
    answers = responses(await exchange(daemon, submit(body)))
    assert [a[0] for a in answers] == [413], answers


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_compressed_bodies(daemon, encoding):
    body = json.dumps({"url": "http://127.0.0.1:9/z", "delay": 3600, "body": "z" * 5000}).encode()
    packed = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    answers = responses(await exchange(daemon, submit(packed, f"Content-Encoding: {encoding}",
                                                      "Connection: close")))
    assert answers[0][0] == 200 and json.loads(answers[0][2])["success"], answers
    bomb = gzip.compress(b"[" + b" " * (MAX_BODY * 4) + b"]")
    answers = responses(await exchange(daemon, submit(bomb, "Content-Encoding: gzip")))
    assert answers[0][0] == 413, answers


async def test_a_slow_body_within_read_timeout_is_served(daemon):
    body = json.dumps({"url": "http://127.0.0.1:9/slow", "delay": 3600}).encode()
    head, _, _ = submit(body, "Connection: close").partition(b"\r\n\r\n")
    pieces = [head + b"\r\n\r\n"] + [body[i:i + 10] for i in range(0, len(body), 10)]
    start = time.monotonic()
    answers = responses(await exchange(daemon, pieces, pause=0.1))
    assert answers[0][0] == 200, answers
    assert time.monotonic() - start < LIMITS["read_timeout"] + 1.5


async def test_request_line_and_header_limits_are_exact(daemon):
    """At the limit: served; one byte over: refused, naming the key."""
    lim = LIMITS
    path = b"/healthz?" + b"a" * (lim["max_request_line"] - len(b"/healthz?"))
    at = b"GET " + path + b" HTTP/1.1\r\nHost: bwp\r\nConnection: close\r\n\r\n"
    assert responses(await exchange(daemon, at))[0][0] == 200
    over = at.replace(path, path + b"a")
    assert responses(await exchange(daemon, over))[0][0] == 414
    value = b"v" * (lim["max_request_header_size"] - len(b"X-Long"))
    at = b"GET /healthz HTTP/1.1\r\nHost: bwp\r\nX-Long: " + value + b"\r\nConnection: close\r\n\r\n"
    assert responses(await exchange(daemon, at))[0][0] == 200
    answers = responses(await exchange(daemon, at.replace(value, value + b"v")))
    assert answers[0][0] == 431 and "max_request_header_size" in answers[0][2].decode()
    many = b"".join(b"X-%d: 1\r\n" % i for i in range(lim["max_request_headers"] - 2))
    at = b"GET /healthz HTTP/1.1\r\nHost: bwp\r\n" + many + b"Connection: close\r\n\r\n"
    assert responses(await exchange(daemon, at))[0][0] == 200
    answers = responses(await exchange(daemon, at.replace(b"Host", b"X-More: 1\r\nHost")))
    assert answers[0][0] == 431 and "max_request_headers" in answers[0][2].decode()


async def test_a_head_without_end_is_cut_at_its_size_limit(daemon):
    """Header lines that never end: refused once the head passes what the limits allow, not
    buffered without bound."""
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: bwp\r\nX-Endless: ")
        sent = 0
        answer = b""
        while sent < 10 * 1024 * 1024 and not answer:
            try:
                writer.write(b"v" * 65536)
                await writer.drain()
            except ConnectionError:
                break
            sent += 65536
            with contextlib.suppress(TimeoutError):
                answer = await asyncio.wait_for(reader.read(1000), 0.01)
        if not answer:
            answer = await asyncio.wait_for(reader.read(1000), 5)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert sent < 2 * 1024 * 1024, sent


async def test_keepalive_timeout_closes_an_idle_connection(daemon):
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
    try:
        writer.write(HEALTHZ)
        first = await asyncio.wait_for(reader.readuntil(b"}"), 5)
        assert first.startswith(b"HTTP/1.1 200")
        start = time.monotonic()
        rest = await asyncio.wait_for(reader.read(), LIMITS["keepalive_timeout"] + 3)
        elapsed = time.monotonic() - start
    finally:
        writer.close()
    assert rest == b""
    assert LIMITS["keepalive_timeout"] - 0.3 <= elapsed < LIMITS["keepalive_timeout"] + 1.5


async def test_the_client_going_away_mid_request_leaves_the_daemon_serving(daemon):
    for data in (submit(b"[" + b" " * 5000)[:-2000], b"GET /heal", submit(b'{"url": "http://1')):
        _reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
        writer.write(data)
        await writer.drain()
        writer.transport.abort()
    await asyncio.sleep(0.2)
    assert daemon.request("GET", "/healthz")[0] == 200
    log = daemon.log_path.read_text()
    assert "Traceback" not in log and "ERROR" not in log


async def test_a_half_closed_client_gets_its_answers_then_eof(daemon):
    """`printf ... | nc`: the requests, then the client's FIN; every answer comes, then the
    daemon closes at once (not after keepalive_timeout)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
    try:
        writer.write(HEALTHZ + submit(JOB))
        writer.write_eof()
        start = time.monotonic()
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert [a[0] for a in responses(data)] == [200, 200], data
    assert time.monotonic() - start < LIMITS["keepalive_timeout"] / 2


# ---------------------------------------------------------------- closing at drain and reload

async def _wait_submit(port: int, sink: Sink, path: str) -> tuple[int, dict]:
    body = json.dumps({"url": sink.url(path), "wait": 20}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(submit(body))
        data = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
        length = int(re.search(rb"(?i)content-length: *(\d+)", data).group(1))
        return int(data.split()[1]), json.loads(await reader.readexactly(length))
    finally:
        writer.close()


@pytest.mark.parametrize("how", ["reload", "stop"])
async def test_requests_under_way_are_answered_at_reload_and_stop(make_daemon, make_sink, how,
                                                                  tmp_path):
    """A request-reply submit waiting on a slow destination when the process is replaced (or
    stopped) gets its answer; a kept-alive idle connection is closed cleanly (EOF, no reset);
    meanwhile new connections are never refused."""
    slow = await make_sink(delay=1.5)
    d = await make_daemon({"pool": {"size": 2}, "drain_timeout": 10,
                           "pidfile": str(tmp_path / "bwp.pid")})
    waiting = asyncio.create_task(_wait_submit(d.port, slow, "/under-way"))
    await slow.wait_for(1)
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", d.port)
    idle_writer.write(HEALTHZ)
    assert (await asyncio.wait_for(idle_reader.readuntil(b"}"), 5)).startswith(b"HTTP/1.1 200")
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP if how == "reload" else signal.SIGTERM)
    refused = 0
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:  # the listeners stay open through a reload
        try:
            r, w = await asyncio.open_connection("127.0.0.1", d.port)
            w.write(b"GET /healthz HTTP/1.1\r\nHost: bwp\r\nConnection: close\r\n\r\n")
            answer = await asyncio.wait_for(r.read(), 5)
            w.close()
            assert answer.split()[1] in (b"200", b"503"), answer  # 503: a stop's drain
        except ConnectionRefusedError:
            refused += 1
        await asyncio.sleep(0.05)
    status, doc = await waiting
    assert status == 200 and doc["results"][0]["state"] == "succeeded", doc
    # the idle one: EOF once its process lets go, never a reset
    assert await asyncio.wait_for(idle_reader.read(), 15) == b""
    idle_writer.close()
    assert refused == 0
    d.pidfile_pid()  # the new process, for the fixture to stop


async def test_a_transfer_coding_besides_chunked_is_501(daemon):
    body = gzip.compress(JOB)
    head = (b"POST /post/http HTTP/1.1\r\nHost: bwp\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
    answers = responses(await exchange(daemon, head + chunked(body, 50)))
    assert [a[0] for a in answers] == [501], answers


async def test_trailers_are_not_the_next_requests_headers(daemon):
    """A chunked body's trailers (here a second Host, an Expect, an Authorization) belong to
    no request: the one after it is served as it came."""
    head = b"POST /post/http HTTP/1.1\r\nHost: bwp\r\nTransfer-Encoding: chunked\r\n\r\n"
    trailed = (b"%x\r\n%s\r\n0\r\nHost: evil\r\nExpect: nothing\r\nAuthorization: Bearer x\r\n\r\n"
               % (len(JOB), JOB))
    answers = responses(await exchange(daemon, head + trailed + HEALTHZ.replace(
        b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")))
    assert [a[0] for a in answers] == [200, 200], answers


async def test_absolute_form_fragments_and_encoded_paths_route_as_before(daemon):
    for target in (b"http://bwp/healthz", b"/healthz#frag", b"/health%7A"):
        answers = responses(await exchange(daemon, b"GET " + target + b" HTTP/1.1\r\nHost: bwp\r\n"
                                           b"Connection: close\r\n\r\n"))
        assert [a[0] for a in answers] == [200], (target, answers)


async def test_a_client_that_never_reads_cannot_pile_up_answers(daemon):
    """Thousands of pipelined /metrics requests, the answers never read: answering stops while
    the socket's buffer is full (RSS stays put), and the connection is dropped after
    keepalive_timeout, its fd freed."""
    import socket

    pid = daemon.proc.pid

    def rss() -> int:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    before, fds_before = rss(), len(os.listdir(f"/proc/{pid}/fd"))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.connect(("127.0.0.1", daemon.port))
    sock.setblocking(False)
    data = b"GET /metrics HTTP/1.1\r\nHost: bwp\r\n\r\n" * 7000
    loop = asyncio.get_running_loop()
    try:
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(loop.sock_sendall(sock, data), 3)
        await asyncio.sleep(1)
        assert rss() - before < 20_000, (before, rss())  # kB: not thousands of 20 kB pages
        start = time.monotonic()
        while time.monotonic() - start < LIMITS["keepalive_timeout"] + 3:
            if len(os.listdir(f"/proc/{pid}/fd")) <= fds_before:
                break
            await asyncio.sleep(0.2)
        assert len(os.listdir(f"/proc/{pid}/fd")) <= fds_before
    finally:
        sock.close()


async def test_a_client_half_closing_mid_body_is_answered_at_once(daemon):
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
    try:
        writer.write(submit(JOB)[:-10])
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write_eof()
        start = time.monotonic()
        answers = responses(await asyncio.wait_for(reader.read(), 5))
    finally:
        writer.close()
    assert [a[0] for a in answers] == [400], answers
    assert "before the body's end" in json.loads(answers[0][2])["error"]
    assert time.monotonic() - start < LIMITS["read_timeout"]


async def test_upgrade_is_ignored_without_a_body_and_refused_with_one(daemon):
    """No protocol switch: a GET asking for h2c is answered over HTTP/1.1; a body behind an
    Upgrade (which llhttp would not read) is a 400 rather than an empty body."""
    up = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"
    answers = responses(await exchange(daemon, b"GET /healthz HTTP/1.1\r\nHost: bwp\r\n" + up + b"\r\n"))
    assert [a[0] for a in answers] == [200], answers
    answers = responses(await exchange(daemon, submit(JOB, up.decode().strip())))
    assert [a[0] for a in answers] == [400], answers
    assert "Upgrade" in json.loads(answers[0][2])["error"]
