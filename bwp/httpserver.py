"""The API's HTTP/1.1 server: llhttp (httptools) parsing on an asyncio Protocol.

Why our own and not aiohttp's web server: it was most of a submit's CPU (docs/performance.md,
"The API server").  What it must be, being public: at least as strict as aiohttp's.  llhttp in
its strict mode (httptools' only mode) refuses the smuggling vectors itself: Content-Length
with Transfer-Encoding in either order, a repeated or signed Content-Length, obs-fold, a bare
LF, a Transfer-Encoding that does not end in `chunked` (`xchunked`), control characters in
field values.  On top of it this module refuses an HTTP version other than 1.0/1.1 (505),
Transfer-Encoding in an HTTP/1.0 request, an HTTP/1.1 request with no Host or two, a repeat
of a header that must be single, an unknown Expect (417), and enforces every `limits:` key
of the request head (414/431) and body (413), the head's deadline (header_timeout) and the
idle deadline (keepalive_timeout).  Every refusal is a JSON answer, then the connection closes.

Requests on one connection are answered in order (pipelining): a head's handler starts once
the head is in; the ones behind it wait, and reading pauses while MAX_PIPELINED do, or while
the client does not read our answers.  A response written before its request's body was read
whole (a 401, a 413) closes the connection after a lingering close, so the client reads it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.utils
import json
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import httptools

from .lifecycle import ThrottledLog
from .outbox import Outbox

if TYPE_CHECKING:
    from .config import LimitsConfig
    from .connections import ConnectionTable

log = logging.getLogger("bwp.http")
JSON = "application/json"
MAX_PIPELINED = 8  # requests parsed ahead of the one being answered before reading pauses
LINGER = 2.0  # seconds an answered connection keeps reading (and dropping) what still comes
# a repeat of these makes the request ambiguous (which token? which body type?): 400
SINGLE = frozenset(("host", "authorization", "content-type", "content-encoding", "expect"))
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}
# the parser's own lookups use lower-case names: dict's, without Headers' case folding
_get = dict.get
# header names as most clients spell them, folded once here rather than for every request
_NAMES = {spelt.encode(): spelt.lower() for name in (
    "Host", "User-Agent", "Accept", "Accept-Encoding", "Authorization", "Connection",
    "Content-Type", "Content-Length", "Content-Encoding", "Expect", "Transfer-Encoding",
    "Keep-Alive", "X-Forwarded-For", "X-Request-Id") for spelt in (name, name.lower())}
_JSON_ANSWER = b"%s%sContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"


class Headers(dict[str, str]):
    """A request's headers by lower-case name; lookups take any case.  A repeated header is
    one value, joined with ", " (RFC 9110 §5.3)."""

    __slots__ = ()

    def __getitem__(self, name: str) -> str:
        return dict.__getitem__(self, name.lower())

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return dict.get(self, name.lower(), default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and dict.__contains__(self, name.lower())


class BodyTooLarge(Exception):
    """The body is over limits.max_body_size as sent (before any decompression)."""


class BodyError(Exception):
    """The body's framing is broken (a malformed chunk)."""


