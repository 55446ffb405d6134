"""The delivery client against destinations that answer raw, scripted bytes: framing, keep-alive,
dead connections, caps, timeouts, redirects and TLS, as the destination actually sees them."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from collections.abc import Callable
from dataclasses import dataclass

import pytest

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@dataclass
class RawRequest:
    conn: int  # which connection (0 = the first one accepted)
    head: bytes
    body: bytes


# answer(request, number of that request on its connection) -> bytes to write and what then:
# "keep" (read the next request), "close", "close-later" (close 0.1 s after) or "hang"
Answer = Callable[[RawRequest, int], tuple[bytes, str]]


class RawServer:
    def __init__(self, answer: Answer):
        self.answer = answer
        self.requests: list[RawRequest] = []
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, tls: ssl.SSLContext | None = None) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def url(self, path: str, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn, self.connections = self.connections, self.connections + 1
        try:
            for number in range(1000):
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                req = RawRequest(conn, head, await reader.readexactly(length))
                self.requests.append(req)
                data, then = self.answer(req, number)
                writer.write(data)
                await writer.drain()
                if then == "hang":
                    await asyncio.sleep(30)
                if then == "close-later":
                    await asyncio.sleep(0.1)
                if then != "keep":
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client went away, or the test is over
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1)


@pytest.fixture
async def raw_server():
    servers: list[RawServer] = []

    async def make(answer: Answer, tls: ssl.SSLContext | None = None) -> RawServer:
        s = RawServer(answer)
        servers.append(s)
        return await s.start(tls)

    yield make
    for s in servers:
        await s.stop()


async def submit_and_wait(d, job: dict, *states: str) -> dict:
    status, resp, _ = await d.post(job)
    assert status == 200, resp
    return await d.wait_state(resp["ids"][0], *(states or ("succeeded", "failed")))


async def test_chunked_answers_on_one_kept_alive_connection(make_daemon, raw_server):
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n"
               b"Server: real\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nServer: trailer\r\n\r\n")
    srv = await raw_server(lambda req, n: (chunked, "keep"))
    d = await make_daemon({"pool": {"size": 1}})
    for i in range(3):
        doc = await submit_and_wait(d, {"url": srv.url(f"/c{i}")})
        assert doc["state"] == "succeeded" and doc["result"]["body"] == "hello world"
        assert doc["result"]["size"] == 11
        assert doc["result"]["headers"] == {"Content-Type": "text/plain", "Server": "real"}
    assert [r.conn for r in srv.requests] == [0, 0, 0]


async def test_an_http10_chunked_answer_is_not_reused(make_daemon, raw_server):
    """RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 is faulty framing: close after it."""
    answer = (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"2\r\nok\r\n0\r\n\r\n")
    srv = await raw_server(lambda req, n: (answer, "keep"))
    d = await make_daemon({"pool": {"size": 1}})
    for i in range(2):
        doc = await submit_and_wait(d, {"url": srv.url(f"/c{i}")})
        assert doc["state"] == "succeeded" and doc["result"]["body"] == "ok"
    assert [r.conn for r in srv.requests] == [0, 1]


async def test_bytes_after_the_answer_put_the_connection_out_of_service(make_daemon, raw_server):
    extra = {b"/whole": b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n",
             b"/partial": b"HTTP/1.1 302 Found\r\nLocation: /x\r\n"}
    srv = await raw_server(lambda req, n: (OK + extra.get(req.head.split(b" ")[1], b""), "keep"))
    d = await make_daemon({"pool": {"size": 1}})
    for path in ("/whole", "/partial", "/next"):
        doc = await submit_and_wait(d, {"url": srv.url(path)})
        assert (doc["state"], doc["status"], doc["result"]["body"]) == ("succeeded", 200, "ok")
    # neither answer was overwritten, and each spoilt connection was dropped, not reused
    assert [r.conn for r in srv.requests] == [0, 1, 2]


async def test_body_ended_by_close_and_interim_100(make_daemon, raw_server):
    answers = {
        "/eof": b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end",
        "/continue": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nhi",
    }
    srv = await raw_server(lambda req, n: (answers[req.head.split(b" ")[1].decode()], "close"))
    d = await make_daemon({"pool": {"size": 1}})
    doc = await submit_and_wait(d, {"url": srv.url("/eof")})
    assert (doc["state"], doc["result"]["body"]) == ("succeeded", "until the end")
    doc = await submit_and_wait(d, {"url": srv.url("/continue")})
    assert (doc["status"], doc["result"]["body"]) == (201, "hi")


async def test_response_over_the_cap_is_cut_and_its_connection_dropped(make_daemon, raw_server):
    big = b"HTTP/1.1 200 OK\r\nContent-Length: 50000\r\n\r\n" + b"x" * 50000
    srv = await raw_server(lambda req, n: (big if req.head.startswith(b"GET /big") else OK, "keep"))
    d = await make_daemon({"pool": {"size": 1}, "client": {"max_response_size": 4096}})
    doc = await submit_and_wait(d, {"url": srv.url("/big")})
    assert doc["state"] == "succeeded" and doc["result"]["truncated"] is True
    assert 4096 < doc["result"]["size"] <= 50000 and len(doc["result"]["body"]) == 1024
    doc = await submit_and_wait(d, {"url": srv.url("/after")})
    assert doc["result"]["body"] == "ok"
    assert [r.conn for r in srv.requests] == [0, 1]


async def test_head_answer_announcing_a_body(make_daemon, raw_server):
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"
    srv = await raw_server(lambda req, n: (head if req.head.startswith(b"HEAD") else OK, "keep"))
    d = await make_daemon({"pool": {"size": 1}})
    doc = await submit_and_wait(d, {"url": srv.url("/h"), "method": "HEAD"})
    assert (doc["state"], doc["result"]["headers"]["Content-Length"]) == ("succeeded", "1234")
    doc = await submit_and_wait(d, {"url": srv.url("/g")})  # not parsed as the HEAD's body
    assert (doc["state"], doc["result"]["body"]) == ("succeeded", "ok")


async def test_dead_kept_alive_connection(make_daemon, raw_server):
    """The server drops a kept-alive connection just as the next request arrives: a GET is sent
    again on a new connection within the same attempt; a POST is not (it may have been acted
    on), and its attempt fails with the reason."""
    def answer(req: RawRequest, n: int) -> tuple[bytes, str]:
        return (OK, "keep") if n == 0 else (b"", "close")

    srv = await raw_server(answer)
    d = await make_daemon({"pool": {"size": 1}})
    await submit_and_wait(d, {"url": srv.url("/warm-up")})
    doc = await submit_and_wait(d, {"url": srv.url("/get")})
    assert (doc["state"], doc["attempts"]) == ("succeeded", 1)
    assert [(r.conn, r.head.split(b" ")[1]) for r in srv.requests] == [
        (0, b"/warm-up"), (0, b"/get"), (1, b"/get")]
    doc = await submit_and_wait(d, {"url": srv.url("/post"), "method": "POST", "body": "eA=="})
    assert doc["state"] == "failed" and "closed before a response" in doc["error"]
    assert [r.head.split(b" ")[1] for r in srv.requests].count(b"/post") == 1


async def test_connection_closed_by_the_server_while_idle_is_not_reused(make_daemon, raw_server):
    srv = await raw_server(lambda req, n: (OK, "close-later"))
    d = await make_daemon({"pool": {"size": 1}})
    for i in range(2):
        doc = await submit_and_wait(d, {"url": srv.url(f"/{i}"), "method": "POST", "body": "eA=="})
        assert doc["state"] == "succeeded"
        await asyncio.sleep(0.4)
    assert [r.conn for r in srv.requests] == [0, 1]


async def test_an_announced_keep_alive_timeout_is_respected(make_daemon, raw_server):
    """Apache says `Keep-Alive: timeout=5` and closes at 5 s: reusing the connection later
    races its close, so bwp stops a second before what the server announced."""
    announced = b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=2, max=100\r\nContent-Length: 2\r\n\r\nok"
    srv = await raw_server(lambda req, n: (announced if b"/short" in req.head else OK, "keep"))
    d = await make_daemon({"pool": {"size": 1}})
    for i, path in enumerate(("/short/1", "/short/2", "/long/1", "/long/2")):
        if i:
            await asyncio.sleep(1.3)  # past 2 - 1 s, well within the default 15 s
        doc = await submit_and_wait(d, {"url": srv.url(path)})
        assert doc["state"] == "succeeded"
    # each /short answer limits its connection to 1 s idle; a /long one keeps the default
    assert [r.conn for r in srv.requests] == [0, 1, 2, 2]


async def test_timeout_and_invalid_answer(make_daemon, raw_server):
    srv = await raw_server(lambda req, n: (b"", "hang") if b"/slow" in req.head
                           else (b"SPDY/9 what\r\n\r\n", "close"))
    d = await make_daemon()
    doc = await submit_and_wait(d, {"url": srv.url("/slow"), "timeout": 0.5})
    assert (doc["state"], doc["error"]) == (
        "failed", "timeout: no complete answer within 0.5s (the job's timeout)")
    assert 0.4 < doc["result"]["duration"] < 3 and doc["result"]["status"] is None
    doc = await submit_and_wait(d, {"url": srv.url("/bad")})
    assert doc["state"] == "failed" and doc["error"].startswith("invalid response")


async def test_the_timeout_bounds_the_whole_attempt(make_daemon, raw_server):
    """Waiting for a per-host slot comes out of the attempt's budget (connect + read)."""
    srv = await raw_server(lambda req, n: (b"", "hang"))
    d = await make_daemon({"pool": {"size": 4},
                           "client": {"limit_per_host": 1, "connect_timeout": 0.5}})
    status, resp, _ = await d.post([{"url": srv.url(f"/{i}"), "timeout": 1} for i in range(4)])
    assert status == 200
    errors = set()
    for job_id in resp["ids"]:
        doc = await d.wait_state(job_id, "failed")
        assert doc["error"].startswith("timeout: ") and doc["result"]["duration"] < 1.9
        errors.add(doc["error"])
    assert len(srv.requests) <= 2  # one at a time: the last ones never got a slot in time
    assert "timeout: no complete answer within 1s (the job's timeout)" in errors
    assert ("timeout: the attempt took over 1.5s (client.connect_timeout + the job's timeout), "
            "waiting for a connection slot (client.limit_per_host) included") in errors


