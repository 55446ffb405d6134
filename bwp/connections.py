"""Inbound API connections: a cap below the open files limit.

Each connection holds a file descriptor, and so does every outbound socket a worker dials:
with the fd table full of idle or half-open API connections, deliveries would fail with
EMFILE.  So the listeners' connections are kept in a ConnectionTable: at
`limits.max_connections` it makes room by closing the least recently active connection that
has no request under way (as nginx reuses idle keep-alive connections), or, when every
connection has one, the new one is answered 503 and closed.  (The head's deadline,
`limits.header_timeout`, is kept by each connection: bwp/httpserver.py.)

The per-request cost is a dict move (the least recently active order).  This module imports
nothing of the server at run time (`bwp check` uses the arithmetic below).
"""

from __future__ import annotations

import contextlib
import logging
import resource
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .httpserver import HttpConnection
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
    """The open connections of a set of listeners, least recently active first (a connection
    moves to the back when the bytes of a new request arrive on it), capped at `limit`."""

    def __init__(self, limit: int, metrics: Metrics | None):
        self.limit = limit
        self.conns: dict[HttpConnection, None] = {}
        self.full_answer = FULL_ANSWER
        self.evicted = self.refused = self.head_timeouts = _NOT_COUNTED
        if metrics is not None:
            closed = metrics.connections_closed
            self.evicted, self.refused = closed.labels("evicted"), closed.labels("refused")
            self.head_timeouts = closed.labels("header_timeout")
            metrics.connections.set_function(lambda: len(self.conns))
            metrics.connections_max.set(limit)
        self._logged = -FULL_LOG_INTERVAL  # monotonic time of the last "full" warning
        self._shed = [0, 0]  # evicted, refused since then

    def admit(self, conn: HttpConnection) -> bool:
        """Make room for a new connection; False when every connection has a request under way."""
        conns = self.conns
        if len(conns) >= self.limit:
            victim = self._idlest()
            if victim is None:
                self.refused.inc()
                self._full(1)
                return False
            victim.abort()
            conns.pop(victim, None)
            self.evicted.inc()
            self._full(0)
        conns[conn] = None
        return True

    def _idlest(self) -> HttpConnection | None:
        """The least recently active connection waiting for a request (nothing under way; a
        head begun but unfinished counts as waiting).  The busy ones passed on the way go to
        the back, so the next search starts past them and each stays bounded."""
        conns = self.conns
        passed = []
        found = None
        for conn in conns:
            if conn.waiting:
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


class _NotCounted:
    """Stands in for a counter where none is kept (the siblings' private socket)."""

    def inc(self, amount: float = 1) -> None:
        pass


_NOT_COUNTED = _NotCounted()
