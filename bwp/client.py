"""Outbound HTTP: a job becomes one serialised HTTP/1.1 request on a pooled keep-alive
connection (bwp/http1.py), whose socket the router bound to the source address picked for the
address actually dialled.

The routing table only changes with a new process (reload), so a pooled connection always has
the right source.  Redirects, when enabled, are followed here, each hop routed and checked
like the first.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping

from yarl import URL

from .breaker import Breakers, RateLimits, destination
from .config import ClientConfig
from .http1 import ConnectionPool, ConnectTimeout, ReadTimeout, ResponseError
from .jobs import HOST, Job, Outcome
from .metrics import Metrics
from .redact import one_line
from .router import DestinationDenied, Router
from .signing import HEADERS as SIGNATURE_HEADERS
from .signing import Signer, signed

log = logging.getLogger("bwp.client")

# RFC 9110 idempotent methods: safe to send again when a kept-alive connection turns out dead
IDEMPOTENT = frozenset(("GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"))
REDIRECTS = frozenset((301, 302, 303, 307, 308))
URL_CACHE_LIMIT = 1024
# socket()/connect() errors that mean this host is short of something (fds, ephemeral ports,
# buffers): the job was never sent, so it is no attempt and no failure (Pool._work)
LOCAL_ERRNOS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM,
                          errno.EADDRNOTAVAIL))
# always computed from the body; a job's own value could only break the framing
_FRAMING_HEADERS = frozenset(("content-length", "transfer-encoding"))
# dropped when a redirect turns the request into a bodiless GET, or leaves the origin
_BODY_HEADERS = frozenset(("content-type", "content-encoding", "content-language", "content-location"))
_CREDENTIALS = frozenset(("authorization", "cookie", "proxy-authorization"))
# framed (Content-Length: 0) even when empty, as the Go daemon does for all but these
_BODYLESS_METHODS = frozenset(("GET", "HEAD"))


class Target:
    """A URL as requests to it are made: worked out once per URL (the client keeps them)."""

    __slots__ = ("authorization", "host", "key", "path", "url")

    def __init__(self, url: URL):
        self.url = url
        self.key = _key(url)
        self.path = url.raw_path_qs or "/"
        self.host = f"Host: {url.host_port_subcomponent}\r\n"
        self.authorization = None  # the URL's user:password, sent as aiohttp did
        if url.raw_user or url.raw_password:
            credentials = base64.b64encode(f"{url.user or ''}:{url.password or ''}".encode())
            self.authorization = f"Authorization: Basic {credentials.decode()}\r\n"


class HttpClient:
    def __init__(self, cfg: ClientConfig, router: Router, metrics: Metrics, max_connections: int,
                 redact: Callable[[str], str] = str, signers: Mapping[str, Signer] | None = None):
        self.cfg, self.router, self.metrics = cfg, router, metrics
        self.signers = dict(signers or {})  # by queue: the queues whose requests are signed
        self.breakers = (Breakers(cfg.breaker_failures, cfg.breaker_cool_off, metrics.breaker_changed)
                         if cfg.breaker_failures else None)
        self.rates = (RateLimits(cfg.rate_per_host, cfg.rate_burst or max(1, round(cfg.rate_per_host)))
                      if cfg.rate_per_host else None)
        self.redact = redact  # a job's URL as logged
        self.max_connections = max_connections
        self._pool: ConnectionPool | None = None
        self._user_agent = f"User-Agent: {cfg.user_agent}\r\n"
        self._targets: dict[str, Target] = {}

    async def start(self) -> None:
        self._pool = ConnectionPool(self.router, max_idle=self.max_connections,
                                    limit_per_host=self.cfg.limit_per_host,
                                    dns_ttl=self.cfg.dns_cache_ttl)

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    async def send(self, job: Job) -> Outcome:
        """One attempt of a job, through the destination's breaker and rate limit; never
        raises for network trouble."""
        key = self._target(job.url).key
        if self.breakers is not None:
            until = self.breakers.hold(key)
            if until is not None:
                self.metrics.breaker_held.inc()
                return Outcome(held_until=until, error=f"circuit open: {destination(key)} is "
                               "not sent to until its breaker lets a probe through")
        try:
            if self.rates is not None:
                await self.rates.turn(key)
            out = await self._attempt(job)
        except BaseException:  # cancelled (a stop), or a bug: no verdict on the destination
            if self.breakers is not None:
                self.breakers.record(key, Outcome(local=True))
            raise
        if self.breakers is not None:
            self.breakers.record(key, out)
        return out

    def sender(self) -> Callable[[Job], Awaitable[Outcome]]:
        """What the workers call for an attempt: `send`, or `_attempt` itself when there is no
        breaker or rate limit to pass (one coroutine less per job)."""
        return self._attempt if self.breakers is None and self.rates is None else self.send

    async def _attempt(self, job: Job) -> Outcome:
        """Send the job, following redirects when configured; what came of it."""
        assert self._pool is not None, "HttpClient.start() first"
        cfg = self.cfg
        start = time.monotonic()
        read_timeout = job.timeout if job.timeout is not None else cfg.read_timeout
        # one budget for the whole attempt (as aiohttp's total timeout): waiting for a
        # per-host slot, every redirect hop and a replay all come out of it
        deadline = asyncio.get_running_loop().time() + cfg.connect_timeout + read_timeout
        signer = self.signers.get(job.queue)
        hops = 0
        try:
            method, target, headers, body = job.method, self._target(job.url), job.headers, job.body
            origin = target.key
            while True:
                if signer is not None:  # each hop (a redirect may drop the body), on its origin
                    # only: another origin could replay a valid signature to ours
                    headers = (signed(headers, signer, job.id, body) if target.key == origin
                               else _without(headers, SIGNATURE_HEADERS))
                resp = await self._pool.request(
                    target.key, self._serialise(method, target, headers, body), deadline=deadline,
                    connect_timeout=cfg.connect_timeout, read_timeout=read_timeout,
                    head_only=method == "HEAD", cap=cfg.max_response_size,
                    head_cap=cfg.max_response_head, replayable=method in IDEMPOTENT)
                location = resp.headers.get("Location")
                if not (cfg.follow_redirects and resp.status in REDIRECTS and location):
                    break
                hops += 1
                method, target, headers, body = _redirected(resp.status, location, hops, cfg,
                                                            method, target, headers, body)
            out = Outcome(status=resp.status, headers=resp.headers, preview=resp.preview,
                          size=resp.size, truncated=resp.truncated)
        except (OSError, ResponseError, ValueError) as e:  # TimeoutError is an OSError
            out = self._failure(job, e)
        out.duration = time.monotonic() - start
        self._account(job, out)
        return out

    def _failure(self, job: Job, e: Exception) -> Outcome:
        """The outcome of an attempt that got no answer."""
        if isinstance(e, TimeoutError):
            return Outcome(timeout=True, error=self._timeout_error(job, e))
        if isinstance(e, DestinationDenied):
            return Outcome(denied=True, error=str(e))
        if isinstance(e, OSError):  # resolving, connecting, TLS
            out = Outcome(error=f"connect: {e}")
            if e.errno in LOCAL_ERRNOS and not isinstance(e, (socket.gaierror, ssl.SSLError)):
                # this host ran short (fds, ports, buffers): no fault of the destination
                out.local = True
                out.error += f" ({errno.errorcode[e.errno]})"
            return out
        return Outcome(error=str(e))  # ValueError: a redirect to nowhere usable

    def _timeout_error(self, job: Job, e: TimeoutError) -> str:
        """Which timeout ran out, and its value, for the job's status and the log."""
        cfg = self.cfg
        if isinstance(e, ConnectTimeout):
            return f"timeout: not connected within {cfg.connect_timeout:g}s (client.connect_timeout)"
        read, key = ((job.timeout, "the job's timeout") if job.timeout is not None
                     else (cfg.read_timeout, "client.read_timeout"))
        if isinstance(e, ReadTimeout):
            return f"timeout: no complete answer within {read:g}s ({key})"
        return (f"timeout: the attempt took over {cfg.connect_timeout + read:g}s "
                f"(client.connect_timeout + {key}), waiting for a connection slot "
                "(client.limit_per_host) included")

    def _target(self, text: str) -> Target:
        """A job's URL, parsed once for URLs that repeat (jobs keep only the text)."""
        target = self._targets.get(text)
        if target is None:
            if len(self._targets) >= URL_CACHE_LIMIT:
                self._targets.clear()
            # normalised when accepted
            target = self._targets[text] = Target(URL(text, encoded=True))
        return target

    def _serialise(self, method: str, target: Target, headers: dict[str, str] | None,
                   body: bytes | None) -> bytes:
        """The request head (and body) as sent: the job's headers as given, except framing."""
        lines = [f"{method} {target.path} HTTP/1.1\r\n"]
        given: set[str] = set()
        if headers:
            for name, value in headers.items():
                lower = name.lower()
                if lower not in _FRAMING_HEADERS:
                    given.add(lower)
                    lines.append(f"{name}: {value}\r\n")
        if "host" not in given:
            lines.append(target.host)
        if "user-agent" not in given:
            lines.append(self._user_agent)
        if target.authorization and "authorization" not in given:
            lines.append(target.authorization)
        if body is not None or method not in _BODYLESS_METHODS:
            if "content-type" not in given:  # what the Go daemon (and aiohttp) sent
                lines.append("Content-Type: application/octet-stream\r\n")
            lines.append(f"Content-Length: {len(body) if body else 0}\r\n\r\n")
        else:
            lines.append("\r\n")
        head = "".join(lines).encode()
        return head + body if body else head

    def _account(self, job: Job, out: Outcome) -> None:
        m = self.metrics
        if out.local:  # not an attempt: the pool logs it as it reschedules the job
            m.local_errors.inc()
            return
        if out.status is not None:
            m.hot.observe_outbound(out.status, out.duration)
        elif out.timeout:
            m.timeouts.inc()
        else:
            m.errors.inc()
        if job.host_metrics and (out.status is None or out.status >= 400):
            host = m.host_label(self._target(job.url).url.host or "")
            (m.host_timeouts if out.timeout else m.host_errors).labels(host).inc()
        self._log(job, out)

    def _log(self, job: Job, out: Outcome) -> None:
        if out.ok and not log.isEnabledFor(logging.DEBUG):
            return  # the common case: nothing to log
        ms = out.duration * 1000
        url = self.redact(job.url)
        fields = {"job": job.id, "queue": job.queue, "url": url, "method": job.method,
                  "status": out.status, "duration": round(out.duration, 6),
                  "attempt": job.attempts + 1, "error": out.reason}
        if out.status is None:
            log.warning("%s %.1fms %s %s %s", job.id, ms, job.method, url, out.error, extra=fields)
        elif out.status >= 400:
            if self.cfg.log_4xx_bodies and out.preview:
                body = one_line(out.preview.decode("utf-8", "replace"))
                log.info("%s %.1fms %s %s %d %d, response: %s", job.id, ms, job.method, url,
                         out.status, out.size, body, extra=fields)
            else:
                log.info("%s %.1fms %s %s %d %d", job.id, ms, job.method, url, out.status,
                         out.size, extra=fields)
        else:
            log.debug("%s %.1fms %s %s %d %d%s", job.id, ms, job.method, url, out.status,
                      out.size, " (truncated)" if out.truncated else "", extra=fields)


