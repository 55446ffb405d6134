"""HTTP API handlers: submit, health, metrics.  Every answer is JSON (metrics aside)."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import HttpVersion11 as HTTP11
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from prometheus_client import generate_latest

from .config import DEFAULT_QUEUE, Config
from .history import History
from .jobs import FINISHED, Job, JobError, Submission, TooMany, parse_submission
from .lifecycle import ThrottledLog
from .metrics import CONTENT_TYPE, Metrics
from .peers import FORWARD_TIMEOUT, MergedMetrics, Peers, merge_job_pages
from .pool import Draining, NotReplayable, Pool, QueueFull, StoreError
from .redact import one_line

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


async def _durability(durable: Awaitable[None], jobs: list[Job]) -> web.Response | None:
    """Wait until the store has the jobs on disk; an error answer when it could not."""
    try:
        await durable
    except StoreError as e:
        # They are queued in memory and will run: say so, a blind resubmit would duplicate them.
        return web.json_response({"success": False, "error": f"{e}: the jobs are queued but "
                                  "would not survive a crash", "ids": [j.id for j in jobs]},
                                 status=503, headers={"Retry-After": RETRY_AFTER_FULL})
    return None


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


def _passed_on(request: web.Request, content_type: str | None = None) -> dict[str, str]:
    """The headers a sibling needs to answer a request made to us."""
    headers = {"Content-Type": content_type} if content_type else {}
    if "Authorization" in request.headers:
        headers["Authorization"] = request.headers["Authorization"]
    return headers


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
    def __init__(self, cfg: Config, pool: Pool, history: History, metrics: Metrics,
                 new_id: Callable[[], str], peers: Peers | None = None, for_peers: bool = False):
        self.cfg, self.pool, self.history = cfg, pool, history
        self.metrics, self.new_id = metrics, new_id
        # Sibling processes to consult; none on the private socket that answers them.
        self.peers = peers
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
        if self.pool.draining:
            raise Rejected("draining", _unavailable(Draining()))
        if self.pool.full():
            # under overload, parsing what cannot be admitted would starve the workers
            raise Rejected("queue_full", _unavailable(self.pool.everything_full()))
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
        if self.peers is not None and (owner := self._owner(sub.jobs)) is not None:
            answer = await self.peers.ask(owner, "POST", "/post/http", _passed_on(request, _JSON),
                                          raw, FORWARD_TIMEOUT)
            if answer is not None:
                return web.Response(status=answer[0], body=answer[1], content_type=_JSON)
            # its owner is restarting: better a job whose duplicate check was local than none
        try:
            jobs, duplicates, durable = self.pool.submit(sub.jobs)
        except (QueueFull, Draining) as e:
            raise Rejected("queue_full" if isinstance(e, QueueFull) else "draining",
                           _unavailable(e), len(sub.jobs)) from None
        except TooMany as e:  # more bytes than the queues may ever hold
            raise Rejected("too_large", _error(413, str(e))) from None
        if durable is not None and (failed := await _durability(durable, jobs)):
            return failed
        ids = [j.id for j in jobs]
        if sub.wait is not None and jobs:
            answer: dict[str, Any] = {"success": True, "ids": ids}
            if duplicates:
                answer["duplicates"] = duplicates
            return await self._wait(jobs, sub.wait, answer)
        return web.Response(body=_accepted(ids, duplicates), content_type=_JSON)

    async def _wait(self, jobs: list[Job], timeout: float, answer: dict[str, Any]) -> web.Response:
        """Request-reply: hold the answer until every job has finished, or 504."""
        loop = asyncio.get_running_loop()
        futures = []
        for job in jobs:
            if job.state not in FINISHED:
                fut = loop.create_future()
                job.waiters = [*(job.waiters or ()), fut]
                futures.append(fut)
        if futures:
            _, pending = await asyncio.wait(futures, timeout=timeout)
            for fut in pending:
                fut.cancel()
            # not finished: the time ran out, or the job went to the process replacing us
            unfinished = [j.id for j in jobs if j.state not in FINISHED]
            if unfinished:
                why = (f"jobs not finished within {timeout:g}s" if pending else
                       "jobs handed to the process replacing this one before they finished")
                body = {"success": False, "error": f"{why} (they go on)", "ids": answer["ids"],
                        "pending": unfinished}
                return web.Response(status=504, body=json.dumps(body).encode(), content_type=_JSON)
        answer["results"] = [self.history.describe(j) for j in jobs]
        return web.Response(body=json.dumps(answer).encode(), content_type=_JSON)

    def _owner(self, jobs: list[Job]) -> int | None:
        """The sibling that decides about the batch's first unique/once id, if not us."""
        assert self.peers is not None
        for job in jobs:
            if job.unique or job.once:
                owner = self.peers.owner(job.id)
                return None if owner == self.peers.index else owner
        return None

    async def get_job(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _unauthorized()
        job = self.history.get(request.match_info["id"])
        if job is None and self.peers is not None:
            for status, body in await self.peers.ask_others("GET", request.path_qs,
                                                            _passed_on(request)):
                if status == 200:
                    return web.Response(body=body, content_type=_JSON)
        if job is None:
            return _error(404, "unknown job id (never submitted, or older than the history)")
        return web.Response(body=json.dumps(self.history.describe(job)).encode(), content_type=_JSON)

    async def list_jobs(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _unauthorized()
        q = request.query
        if q.get("state", "failed") != "failed":
            return _error(400, "only state=failed (dead letters) can be listed")
        try:
            limit = int(q.get("limit", "100"))
            offset = int(q.get("offset", "0"))
        except ValueError:
            return _error(400, "limit and offset must be integers")
        if not 1 <= limit <= self.max_list or offset < 0:
            return _error(400, f"limit must be 1-{self.max_list} and offset >= 0")
        if self.peers is None:
            page, total = self.history.failed(offset, limit)
            jobs = [self.history.describe(j) for j in page]
        else:  # everyone's newest offset+limit, merged
            own, total = self.history.failed(0, offset + limit)
            answers = await self.peers.ask_others(
                "GET", f"/jobs?state=failed&offset=0&limit={offset + limit}", _passed_on(request))
            pages = [json.loads(body) for status, body in answers if status == 200]
            jobs, total = merge_job_pages([self.history.describe(j) for j in own], total, pages,
                                          offset, limit)
        body = {"jobs": jobs, "total": total, "offset": offset, "limit": limit}
        return web.Response(body=json.dumps(body).encode(), content_type=_JSON)

    async def retry_job(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _unauthorized()
        job_id = request.match_info["id"]
        try:
            job, durable = self.pool.replay(job_id)
        except NotReplayable:
            job = self.history.get(job_id)
            known = job is not None
            if not known and self.peers is not None:
                for index in self.peers.others:  # one at a time: only one may replay it
                    answer = await self.peers.ask(index, "POST", request.path_qs,
                                                  _passed_on(request))
                    if answer is not None and answer[0] != 404:
                        return web.Response(status=answer[0], body=answer[1], content_type=_JSON)
            if job is None:
                return _error(404, "unknown job id (never submitted, or older than the history)")
            return _error(409, f"job {job_id} is {job.state}: only failed jobs can be replayed")
        except (QueueFull, Draining) as e:
            return _unavailable(e)
        except TooMany as e:
            return _error(413, str(e))
        if durable is not None and (failed := await _durability(durable, [job])):
            return failed
        return web.Response(body=_accepted([job.id], []), content_type=_JSON)

    async def healthz(self, request: web.Request) -> web.Response:
        draining = self.stopping or self.pool.draining
        status, state = (503, "draining") if draining else (200, "ok")
        body = json.dumps({"status": state, "pid": self.pid}).encode()
        return web.Response(status=status, body=body, content_type=_JSON)

    async def metrics_page(self, request: web.Request) -> web.Response:
        if self.peers is None:
            body = self.metrics.render()
        else:  # one view of every process: samples summed
            answers = await self.peers.ask_others("GET", "/metrics", {})
            texts = [text.decode() for status, text in answers if status == 200]
            body = generate_latest(MergedMetrics(self.metrics.registry.collect(), texts))
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})
