"""A lean HTTP/1.1 client transport: keep-alive connections over asyncio protocols, responses
parsed by httptools (llhttp), every new socket made by the router.

Why not aiohttp's client here: per request it builds a ClientRequest, a payload object, a
writer task, timers and a ClientResponse; a delivery cost 200-220 µs of CPU with it and 53-58 µs
with this module, which does one write and one parse (docs/performance.md).  It does only what
a job needs: one request per connection at a time, the body read and discarded up to a cap with
its first bytes kept, all that is not body (status line, headers, 1xx answers, chunk framing,
trailers) under a cap of its own, one deadline per attempt.  aiohttp still serves the API.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections import deque

import aiohappyeyeballs
import httptools

from .outbox import Outbox
from .router import Router

PREVIEW_BYTES = 1024  # kept from each response body
KEPT_VALUE_BYTES = 1024  # kept of each KEPT_HEADERS value
# A chunk under this size is charged this much against the head cap beyond its framing, so a
# stream of tiny chunks (300 000 one-byte chunks cost 140 ms of parsing) ends at the cap too.
SMALL_CHUNK = 64
SMALL_CHUNK_CHARGE = 8
KEEPALIVE = 15.0  # seconds an idle connection is kept; below common server timeouts (nginx 75 s)
KEEPALIVE_MARGIN = 1.0  # seconds short of a server's announced `Keep-Alive: timeout=N`
HAPPY_EYEBALLS_DELAY = 0.25  # seconds before the next address is tried alongside (aiohttp's)
DNS_CACHE_LIMIT = 1024
TIMER_SLACK = 0.001  # seconds: a timer firing this close to its deadline counts as on time

# response headers kept for job status and Retry-After, by lower-case name
KEPT_HEADERS = {h.lower().encode(): h for h in
                ("Content-Type", "Content-Length", "Location", "Retry-After", "Server")}

Key = tuple[str, str, int]  # scheme, host, port


class ResponseError(Exception):
    """The destination broke HTTP: an unparsable answer, or the connection closed early."""


class ConnectTimeout(TimeoutError):
    """Resolving, connecting and TLS took longer than connect_timeout."""


class ReadTimeout(TimeoutError):
    """The complete answer did not come within read_timeout (or the attempt's deadline)."""


class ConnectionClosed(ResponseError):
    """The server closed the connection before the response was complete."""


class Response:
    """What came back for one request."""

    __slots__ = ("framed", "headers", "preview", "size", "status", "truncated")

    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.preview = b""
        self.size = 0
        self.truncated = False  # the body passed the cap; the connection was dropped
        self.framed = False  # Content-Length or chunked: else the body ends at close


class Connection(asyncio.Protocol):
    """One HTTP/1.1 connection, one request at a time; httptools calls the on_* methods.

    `_response` is the answer being read; it is None before a request and once the waiter
    has its result, so nothing the server sends afterwards can touch an answer given.
    """

    def __init__(self, key: Key, outbox: Outbox) -> None:
        self.key, self.outbox = key, outbox
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._unsent = b""  # the request, until the outbox has it written
        self.written = False  # the current request's bytes went to the transport
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.reuse_until = 0.0  # monotonic; past it the server may have closed the connection
        self.idle_limit = KEEPALIVE  # the server's `Keep-Alive: timeout=N` can shorten it
        self._response: Response | None = None
        self._waiter: asyncio.Future[Response] | None = None
        # One timer serves the requests in turn: armed for a request's deadline, and when it
        # fires for a request since answered, re-armed for the current one's (or dropped when
        # idle), so a request costs no timer of its own (call_at + cancel: ~2.7 µs in uvloop)
        self._deadline = 0.0  # loop time by which the current request must be answered
        self._timer: asyncio.TimerHandle | None = None
        self._head_only = False
        self._cap = 0
        self._head_cap = 0  # bytes of an answer that are not body, all together
        # bytes fed to the parser for this answer, less the chunk framing credited: minus the
        # body (Response.size), what counts against _head_cap
        self._fed = 0
        self._chunk_start = 0  # Response.size when the current chunk began
        self._counting = True  # bytes that are not body may still come: the head, or chunks
        self._in_head = False  # between a message's start and its headers' end (not trailers)
        self._keep_alive = False
        self._te_seen = False  # the answer is chunked
        self._got_bytes = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        resp = self._response
        if resp is None:
            self.close()  # bytes nobody asked for: the connection is out of step
            return
        self._got_bytes = True
        rest: bytes | memoryview | None = data
        try:
            if self._counting and len(data) > self._head_cap - self._fed + resp.size:
                rest = self._feed_within_head_cap(data)  # a read that could pass the cap
                if rest is None:
                    return
            self._fed += len(rest)
            self.parser.feed_data(rest)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:
            self._fail(ResponseError(f"invalid response: {e}"))

    def _feed_within_head_cap(self, data: bytes) -> memoryview | None:
        """Feed `data` in pieces no larger than the room left under the head cap, so that the
        parser never holds more than the cap (httptools keeps a header name or value whole until
        it ends) and an answer that ends within this read is judged on the bytes it really had.
        Returns what is left once only body can follow or the answer is done, for the caller to
        feed at once; None when the cap was passed (the attempt failed, the connection closed)."""
        view = memoryview(data)
        while True:
            resp = self._response
            if resp is None or not self._counting:
                return view
            room = self._head_cap - self._fed + resp.size
            if len(view) <= room:
                return view
            if room <= 0:  # more to come before the answer can end: at least its last byte
                self._fail(ResponseError(
                    f"response head over {self._head_cap} bytes (client.max_response_head)"))
                return None
            self._fed += room
            self.parser.feed_data(view[:room])
            view = view[room:]

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost decides what the EOF meant

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._stop_timer()
        resp = self._response
        if resp is None:
            return
        if resp.status and not resp.framed and exc is None:
            self._finish()  # a body delimited by the end of the connection
        elif resp.status:
            self._fail(ConnectionClosed("connection lost before the end of the response body"))
        else:
            self._fail(ConnectionClosed(f"connection closed before a response ({exc})" if exc
                                        else "connection closed before a response"))

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self._response is None:  # a second answer to one request
            self.close()
        self._in_head = True

    def on_header(self, name: bytes, value: bytes) -> None:
        resp = self._response
        if resp is None or not self._in_head:
            return  # out of step, or a chunked body's trailer
        lower = name.lower()
        kept = KEPT_HEADERS.get(lower)
        if kept is not None:
            # kept by every finished job in the history: a value's start is enough
            resp.headers[kept] = value[:KEPT_VALUE_BYTES].decode("utf-8", "replace")
        if lower == b"keep-alive":
            self.idle_limit = _announced_idle_limit(value)
        if lower == b"content-length" or (
                lower == b"transfer-encoding" and value.rstrip().lower().endswith(b"chunked")):
            resp.framed = True  # any other transfer coding is read until the close
            if lower == b"transfer-encoding":
                self._te_seen = True

    def on_headers_complete(self) -> None:
        self._in_head = False
        resp = self._response
        if resp is None:
            return
        status = self.parser.get_status_code()
        if status < 200:
            if status == 101:
                self._fail(ResponseError("the server switched protocols (101)"))
            else:  # 100 Continue, 103 Early Hints: the real answer follows
                resp.headers.clear()
                resp.framed = False
            return
        resp.status = status
        # past the head only a chunked body has bytes that are not body (framing, trailers)
        self._counting = resp.framed and "Content-Length" not in resp.headers
        if self._head_only:
            # llhttp cannot be told the request was HEAD and would wait for a body that the
            # Content-Length announces but never comes: finish here and drop the connection.
            self._finish()
            self.close()

    def on_body(self, body: bytes) -> None:
        resp = self._response
        if resp is None:
            return
        size = resp.size
        if size < PREVIEW_BYTES:
            resp.preview += body[: PREVIEW_BYTES - size]
        resp.size = size = size + len(body)
        if size > self._cap:
            resp.truncated = True
            self._finish()
            self.close()  # rather than read an unbounded body

    def on_chunk_complete(self) -> None:
        """A chunk's framing, `<hex size>\\r\\n` before its data and `\\r\\n` after, does not
        count against the head cap, up to the least it can take: never more than came, so many
        small chunks leave no room for anything else.  Extensions and trailers count."""
        resp = self._response
        if resp is None:
            return
        size = resp.size - self._chunk_start
        self._chunk_start = resp.size
        self._fed -= ((size.bit_length() + 3) // 4 or 1) + 4 - (SMALL_CHUNK_CHARGE
                                                                if size < SMALL_CHUNK else 0)

    def on_message_complete(self) -> None:
        resp = self._response
        if resp is None or not resp.status:
            return  # the end of a 1xx message, or of an answer already given
        # RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 answer is faulty framing, so the
        # connection is not reused
        self._keep_alive = self.parser.should_keep_alive() and not (
            self._te_seen and self.parser.get_http_version() == "1.0")
        self._finish()

    # requests

    def send(self, data: bytes, deadline: float, head_only: bool, cap: int,
             head_cap: int) -> asyncio.Future[Response]:
        """Write one request; the future resolves with its response or fails by the deadline.
        `cap` bounds the body (then cut), `head_cap` all the rest (then the attempt fails)."""
        self._response = Response()
        self.idle_limit = KEEPALIVE
        self._head_only, self._cap, self._head_cap = head_only, cap, head_cap
        self._fed = self._chunk_start = 0
        self._counting = True
        self._keep_alive = self._got_bytes = self._te_seen = False
        self._waiter = waiter = self.loop.create_future()
        self._deadline = deadline
        if self._timer is None or self._timer.when() > deadline:
            self._arm(deadline)
        self._unsent = data
        self.written = False
        self.outbox.add(self)
        return waiter

    def send_now(self) -> None:
        data, self._unsent = self._unsent, b""
        if data and not self.closed and self.transport is not None:
            self.transport.write(data)
            self.written = True

    @property
    def failed_silently(self) -> bool:
        """The last request got no byte back: on a reused connection the server most likely
        closed it while idle."""
        return not self._got_bytes

    @property
    def reusable(self) -> bool:
        return (self._keep_alive and not self.closed and self.transport is not None
                and not self.transport.is_closing())

    def reusable_at(self, now: float) -> bool:
        """Still fit for a request at `now` (monotonic): reusable and within its idle limit."""
        return self.reusable and self.reuse_until > now

    def close(self) -> None:
        """Drop the connection; a request under way fails (connection_lost follows)."""
        self.closed = True
        self._stop_timer()
        if self.transport is not None:
            self.transport.close()

    def abandon(self) -> None:
        """The caller gave up (cancelled): nothing will read the answer, so drop it all."""
        self._response = None
        self.close()

    def _arm(self, when: float) -> None:
        self._stop_timer()
        self._timer = self.loop.call_at(when, self._expire)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if self._response is None:
            return  # the request it was armed for was answered, and none is under way
        if self.loop.time() + TIMER_SLACK < self._deadline:
            self._arm(self._deadline)  # armed for an earlier request: wait for this one's
            return
        self._fail(ReadTimeout())

    def _finish(self) -> None:
        resp, self._response = self._response, None
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(resp)  # type: ignore[arg-type]

    def _fail(self, exc: BaseException) -> None:
        self._response = None
        self.close()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)