async def test_request_framing_is_always_the_clients(make_daemon, raw_server):
    srv = await raw_server(lambda req, n: (OK, "keep"))
    d = await make_daemon()
    url = srv.url("/framed?q=1").replace("://", "://user:pa%20ss@")
    await submit_and_wait(d, {"url": url, "method": "PUT", "body": "aGVsbG8=",
                              "headers": {"Content-Length": "999", "Transfer-Encoding": "chunked",
                                          "X-Case": "Kept"}})
    req = srv.requests[0]
    lines = req.head.decode().split("\r\n")
    assert lines[0] == "PUT /framed?q=1 HTTP/1.1" and req.body == b"hello"
    headers = dict(line.split(": ", 1) for line in lines[1:] if line)
    assert headers["Content-Length"] == "5" and "Transfer-Encoding" not in headers
    assert headers["X-Case"] == "Kept" and headers["Host"] == f"127.0.0.1:{srv.port}"
    assert headers["Content-Type"] == "application/octet-stream"  # no type given: the Go daemon's
    assert headers["Authorization"] == "Basic " + base64.b64encode(b"user:pa ss").decode()
    await submit_and_wait(d, {"url": srv.url("/password-only").replace("://", "://:secret@")})
    assert f"Authorization: Basic {base64.b64encode(b':secret').decode()}".encode() in srv.requests[1].head
    # framed even when empty, as the Go daemon does, for every method but GET and HEAD
    for n, method in enumerate(("POST", "DELETE", "GET"), start=2):
        await submit_and_wait(d, {"url": srv.url(f"/empty-{method}"), "method": method})
        framed = srv.requests[n].head.endswith(
            b"\r\nContent-Type: application/octet-stream\r\nContent-Length: 0\r\n\r\n")
        assert framed == (method != "GET"), srv.requests[n].head


