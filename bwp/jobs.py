"""Job model and submission parsing: everything is validated before anything is enqueued.

A request is a JSON object or an array of objects; a root object may carry `clones`, each of
which inherits every field of the root it does not set (`parameters`/`headers` are merged, the
clone winning).  Parsing either yields the complete list of jobs or raises JobError: a batch is
all or nothing.

Two ways lead there.  The plain way (`_Plain`, decoded and type-checked by msgspec) takes the
common job: the keys most submissions have, all valid, no clones.  Anything else goes the
general way (json, then key by key), which words every error; the plain way only steps aside,
so both give the same jobs and the same answers (tests/test_submit_parsing.py).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any
from urllib.parse import urlencode

import msgspec
from msgspec import UNSET, UnsetType
from yarl import URL

from .config import LimitsConfig

MAX_ID_LENGTH = 128
MAX_RETRIES = 100
MAX_INT_DIGITS = 100  # of an integer in a submission
MIN_TIMEOUT, MAX_TIMEOUT = 0.001, 3600.0  # a job's `timeout`, seconds
# Validations use fullmatch: `$` also matches before a final "\n" ("GET\n" would pass).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 9110 field values: visible characters, SP, HTAB and obs-text; no other control character
_BAD_HEADER_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_CONTROL_CHARS = re.compile(r"[\x00-\x20\x7f]")  # never in a URL (space included)
# what a dialled host may be: a DNS name (IDNs arrive punycoded) or an IP literal
HOST = re.compile(r"[A-Za-z0-9._~-]+|[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*(?:%[A-Za-z0-9._~-]+)?")
_NUM = r"([0-9]+(?:[.,][0-9]+)?)"
_ISO_DURATION = re.compile(
    rf"P(?!$)(?:{_NUM}W)?(?:{_NUM}D)?(?:T(?=[0-9])(?:{_NUM}H)?(?:{_NUM}M)?(?:{_NUM}S)?)?"
)
# a JSON string escape of a UTF-16 surrogate: only then can a lone one hide in the data
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_ISO_UNITS = (7 * 86400, 86400, 3600, 60, 1)
_ROOT_ONLY = ("clones", "wait")
JOB_FIELDS = ("url", "method", "body", "json", "parameters", "headers", "hostMetrics", "queue",
              "delay", "at", "retries", "timeout", "id", "unique", "once", "callback")
_FORM = "application/x-www-form-urlencoded"
_QUERY_METHODS = ("GET", "HEAD")  # their `parameters` go in the query, not a form body
_COMMON_METHODS = frozenset(("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"))
_URL_CACHE: dict[str, str] = {}  # valid URLs only, normalised
_URL_CACHE_SIZE = 1024


FINISHED = frozenset(("succeeded", "failed", "cancelled"))
CANCELLABLE = frozenset(("queued", "delayed", "retrying"))  # not started: DELETE /jobs/{id}
PENDING = CANCELLABLE | {"running"}  # not finished
# what GET /jobs?state= lists: the dead letters, or jobs not finished (all, or in one state)
LISTED = ("failed", "pending", "queued", "delayed", "running", "retrying")


class JobError(ValueError):
    """Invalid submission: becomes a 400 with this message."""


class TooMany(JobError):
    """More jobs or clones than one request may carry: a 413, the client should split it."""


# Job and Outcome are structs the cycle collector does not track (gc=False): a queue of 100k
# jobs made each full collection a 30 ms pause (the API-alone p99 14 ms against 3 ms without
# them).  Neither can be part of a cycle: what they hold (text, numbers, bytes, header dicts,
# an Outcome) never refers back to a job.


class Outcome(msgspec.Struct, gc=False):
    """What one attempt produced: a status, or an error (timeout or other)."""

    status: int | None = None
    error: str | None = None
    timeout: bool = False
    denied: bool = False  # the destination guard refused it: never worth a retry
    # this host lacked a resource to dial (EMFILE, ENFILE, ENOBUFS, ENOMEM, EADDRNOTAVAIL):
    # nothing was sent, so it is no attempt and never final (Pool._work)
    local: bool = False
    # the destination's breaker is open: nothing was sent, no attempt; due again then
    held_until: float | None = None
    duration: float = 0.0
    headers: dict[str, str] | None = None
    preview: bytes = b""
    size: int = 0
    truncated: bool = False  # body exceeded max_response_size; connection dropped

    @property
    def ok(self) -> bool:
        return self.status is not None and self.status < 400

    @property
    def reason(self) -> str | None:
        """What went wrong: the error, or the failing status ("HTTP 503 Service Unavailable")."""
        if self.error is not None or self.status is None or self.status < 400:
            return self.error
        try:
            return f"HTTP {self.status} {HTTPStatus(self.status).phrase}"
        except ValueError:
            return f"HTTP {self.status}"


class Job(msgspec.Struct, gc=False, eq=False):
    """One outbound HTTP request and its delivery bookkeeping (compared and hashed by
    identity)."""

    id: str
    # the normalised (encoded) URL as text: a parsed yarl.URL would cost ~840 bytes more per
    # queued job; the client parses it when it sends (cached for URLs that repeat)
    url: str
    method: str
    headers: dict[str, str] | None
    body: bytes | None
    queue: str
    host_metrics: bool = False
    timeout: float | None = None  # seconds for one attempt; None = client.read_timeout
    retries: int | None = None  # extra attempts; None = the queue's policy
    not_before: float | None = None  # wall-clock time of the first attempt
    unique: bool = False
    once: bool = False  # never run twice while the history remembers the id
    callback: str | None = None
    created: float = msgspec.field(default_factory=time.time)
    attempts: int = 0
    # queued | delayed | running | retrying | succeeded | failed
    state: str = "queued"
    outcome: Outcome | None = None  # of the last attempt
    finished: float | None = None

    def as_submission(self, retries_left: int, with_body: bool = True) -> dict[str, Any]:
        """The POST /post/http object that recreates this job, due at the same time (without
        its body when a root carries it for several, as `clones`)."""
        d: dict[str, Any] = {"id": self.id, "url": self.url, "method": self.method,
                             "queue": self.queue, "retries": retries_left}
        if self.body is not None and with_body:
            d["body"] = base64.b64encode(self.body).decode()
        if self.headers:
            d["headers"] = self.headers
        if self.not_before is not None:
            d["at"] = datetime.fromtimestamp(self.not_before, UTC).isoformat()
        if self.timeout is not None:
            d["timeout"] = self.timeout
        if self.host_metrics:
            d["hostMetrics"] = True
        if self.callback is not None:
            d["callback"] = self.callback
        return d

    def to_record(self, body_ref: int | None = None) -> dict[str, Any]:
        """Everything needed to rebuild this job in another process (the journal's form).

        With `body_ref` the body is left out and the record names it instead: the number under
        which the journal keeps one copy of a body several jobs share (from_record's `bodies`)."""
        body = self.body  # read once: the journal's writer thread calls this
        record = {"id": self.id, "url": self.url, "method": self.method, "headers": self.headers,
                  "body": None if body is None or body_ref is not None
                  else base64.b64encode(body).decode(),
                  "queue": self.queue, "host_metrics": self.host_metrics, "timeout": self.timeout,
                  "retries": self.retries, "not_before": self.not_before, "unique": self.unique,
                  "once": self.once, "callback": self.callback,
                  "created": self.created, "attempts": self.attempts}
        if body_ref is not None:
            del record["body"]
            record["body_ref"] = body_ref
        return record

    @classmethod
    def from_record(cls, d: Any, bodies: dict[int, bytes] | None = None) -> Job:
        """The inverse of to_record; `bodies` are the shared bodies a record may name, by number
        (each job naming one gets that very bytes object).

        Whatever was damaged on disk raises ValueError naming the field: every value is checked
        for the type and range this process writes, so a job rebuilt here cannot break a worker
        (or the status page, or its callback) once it runs."""
        if type(d) is not dict:
            raise ValueError(f"a job record is an object, not {type(d).__name__}")
        try:
            job_id, url, method, headers, queue = (d["id"], d["url"], d["method"], d["headers"],
                                                   d["queue"])
            host_metrics, unique, once = d["host_metrics"], d["unique"], d["once"]
            timeout, retries, not_before = d["timeout"], d["retries"], d["not_before"]
            callback, created, attempts = d["callback"], d["created"], d["attempts"]
            body = d["body"] if "body_ref" not in d else None
        except KeyError as e:
            raise ValueError(f"{e.args[0]}: missing") from None

        def bad(name: str, value: Any, what: str) -> ValueError:
            shown = repr(value[:40] if type(value) is str else value) \
                if type(value) in (str, int, float, bool) else type(value).__name__
            return ValueError(f"{name}: {shown[:60]} is not {what}")

        def when(value: Any) -> bool:  # a time gmtime and datetime can show (up to year 9999)
            return type(value) in (int, float) and 0 <= value < 253402300800

        if type(job_id) is not str or not job_id:
            raise bad("id", job_id, "a string")
        for name, value in (("url", url), ("callback", callback)):
            if (value is not None or name == "url") and not (
                    type(value) is str and value.startswith(("http://", "https://"))
                    and not _CONTROL_CHARS.search(value)):  # it goes into the request line
                raise bad(name, "(not shown)", "an http(s) URL")
        if type(method) is not str or not _TOKEN.fullmatch(method):
            raise bad("method", method, "a method name")
        if headers is not None:
            if type(headers) is not dict:
                raise bad("headers", headers, "an object of strings")
            for k, v in headers.items():  # what would break the request's framing
                if not (type(v) is str and _TOKEN.fullmatch(k)
                        and "\r" not in v and "\n" not in v and "\0" not in v):
                    raise bad(f"headers.{k[:40]}", v, "a header value of a valid name")
        if "body_ref" in d:
            ref = d["body_ref"]
            if type(ref) is not int:
                raise bad("body_ref", ref, "a number")
            if bodies is None or ref not in bodies:
                raise ValueError(f"body_ref: the shared body {ref} is missing")
            data: bytes | None = bodies[ref]
        elif body is None:
            data = None
        elif type(body) is not str:
            raise bad("body", body, "a base64 string")
        else:
            try:
                data = base64.b64decode(body, validate=True)
            except ValueError:  # binascii.Error, or not ASCII
                raise ValueError("body: invalid base64") from None
        if type(queue) is not str:
            raise bad("queue", queue, "a string")
        for name, value in (("host_metrics", host_metrics), ("unique", unique), ("once", once)):
            if type(value) is not bool:
                raise bad(name, value, "true or false")
        if timeout is not None and not (type(timeout) in (int, float)
                                        and 0 < timeout < float("inf")):
            raise bad("timeout", timeout, "a positive number of seconds")
        if retries is not None and not (type(retries) is int and 0 <= retries <= MAX_RETRIES):
            raise bad("retries", retries, f"an integer 0-{MAX_RETRIES}")
        if not_before is not None and not when(not_before):
            raise bad("not_before", not_before, "a time")
        if not when(created):
            raise bad("created", created, "a time")
        if type(attempts) is not int or attempts < 0:
            raise bad("attempts", attempts, "a count")
        return cls(job_id, url, method, headers, data, queue, host_metrics=host_metrics,
                   timeout=timeout, retries=retries, not_before=not_before, unique=unique,
                   once=once, callback=callback, created=created, attempts=attempts)


JOB_OVERHEAD = 600  # bytes of a queued job besides its url, headers and body (measured: ~1.4 KiB
# per 1 KiB-body job in docs/performance.md)


class HeldBytes:
    """What the jobs in a store hold, in bytes.  A body or headers mapping that several jobs
    share (the clones of one request) is one object and counts once, by identity; one that a
    single job holds needs no bookkeeping (its size is taken again on release)."""

    __slots__ = ("_shared", "limit", "total")

    def __init__(self, limit: int):
        self.limit, self.total = limit, 0
        self._shared: dict[int, list[Any]] = {}  # id(obj) -> [obj, jobs holding it, bytes]

    def weigh(self, jobs: Sequence[Job]) -> int:
        """Bytes the jobs would add (objects already held or seen earlier in `jobs` are free)."""
        shared = self._shared
        if len(jobs) == 1:  # most submits: nothing in the batch to share
            job = jobs[0]
            body, headers = job.body, job.headers
            return (JOB_OVERHEAD + len(job.url)
                    + (0 if body is None or id(body) in shared else _size(body))
                    + (0 if headers is None or id(headers) in shared else _size(headers)))
        seen: set[int] = set()
        total = 0
        for job in jobs:
            total += JOB_OVERHEAD + len(job.url)
            for obj in (job.body, job.headers):
                if obj is not None and id(obj) not in shared and id(obj) not in seen:
                    seen.add(id(obj))
                    total += _size(obj)
        return total

    def hold(self, jobs: Sequence[Job], weight: int | None = None) -> None:
        """Count the jobs as held; `weight` is what weigh() said of them just now."""
        shared = self._shared
        if weight is not None and len(jobs) == 1:  # weigh's sum, as this loop would make it
            job = jobs[0]
            for obj in (job.body, job.headers):
                entry = shared.get(id(obj)) if obj is not None else None
                if entry is not None:
                    entry[1] += 1
            self.total += weight
            return
        uses = Counter(id(obj) for job in jobs for obj in (job.body, job.headers)
                       if obj is not None) if len(jobs) > 1 else None
        for job in jobs:
            self.total += JOB_OVERHEAD + len(job.url)
            for obj in (job.body, job.headers):
                if obj is None:
                    continue
                entry = shared.get(id(obj))
                if entry is not None:
                    entry[1] += 1
                elif uses is not None and uses[id(obj)] > 1:
                    size = _size(obj)
                    shared[id(obj)] = [obj, 1, size]
                    self.total += size
                else:
                    self.total += _size(obj)

    def release(self, job: Job) -> None:
        self.total -= JOB_OVERHEAD + len(job.url)
        for obj in (job.body, job.headers):
            if obj is None:
                continue
            entry = self._shared.get(id(obj))
            if entry is None or entry[0] is not obj:
                self.total -= _size(obj)
                continue
            entry[1] -= 1
            if not entry[1]:
                del self._shared[id(obj)]
                self.total -= entry[2]


def _size(obj: bytes | dict[str, str]) -> int:
    if isinstance(obj, bytes):
        return len(obj)
    return sum(map(len, obj)) + sum(map(len, obj.values()))  # no Python frame per header


@dataclass(slots=True)
class Submission:
    jobs: list[Job]
    wait: float | None  # seconds to hold the HTTP response for the outcomes


def parse_submission(
    raw: bytes,
    queues: Container[str],
    default_queue: str,
    new_id: Callable[[], str],
    limits: LimitsConfig,
) -> Submission:
    """Parse and validate one POST /post/http body."""
    max_depth = limits.max_json_depth
    containers = _values_before_parsing(raw, limits.max_json_values)
    if containers <= max_depth or max_depth >= PLAIN_DEPTH:
        plain = _plain_submission(raw, queues, default_queue, new_id, limits)
        if plain is not None:
            return plain
    return _general_submission(raw, containers, queues, default_queue, new_id, limits)


def _general_submission(raw: bytes, containers: int, queues: Container[str], default_queue: str,
                        new_id: Callable[[], str], limits: LimitsConfig) -> Submission:
    """Any submission, decoded by json and checked key by key: every error is worded here."""
    max_depth = limits.max_json_depth
    try:
        # as json.loads(raw) does, with one decoder made once (json.loads makes one per call
        # when given any option)
        text = raw.decode(json.detect_encoding(raw))  # strict: UTF-8 of a lone surrogate fails
        data = _DECODER.decode(text)
    except RecursionError:
        raise _too_deep(max_depth) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise JobError(f"malformed JSON: {e}") from None
    # Counting brackets runs at C speed and spares most requests the walk; a large batch
    # pays for it (about a tenth of its parse time).
    if containers > max_depth and _deeper_than(data, max_depth):
        raise _too_deep(max_depth)
    if _SURROGATE_ESCAPE.search(text):  # PHP escapes emoji as pairs: check for a lone half
        try:
            json.dumps(data, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise JobError("malformed JSON: a lone UTF-16 surrogate (\\uD800-\\uDFFF) is not "
                           "text") from None
    if isinstance(data, dict):
        roots, prefix = [data], ""
    elif isinstance(data, list):
        roots, prefix = data, "[{}]"
    else:
        raise JobError("the body must be a JSON object or an array of objects")
    # Counted before any job is built, so an oversized batch costs next to nothing.
    count = sum(map(_job_count, roots))
    if count > limits.max_jobs_per_request:
        raise TooMany(f"{count} jobs in one request (clones expanded), over the limit of "
                      f"{limits.max_jobs_per_request} (limits.max_jobs_per_request)")
    parser = _Parser(queues, default_queue, new_id, time.time(), limits)
    jobs: list[Job] = []
    wait: float | None = None
    for i, root in enumerate(roots):
        where = prefix.format(i)
        if not isinstance(root, dict):
            raise JobError(f"{where or 'body'}: each job must be a JSON object")
        root_wait = parser.wait(root, where)
        if root_wait is not None:
            wait = root_wait if wait is None else max(wait, root_wait)
        jobs.extend(parser.expand(root, where))
    return Submission(jobs, wait)


class _Plain(msgspec.Struct, forbid_unknown_fields=True):
    """A job as most are submitted, decoded and type-checked by msgspec in one C pass.  The
    keys `_plain_job` does not take (a body, `json`, a schedule, a callback, clones, `wait`)
    are read only to see that they are absent; with them, or any key a job does not have
    (ignored the general way, as the Go daemon did), the request goes the general way."""

    url: str
    method: str = "GET"
    headers: dict[str, str] | None = None
    parameters: dict[str, str] | None = None
    queue: str | UnsetType = UNSET
    hostMetrics: bool = False
    timeout: float | None = None
    retries: int | None = None
    id: str | UnsetType | None = UNSET
    unique: bool = False
    once: bool = False
    body: Any = UNSET
    json: Any = UNSET
    delay: Any = UNSET
    at: Any = UNSET
    callback: Any = UNSET
    clones: Any = UNSET
    wait: Any = UNSET


_PLAIN = msgspec.json.Decoder(_Plain | list[_Plain])
# what a plain submission nests at most (an array, a job, its headers or parameters): within
# any max_json_depth at least this, the depth need not be looked at
PLAIN_DEPTH = 3


def _plain_submission(raw: bytes, queues: Container[str], default_queue: str,
                      new_id: Callable[[], str], limits: LimitsConfig) -> Submission | None:
    """The submission when it is plain jobs only (see _Plain), all valid; else None, and
    parse_submission goes the general way, which also words any error.  Equal to what the
    general way builds (tests/test_submit_parsing.py compares the two).  limits.max_json_values
    is the caller's to check first, and max_json_depth unless it is PLAIN_DEPTH or more."""
    # msgspec refuses what the general way refuses in JSON: invalid UTF-8 in any string, a
    # lone UTF-16 surrogate, NaN; `int` fields what passes 64 bits (json.loads: 100 digits)
    try:
        data = _PLAIN.decode(raw)
    except (msgspec.DecodeError, RecursionError):  # a ValidationError too; a deep `json`
        return None
    if not isinstance(data, list):
        data = [data]
    elif not 0 < len(data) <= limits.max_jobs_per_request:
        return None
    if not all(map(_is_plain, data)):  # before any id is drawn: the general way draws them
        return None
    now = time.time()
    jobs = []
    try:
        for fields in data:
            job = _plain_job(fields, queues, default_queue, new_id, limits, now)
            if job is None:
                return None
            jobs.append(job)
    except JobError:
        return None
    return Submission(jobs, None)


def _plain_job(f: _Plain, queues: Container[str], default_queue: str, new_id: Callable[[], str],
               limits: LimitsConfig, now: float) -> Job | None:
    """_Parser.job of a plain job, its checks in the same terms; None for anything else."""
    url = _url(f.url, "url", limits.max_url_length)
    method = f.method
    if not (method in _COMMON_METHODS or _TOKEN.fullmatch(method)):
        return None
    method = method.upper()
    headers = _header_map(f.headers, "headers", limits) if f.headers else None
    body = None
    if f.parameters:
        if method in _QUERY_METHODS:
            url = _with_query(url, f.parameters, "", limits.max_url_length)
        else:
            body = _urlencode(f.parameters)
            headers = _with_default_content_type(headers, _FORM)
    queue = default_queue if f.queue is UNSET else f.queue
    timeout, retries, job_id = f.timeout, f.retries, f.id
    if queue not in queues or (timeout is not None and not MIN_TIMEOUT <= timeout <= MAX_TIMEOUT) \
            or (retries is not None and not _valid_retries(retries)) \
            or ((f.unique or f.once) and job_id is UNSET):
        return None
    if job_id is UNSET or job_id is None:
        job_id = new_id()
    elif not _valid_id(job_id):
        return None
    return Job(job_id, url, method, headers, body, queue, f.hostMetrics, timeout, retries, None,
               f.unique, f.once, None, now)


def _is_plain(f: _Plain) -> bool:
    """Without the keys that only the general way takes."""
    return (f.body is UNSET and f.json is UNSET and f.delay is UNSET and f.at is UNSET
            and f.callback is UNSET and f.clones is UNSET and f.wait is UNSET)


def _valid_id(job_id: Any) -> bool:
    return isinstance(job_id, str) and 0 < len(job_id) <= MAX_ID_LENGTH \
        and job_id.isprintable() and "/" not in job_id


def _valid_retries(retries: Any) -> bool:
    return type(retries) is int and 0 <= retries <= MAX_RETRIES


def _values_before_parsing(raw: bytes, limit: int) -> int:
    """The arrays and objects in `raw` (an upper bound: brackets inside strings count too),
    after refusing a body of more than `limit` values: json.loads of a few MB of `[{},{},..]`
    builds millions of objects and holds the event loop for a second, so they are counted
    first, at C speed, by the bytes that separate or open them."""
    containers = raw.count(b"[") + raw.count(b"{")
    if len(raw) > limit and containers + raw.count(b",") > limit:
        raise TooMany(f"more than {limit} JSON values in one request (limits.max_json_values)")
    return containers


def _non_finite(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _int(digits: str) -> int:
    # int() of thousands of digits is slow (900 of 4 299 digits: 0.4 s); no job needs them
    if len(digits) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(digits)} digits (at most {MAX_INT_DIGITS})")
    return int(digits)


_DECODER = json.JSONDecoder(parse_constant=_non_finite, parse_int=_int)
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _too_deep(limit: int) -> JobError:
    return JobError(f"JSON nested deeper than {limit} levels (limits.max_json_depth)")


def _deeper_than(data: Any, limit: int) -> bool:
    """Whether arrays/objects nest more than `limit` levels; breadth first and iterative, so
    any depth json.loads accepted is safe to walk."""
    level = [data]
    for _ in range(limit):
        level = [v for c in level for v in (c.values() if type(c) is dict else c)
                 if type(v) is dict or type(v) is list]
        if not level:
            return False
    return True


def _job_count(root: Any) -> int:
    """How many jobs a root object expands to (an invalid one is refused later)."""
    clones = root.get("clones") if isinstance(root, dict) else None
    return len(clones) if isinstance(clones, list) and clones else 1


class _Parser:
    """Builds the jobs of one request.  What clones inherit unchanged from their root (a body,
    a `json` value, parameters, headers) is encoded once and the result shared by identity:
    1 000 clones of a 1 MiB body hold one copy of it, not 1 000."""

    def __init__(self, queues: Container[str], default_queue: str,
                 new_id: Callable[[], str], now: float, limits: LimitsConfig):
        self.queues, self.default_queue, self.new_id, self.now = queues, default_queue, new_id, now
        self.limits = limits
        # with clones: id(source value) -> (source, encoded); the source is held so its id
        # stays its own
        self._shared: dict[tuple[str, int, int], tuple[Any, Any]] | None = None

    def _once(self, kind: str, source: Any, other: Any, encode: Callable[..., Any],
              *args: Any) -> Any:
        """encode(*args), computed once per request for the same `source` (and `other`)."""
        if self._shared is None:
            return encode(*args)
        key = (kind, id(source), id(other))
        hit = self._shared.get(key)
        if hit is None:
            hit = self._shared[key] = ((source, other), encode(*args))
        return hit[1]

    def wait(self, root: dict, where: str) -> float | None:
        if "wait" not in root:
            return None
        return _number(root["wait"], _at(where, "wait"), minimum=0, maximum=3600)

    def expand(self, root: dict, where: str) -> list[Job]:
        clones = root.get("clones")
        if clones is None:
            return [self.job(root, where)]
        if not isinstance(clones, list):
            raise JobError(f"{_at(where, 'clones')}: must be an array of objects")
        if not clones:
            return [self.job(root, where)]
        if len(clones) > self.limits.max_clones:
            raise TooMany(f"{_at(where, 'clones')}: {len(clones)} clones, over the limit of "
                          f"{self.limits.max_clones} (limits.max_clones)")
        if self._shared is None:
            self._shared = {}
        # only what a job reads: unknown keys (ignored, as the Go daemon did) are not copied
        # into every clone
        base = {k: root[k] for k in JOB_FIELDS if k in root}
        jobs = []
        for n, clone in enumerate(clones):
            cw = f"{_at(where, 'clones')}[{n}]"
            if not isinstance(clone, dict):
                raise JobError(f"{cw}: must be a JSON object")
            for key in _ROOT_ONLY:
                if key in clone:
                    raise JobError(f"{cw}.{key}: allowed only on the root request")
            merged = {**base, **clone}
            for key in ("parameters", "headers"):
                if isinstance(base.get(key), dict) and isinstance(clone.get(key), dict):
                    merged[key] = {**base[key], **clone[key]}
            if "id" in base and "id" not in clone and isinstance(base["id"], str):
                merged["id"] = f"{base['id']}.{n}"  # clone ids stay distinct and traceable
            jobs.append(self.job(merged, cw))
        return jobs

    def job(self, d: dict, where: str) -> Job:
        url = _url(d.get("url"), _at(where, "url"), self.limits.max_url_length)
        method = d.get("method", "GET")
        if not (isinstance(method, str) and (method in _COMMON_METHODS or _TOKEN.fullmatch(method))):
            raise JobError(f"{_at(where, 'method')}: must be an HTTP method name")
        method = method.upper()
        value = d.get("headers")  # the root's, checked once for all its clones
        headers = self._once("headers", value, None, self.headers, value, _at(where, "headers"))
        url, headers, body = self.payload(d, where, method, url, headers)

        queue = d.get("queue", self.default_queue)
        if not isinstance(queue, str) or queue not in self.queues:
            raise JobError(f"{_at(where, 'queue')}: unknown queue {_shown(queue)}")
        host_metrics = _flag(d, "hostMetrics", where)
        timeout = None
        if d.get("timeout") is not None:
            timeout = _number(d["timeout"], _at(where, "timeout"), minimum=MIN_TIMEOUT,
                              maximum=MAX_TIMEOUT)
        retries = None
        if d.get("retries") is not None:
            retries = d["retries"]
            if not _valid_retries(retries):
                raise JobError(f"{_at(where, 'retries')}: must be an integer 0-{MAX_RETRIES}")
        not_before = self.schedule(d, where)

        job_id = d.get("id")
        if job_id is None:
            job_id = self.new_id()
        elif not _valid_id(job_id):
            raise JobError(f"{_at(where, 'id')}: must be a printable string of 1-{MAX_ID_LENGTH} "
                           "characters without '/'")
        unique, once = _flag(d, "unique", where), _flag(d, "once", where)
        for name, on in (("unique", unique), ("once", once)):
            if on and "id" not in d:
                raise JobError(f"{_at(where, name)}: needs an `id`")
        callback = None
        if d.get("callback") is not None:
            callback = _url(d["callback"], _at(where, "callback"), self.limits.max_url_length)

        return Job(job_id, url, method, headers, body, queue, host_metrics, timeout, retries,
                   not_before, unique, once, callback, self.now)

    def payload(self, d: dict, where: str, method: str, url: str, headers: dict[str, str] | None
                ) -> tuple[str, dict[str, str] | None, bytes | None]:
        """The URL, headers and body as sent: `body`, `json` or `parameters` applied."""
        value = d.get("parameters")
        params = self._once("parameters", value, None, _string_map, value,
                            _at(where, "parameters"))
        body: bytes | None = None
        if "body" in d and "json" in d:
            raise JobError(f"{where or 'job'}: `body` and `json` are mutually exclusive")
        if "body" in d and d["body"] is not None:
            raw = d["body"]
            if not isinstance(raw, str):
                raise JobError(f"{_at(where, 'body')}: must be a base64 string")
            body = self._once("body", raw, None, _base64, raw, where)
        elif "json" in d:
            value = d["json"]
            body = self._once("json", value, None, _json_body, value, where)
            headers = self._typed(headers, "application/json")
        if params:
            if method in _QUERY_METHODS:
                url = self._once("query", params, url, _with_query, url, params, where,
                                 self.limits.max_url_length)
            elif body is None:
                body = self._once("form", params, None, _urlencode, params)
                headers = self._typed(headers, _FORM)
        return url, headers, body

    def _typed(self, headers: dict[str, str] | None, ctype: str) -> dict[str, str]:
        return self._once(ctype, headers, None, _with_default_content_type, headers, ctype)

    def headers(self, value: Any, where: str) -> dict[str, str] | None:
        if not isinstance(value, dict):
            return _string_map(value, where)  # None, PHP's [] or an error
        return _header_map(value, where, self.limits)

    def schedule(self, d: dict, where: str) -> float | None:
        delay, at = d.get("delay"), d.get("at")
        if delay is not None and at is not None:
            raise JobError(f"{where or 'job'}: `delay` and `at` are mutually exclusive")
        if delay is not None:
            if isinstance(delay, str):
                seconds = parse_iso_duration(delay, _at(where, "delay"))
            else:
                seconds = _number(delay, _at(where, "delay"), minimum=0, maximum=float("inf"))
            if seconds > self.limits.max_delay:
                raise JobError(f"{_at(where, 'delay')}: {seconds:g}s is past the limit of "
                               f"{self.limits.max_delay:g}s (limits.max_delay)")
            return self.now + seconds if seconds > 0 else None
        if at is not None:
            if not isinstance(at, str):
                raise JobError(f"{_at(where, 'at')}: must be an RFC 3339 time string")
            try:
                when = datetime.fromisoformat(at)
            except ValueError:
                raise JobError(f"{_at(where, 'at')}: {_shown(at)} is not an RFC 3339 time") from None
            if when.tzinfo is None:
                raise JobError(f"{_at(where, 'at')}: needs a UTC offset or 'Z'")
            ts = when.timestamp()
            if ts - self.now > self.limits.max_delay:
                raise JobError(f"{_at(where, 'at')}: {_shown(at)} is more than "
                               f"{self.limits.max_delay:g}s ahead (limits.max_delay)")
            return ts if ts > self.now else None
        return None


def _header_map(value: dict, where: str, lim: LimitsConfig) -> dict[str, str] | None:
    """A job's headers object, checked against `limits:`; None when empty."""
    if len(value) > lim.max_headers:
        raise JobError(f"{where}: {len(value)} headers, over the limit of {lim.max_headers} "
                       "(limits.max_headers)")
    for k, v in value.items():
        if not isinstance(v, str):
            raise JobError(f"{where}.{_name(k)}: must be a string")
        if len(k) + len(v) > lim.max_header_size:  # before echoing the name in any message
            raise JobError(f"{where}: a header of {len(k) + len(v)} characters (name plus "
                           f"value), over the limit of {lim.max_header_size} (limits.max_header_size)")
        if not _TOKEN.fullmatch(k):
            raise JobError(f"{where}: {_shown(k)} is not a valid header name")
        if _BAD_HEADER_CHARS.search(v):
            raise JobError(f"{where}.{k}: header values must not contain control characters "
                           "(CR, LF, NUL, DEL ...; HTAB is allowed)")
    return value or None


def parse_iso_duration(text: str, where: str = "delay") -> float:
    """ISO 8601 duration in weeks/days/hours/minutes/seconds (`PT10M`, `P1DT2H`, `PT0.5S`).

    Years and months are refused: their length in seconds is ambiguous.
    """
    m = _ISO_DURATION.fullmatch(text.strip().upper())
    if not m:
        raise JobError(f"{where}: {_shown(text)} is not a number of seconds or an ISO 8601 duration "
                       "like PT10M (years and months are not supported)")
    return sum(float(v.replace(",", ".")) * unit
               for v, unit in zip(m.groups(), _ISO_UNITS, strict=True) if v)


def _flag(d: dict, name: str, where: str) -> bool:
    value = d.get(name, False)
    if not isinstance(value, bool):
        raise JobError(f"{_at(where, name)}: must be true or false")
    return value


def _base64(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise JobError(f"{_at(where, 'body')}: invalid base64") from None


def _json_body(value: Any, where: str) -> bytes:
    try:  # json.loads turns 1e999 into inf, which JSON cannot carry
        return _ENCODER.encode(value).encode()
    except ValueError:
        raise JobError(f"{_at(where, 'json')}: numbers must be finite") from None


def _with_query(url: str, params: dict[str, str], where: str, max_length: int) -> str:
    try:
        text = str(URL(url, encoded=True).extend_query(params))
    except UnicodeEncodeError:
        raise JobError(f"{_at(where, 'parameters')}: a lone UTF-16 surrogate is not text") from None
    if len(text) > max_length:
        raise JobError(f"{_at(where, 'parameters')}: the url with its query is {len(text)} "
                       f"characters, over the limit of {max_length} (limits.max_url_length)")
    return text


def _at(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _number(value: Any, where: str, *, minimum: float, maximum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise JobError(f"{where}: must be a number")
    if not minimum <= value <= maximum:
        raise JobError(f"{where}: must be between {minimum} and {maximum}")
    return float(value)


def _url(value: Any, where: str, max_length: int) -> str:
    """A valid absolute http(s) URL, normalised; the same text object for a URL that repeats."""
    if type(value) is str and len(value) > max_length:
        raise JobError(f"{where}: {len(value)} characters, over the limit of {max_length} "
                       "(limits.max_url_length)")
    try:
        return _URL_CACHE[value]  # sites post to a few URLs again and again
    except (KeyError, TypeError):
        pass
    if not isinstance(value, str) or not value:
        raise JobError(f"{where}: is required" if value in (None, "") else f"{where}: must be a string")
    if _CONTROL_CHARS.search(value):
        raise JobError(f"{where}: must not contain whitespace or control characters")
    try:
        url = URL(value)
        host = url.host  # decodes IDNA: a malformed xn-- label raises UnicodeError
    except (ValueError, TypeError, IndexError) as e:  # IndexError: yarl, on `-HTTP://[]@`
        raise JobError(f"{where}: invalid URL ({e})") from None
    if url.scheme not in ("http", "https") or not host:
        raise JobError(f"{where}: must be an absolute http:// or https:// URL")
    if not HOST.fullmatch(url.raw_host or ""):
        raise JobError(f"{where}: {_shown(url.raw_host)} is not a host name or IP address")
    if len(_URL_CACHE) >= _URL_CACHE_SIZE:
        _URL_CACHE.clear()
    text = _URL_CACHE[value] = str(url)
    return text


def _string_map(value: Any, where: str) -> dict[str, str] | None:
    if value is None:
        return None
    if isinstance(value, list) and not value:
        return None  # PHP's json_encode([]) of an empty array
    if not isinstance(value, dict):
        raise JobError(f"{where}: must be an object of strings")
    for k, v in value.items():
        if not isinstance(v, str):
            raise JobError(f"{where}.{_name(k)}: must be a string")
    return value or None


def _name(key: Any) -> str:
    """A client's key in a message path: as it is when printable, else quoted (escaped)."""
    return key if isinstance(key, str) and key.isprintable() and len(key) <= 100 \
        else _shown(key)


def _shown(value: Any, limit: int = 100) -> str:
    """A client's value for an error message, cut short: an answer need not echo megabytes."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _with_default_content_type(headers: dict[str, str] | None, ctype: str) -> dict[str, str]:
    if headers and any(k.lower() == "content-type" for k in headers):
        return headers
    return {**headers, "Content-Type": ctype} if headers else {"Content-Type": ctype}


_UNRESERVED = re.compile(r"[A-Za-z0-9_.~-]*")  # what urlencode leaves as it is


def _urlencode(params: dict[str, str]) -> bytes:
    # the usual form (ids, amounts, statuses) needs no quoting: urlencode's per-character
    # Python was a tenth of a submit's CPU
    if _UNRESERVED.fullmatch("".join([*params, *params.values()])):
        return "&".join([k + "=" + v for k, v in params.items()]).encode()
    try:
        return urlencode(params).encode()
    except UnicodeEncodeError:
        raise JobError("parameters: a lone UTF-16 surrogate is not text") from None
