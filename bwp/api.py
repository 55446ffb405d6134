"""HTTP API: routes and handlers (submit, job status, dead letters, health, metrics), between
the HTTP server (bwp/httpserver.py) and the jobs service.  Every answer is JSON (metrics aside)."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import urllib.parse
import zlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from .config import DEFAULT_QUEUE, Config
from .httpserver import BodyError, BodyTooLarge, Request, Response, error, json_response
from .jobs import LISTED, JobError, Submission, TooMany, parse_submission
from .lifecycle import ThrottledLog
from .metrics import CONTENT_TYPE
from .redact import one_line
from .service import (
    RELAY_DEADLINE,
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
Handler = Callable[[Request], Awaitable[Response]]
_FORMS = frozenset(("application/x-www-form-urlencoded", "multipart/form-data"))


def _error(status: int, message: str, **headers: str) -> Response:
    return error(status, message, headers or None)


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


def _unavailable(e: QueueFull | Draining) -> Response:
    """503 with Retry-After: no room for the whole batch, or this process is stopping."""
    if isinstance(e, QueueFull):
        return _error(503, str(e), **{"Retry-After": RETRY_AFTER_FULL})
    return _error(503, "bwp is shutting down", **{"Retry-After": RETRY_AFTER_DRAINING})


def _not_durable(e: NotDurable) -> Response:
    # They are queued in memory and will run: say so, a blind resubmit would duplicate them.
    return json_response({"success": False, "error": f"{e}: the jobs are queued but would not "
                          "survive a crash", "ids": e.ids}, 503, {"Retry-After": RETRY_AFTER_FULL})


def _not_admitted(e: NotAdmitted) -> Response:
    """Never a silent partial batch: what the broker took runs, the rest did not get in."""
    return json_response({"success": False, "error": f"{e}: nothing of this request is queued "
                          "but the jobs under 'ids'", "ids": [j.id for j in e.admitted],
                          "refused": [j.id for j in e.refused]},
                         503, {"Retry-After": RETRY_AFTER_FULL})


def _relayed(answer: Relayed) -> Response:
    # a sibling's 503 (full, stopping) comes without its headers
    retry = {"Retry-After": RETRY_AFTER_FULL} if answer.status == 503 else None
    return Response(answer.body, answer.status, headers=retry)


def _unknown_job() -> Response:
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


def _unauthorized() -> Response:
    return _error(401, "missing or invalid bearer token", **{"WWW-Authenticate": "Bearer"})


def _in_time(request: Request) -> None:
    """A sibling relaying a submit for room stops waiting for the answer at its deadline:
    past it (this process stalled meanwhile) the submit is not taken, as it was refused there."""
    deadline = request.headers.get(RELAY_DEADLINE)
    if deadline is None:
        return
    try:
        late = time.monotonic() > float(deadline)
    except ValueError:
        raise Rejected("invalid", _error(400, f"invalid {RELAY_DEADLINE} header")) from None
    if late:  # its jobs are counted refused where the client was answered, not again here
        raise Rejected("unavailable", _error(
            503, "not accepted: the worker that relayed this submit stopped waiting for the "
                 "answer", **{"Retry-After": RETRY_AFTER_FULL}), 0)


class Rejected(Exception):
    """A submit refused: its answer, and what to count (reason, jobs) and log."""

    def __init__(self, reason: str, response: Response, jobs: int = 1):
        super().__init__(reason)
        self.reason, self.response, self.jobs = reason, response, jobs

    @property
    def message(self) -> str:
        try:
            return str(json.loads(self.response.body)["error"])
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
        self._routes()

    def _routes(self) -> None:
        """Paths by their fixed part, then methods: {path: {method: (endpoint, handler)}}.
        A job's paths (/jobs/{id}, /jobs/{id}/retry) are looked up under "/jobs/*" and
        "/jobs/*/retry"; the endpoint names the bwp_api_* metrics' label."""
        self.routes: dict[str, dict[str, tuple[str, Handler]]] = {
            "/post/http": {"POST": ("submit", self.post_http)},
            "/jobs": {"GET": ("jobs", self.list_jobs)},
            "/jobs/*": {"GET": ("job", self.get_job), "DELETE": ("cancel", self.cancel_job)},
            "/jobs/*/retry": {"POST": ("retry", self.retry_job)},
            "/healthz": {"GET": ("healthz", self.healthz)},
            "/metrics": {"GET": ("metrics", self.metrics_page)},
        }

    async def handle(self, request: Request) -> Response:
        """The server's handler: route, answer, count and time per endpoint (bwp_api_*)."""
        start = time.perf_counter()
        endpoint, handler = self._route(request)
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        finally:
            self.metrics.hot.observe_api(endpoint, status, time.perf_counter() - start)

    def _route(self, request: Request) -> tuple[str, Handler]:
        path = request.path
        # routed on the decoded path, as aiohttp did; a job id is decoded apart (%2F in it)
        methods = self.routes.get(urllib.parse.unquote(path) if "%" in path else path)
        if methods is None and path.startswith("/jobs/"):
            rest = path[6:]
            key = "/jobs/*"
            if rest.endswith("/retry"):
                rest, key = rest[:-6], "/jobs/*/retry"
            if rest and "/" not in rest:  # a job id: one segment, decoded on its own (%2F)
                request.params = (urllib.parse.unquote(rest),)
                methods = self.routes[key]
        if methods is None:
            return "other", self.no_route
        method = request.method
        route = methods.get("GET" if method == "HEAD" else method)
        if route is None:
            return "other", self.not_allowed(methods)
        return route

    async def no_route(self, request: Request) -> Response:
        return _error(404, f"no such endpoint: {urllib.parse.unquote(request.path)[:100]}")

    def not_allowed(self, methods: Mapping[str, object]) -> Handler:
        """405 (with Allow) for a known path: JSON like every answer."""
        allowed = sorted({*methods, *(("HEAD",) if "GET" in methods else ())})

        async def answer(request: Request) -> Response:
            return _error(405, f"{request.method} is not allowed on "
                          f"{urllib.parse.unquote(request.path)[:100]} "
                          f"(allowed: {', '.join(allowed)})", Allow=",".join(allowed))

        return answer

    def _authorized(self, request: Request) -> bool:
        if not self.tokens:
            return True
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        given = token.strip().encode()
        # compare against every token (constant time each) so timing reveals nothing
        return sum(hmac.compare_digest(given, t) for t in self.tokens) > 0

    async def post_http(self, request: Request) -> Response:
        try:
            self._admission(request)
            try:
                # the body mostly comes whole with its head: then there is nothing to wait for
                raw = request.body() if request.is_eof() else await self._read(request)
                raw = _decode_body(raw, request.headers.get("Content-Encoding", "").strip().lower(),
                                   self.max_body)
                sub = parse_submission(raw, self.queue_names, DEFAULT_QUEUE, self.new_id,
                                       self.limits)
            except (TimeoutError, BodyTooLarge, TooLarge, TooMany, BodyError, JobError) as e:
                raise self._unreadable(request, e) from None
            if self.for_peers:
                _in_time(request)
            return await self._submit(request, raw, sub)
        except Rejected as r:
            self.metrics.rejected_by[r.reason].inc(r.jobs)
            self.rejections(r.reason, "submit from %s refused (%s): %s",
                            request.remote, r.reason, one_line(r.message[:300]))
            return r.response

    def _admission(self, request: Request) -> None:
        """What refuses a submit before its body is read."""
        if not self._authorized(request):
            raise Rejected("unauthorized", _unauthorized())
        if self.jobs.draining:
            raise Rejected("draining", _unavailable(Draining()))
        if self.jobs.full():
            # under overload, parsing what cannot be admitted would starve the workers
            raise Rejected("queue_full", _unavailable(self.jobs.everything_full()))

    async def _read(self, request: Request) -> bytes:
        """The body, within limits.read_timeout."""
        async with asyncio.timeout(self.limits.read_timeout):
            return await request.read()

    def _unreadable(self, request: Request, e: Exception) -> Rejected:
        """Why a submit's body could not be read, decoded or parsed."""
        if isinstance(e, TimeoutError):
            # the connection closes after the answer: the rest of the body is not awaited
            return Rejected("timeout", error(
                408, f"request body not received within {self.limits.read_timeout:g}s "
                     "(limits.read_timeout)", close=True))
        if isinstance(e, (BodyTooLarge, TooLarge)):
            return Rejected("too_large", _error(
                413, f"request body over {self.max_body} bytes (limits.max_body_size)"))
        if isinstance(e, TooMany):
            return Rejected("too_large", _error(413, str(e)))
        if isinstance(e, BodyError):  # e.g. a malformed chunked body
            return Rejected("invalid", _error(
                400, "cannot read the request body: " + " ".join(str(e).split())))
        message = str(e)  # a JobError
        if message.startswith("malformed JSON") and request.content_type in _FORMS:
            # curl's default type for a string posted with CURLOPT_POSTFIELDS is the form
            # type, so a JSON body labelled so is fine: this one is a real form
            message += ("; the body must be JSON (a job object or an array of them), "
                        f"not {request.content_type} form fields")
        return Rejected("invalid", _error(400, message))

    async def _submit(self, request: Request, raw: bytes, sub: Submission) -> Response:
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
        return Response(_accepted(accepted.ids, accepted.duplicates))

    async def _wait(self, accepted: Accepted, timeout: float) -> Response:
        """Request-reply: hold the answer until every job has finished, or 504."""
        ids = accepted.ids
        try:
            results = await self.jobs.wait(accepted, timeout)
        except Unfinished as e:
            body = {"success": False, "error": f"{e} (they go on)", "ids": ids,
                    "pending": e.pending}
            return json_response(body, 504)
        answer: dict[str, Any] = {"success": True, "ids": ids}
        if accepted.duplicates:
            answer["duplicates"] = accepted.duplicates
        answer["results"] = results
        return json_response(answer)

    async def get_job(self, request: Request) -> Response:
        return await self._job_document(request, self.jobs.status)

    async def cancel_job(self, request: Request) -> Response:
        return await self._job_document(request, self.jobs.cancel)

    async def _job_document(self, request: Request, call: Callable[
            [str, Mapping[str, str]], Awaitable[dict[str, Any] | Relayed]]) -> Response:
        """GET or DELETE /jobs/{id}: the job's status document (a sibling's, passed on)."""
        if not self._authorized(request):
            return _unauthorized()
        try:
            doc = await call(request.params[0], request.headers)
        except UnknownJob:
            return _unknown_job()
        except NotCancellable as e:
            return _error(409, str(e))
        if isinstance(doc, Relayed):
            return _relayed(doc)
        return json_response(doc)

    async def list_jobs(self, request: Request) -> Response:
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
        return json_response(body)

    async def retry_job(self, request: Request) -> Response:
        if not self._authorized(request):
            return _unauthorized()
        try:
            replayed = await self.jobs.replay(request.params[0], request.headers)
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
        return Response(_accepted([replayed], []))

    async def healthz(self, request: Request) -> Response:
        draining = self.stopping or self.jobs.draining
        status, state = (503, "draining") if draining else (200, "ok")
        return json_response({"status": state, "pid": self.pid}, status)

    async def metrics_page(self, request: Request) -> Response:
        return Response(await self.jobs.metrics_page(), content_type=CONTENT_TYPE)