async def test_redirects_not_followed_by_default(make_daemon, make_sink):
    sink = await make_sink(script=[(302, {"Location": "/elsewhere"})])
    d = await make_daemon()
    doc = await submit_and_wait(d, {"url": sink.url("/start")})
    assert doc["status"] == 302 and doc["result"]["headers"]["Location"] == "/elsewhere"
    await sink.settle(0.2)
    assert [r.path_qs for r in sink.received] == ["/start"]


async def test_redirects_followed_when_configured(make_daemon, make_sink):
    other = await make_sink()
    sink = await make_sink(script=[(303, {"Location": "/see-other"}),
                                   (307, {"Location": other.url("/moved/café")})])
    d = await make_daemon({"client": {"follow_redirects": True, "max_redirects": 3}})
    doc = await submit_and_wait(d, {"url": sink.url("/form"), "method": "POST",
                                    "parameters": {"a": "1"}, "headers": {"Authorization": "secret"}})
    assert (doc["state"], doc["status"]) == ("succeeded", 200)
    first, second = sink.received
    assert (first.method, first.body) == ("POST", b"a=1")
    # 303: a GET without the body; 307 then keeps the method, and leaving the origin drops
    # the credentials
    assert (second.method, second.path_qs, second.body) == ("GET", "/see-other", b"")
    assert second.headers["Authorization"] == "secret" and "Content-Type" not in second.headers
    moved = (await other.wait_for(1))[0]
    assert (moved.method, moved.path_qs) == ("GET", "/moved/caf%C3%A9")  # a UTF-8 Location
    assert "Authorization" not in moved.headers

    loop = await make_sink(script=[(302, {"Location": "/again"})] * 10)
    doc = await submit_and_wait(d, {"url": loop.url("/loop")})
    assert doc["state"] == "failed" and "more than 3 redirects" in doc["error"]
    assert len(loop.received) == 4