class Request:
    """One parsed request head; its body comes through `read()`."""

    __slots__ = ("_body", "_error", "_waiter", "answer", "complete", "expect_continue", "headers",
                 "keep_alive", "method", "params", "path", "query_string", "remote", "size",
                 "version")

    def __init__(self, method: str, target: bytes, version: str, headers: Headers,
                 keep_alive: bool, remote: str):
        self.method, self.version, self.headers = method, version, headers
        self.keep_alive, self.remote = keep_alive, remote
        if target[:1] != b"/" and b"://" in target[:10]:  # absolute-form (RFC 9112 §3.2.2)
            target = b"/" + target.partition(b"://")[2].partition(b"/")[2]
        path, _, query = target.partition(b"#")[0].partition(b"?")
        self.path = path.decode("latin-1")  # still percent-encoded: segments are decoded apart
        self.query_string = query.decode("latin-1")
        self.params: tuple[str, ...] = ()  # what the route matched (a job id)
        self.expect_continue: Callable[[], None] | None = None  # sends 100 Continue
        self.answer: Response | None = None  # set for a head refused before any handler
        self.complete = False
        self.size = 0
        self._body: list[bytes] = []
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").partition(";")[0].strip().lower()

    @property
    def query(self) -> dict[str, str]:
        """The query's parameters, the first of each name (as aiohttp's MultiDict.get)."""
        out: dict[str, str] = {}
        for name, value in urllib.parse.parse_qsl(self.query_string, keep_blank_values=True):
            out.setdefault(name, value)
        return out

    def is_eof(self) -> bool:
        """The whole body is in (or reading it failed): read() will not wait."""
        return self.complete or self._error is not None

    async def read(self) -> bytes:
        """The whole body; BodyTooLarge or BodyError when it cannot be had."""
        if not self.is_eof():
            if self._waiter is None:
                self._waiter = asyncio.get_running_loop().create_future()
                if self.expect_continue is not None:
                    self.expect_continue()
            await self._waiter
        return self.body()

    def body(self) -> bytes:
        """The whole body, once is_eof(): read() without the wait."""
        if self._error is not None:
            raise self._error
        body = self._body
        return body[0] if len(body) == 1 else b"".join(body)

    def _feed(self, data: bytes, limit: int) -> None:
        if self._error is not None:
            return
        self.size += len(data)
        if self.size > limit:
            self._body = []
            self._fail(BodyTooLarge())
        else:
            self._body.append(data)

    def _fail(self, error: Exception) -> None:
        if self._error is None and not self.complete:
            self._error = error
            self._wake()

    def _done(self) -> None:
        self.complete = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class Response:
    __slots__ = ("body", "close", "content_type", "headers", "status")

    def __init__(self, body: bytes = b"", status: int = 200, content_type: str | None = JSON,
                 headers: dict[str, str] | None = None, close: bool = False):
        self.body, self.status, self.content_type = body, status, content_type
        self.headers, self.close = headers, close


def json_response(doc: Any, status: int = 200, headers: dict[str, str] | None = None,
                  close: bool = False) -> Response:
    return Response(json.dumps(doc).encode(), status, headers=headers, close=close)


def error(status: int, message: str, headers: dict[str, str] | None = None,
          close: bool = False) -> Response:
    """The JSON error answer every refusal gets."""
    return json_response({"success": False, "error": message}, status, headers, close)


