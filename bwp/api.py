"""HTTP API handlers: submit, health, metrics.  Every answer is JSON (metrics aside)."""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Callable

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from .config import DEFAULT_QUEUE, Config
from .jobs import JobError, parse_submission
from .metrics import CONTENT_TYPE, Metrics
from .pool import Draining, Pool, QueueFull

RETRY_AFTER_FULL = "1"
RETRY_AFTER_DRAINING = "1"
_JSON = "application/json"


def _error(status: int, message: str, **headers: str) -> web.Response:
    body = json.dumps({"success": False, "error": message}).encode()
    return web.Response(status=status, body=body, content_type=_JSON, headers=headers or None)


class Api:
    def __init__(self, cfg: Config, pool: Pool, metrics: Metrics, new_id: Callable[[], str]):
        self.cfg, self.pool, self.metrics, self.new_id = cfg, pool, metrics, new_id
        self.queue_names = frozenset(cfg.all_queues)
        self.max_body = cfg.limits.max_body_size
        self.tokens = [t.encode() for t in cfg.auth.tokens]
        self.pid = os.getpid()

    def app(self) -> web.Application:
        # aiohttp enforces client_max_size on read(); we turn its 413 into our JSON one
        app = web.Application(client_max_size=self.max_body, handler_args={"access_log": None})
        app.router.add_post("/post/http", self.post_http)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics_page)
        return app

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
        rejected = self.metrics.rejected_by
        if not self._authorized(request):
            rejected["unauthorized"].inc()
            return _error(401, "missing or invalid bearer token", **{"WWW-Authenticate": "Bearer"})
        if self.pool.draining:
            rejected["draining"].inc()
            return _error(503, "bwp is shutting down", **{"Retry-After": RETRY_AFTER_DRAINING})
        try:
            # aiohttp has already undone gzip/deflate and counts the limit after decompression
            raw = await request.read()
            sub = parse_submission(raw, self.queue_names, DEFAULT_QUEUE, self.new_id)
        except web.HTTPRequestEntityTooLarge:
            rejected["too_large"].inc()
            return _error(413, f"request body over {self.max_body} bytes")
        except RequestPayloadError as e:  # e.g. a broken gzip stream
            rejected["invalid"].inc()
            return _error(400, "cannot read the request body: " + " ".join(str(e).split()))
        except JobError as e:
            rejected["invalid"].inc()
            return _error(400, str(e))
        try:
            self.pool.submit(sub.jobs)
        except QueueFull as e:
            rejected["queue_full"].inc(len(sub.jobs))
            return _error(503, str(e), **{"Retry-After": RETRY_AFTER_FULL})
        except Draining:
            rejected["draining"].inc(len(sub.jobs))
            return _error(503, "bwp is shutting down", **{"Retry-After": RETRY_AFTER_DRAINING})
        body = json.dumps({"success": True, "ids": [j.id for j in sub.jobs]}).encode()
        return web.Response(body=body, content_type=_JSON)

    async def healthz(self, request: web.Request) -> web.Response:
        status, state = (503, "draining") if self.pool.draining else (200, "ok")
        body = json.dumps({"status": state, "pid": self.pid}).encode()
        return web.Response(status=status, body=body, content_type=_JSON)

    async def metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})
