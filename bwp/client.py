"""Outbound HTTP: one long-lived aiohttp session whose connector binds every new socket to the
source address the router picks for the address actually dialled.

Connections are pooled and kept alive per destination by aiohttp; the routing table only
changes with a new process (reload), so a pooled connection always has the right source.
"""

from __future__ import annotations

import logging
import time

import aiohttp

from .config import ClientConfig
from .jobs import Job, Outcome
from .metrics import Metrics
from .router import DestinationDenied, Router

log = logging.getLogger("bwp.client")

PREVIEW_BYTES = 1024  # kept from each response for job status
RESULT_HEADERS = ("Content-Type", "Content-Length", "Location", "Retry-After", "Server")


class HttpClient:
    def __init__(self, cfg: ClientConfig, router: Router, metrics: Metrics, max_connections: int):
        self.cfg, self.router, self.metrics = cfg, router, metrics
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[float | None, aiohttp.ClientTimeout] = {}

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            # the default limit=100 would silently cap a larger worker pool
            limit=self.max_connections,
            limit_per_host=self.cfg.limit_per_host,
            ttl_dns_cache=self.cfg.dns_cache_ttl,
            socket_factory=self.router.socket_factory,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers={"User-Agent": self.cfg.user_agent},
            # send only what the job asked for, like the Go daemon (no Accept/Accept-Encoding)
            skip_auto_headers=("Accept", "Accept-Encoding"),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),  # jobs must not leak cookies to each other
            timeout=self._timeout(None),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _timeout(self, read: float | None) -> aiohttp.ClientTimeout:
        try:
            return self._timeouts[read]
        except KeyError:
            connect = self.cfg.connect_timeout
            read_s = read if read is not None else self.cfg.read_timeout
            t = aiohttp.ClientTimeout(total=connect + read_s, sock_connect=connect, sock_read=read_s)
            if len(self._timeouts) < 64:
                self._timeouts[read] = t
            return t

    async def send(self, job: Job) -> Outcome:
        """One attempt of a job; never raises for network trouble."""
        assert self._session is not None, "HttpClient.start() first"
        out = Outcome()
        start = time.monotonic()
        try:
            async with self._session.request(
                job.method, job.url, headers=job.headers, data=job.body,
                timeout=self._timeout(job.timeout),
                allow_redirects=self.cfg.follow_redirects,
                max_redirects=self.cfg.max_redirects,
            ) as resp:
                out.status = resp.status
                out.headers = {h: resp.headers[h] for h in RESULT_HEADERS if h in resp.headers}
                if job.method != "HEAD":
                    await self._read_body(resp, out)
        except (TimeoutError, aiohttp.ServerTimeoutError):
            out.timeout, out.error = True, "timeout"
        except aiohttp.ClientConnectorError as e:
            out.denied = isinstance(e.os_error, DestinationDenied)
            out.error = str(e.os_error) if out.denied else f"connect: {e.os_error}"
        except (aiohttp.ClientError, OSError, ValueError) as e:
            out.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        out.duration = time.monotonic() - start
        self._account(job, out)
        return out

    async def _read_body(self, resp: aiohttp.ClientResponse, out: Outcome) -> None:
        """Read up to the cap and discard; keep the first bytes for the job's result."""
        cap = self.cfg.max_response_size
        content = resp.content
        preview = b""
        size = 0
        while True:
            chunk = await content.readany()
            if not chunk:
                break
            if size < PREVIEW_BYTES:
                preview += chunk[: PREVIEW_BYTES - size]
            size += len(chunk)
            if size > cap:
                out.truncated = True
                resp.close()  # drop the connection rather than read an unbounded body
                break
        out.preview, out.size = preview, size

    def _account(self, job: Job, out: Outcome) -> None:
        m = self.metrics
        if out.status is not None:
            m.observe_status(out.status)
            m.duration.observe(out.duration)
        elif out.timeout:
            m.timeouts.inc()
        else:
            m.errors.inc()
        if job.host_metrics and (out.status is None or out.status >= 400):
            host = m.host_label(job.url.host or "")
            (m.host_timeouts if out.timeout else m.host_errors).labels(host).inc()
        self._log(job, out)

    def _log(self, job: Job, out: Outcome) -> None:
        ms = out.duration * 1000
        if out.status is None:
            log.warning("%s %.1fms %s %s %s", job.id, ms, job.method, job.url, out.error)
        elif out.status >= 400:
            if self.cfg.log_4xx_bodies and out.preview:
                body = out.preview.decode("utf-8", "replace")
                log.info("%s %.1fms %s %s %d %d, response: %s", job.id, ms, job.method, job.url,
                         out.status, out.size, body)
            else:
                log.info("%s %.1fms %s %s %d %d", job.id, ms, job.method, job.url, out.status,
                         out.size)
        elif log.isEnabledFor(logging.DEBUG):
            log.debug("%s %.1fms %s %s %d %d%s", job.id, ms, job.method, job.url, out.status,
                      out.size, " (truncated)" if out.truncated else "")