class HostSlots:
    """At most `limit` requests under way per destination; a key exists only while in use."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._used: dict[Key, int] = {}
        self._waiting: dict[Key, deque[asyncio.Future[None]]] = {}

    async def acquire(self, key: Key) -> None:
        used = self._used.get(key, 0)
        if used < self.limit and key not in self._waiting:
            self._used[key] = used + 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, deque()).append(waiter)
        try:
            await waiter  # release() passes its slot on: the count stays
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release(key)  # handed a slot just as we gave up
            else:  # release() may have dropped it (and its queue) already
                queue = self._waiting.get(key)
                if queue is not None and waiter in queue:
                    queue.remove(waiter)
                    if not queue:
                        del self._waiting[key]
            raise

    def release(self, key: Key) -> None:
        queue = self._waiting.get(key)
        while queue:
            waiter = queue.popleft()
            if not queue:
                del self._waiting[key]
            if not waiter.done():
                waiter.set_result(None)
                return
        used = self._used[key] - 1
        if used:
            self._used[key] = used
        else:
            del self._used[key]


class ConnectionPool:
    """Idle keep-alive connections per (scheme, host, port), most recently used first."""

    def __init__(self, router: Router, max_idle: int, limit_per_host: int = 0,
                 dns_ttl: float = 10.0) -> None:
        self.router = router
        self.max_idle = max_idle
        self.dns_ttl = dns_ttl
        self._idle: dict[Key, deque[Connection]] = {}
        self._idle_count = 0
        self._busy: set[Connection] = set()
        self._host_slots = HostSlots(limit_per_host) if limit_per_host else None
        self._dns: dict[tuple[str, int], tuple[float, list[tuple]]] = {}
        self._tls: ssl.SSLContext | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False
        self.outbox = Outbox()  # requests go out together (bwp/outbox.py)

    async def request(self, key: Key, data: bytes, *, deadline: float, connect_timeout: float,
                      read_timeout: float, head_only: bool = False, cap: int, head_cap: int,
                      replayable: bool = False) -> Response:
        """Send one serialised request and read its response, all by `deadline` (loop time):
        connecting takes at most connect_timeout of it, the answer at most read_timeout.

        A reused connection that answers nothing was most likely closed by the server while
        idle; the request is then sent once more on a new connection if it is `replayable`
        (idempotent), as browsers and Go's net/http do.
        """
        slots = self._host_slots
        if slots is not None:
            async with asyncio.timeout_at(deadline):
                await slots.acquire(key)
        try:
            conn = self._take_idle(key)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(key, deadline, connect_timeout)
            while True:  # at most twice: once more on a new connection (see above)
                self._busy.add(conn)
                try:  # awaited here, not in a coroutine of its own: one frame less a request
                    resp = await conn.send(data, min(deadline, conn.loop.time() + read_timeout),
                                           head_only, cap, head_cap)
                    break
                except asyncio.CancelledError:
                    conn.abandon()  # e.g. the drain deadline: the connection must not outlive us
                    raise
                except ConnectionClosed:
                    # a request never written (the server closed the idle connection before
                    # the outbox wrote it) is safe to send again, idempotent or not
                    if not (reused and (replayable or not conn.written) and conn.failed_silently
                            ) or self._closed:
                        raise
                finally:
                    self._busy.discard(conn)
                reused = False
                conn = await self._connect(key, deadline, connect_timeout)
            self._release(conn)
            return resp
        finally:
            if slots is not None:
                slots.release(key)

    def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        for conn in self._busy:
            conn.close()
        self._idle.clear()
        self._idle_count = 0

    # connections

    def _take_idle(self, key: Key) -> Connection | None:
        conns = self._idle.get(key)
        if not conns:
            return None
        now = time.monotonic()
        while conns:
            conn = conns.pop()
            self._idle_count -= 1
            if conn.reusable_at(now):
                return conn
            conn.close()
        return None

    def _release(self, conn: Connection) -> None:
        if not conn.reusable or self._closed or self._idle_count >= self.max_idle:
            conn.close()
            return
        conn.reuse_until = time.monotonic() + conn.idle_limit
        self._idle.setdefault(conn.key, deque()).append(conn)
        self._idle_count += 1
        if self._sweeper is None:
            self._sweeper = conn.loop.call_later(KEEPALIVE, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle for too long (their fds are not kept forever)."""
        self._sweeper = None
        now = time.monotonic()
        for key, conns in list(self._idle.items()):
            while conns and not conns[0].reusable_at(now):
                conns.popleft().close()
                self._idle_count -= 1
            if not conns:
                del self._idle[key]
        if self._idle_count:
            self._sweeper = asyncio.get_running_loop().call_later(KEEPALIVE / 2, self._sweep)

    async def _connect(self, key: Key, deadline: float, timeout: float) -> Connection:
        """Resolve, dial (happy eyeballs, through the router's socket factory), then TLS."""
        loop = asyncio.get_running_loop()
        try:
            return await self._dial(key, min(deadline, loop.time() + timeout))
        except TimeoutError:
            raise ConnectTimeout() from None

    async def _dial(self, key: Key, deadline: float) -> Connection:
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        async with asyncio.timeout_at(deadline):
            infos = await self._resolve(host, port)
            # aiohttp's own dialler; a single failure comes back as itself (DestinationDenied)
            sock = await aiohappyeyeballs.start_connection(
                infos, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY, interleave=1,
                socket_factory=self.router.socket_factory)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                tls = await self._tls_context() if scheme == "https" else None
                _, conn = await loop.create_connection(
                    lambda: Connection(key, self.outbox), sock=sock, ssl=tls,
                    server_hostname=host.rstrip(".") if tls else None)
            except BaseException:
                sock.close()
                raise
            return conn

    async def _resolve(self, host: str, port: int) -> list[tuple]:
        now = time.monotonic()
        cached = self._dns.get((host, port))
        if cached is not None and cached[0] > now:
            return cached[1]
        ip_family = _ip_family(host)
        if ip_family is not None:
            expires = float("inf")
            infos = [(ip_family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))]
        else:
            expires = now + self.dns_ttl
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        if len(self._dns) >= DNS_CACHE_LIMIT:
            self._dns.clear()
        self._dns[(host, port)] = (expires, infos)
        return infos

    async def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:  # verified against the system's CAs (read from disk: a thread)
            self._tls = await asyncio.to_thread(ssl.create_default_context)
        return self._tls


def _announced_idle_limit(value: bytes) -> float:
    """Seconds a connection may idle per `Keep-Alive: timeout=N, max=M` (Apache says 5)."""
    for part in value.split(b","):
        key, _, number = part.strip().partition(b"=")
        if key.strip().lower() == b"timeout":
            try:
                return min(KEEPALIVE, max(0.0, float(number) - KEEPALIVE_MARGIN))
            except ValueError:
                break
    return KEEPALIVE


def _ip_family(host: str) -> socket.AddressFamily | None:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        return family
    return None
