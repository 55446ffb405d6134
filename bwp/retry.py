"""The retry policy: which outcomes are retried and after how long."""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime

from aiohttp_retry import ExponentialRetry, JitterRetry, RetryOptionsBase

from .config import RetryConfig
from .jobs import Job, Outcome


class RetryPolicy:
    """Which outcomes are retried and when; aiohttp-retry's options compute the backoff.

    The wait is never slept in a worker: the job goes back to the store's delay heap.
    """

    def __init__(self, cfg: RetryConfig):
        self.cfg = cfg
        common = dict(attempts=cfg.attempts, start_timeout=cfg.backoff,
                      max_timeout=cfg.max_backoff, factor=cfg.factor)
        self.options: RetryOptionsBase = (
            JitterRetry(random_interval_size=cfg.jitter, **common) if cfg.jitter
            else ExponentialRetry(**common))
        self.statuses = frozenset(cfg.statuses)

    def limit(self, job: Job) -> int:
        """Extra attempts the job may have: its own `retries`, else the queue's policy."""
        return job.retries if job.retries is not None else self.cfg.attempts

    def delay(self, job: Job, out: Outcome) -> float | None:
        """Seconds until the next attempt, or None when the job is finished."""
        cfg = self.cfg
        if out.ok or out.denied or job.attempts > self.limit(job):
            return None
        if out.status is not None:
            retryable = out.status in self.statuses or (cfg.server_errors and out.status >= 500)
        else:
            retryable = cfg.timeouts if out.timeout else cfg.connection_errors
        if not retryable:
            return None
        backoff = self.options.get_timeout(job.attempts - 1)
        # JitterRetry may exceed its max_timeout, and Retry-After is the server's wish: cap both
        return min(max(backoff, _retry_after(out)), cfg.max_backoff)


def _retry_after(out: Outcome) -> float:
    value = (out.headers or {}).get("Retry-After")
    if not value:
        return 0.0
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return 0.0
