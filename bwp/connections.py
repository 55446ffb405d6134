"""Inbound API connections: a cap below the open files limit, and a deadline for each request head.

aiohttp's server accepts every connection it is offered and gives a request head as long as an
idle connection (keepalive_timeout).  Each connection holds a file descriptor, and so does
every outbound socket a worker dials: with the fd table full of idle or half-open API
connections, deliveries would fail with EMFILE.  So the listeners' protocol factory is a
ConnectionTable: it counts the connections (in connection_made/connection_lost) and, at
`limits.max_connections`, makes room by closing the least recently active connection that has
no request under way (as nginx reuses idle keep-alive connections), or, when every connection
has one, answers the new one 503 and closes it.  Each connection also gets
`limits.header_timeout` to deliver a complete request head, counted from connecting or from
the first byte of the next request on a kept-alive connection.

The per-request cost is a dict move (the least recently active order) and two attribute
reads; a timer exists per connection from its start and only again for a head that did not
arrive in one read.  This module imports nothing of aiohttp at run time (`bwp check` uses the
arithmetic below).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiohttp import web
    from aiohttp.web_protocol import RequestHandler

    from .metrics import Metrics

log = logging.getLogger("bwp.connections")

# File descriptors kept for everything but API connections ("auto" max_connections):
OUTBOUND_PER_WORKER = 3  # its connection, an idle pooled one, happy eyeballs' second dial
RESERVED_FDS = 64  # stdio, the event loop's own, journal, sibling sockets, DNS and TLS threads
MIN_CONNECTIONS = 8  # whatever the limit: an API that takes no connection is no API
SCAN_LIMIT = 256  # connections looked at per eviction (busy ones passed go to the back)
FULL_LOG_INTERVAL = 60.0  # seconds between warnings while the table stays full

_BODY = (b'{"success":false,"error":"every connection is busy '
         b'(limits.max_connections): try again"}')
FULL_ANSWER = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
               b"Retry-After: 1\r\nConnection: close\r\nContent-Length: "
               + str(len(_BODY)).encode() + b"\r\n\r\n" + _BODY)


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit, as Go's runtime does at start; return
    the soft limit in effect."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        # (an infinite hard limit: Linux refuses past nr_open, and the soft one stays)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft


def fd_limit_at_start() -> int:
    """The soft limit a daemon started from this process would run with (its hard limit)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def reserved_fds(workers: int, listeners: int) -> int:
    """Descriptors "auto" keeps for outbound sockets and everything else."""
    return OUTBOUND_PER_WORKER * workers + RESERVED_FDS + listeners


def connection_cap(configured: int | None, fd_limit: int, workers: int, listeners: int) -> int:
    """limits.max_connections as given, or for "auto" (None) the fd limit less the reserve."""
    if configured is not None:
        return configured
    if fd_limit == resource.RLIM_INFINITY or fd_limit < 0:
        fd_limit = 1 << 20
    return max(MIN_CONNECTIONS, fd_limit - reserved_fds(workers, listeners))


