"""Job model and submission parsing: everything is validated before anything is enqueued.

A request is a JSON object or an array of objects; a root object may carry `clones`, each of
which inherits every field of the root it does not set (`parameters`/`headers` are merged, the
clone winning).  Parsing either yields the complete list of jobs or raises JobError: a batch is
all or nothing.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import time
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from yarl import URL

from .config import LimitsConfig

MAX_ID_LENGTH = 128
MAX_RETRIES = 100
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_BAD_HEADER_CHARS = re.compile(r"[\r\n\x00]")
_NUM = r"(\d+(?:[.,]\d+)?)"
_ISO_DURATION = re.compile(
    rf"^P(?!$)(?:{_NUM}W)?(?:{_NUM}D)?(?:T(?=\d)(?:{_NUM}H)?(?:{_NUM}M)?(?:{_NUM}S)?)?$"
)
_ISO_UNITS = (7 * 86400, 86400, 3600, 60, 1)
_ROOT_ONLY = ("clones", "wait")
_FORM = "application/x-www-form-urlencoded"
_COMMON_METHODS = frozenset(("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"))
_URL_CACHE: dict[str, str] = {}  # valid URLs only, normalised
_URL_CACHE_SIZE = 1024


FINISHED = frozenset(("succeeded", "failed"))


class JobError(ValueError):
    """Invalid submission: becomes a 400 with this message."""


class TooMany(JobError):
    """More jobs or clones than one request may carry: a 413, the client should split it."""


@dataclass(slots=True)
class Outcome:
    """What one attempt produced: a status, or an error (timeout or other)."""

    status: int | None = None
    error: str | None = None
    timeout: bool = False
    denied: bool = False  # the destination guard refused it: never worth a retry
    duration: float = 0.0
    headers: dict[str, str] | None = None
    preview: bytes = b""
    size: int = 0
    truncated: bool = False  # body exceeded max_response_size; connection dropped

    @property
    def ok(self) -> bool:
        return self.status is not None and self.status < 400


@dataclass(slots=True, eq=False)
class Job:
    """One outbound HTTP request and its delivery bookkeeping."""

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
    created: float = field(default_factory=time.time)
    attempts: int = 0
    # queued | delayed | running | retrying | succeeded | failed
    state: str = "queued"
    outcome: Outcome | None = None  # of the last attempt
    finished: float | None = None
    waiters: list[asyncio.Future[None]] | None = None  # `wait` requests holding a response


    def as_submission(self, retries_left: int) -> dict[str, Any]:
        """The POST /post/http object that recreates this job, due at the same time."""
        d: dict[str, Any] = {"id": self.id, "url": self.url, "method": self.method,
                             "queue": self.queue, "retries": retries_left}
        if self.body is not None:
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

    def to_record(self) -> dict[str, Any]:
        """Everything needed to rebuild this job in another process (the journal's form)."""
        body = self.body  # read once: the journal's writer thread calls this
        return {"id": self.id, "url": self.url, "method": self.method, "headers": self.headers,
                "body": None if body is None else base64.b64encode(body).decode(),
                "queue": self.queue, "host_metrics": self.host_metrics, "timeout": self.timeout,
                "retries": self.retries, "not_before": self.not_before, "unique": self.unique,
                "once": self.once, "callback": self.callback,
                "created": self.created, "attempts": self.attempts}

    @classmethod
    def from_record(cls, d: dict[str, Any]) -> Job:
        """The inverse of to_record (raises KeyError/TypeError/ValueError on a damaged record)."""
        body = d["body"]
        callback = d["callback"]
        return cls(str(d["id"]), str(d["url"]), str(d["method"]), d["headers"],
                   None if body is None else base64.b64decode(body), str(d["queue"]),
                   host_metrics=bool(d["host_metrics"]), timeout=d["timeout"], retries=d["retries"],
                   not_before=d["not_before"], unique=bool(d["unique"]), once=bool(d["once"]),
                   callback=None if callback is None else str(callback), created=float(d["created"]),
                   attempts=int(d["attempts"]))


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
    try:
        data = json.loads(raw)
    except RecursionError:
        raise _too_deep(max_depth) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise JobError(f"malformed JSON: {e}") from None
    # Counting brackets runs at C speed and spares most requests the walk; a large batch
    # pays for it (about a tenth of its parse time).
    if raw.count(b"[") + raw.count(b"{") > max_depth and _deeper_than(data, max_depth):
        raise _too_deep(max_depth)
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
    def __init__(self, queues: Container[str], default_queue: str,
                 new_id: Callable[[], str], now: float, limits: LimitsConfig):
        self.queues, self.default_queue, self.new_id, self.now = queues, default_queue, new_id, now
        self.limits = limits

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
        base = {k: v for k, v in root.items() if k not in _ROOT_ONLY}
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
        if not (isinstance(method, str) and (method in _COMMON_METHODS or _TOKEN.match(method))):
            raise JobError(f"{_at(where, 'method')}: must be an HTTP method name")
        method = method.upper()

        headers = self.headers(d.get("headers"), _at(where, "headers"))
        params = _string_map(d.get("parameters"), _at(where, "parameters"))

        body: bytes | None = None
        if "body" in d and "json" in d:
            raise JobError(f"{where or 'job'}: `body` and `json` are mutually exclusive")
        if "body" in d and d["body"] is not None:
            raw = d["body"]
            if not isinstance(raw, str):
                raise JobError(f"{_at(where, 'body')}: must be a base64 string")
            try:
                body = base64.b64decode(raw, validate=True)
            except (binascii.Error, ValueError):
                raise JobError(f"{_at(where, 'body')}: invalid base64") from None
        elif "json" in d:
            body = json.dumps(d["json"], separators=(",", ":"), ensure_ascii=False).encode()
            headers = _with_default_content_type(headers, "application/json")

        if params:
            if method in ("GET", "HEAD"):
                url = str(URL(url, encoded=True).extend_query(params))
            elif body is None:
                body = _urlencode(params)
                headers = _with_default_content_type(headers, _FORM)

        queue = d.get("queue", self.default_queue)
        if not isinstance(queue, str) or queue not in self.queues:
            raise JobError(f"{_at(where, 'queue')}: unknown queue {_shown(queue)}")

        host_metrics = d.get("hostMetrics", False)
        if not isinstance(host_metrics, bool):
            raise JobError(f"{_at(where, 'hostMetrics')}: must be true or false")

        timeout = None
        if d.get("timeout") is not None:
            timeout = _number(d["timeout"], _at(where, "timeout"), minimum=0.001, maximum=3600)
        retries = None
        if d.get("retries") is not None:
            retries = d["retries"]
            if type(retries) is not int or not 0 <= retries <= MAX_RETRIES:
                raise JobError(f"{_at(where, 'retries')}: must be an integer 0-{MAX_RETRIES}")

        not_before = self.schedule(d, where)

        job_id = d.get("id")
        if job_id is None:
            job_id = self.new_id()
        elif not isinstance(job_id, str) or not 0 < len(job_id) <= MAX_ID_LENGTH \
                or not job_id.isprintable() or "/" in job_id:
            raise JobError(f"{_at(where, 'id')}: must be a printable string of 1-{MAX_ID_LENGTH} "
                           "characters without '/'")
        unique = d.get("unique", False)
        if not isinstance(unique, bool):
            raise JobError(f"{_at(where, 'unique')}: must be true or false")
        if unique and "id" not in d:
            raise JobError(f"{_at(where, 'unique')}: needs an `id`")
        once = d.get("once", False)
        if not isinstance(once, bool):
            raise JobError(f"{_at(where, 'once')}: must be true or false")
        if once and "id" not in d:
            raise JobError(f"{_at(where, 'once')}: needs an `id`")

        callback = None
        if d.get("callback") is not None:
            callback = _url(d["callback"], _at(where, "callback"), self.limits.max_url_length)

        return Job(job_id, url, method, headers, body, queue, host_metrics, timeout, retries,
                   not_before, unique, once, callback, self.now)

    def headers(self, value: Any, where: str) -> dict[str, str] | None:
        if not isinstance(value, dict):
            return _string_map(value, where)  # None, PHP's [] or an error
        lim = self.limits
        if len(value) > lim.max_headers:
            raise JobError(f"{where}: {len(value)} headers, over the limit of {lim.max_headers} "
                           "(limits.max_headers)")
        for k, v in value.items():
            if not isinstance(v, str):
                raise JobError(f"{where}.{_shown(k, quoted=False)}: must be a string")
            if len(k) + len(v) > lim.max_header_size:  # before echoing the name in any message
                raise JobError(f"{where}: a header of {len(k) + len(v)} characters (name plus "
                               f"value), over the limit of {lim.max_header_size} (limits.max_header_size)")
            if not _TOKEN.match(k):
                raise JobError(f"{where}: {_shown(k)} is not a valid header name")
            if _BAD_HEADER_CHARS.search(v):
                raise JobError(f"{where}.{k}: header values must not contain CR, LF or NUL")
        return value or None

    def schedule(self, d: dict, where: str) -> float | None:
        delay, at = d.get("delay"), d.get("at")
        if delay is not None and at is not None:
            raise JobError(f"{where or 'job'}: `delay` and `at` are mutually exclusive")
        if delay is not None:
            if isinstance(delay, str):
                seconds = parse_iso_duration(delay, _at(where, "delay"))
            else:
                seconds = _number(delay, _at(where, "delay"), minimum=0, maximum=365 * 86400)
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
            return ts if ts > self.now else None
        return None


def parse_iso_duration(text: str, where: str = "delay") -> float:
    """ISO 8601 duration in weeks/days/hours/minutes/seconds (`PT10M`, `P1DT2H`, `PT0.5S`).

    Years and months are refused: their length in seconds is ambiguous.
    """
    m = _ISO_DURATION.match(text.strip().upper())
    if not m:
        raise JobError(f"{where}: {_shown(text)} is not a number of seconds or an ISO 8601 duration "
                       "like PT10M (years and months are not supported)")
    return sum(float(v.replace(",", ".")) * unit
               for v, unit in zip(m.groups(), _ISO_UNITS, strict=True) if v)


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
    if any(c in value for c in "\r\n\t\x00 "):
        raise JobError(f"{where}: must not contain whitespace or control characters")
    try:
        url = URL(value)
    except (ValueError, TypeError) as e:
        raise JobError(f"{where}: invalid URL ({e})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise JobError(f"{where}: must be an absolute http:// or https:// URL")
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
            raise JobError(f"{where}.{_shown(k, quoted=False)}: must be a string")
    return value or None


def _shown(value: Any, quoted: bool = True, limit: int = 100) -> str:
    """A client's value for an error message, cut short: an answer need not echo megabytes."""
    text = repr(value) if quoted else str(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _with_default_content_type(headers: dict[str, str] | None, ctype: str) -> dict[str, str]:
    if headers and any(k.lower() == "content-type" for k in headers):
        return headers
    return {**headers, "Content-Type": ctype} if headers else {"Content-Type": ctype}


def _urlencode(params: dict[str, str]) -> bytes:
    return urlencode(params).encode()