async def test_https_is_verified_against_the_system_cas(make_daemon, raw_server, tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    srv = await raw_server(lambda req, n: (OK, "keep"), tls=server_tls)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))

    trusting = await make_daemon({"pool": {"size": 1}}, env={"SSL_CERT_FILE": str(tmp_path / "ca.pem")})
    for i in range(2):
        doc = await submit_and_wait(trusting, {"url": srv.url(f"/tls{i}", "https")})
        assert (doc["state"], doc["result"]["body"]) == ("succeeded", "ok")
    assert [r.conn for r in srv.requests] == [0, 0]

    default = await make_daemon()
    doc = await submit_and_wait(default, {"url": srv.url("/untrusted", "https")})
    assert doc["state"] == "failed" and "CERTIFICATE_VERIFY_FAILED" in doc["error"]
    assert len(srv.requests) == 2


async def test_per_host_slots_survive_a_waiter_given_up_as_a_slot_frees():
    """A waiter cancelled (its deadline, or the drain) in the same loop turn as a release."""
    from bwp.http1 import HostSlots

    slots, key = HostSlots(1), ("http", "127.0.0.1", 80)
    await slots.acquire(key)
    b = asyncio.create_task(slots.acquire(key))
    c = asyncio.create_task(slots.acquire(key))
    await asyncio.sleep(0)
    b.cancel()
    slots.release(key)  # skips b's cancelled turn, hands the slot to c
    with pytest.raises(asyncio.CancelledError):
        await b
    await asyncio.wait_for(c, 1)
    slots.release(key)
    assert not slots._used and not slots._waiting


MIB = 1024 * 1024
HEAD_CAP_ERROR = "response head over 65536 bytes (client.max_response_head)"  # the default cap
CHUNKED_START = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"


class EndlessServer(RawServer):
    """Answers a request with `start`, then `more` over and over for as long as the client reads,
    up to `limit` bytes; it stops when the client closes the connection."""

    def __init__(self, start: bytes, more: bytes, limit: int = 200 * MIB):
        super().__init__(lambda req, n: (b"", "close"))
        self.start_bytes, self.more, self.limit = start, more, limit
        self.sent = 0
        self.finished = asyncio.Event()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.requests.append(RawRequest(self.connections, head, b""))
            self.connections += 1
            writer.write(self.start_bytes)
            self.sent = len(self.start_bytes)
            while self.sent < self.limit:
                writer.write(self.more)
                self.sent += len(self.more)
                await writer.drain()  # raises once the client has closed the connection
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.finished.set()
            writer.close()


@pytest.fixture
async def endless_server():
    servers: list[EndlessServer] = []

    async def make(start: bytes, more: bytes) -> EndlessServer:
        s = EndlessServer(start, more)
        servers.append(s)
        await s.start()
        return s

    yield make
    for s in servers:
        await s.stop()