class ConnectionTable:
    """The protocol factory of every API listener: aiohttp's handlers, counted and capped.

    `conns` holds the open connections least recently active first: a connection moves to
    the back when the bytes of a new request arrive on it."""

    def __init__(self, server: web.Server, limit: int, header_timeout: float, metrics: Metrics):
        self.server = server  # aiohttp's: makes a RequestHandler per connection
        self.limit = limit
        self.header_timeout = header_timeout
        self.loop = asyncio.get_running_loop()
        self.conns: dict[ApiConnection, None] = {}
        closed = metrics.connections_closed
        self.evicted, self.refused = closed.labels("evicted"), closed.labels("refused")
        self.head_timeouts = closed.labels("header_timeout")
        metrics.connections.set_function(lambda: len(self.conns))
        metrics.connections_max.set(limit)
        self._logged = -FULL_LOG_INTERVAL  # monotonic time of the last "full" warning
        self._shed = [0, 0]  # evicted, refused since then

    def __call__(self) -> ApiConnection:
        return ApiConnection(self)

    def admit(self, conn: ApiConnection) -> bool:
        """Make room for a new connection; False when every connection has a request under way."""
        conns = self.conns
        if len(conns) >= self.limit:
            victim = self._idlest()
            if victim is None:
                self.refused.inc()
                self._full(1)
                return False
            victim.handler.force_close()  # type: ignore[union-attr]
            self.evicted.inc()
            self._full(0)
        conns[conn] = None
        return True

    def _idlest(self) -> ApiConnection | None:
        """The least recently active connection waiting for a request (nothing under way; a
        head begun but unfinished counts as waiting).  The busy ones passed on the way go to
        the back, so the next search starts past them and each stays bounded."""
        conns = self.conns
        passed = []
        found = None
        for conn in conns:
            h = conn.handler
            waiter = h._waiter  # type: ignore[union-attr]
            if waiter is not None and not waiter.done() and h.transport is not None:  # type: ignore[union-attr]
                found = conn
                break
            passed.append(conn)
            if len(passed) >= SCAN_LIMIT:
                break
        for conn in passed:
            del conns[conn]
            conns[conn] = None
        return found

    def _full(self, which: int) -> None:
        self._shed[which] += 1
        now = time.monotonic()
        if now - self._logged >= FULL_LOG_INTERVAL:
            log.warning("%d API connections open, the limit (limits.max_connections): closed %d "
                        "idle ones for new ones, refused %d while all were busy%s",
                        len(self.conns), self._shed[0], self._shed[1],
                        "" if self._logged < 0 else f" in the last {now - self._logged:.0f}s")
            self._logged, self._shed = now, [0, 0]


class ApiConnection(asyncio.Protocol):
    """One API connection: aiohttp's RequestHandler, made once the table admitted it, plus the
    request head's deadline.  The handler's own state says whether a request is under way:
    it awaits `_waiter` exactly while it waits for the next request head."""

    __slots__ = ("deadline", "handler", "seen", "table", "timer")

    def __init__(self, table: ConnectionTable):
        self.table = table
        self.handler: RequestHandler | None = None
        self.deadline: float | None = None  # loop time by which the pending head must be in
        self.seen = 0  # the handler's request count when that head began
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        table = self.table
        if not table.admit(self):
            transport.write(FULL_ANSWER)  # type: ignore[attr-defined]
            transport.close()
            return
        self.handler = h = table.server()
        h.connection_made(transport)
        loop = table.loop
        self.deadline = loop.time() + table.header_timeout
        self.timer = loop.call_at(self.deadline, self._head_overdue)

    def data_received(self, data: bytes) -> None:
        h: Any = self.handler
        waiter = h._waiter
        if waiter is None or waiter.done():  # a request under way: its body, or pipelined ones
            h.data_received(data)
            return
        conns = self.table.conns  # the bytes of a new request: most recently active now
        if conns.pop(self, 0) is None:  # (0: not there any more, being closed)
            conns[self] = None
        h.data_received(data)
        if not waiter.done() and (self.deadline is None or self.seen != h._request_count):
            self._head_begun()  # the head did not come whole: it gets header_timeout

    def _head_begun(self) -> None:
        table = self.table
        self.deadline = deadline = table.loop.time() + table.header_timeout
        self.seen = self.handler._request_count  # type: ignore[union-attr]
        if self.timer is None:  # else the one armed fires first and moves on to this deadline
            self.timer = table.loop.call_at(deadline, self._head_overdue)

    def _head_overdue(self) -> None:
        self.timer = None
        h = self.handler
        deadline = self.deadline
        if deadline is None or h is None or h.transport is None or h._request_count != self.seen:
            self.deadline = None  # the head came in (or the connection is gone)
            return
        loop = self.table.loop
        if loop.time() < deadline:  # a later head than the one this timer was armed for
            self.timer = loop.call_at(deadline, self._head_overdue)
            return
        self.deadline = None
        self.table.head_timeouts.inc()
        log.debug("closing %s: no complete request head within %gs (limits.header_timeout)",
                  h.peername, self.table.header_timeout)
        h.force_close()

    def eof_received(self) -> bool | None:
        return self.handler.eof_received() if self.handler is not None else None  # type: ignore[func-returns-value]

    def pause_writing(self) -> None:
        if self.handler is not None:
            self.handler.pause_writing()

    def resume_writing(self) -> None:
        if self.handler is not None:
            self.handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        h = self.handler
        if h is None:
            return  # refused: never admitted
        self.table.conns.pop(self, None)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        h.connection_lost(exc)