def _redirected(status: int, location: str, hops: int, cfg: ClientConfig, method: str,
                target: Target, headers: dict[str, str] | None, body: bytes | None
                ) -> tuple[str, Target, dict[str, str] | None, bytes | None]:
    """The request a redirect asks for: method, target, headers and body of the next hop."""
    if hops > cfg.max_redirects:
        raise ValueError(f"more than {cfg.max_redirects} redirects (client.max_redirects)")
    try:
        url = target.url.join(URL(location))
    except (ValueError, IndexError):  # IndexError: yarl, on some malformed authorities
        url = None
    if url is None or url.scheme not in ("http", "https") or not HOST.fullmatch(url.raw_host or ""):
        raise ValueError(f"redirect to an unusable URL: {one_line(location[:200])}")
    if status == 303 or (status in (301, 302) and method == "POST"):
        method = "GET" if method != "HEAD" else method
        body = None
        headers = _without(headers, _BODY_HEADERS)
    hop = Target(url)
    if hop.key != target.key:
        headers = _without(headers, _CREDENTIALS)
    return method, hop, headers, body


def _key(url: URL) -> tuple[str, str, int]:
    return url.scheme, url.raw_host or "", url.port or 0


def _without(headers: dict[str, str] | None, names: frozenset[str]) -> dict[str, str] | None:
    if not headers:
        return headers
    return {k: v for k, v in headers.items() if k.lower() not in names}