def proc_status_kib(pid: int, name: str) -> int:
    """VmRSS, VmHWM (peak RSS), ... of a process, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {name} in /proc/{pid}/status")


ENDLESS = {  # what the answer starts with, then what it repeats without end
    "header-value": (b"HTTP/1.1 200 OK\r\nX-Long: ", b"v" * 65536),
    "header-name": (b"HTTP/1.1 200 OK\r\nX-", b"n" * 65536),
    "header-lines": (b"HTTP/1.1 200 OK\r\n", b"X-Many: small\r\n" * 4096),
    "status-reason": (b"HTTP/1.1 200 ", b"reason " * 8192),
    "interim-100": (b"", b"HTTP/1.1 100 Continue\r\n\r\n" * 2048),
    "trailer-lines": (CHUNKED_START, b"X-Trailer: t\r\n" * 4096),
    "trailer-value": (CHUNKED_START + b"X-Trailer: ", b"t" * 65536),
}


@pytest.mark.parametrize("case", list(ENDLESS))
async def test_an_endless_head_fails_the_attempt_in_bounded_memory(make_daemon, endless_server, case):
    """client.max_response_size bounds only the body: a destination that never ends a header,
    a status line, its 1xx answers or its trailers is cut off by client.max_response_head."""
    srv = await endless_server(*ENDLESS[case])
    d = await make_daemon({"pool": {"size": 1}})
    assert d.proc is not None
    rss_before = proc_status_kib(d.proc.pid, "VmRSS")
    doc = await submit_and_wait(d, {"url": srv.url(f"/{case}"), "timeout": 5})
    assert (doc["state"], doc["error"]) == ("failed", HEAD_CAP_ERROR)
    assert doc["result"]["duration"] < 2.5  # not the 5 s timeout
    await asyncio.wait_for(srv.finished.wait(), 5)  # the connection was closed, sending stopped
    assert srv.sent < 32 * MIB, srv.sent  # of the 200 MiB on offer
    growth = proc_status_kib(d.proc.pid, "VmHWM") - rss_before  # the peak, not what is left
    assert growth < 20 * 1024, f"peak RSS grew {growth} KiB"


def answer_with_head(size: int, body: bytes = b"ok") -> bytes:
    """A 200 answer whose head, status line to blank line, is exactly `size` bytes."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n" % len(body)
    left = size - len(head) - 2
    lengths = [1000] * ((left - 14) // 1000)
    lengths.append(left - sum(lengths))  # 14..1013: b"X-Pad-0000: " + value + b"\r\n"
    lines = [b"X-Pad-%04d: " % i + b"p" * (n - 14) + b"\r\n" for i, n in enumerate(lengths)]
    answer = head + b"".join(lines) + b"\r\n"
    assert len(answer) == size
    return answer + body


def chunked(body: bytes, size: int) -> bytes:
    chunks = (body[i:i + size] for i in range(0, len(body), size))
    return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n")


async def test_the_head_cap_counts_all_but_the_body(make_daemon, raw_server):
    """The default 64 KiB: 60 KiB of headers pass and 100 KiB fail, to the byte, however the
    answer is split into reads; a large body, and one in many chunks, are not counted."""
    answers = {
        b"/head-60k": answer_with_head(60 * 1024),
        b"/head-at-cap": answer_with_head(65536),
        b"/head-100k": answer_with_head(100 * 1024),
        b"/head-over-cap": answer_with_head(65537),
        b"/body-1m": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % MIB + b"b" * MIB,
        b"/chunks-4k": chunked(b"c" * MIB, 4096),  # 256 chunks
        b"/chunks-8": chunked(b"t" * 24 * 1024, 8),  # 3072 small chunks: 15 KiB of framing
        # tiny chunks cost parsing time: each is charged a little against the cap
        b"/chunks-8-many": chunked(b"t" * 256 * 1024, 8),
    }
    srv = await raw_server(lambda req, n: (answers[req.head.split(b" ")[1]], "keep"))
    d = await make_daemon({"pool": {"size": 1}, "client": {"max_response_size": 2 * MIB}})
    for path in ("/head-60k", "/head-at-cap"):
        doc = await submit_and_wait(d, {"url": srv.url(path)})
        assert (doc["state"], doc["status"], doc["result"]["body"]) == ("succeeded", 200, "ok"), doc
    for path in ("/head-100k", "/head-over-cap"):
        doc = await submit_and_wait(d, {"url": srv.url(path)})
        assert (doc["state"], doc["error"]) == ("failed", HEAD_CAP_ERROR), doc
    for path, size in (("/body-1m", MIB), ("/chunks-4k", MIB), ("/chunks-8", 24 * 1024)):
        doc = await submit_and_wait(d, {"url": srv.url(path)})
        assert (doc["state"], doc["status"]) == ("succeeded", 200), doc
        assert (doc["result"]["size"], doc["result"]["truncated"]) == (size, False)
    doc = await submit_and_wait(d, {"url": srv.url("/chunks-8-many")})
    assert (doc["state"], doc["error"]) == ("failed", HEAD_CAP_ERROR), doc
    # a connection whose answer passed the cap is dropped, never reused
    assert [r.conn for r in srv.requests] == [0, 0, 0, 1, 2, 2, 2, 2]