class _Refused(Exception):
    """A request head this server will not take: its answer, then the connection closes."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _Date:
    """The Date header, formatted once a second."""

    __slots__ = ("line", "second")

    def __init__(self) -> None:
        self.second, self.line = -1, b""

    def __call__(self) -> bytes:
        now = int(time.time())
        if now != self.second:
            self.second = now
            self.line = b"Date: " + email.utils.formatdate(now, usegmt=True).encode() + b"\r\n"
        return self.line


Handler = Callable[[Request], Awaitable[Response]]


class HttpServer:
    """The protocol factory of a set of listeners: one HttpConnection per accepted socket."""

    def __init__(self, handler: Handler, limits: LimitsConfig, table: ConnectionTable):
        self.handler, self.limits, self.table = handler, limits, table
        self.max_body = limits.max_body_size
        self.max_headers, self.max_header_size = (limits.max_request_headers,
                                                  limits.max_request_header_size)
        # the most a head may take before it is refused: the line and every field at their limit
        self.max_head = (limits.max_request_line + 16
                         + limits.max_request_headers * (limits.max_request_header_size + 4))
        # what one read may add to a header still coming before it is refused
        self.max_field = limits.max_request_line + limits.max_request_header_size + 64 * 1024
        self.loop = asyncio.get_running_loop()
        self.date = _Date()
        self.closing = False
        self.refusals = ThrottledLog(log, logging.INFO)  # a flood of bad heads: not of log lines
        self._all_closed: asyncio.Future[None] | None = None
        self.outbox = Outbox()  # answers go out together (bwp/outbox.py)

    def __call__(self) -> HttpConnection:
        return HttpConnection(self)

    def lost(self) -> None:
        if self._all_closed is not None and not self.table.conns and not self._all_closed.done():
            self._all_closed.set_result(None)

    async def shutdown(self, timeout: float) -> None:
        """Close every connection: the idle at once, the others after answering what they
        already received (heads still arriving may finish); past `timeout`, whatever is left."""
        self.closing = True
        for conn in list(self.table.conns):
            conn.close_when_idle()
        if self.table.conns:
            self._all_closed = self.loop.create_future()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._all_closed
        for conn in list(self.table.conns):
            conn.abort()


class HttpConnection(asyncio.Protocol):
    """One client connection: its parser, the requests parsed and not yet answered, and the one
    deadline it is waiting on (a head's, or the idle one's)."""

    def __init__(self, server: HttpServer):
        self.server = server
        self.table = server.table
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.remote = ""
        self.pipeline: collections.deque[Request] = collections.deque()  # [0] is being answered
        self.busy = False  # a handler runs for pipeline[0]
        # the connection's handler task (_answer): running, or waiting for the next request
        self.answering = False
        self.handed: asyncio.Future[Request | None] | None = None
        self.up_next: Request | None = None
        self.in_head = False  # a head's first bytes came, its end not yet
        self.head_bytes = 0
        self.field_bytes = 0  # head bytes since the last whole header
        self.header_seen = False
        self.head_deadline: float | None = None  # loop time, for a head that did not come whole
        self.answered = 0
        self.idle_since = 0.0  # loop time of the last answer (or of connecting)
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.closing = False  # answer what was received, then close
        self.lingering = False  # answered and half-closed: what comes is dropped
        self.reading_paused = False
        self.writing_paused = False
        self.stalled_until = 0.0  # loop time: a client not reading our answers by then is dropped
        self.unsent: list[bytes] = []  # answers made, written by send_now (bwp/outbox.py)
        # the head being parsed
        self._url: list[bytes] = []
        self._url_size = 0
        self._headers = Headers()
        self._count = 0

    # ------------------------------------------------------------------ transport events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = transport  # type: ignore[assignment]
        if not self.table.admit(self):
            t.write(self.table.full_answer)  # type: ignore[attr-defined]
            t.close()
            self.transport = None
            return
        peer = t.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) else "unix socket"  # for the logs
        self.idle_since = now = self.server.loop.time()
        lim = self.server.limits
        self._arm(now + min(lim.header_timeout, lim.keepalive_timeout))
        if self.server.closing:
            self.close_when_idle()

    def data_received(self, data: bytes) -> None:
        if self.lingering or self.transport is None:
            return
        if not self.in_head:
            self.head_bytes = self.field_bytes = 0
        self.head_bytes += len(data)
        self.header_seen = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # no protocol switch here: what was asked is answered, what follows is not HTTP/1.1
            self._read_no_more()
        except httptools.HttpParserError as e:
            self._broken(e)
        if self.in_head:
            # a header is handed over whole when the next begins: meanwhile its bytes are
            # counted here, so one cannot grow past its limit (httptools joins it piecewise)
            self.field_bytes = len(data) if self.header_seen else self.field_bytes + len(data)
            if self.head_bytes > self.server.max_head or self.field_bytes > self.server.max_field:
                self._broken(_Refused(431, "request head too large (limits.max_request_headers"
                                           " and max_request_header_size)"))
            elif self.head_deadline is None:  # the head did not come whole: it is timed
                at = self.server.loop.time() + self.server.limits.header_timeout
                self.head_deadline = at
                if self.timer is None or self.timer_at > at:
                    self._arm(at)
        if not (self.busy or self.writing_paused) and self.pipeline:
            self._next()

    def eof_received(self) -> bool | None:
        if self.lingering or not (self.busy or self.pipeline):
            self.abort()
        else:  # half-closed by the client, which still waits for its answers: then close
            self.closing = True
            last = self.pipeline[-1] if self.pipeline else None
            if last is not None and not last.complete:
                last._fail(BodyError("the client closed the connection before the body's end"))
        return True

    def pause_writing(self) -> None:
        # the client does not read our answers: no more are made (each waits for the buffer
        # to drain), and one that never reads again is dropped after keepalive_timeout
        self.writing_paused = True
        self._pause_reading()
        self.stalled_until = at = self.server.loop.time() + self.server.limits.keepalive_timeout
        if self.timer is None or self.timer_at > at:
            self._arm(at)

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._maybe_resume_reading()
        if not self.busy and self.pipeline:
            self._next()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.unsent.clear()
        if self.handed is not None:  # the handler task ends
            handed, self.handed = self.handed, None
            handed.set_result(None)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for request in self.pipeline:
            request._fail(ConnectionResetError("the client closed the connection"))
        if self.table.conns.pop(self, 0) is None:
            self.server.lost()

    # ------------------------------------------------------------------ parser callbacks

    def on_message_begin(self) -> None:
        self.in_head = True
        self.head_deadline = None
        self._headers, self._count = Headers(), 0
        conns = self.table.conns  # a new request: the most recently active connection now
        if conns.pop(self, 0) is None:
            conns[self] = None

    def on_url(self, url: bytes) -> None:
        self._url_size += len(url)
        if self._url_size > self.server.limits.max_request_line:
            self._refuse(414, f"request target over {self.server.limits.max_request_line} bytes "
                              "(limits.max_request_line)")
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:
            return  # a chunked body's trailer: not a header of this request, nor of the next
        self.header_seen = True
        self._count = count = self._count + 1
        server = self.server
        if count > server.max_headers or len(name) + len(value) > server.max_header_size:
            self._too_many_or_too_large(count)
        key = _NAMES.get(name) or name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers = self._headers
        before = _get(headers, key)
        if before is not None:
            if key in SINGLE:
                self._refuse(400, f"more than one {name.decode('latin-1')} header")
            text = before + ", " + text
        headers[key] = text

    def _too_many_or_too_large(self, count: int) -> None:
        lim = self.server.limits
        if count > lim.max_request_headers:
            self._refuse(431, f"more than {lim.max_request_headers} request headers "
                              "(limits.max_request_headers)")
        self._refuse(431, f"a request header over {lim.max_request_header_size} bytes "
                          "(limits.max_request_header_size)")

    def on_headers_complete(self) -> None:
        parser = self.parser
        version = parser.get_http_version()
        url, self._url, self._url_size = self._url, [], 0
        headers = self._headers
        self.head_deadline = None
        coding = _get(headers, "transfer-encoding")
        length = _get(headers, "content-length")
        if version != "1.1":
            if version != "1.0":
                self._refuse(505, f"HTTP version {version} is not supported (1.1 and 1.0 are)")
            if coding is not None:
                # RFC 9112 §6.1: faulty framing; where the body ends is unknowable
                self._refuse(400, "Transfer-Encoding is not allowed in an HTTP/1.0 request")
        elif _get(headers, "host") is None:
            self._refuse(400, "an HTTP/1.1 request needs a Host header (RFC 9112 §3.2)")
        if (coding is not None or (length is not None and length != "0")) \
                and parser.should_upgrade():
            # llhttp reads no body past an Upgrade (it would be the new protocol's bytes), and
            # no protocol switch happens here: the body would be lost
            self._refuse(400, "a request body with Upgrade is not supported (send it without "
                              "the Upgrade header)")
        if coding is not None and "," in coding:
            # llhttp frames `gzip, chunked` as chunked, the gzip would be left on the body
            # (one not ending in chunked llhttp refuses itself: 400)
            self._refuse(501, f"Transfer-Encoding {coding[:100]!r} is not supported (chunked "
                              "is; compress with Content-Encoding)")
        request = Request(parser.get_method().decode(), url[0] if len(url) == 1 else b"".join(url),
                          version, headers, parser.should_keep_alive(), self.remote)
        expect = _get(headers, "expect")
        if expect is not None:
            if expect.lower() != "100-continue":
                self._refuse(417, f"Expect: {expect[:100]} is not supported (100-continue is)")
            if version == "1.1":
                request.expect_continue = self.send_continue
        if length is not None and int(length) > self.server.max_body:
            # refused before it is sent (and before a 100 Continue): its handler answers 413
            request._fail(BodyTooLarge())
            self._read_no_more()
        self.pipeline.append(request)
        self.in_head = False
        if len(self.pipeline) > MAX_PIPELINED:
            self._pause_reading()

    def on_body(self, body: bytes) -> None:
        request = self.pipeline[-1]
        request._feed(body, self.server.max_body)
        if request._error is not None:  # too large: nothing after it can be parsed as ours
            self._read_no_more()
            raise _Stop()

    def on_message_complete(self) -> None:
        self.pipeline[-1]._done()

    # ------------------------------------------------------------------ answering

    def _next(self) -> None:
        self.busy = True
        request = self.pipeline[0]
        if request.answer is not None:  # a head refused: no handler to run
            self.write(request, request.answer)
        elif self.answering:  # from the task's write of the answer before: it goes on to this
            self.up_next = request
        elif self.handed is not None:
            handed, self.handed = self.handed, None
            handed.set_result(request)
        else:
            self.server.loop.create_task(self._answer(request))

    async def _answer(self, request: Request | None) -> None:
        """The connection's handler task: it answers pipeline[0], then the next, and waits in
        between.  One task per connection, not per request: waking a task costs half of
        making one (and registering it with asyncio)."""
        handler, loop = self.server.handler, self.server.loop
        self.answering = True
        try:
            while request is not None:
                try:
                    response = await handler(request)
                except Exception as e:
                    if isinstance(e, ConnectionError) and self.transport is None:
                        self.busy = False  # the client went away while its body was awaited
                        return
                    log.exception("error answering %s %s", request.method, request.path[:200])
                    response = error(500, "internal error")
                self.write(request, response)  # which may hand over the next: up_next
                request, self.up_next = self.up_next, None
                if request is not None:
                    # pipelined: the others' turn first, and the answer's write (the client
                    # may not be reading: pause_writing stops the answers)
                    await asyncio.sleep(0)
                elif self.transport is not None:
                    self.answering = False
                    self.handed = handed = loop.create_future()
                    request = await handed  # from _next; None once the connection is lost
                    self.answering = True
        finally:
            self.answering = False
            self.handed = None

    def write(self, request: Request, response: Response) -> None:
        """The answer to pipeline[0], in one write; then the next request, idling or closing."""
        t = self.transport
        pipeline = self.pipeline
        if pipeline and pipeline[0] is request:
            pipeline.popleft()
        self.busy = False
        self.answered += 1
        if t is None:
            return
        body = response.body
        # the body not read whole: where the next request would begin is unknown
        unread = not request.complete
        close = (response.close or unread or not request.keep_alive
                 or (self.closing and not pipeline))
        status_line = _STATUS_LINES.get(response.status)
        if (status_line is not None and response.content_type == JSON and not response.headers
                and not close and request.version == "1.1" and request.method != "HEAD"):
            # most answers: one format, not a list of parts
            self._send(_JSON_ANSWER % (status_line, self.server.date(), len(body), body))
        else:
            self._send(self._head(request, response, status_line, close)
                       + (b"" if request.method == "HEAD" else body))
        if close:
            self._close(linger=unread)
        elif pipeline:
            self._maybe_resume_reading()
            if not self.writing_paused:  # else resume_writing goes on
                self._next()
        else:
            self.idle_since = self.server.loop.time()
            if self.timer is None:
                self._arm(self.idle_since + self.server.limits.keepalive_timeout)
            if self.closing:
                self._close()
            else:
                self._maybe_resume_reading()

    def _head(self, request: Request, response: Response, status_line: bytes | None,
              close: bool) -> bytes:
        parts = [status_line or b"HTTP/1.1 %d Unknown\r\n" % response.status, self.server.date()]
        if response.content_type:
            parts.append(b"Content-Type: " + response.content_type.encode() + b"\r\n")
        if response.headers:
            parts += [f"{k}: {v}\r\n".encode("latin-1") for k, v in response.headers.items()]
        parts.append(b"Content-Length: %d\r\n" % len(response.body))
        if close:
            parts.append(b"Connection: close\r\n")
        elif request.version == "1.0":
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def send_continue(self) -> None:
        """The client waits for this before sending the body (curl: bodies over 1 KiB)."""
        if self.transport is not None and not self.closing:
            self._send(_CONTINUE)

    def _send(self, data: bytes) -> None:
        unsent = self.unsent
        unsent.append(data)  # first: adding may write the burst, this connection's included
        if len(unsent) == 1:
            self.server.outbox.add(self)

    def send_now(self) -> None:
        """Write what was answered: with the others (Outbox), or before a close."""
        unsent = self.unsent
        if unsent and self.transport is not None:
            self.transport.write(unsent[0] if len(unsent) == 1 else b"".join(unsent))
        unsent.clear()

    # ------------------------------------------------------------------ refusing and closing

    def _refuse(self, status: int, message: str) -> None:
        raise _Refused(status, message)  # out of the parser: HttpParserCallbackError

    def _broken(self, e: Exception) -> None:
        """The parser (or a limit) refused the bytes: nothing after them is read.  A body
        gone wrong fails its request's read(); a head gone wrong is answered in its turn,
        after the requests before it, and the connection closes."""
        in_head, self.in_head = self.in_head, False
        self._read_no_more()
        cause = e.__context__ if isinstance(e, httptools.HttpParserCallbackError) else e
        if isinstance(cause, _Stop):
            return  # a body too large: its handler answers 413
        if isinstance(cause, _Refused):
            refusal = cause
        elif isinstance(cause, httptools.HttpParserInvalidMethodError):
            refusal = _Refused(400, "invalid request method")
        else:
            refusal = _Refused(400, " ".join(str(cause).split())[:200] or type(cause).__name__)
        pending = self.pipeline[-1] if self.pipeline else None
        if not in_head and pending is not None and not pending.complete:
            pending._fail(BodyError(str(refusal)))  # its head was fine: a malformed chunk
            return
        self.server.refusals(str(refusal.status), "refused a request from %s: %d %s",
                             self.remote, refusal.status, refusal)
        stand_in = Request("GET", b"", "1.1", Headers(), False, self.remote)
        stand_in.answer = error(refusal.status, str(refusal), close=True)
        self.pipeline.append(stand_in)

    def close_when_idle(self) -> None:
        """Stopping: close now if nothing is under way, else after answering what came."""
        self.closing = True
        if self.transport is None:
            return
        if not (self.busy or self.pipeline or self.in_head):
            self._close()

    def _close(self, linger: bool = False) -> None:
        t = self.transport
        if t is None:
            return
        self.send_now()
        if linger and t.can_write_eof():
            # closing with unread bytes in the socket would reset the connection, and the
            # client could lose the answer before reading it: half-close, drop what comes
            self.lingering = True
            t.write_eof()
            self._maybe_resume_reading(force=True)
            self._arm(self.server.loop.time() + LINGER)
            return
        t.close()

    def abort(self) -> None:
        """Closed now, whatever is unsent: a client that does not read must not keep its fd
        (the table counts it gone)."""
        if self.transport is not None:
            self.send_now()  # a half-closed client's answers: made, they go before the close
            self.transport.abort()

    @property
    def waiting(self) -> bool:
        """Waiting for a request (nothing under way; a head begun but unfinished counts)."""
        return self.transport is not None and not (self.busy or self.pipeline or self.lingering)

    # ------------------------------------------------------------------ deadlines and flow

    def _arm(self, at: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer_at = at
        self.timer = self.server.loop.call_at(at, self._deadline)

    def _deadline(self) -> None:
        self.timer = None
        if self.transport is None:
            return
        now = self.server.loop.time()
        if self.lingering:
            self.abort()
            return
        if self.writing_paused:
            if now >= self.stalled_until:
                self.abort()
            else:
                self._arm(self.stalled_until)
            return
        if self.busy or self.pipeline:
            return  # re-armed when the connection idles again
        lim = self.server.limits
        idle_at = self.idle_since + lim.keepalive_timeout
        head_at = self.head_deadline if self.head_deadline is not None else (
            self.idle_since + lim.header_timeout if not self.answered else idle_at)
        at = min(idle_at, head_at)
        if now < at:
            self._arm(at)
            return
        if head_at <= idle_at:
            self.table.head_timeouts.inc()
            log.debug("closing %s: no complete request head within %gs (limits.header_timeout)",
                      self.remote, lim.header_timeout)
        self.abort()

    def _read_no_more(self) -> None:
        """Nothing after what was parsed is read: answer what came, then close."""
        self.closing = True
        self._pause_reading()

    def _pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def _maybe_resume_reading(self, force: bool = False) -> None:
        if not self.reading_paused or self.transport is None:
            return
        if force or not (self.writing_paused or self.closing or len(self.pipeline) > MAX_PIPELINED):
            self.reading_paused = False
            self.transport.resume_reading()


class _Stop(Exception):
    """Raised from on_body to stop parsing a body over the limit."""
