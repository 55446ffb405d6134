"""HTTP API handlers: submit, health, metrics.  Every answer is JSON (metrics aside)."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import HttpVersion11 as HTTP11
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from .config import DEFAULT_QUEUE, Config
from .index import LISTED
from .jobs import JobError, Submission, TooMany, parse_submission
from .lifecycle import ThrottledLog
from .metrics import CONTENT_TYPE
from .redact import one_line
from .service import (
    Accepted,
    Draining,
    Jobs,
    NotAdmitted,
    NotCancellable,
    NotDurable,
    NotReplayable,
    QueueFull,
    Relayed,
    Unfinished,
    UnknownJob,
)

log = logging.getLogger("bwp.api")
MAX_LIST = 1000  # dead letters per page
MAX_GZIP_MEMBERS = 64  # concatenated gzip members in one body (RFC 1952 allows several)
MAX_PEER_LIST = 1_000_000  # a sibling merging pages asks for everything up to its offset
RETRY_AFTER_FULL = "1"
RETRY_AFTER_DRAINING = "1"
_JSON = "application/json"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_FORMS = frozenset(("application/x-www-form-urlencoded", "multipart/form-data"))


def malformed_request_line(record: logging.LogRecord) -> bool:
    """aiohttp logs every malformed request head at ERROR with a traceback, so a broken or
    hostile client could flood the log; the client got its 400, one INFO line is enough."""
    exc = record.exc_info[1] if record.exc_info else None
    if not isinstance(exc, HttpProcessingError):
        return True
    reason = " ".join(str(exc.message).split())[:200]
    record.msg, record.args = "%s: %s %s", (record.getMessage(), exc.code, reason)
    record.levelno = min(record.levelno, logging.INFO)
    record.levelname = logging.getLevelName(record.levelno)
    record.exc_info = record.exc_text = None
    return logging.getLogger(record.name).isEnabledFor(record.levelno)


def _error(status: int, message: str, **headers: str) -> web.Response:
    body = json.dumps({"success": False, "error": message}).encode()
    return web.Response(status=status, body=body, content_type=_JSON, headers=headers or None)


class TooLarge(Exception):
    """The body is over the limit once decompressed."""


def _decode_body(raw: bytes, encoding: str, limit: int) -> bytes:
    """Undo Content-Encoding without letting a small bomb expand past `limit`."""
    if encoding in ("", "identity"):
        return raw
    if encoding in ("gzip", "x-gzip"):
        wbits_options: tuple[int, ...] = (16 + zlib.MAX_WBITS,)
    elif encoding == "deflate":
        wbits_options = (zlib.MAX_WBITS, -zlib.MAX_WBITS)  # zlib-wrapped, or raw as some send
    else:
        raise JobError(f"unsupported Content-Encoding {encoding!r} (gzip or deflate)")
    for wbits in wbits_options:
        try:
            return _inflate(raw, wbits, limit, encoding)
        except zlib.error:
            continue
    raise JobError(f"invalid {encoding} body")


def _inflate(data: bytes, wbits: int, limit: int, encoding: str) -> bytes:
    """Every gzip member in turn (RFC 1952: a file may hold several, concatenated); for
    deflate, one stream and nothing after it."""
    parts: list[bytes] = []
    room = limit
    while True:
        if len(parts) == MAX_GZIP_MEMBERS:  # each member copies what follows it: keep it short
            raise JobError(f"more than {MAX_GZIP_MEMBERS} {encoding} members")
        d = zlib.decompressobj(wbits)
        out = d.decompress(data, room + 1)
        if len(out) > room or d.unconsumed_tail:
            raise TooLarge()
        if not d.eof:
            raise JobError(f"truncated {encoding} body")
        parts.append(out)
        room -= len(out)
        data = d.unused_data
        if not data:
            return b"".join(parts) if len(parts) > 1 else out
        if wbits != 16 + zlib.MAX_WBITS:
            raise JobError(f"{len(data)} bytes after the end of the {encoding} body")


def _unavailable(e: QueueFull | Draining) -> web.Response:
    """503 with Retry-After: no room for the whole batch, or this process is stopping."""
    if isinstance(e, QueueFull):
        return _error(503, str(e), **{"Retry-After": RETRY_AFTER_FULL})
    return _error(503, "bwp is shutting down", **{"Retry-After": RETRY_AFTER_DRAINING})


def _not_durable(e: NotDurable) -> web.Response:
    # They are queued in memory and will run: say so, a blind resubmit would duplicate them.
    return web.json_response({"success": False, "error": f"{e}: the jobs are queued but "
                              "would not survive a crash", "ids": e.ids},
                             status=503, headers={"Retry-After": RETRY_AFTER_FULL})


def _not_admitted(e: NotAdmitted) -> web.Response:
    """Never a silent partial batch: what the broker took runs, the rest did not get in."""
    return web.json_response({"success": False, "error": f"{e}: nothing of this request is "
                              "queued but the jobs under 'ids'", "ids": [j.id for j in e.admitted],
                              "refused": [j.id for j in e.refused]},
                             status=503, headers={"Retry-After": RETRY_AFTER_FULL})


def _relayed(answer: Relayed) -> web.Response:
    return web.Response(status=answer.status, body=answer.body, content_type=_JSON)


def _unknown_job() -> web.Response:
    return _error(404, "unknown job id (never submitted, or older than the history)")


def _accepted(ids: list[str], duplicates: list[str]) -> bytes:
    """The usual answer, formatted directly (json.dumps took ~5% of a submit's CPU) unless there
    are duplicates to report or an id the client chose needs escaping."""
    if duplicates:
        return json.dumps({"success": True, "ids": ids, "duplicates": duplicates}).encode()
    for i in ids:
        if not (i.isascii() and i.isprintable()) or '"' in i or "\\" in i:
            return json.dumps({"success": True, "ids": ids}).encode()
    return ('{"success":true,"ids":["' + '","'.join(ids) + '"]}').encode() if ids \
        else b'{"success":true,"ids":[]}'


def _faulty_framing() -> web.Response:
    """RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 request is faulty framing; where the
    body ends is unknowable, so the connection is closed after the answer."""
    response = _error(400, "Transfer-Encoding is not allowed in an HTTP/1.0 request")
    response.force_close()
    return response


def _unauthorized() -> web.Response:
    return _error(401, "missing or invalid bearer token", **{"WWW-Authenticate": "Bearer"})


class Rejected(Exception):
    """A submit refused: its answer, and what to count (reason, jobs) and log."""

    def __init__(self, reason: str, response: web.Response, jobs: int = 1):
        super().__init__(reason)
        self.reason, self.response, self.jobs = reason, response, jobs

    @property
    def message(self) -> str:
        body = self.response.body
        try:
            return str(json.loads(body)["error"]) if isinstance(body, bytes) else ""
        except (ValueError, KeyError, TypeError):
            return ""


class Api:
    def __init__(self, cfg: Config, jobs: Jobs, new_id: Callable[[], str],
                 for_peers: bool = False):
        # for_peers: on the private socket that answers sibling processes (bwp/peers.py)
        self.cfg, self.jobs, self.new_id = cfg, jobs, new_id
        self.metrics = jobs.metrics
        self.for_peers = for_peers
        self.max_list = MAX_PEER_LIST if for_peers else MAX_LIST
        self.queue_names = frozenset(cfg.all_queues)
        self.limits = cfg.limits
        self.max_body = cfg.limits.max_body_size
        self.tokens = [t.encode() for t in cfg.auth.tokens]
        self.pid = os.getpid()
        # a flood of bad requests must not fill the disk
        self.rejections = ThrottledLog(log, logging.INFO)
        self.stopping = False  # listeners closed: health checks should look elsewhere

    def app(self) -> web.Application:
        # aiohttp enforces client_max_size on read(); we turn its 413 into our JSON one.
        # We decompress ourselves: aiohttp would answer an unknown encoding in plain text.
        # Its parser refuses an oversized request head itself (400/431, plain text).
        # keepalive_timeout closes idle connections; the listeners' ConnectionTable
        # (bwp/connections.py) caps them and closes one whose request head is late.
        lim = self.limits
        logging.getLogger("aiohttp.server").addFilter(malformed_request_line)  # once per process
        app = web.Application(client_max_size=self.max_body, handler_args={
            "access_log": None, "auto_decompress": False,
            "keepalive_timeout": lim.keepalive_timeout, "max_line_size": lim.max_request_line,
            "max_field_size": lim.max_request_header_size, "max_headers": lim.max_request_headers,
        })
        timed = self._timed
        app.router.add_post("/post/http", timed("submit", self.post_http))
        app.router.add_get("/jobs", timed("jobs", self.list_jobs))
        app.router.add_get("/jobs/{id}", timed("job", self.get_job))
        app.router.add_post("/jobs/{id}/retry", timed("retry", self.retry_job))
        app.router.add_delete("/jobs/{id}", timed("cancel", self.cancel_job))
        app.router.add_get("/healthz", timed("healthz", self.healthz))
        app.router.add_get("/metrics", timed("metrics", self.metrics_page))
        self._routes = list(app.router.resources())
        # last: only what nothing else matched
        app.router.add_route("*", "/{path:.*}", timed("other", self.no_route))
        return app

    def _timed(self, endpoint: str, handler: Handler) -> Handler:
        """`handler`, counted and timed per endpoint (bwp_api_* metrics)."""
        observe = self.metrics.hot.observe_api

        async def timed(request: web.Request) -> web.StreamResponse:
            start = time.perf_counter()
            status = 500
            try:
                response = await handler(request)
                status = response.status
                return response
            except web.HTTPException as e:
                status = e.status
                raise
            finally:
                observe(endpoint, status, time.perf_counter() - start)

        return timed

    async def no_route(self, request: web.Request) -> web.Response:
        """404 for an unknown path, 405 (with Allow) for a known one: JSON like every answer."""
        allowed: set[str] = set()
        for resource in self._routes:
            allowed |= (await resource.resolve(request))[1]
        if allowed:
            return _error(405, f"{request.method} is not allowed on {request.path[:100]} "
                          f"(allowed: {', '.join(sorted(allowed))})", Allow=",".join(sorted(allowed)))
        return _error(404, f"no such endpoint: {request.path[:100]}")

    def _authorized(self, request: web.Request) -> bool:
        if not self.tokens:
            return True
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        given = token.strip().encode()
        # compare against every token (constant time each) so timing reveals nothing
        return sum(hmac.compare_digest(given, t) for t in self.tokens) > 0

    async def post_http(self, request: web.Request) -> web.Response:
        try:
            self._admission(request)
            raw, sub = await self._submission(request)
            return await self._submit(request, raw, sub)
        except Rejected as r:
            self.metrics.rejected_by[r.reason].inc(r.jobs)
            self.rejections(r.reason, "submit from %s refused (%s): %s",
                            request.remote or "unix socket", r.reason, one_line(r.message[:300]))
            return r.response

    def _admission(self, request: web.Request) -> None:
        """What refuses a submit before its body is read."""
        if not self._authorized(request):
            raise Rejected("unauthorized", _unauthorized())
        if self.jobs.draining:
            raise Rejected("draining", _unavailable(Draining()))
        if self.jobs.full():
            # under overload, parsing what cannot be admitted would starve the workers
            raise Rejected("queue_full", _unavailable(self.jobs.everything_full()))
        if request.version < HTTP11 and "Transfer-Encoding" in request.headers:
            raise Rejected("invalid", _faulty_framing())

    async def _submission(self, request: web.Request) -> tuple[bytes, Submission]:
        """The body, read within limits.read_timeout, decoded and parsed (or Rejected)."""
        try:
            if request.content.is_eof():  # the whole body came with the head: nothing to wait for
                raw = await request.read()
            else:
                async with asyncio.timeout(self.limits.read_timeout):
                    raw = await request.read()
            raw = _decode_body(raw, request.headers.get("Content-Encoding", "").strip().lower(),
                               self.max_body)
            return raw, parse_submission(raw, self.queue_names, DEFAULT_QUEUE, self.new_id,
                                         self.limits)
        except TimeoutError:
            response = _error(408, f"request body not received within {self.limits.read_timeout:g}s "
                                   "(limits.read_timeout)")
            # Answer, then drop the connection: aiohttp would otherwise linger, reading the
            # rest of the trickled body for up to 10 more seconds.
            response.force_close()
            await response.prepare(request)
            await response.write_eof()
            if request.protocol is not None:
                request.protocol.force_close()
            raise Rejected("timeout", response) from None
        except (web.HTTPRequestEntityTooLarge, TooLarge):
            raise Rejected("too_large", _error(
                413, f"request body over {self.max_body} bytes (limits.max_body_size)")) from None
        except TooMany as e:
            raise Rejected("too_large", _error(413, str(e))) from None
        except RequestPayloadError as e:  # e.g. a malformed chunked body
            raise Rejected("invalid", _error(
                400, "cannot read the request body: " + " ".join(str(e).split()))) from None
        except JobError as e:
            message = str(e)
            if message.startswith("malformed JSON") and request.content_type in _FORMS:
                # curl's default type for a string posted with CURLOPT_POSTFIELDS is the form
                # type, so a JSON body labelled so is fine: this one is a real form
                message += ("; the body must be JSON (a job object or an array of them), "
                            f"not {request.content_type} form fields")
            raise Rejected("invalid", _error(400, message)) from None

    async def _submit(self, request: web.Request, raw: bytes, sub: Submission) -> web.Response:
        try:
            accepted = await self.jobs.submit(sub, raw, request.headers)
        except (QueueFull, Draining) as e:
            raise Rejected("queue_full" if isinstance(e, QueueFull) else "draining",
                           _unavailable(e), len(sub.jobs)) from None
        except TooMany as e:  # more bytes than the queues may ever hold
            raise Rejected("too_large", _error(413, str(e))) from None
        except NotDurable as e:
            return _not_durable(e)
        except NotAdmitted as e:
            self.metrics.rejected_by["unavailable"].inc(len(e.refused))
            return _not_admitted(e)
        if isinstance(accepted, Relayed):
            return _relayed(accepted)
        if sub.wait is not None and accepted.jobs:
            return await self._wait(accepted, sub.wait)
        return web.Response(body=_accepted(accepted.ids, accepted.duplicates),
                            content_type=_JSON)

    async def _wait(self, accepted: Accepted, timeout: float) -> web.Response:
        """Request-reply: hold the answer until every job has finished, or 504."""
        ids = accepted.ids
        try:
            results = await self.jobs.wait(accepted, timeout)
        except Unfinished as e:
            body = {"success": False, "error": f"{e} (they go on)", "ids": ids,
                    "pending": e.pending}
            return web.Response(status=504, body=json.dumps(body).encode(), content_type=_JSON)
        answer: dict[str, Any] = {"success": True, "ids": ids}
        if accepted.duplicates:
            answer["duplicates"] = accepted.duplicates
        answer["results"] = results
        return web.Response(body=json.dumps(answer).encode(), content_type=_JSON)

    async def get_job(self, request: web.Request) -> web.Response:
        return await self._job_document(request, self.jobs.status)

    async def cancel_job(self, request: web.Request) -> web.Response:
        return await self._job_document(request, self.jobs.cancel)

    async def _job_document(self, request: web.Request, call: Callable[
            [str, Mapping[str, str]], Awaitable[dict[str, Any] | Relayed]]) -> web.Response:
        """GET or DELETE /jobs/{id}: the job's status document (a sibling's, passed on)."""
        if not self._authorized(request):
            return _unauthorized()
        try:
            doc = await call(request.match_info["id"], request.headers)
        except UnknownJob:
            return _unknown_job()
        except NotCancellable as e:
            return _error(409, str(e))
        if isinstance(doc, Relayed):
            return _relayed(doc)
        return web.Response(body=json.dumps(doc).encode(), content_type=_JSON)

    async def list_jobs(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _unauthorized()
        q = request.query
        state, queue = q.get("state", "failed"), q.get("queue")
        if state not in LISTED:
            return _error(400, f"state must be one of {', '.join(LISTED)}")
        if queue is not None and queue not in self.queue_names:
            return _error(400, f"unknown queue {one_line(queue[:100])!r}")
        try:
            limit = int(q.get("limit", "100"))
            offset = int(q.get("offset", "0"))
        except ValueError:
            return _error(400, "limit and offset must be integers")
        if not 1 <= limit <= self.max_list or offset < 0:
            return _error(400, f"limit must be 1-{self.max_list} and offset >= 0")
        # a sibling asks for this process's own jobs: a broker's, every process lists alike
        shared = not (self.for_peers and q.get("scope") == "local")
        jobs, total = await self.jobs.jobs_page(state, queue, offset, limit, request.headers,
                                                shared)
        body = {"jobs": jobs, "total": total, "offset": offset, "limit": limit}
        return web.Response(body=json.dumps(body).encode(), content_type=_JSON)

    async def retry_job(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _unauthorized()
        try:
            replayed = await self.jobs.replay(request.match_info["id"], request.headers)
        except UnknownJob:
            return _unknown_job()
        except NotReplayable as e:
            return _error(409, str(e))
        except (QueueFull, Draining) as e:
            return _unavailable(e)
        except TooMany as e:
            return _error(413, str(e))
        except NotDurable as e:
            return _not_durable(e)
        except NotAdmitted as e:
            return _not_admitted(e)
        if isinstance(replayed, Relayed):
            return _relayed(replayed)
        return web.Response(body=_accepted([replayed], []), content_type=_JSON)

    async def healthz(self, request: web.Request) -> web.Response:
        draining = self.stopping or self.jobs.draining
        status, state = (503, "draining") if draining else (200, "ok")
        body = json.dumps({"status": state, "pid": self.pid}).encode()
        return web.Response(status=status, body=body, content_type=_JSON)

    async def metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(body=await self.jobs.metrics_page(),
                            headers={"Content-Type": CONTENT_TYPE})
