"""Prometheus metrics, all named `bwp_*`, in a registry of the process's own.

Queue lengths and busy workers are read through callbacks at scrape time, so the hot path
does not pay for gauge updates; counters used per job are resolved to their label children
once, up front.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# `_created` series double the page and nobody alerts on them
disable_created_metrics()

REJECT_REASONS = ("invalid", "too_large", "timeout", "queue_full", "draining", "unauthorized")
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
OTHER_HOSTS = "other"  # label for hosts past the cardinality bound
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self, queues: Iterable[str], max_hosts: int = 200):
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.max_hosts = max_hosts
        self.accepted = Counter("bwp_jobs_accepted", "Jobs accepted for delivery", ["queue"],
                                registry=r)
        self.rejected = Counter("bwp_jobs_rejected", "Jobs or requests refused at submit",
                                ["reason"], registry=r)
        self.requests = Counter("bwp_http_requests", "Outbound requests answered, by status class",
                                ["code"], registry=r)
        self.errors = Counter("bwp_http_errors", "Outbound requests that failed without a status "
                              "(connection refused/reset, DNS, TLS, denied destination)",
                              registry=r)
        self.timeouts = Counter("bwp_http_timeouts", "Outbound requests that timed out",
                                registry=r)
        self.duration = Histogram(
            "bwp_http_request_duration_seconds", "Outbound request duration, headers to body end",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)
        self.succeeded = Counter("bwp_jobs_succeeded", "Jobs finished with a 1xx-3xx response",
                                 ["queue"], registry=r)
        self.failed = Counter("bwp_jobs_failed", "Jobs finished without success", ["queue"],
                              registry=r)
        self.callbacks = Counter("bwp_callbacks", "Callback jobs made for finished jobs: each "
                                 "then counts once in bwp_jobs_succeeded or bwp_jobs_failed "
                                 "(at once as failed when its queue is full)", ["queue"],
                                 registry=r)
        self.retries = Counter("bwp_job_retries", "Attempts rescheduled after a retryable failure",
                               ["queue"], registry=r)
        self.duplicates = Counter("bwp_jobs_duplicate", "Jobs skipped by unique/once", registry=r)
        self.replayed = Counter("bwp_jobs_replayed", "Dead letters enqueued again", ["queue"],
                                registry=r)
        self.dead_letters = Gauge("bwp_dead_letters", "Failed jobs kept in the history",
                                  registry=r)
        self.delayed = Gauge("bwp_queue_delayed", "Jobs waiting for their time (delay or retry "
                             "backoff), included in bwp_queue_length", ["queue"], registry=r)
        self.abandoned = Counter("bwp_jobs_abandoned", "Jobs dropped at the drain deadline "
                                 "(with the journal on they stay there for the next process)",
                                 ["queue"], registry=r)
        self.recovered = Counter("bwp_jobs_recovered", "Unfinished jobs taken over from the "
                                 "journal of a process that exited or died", ["queue"], registry=r)
        self.journal_syncs = Counter("bwp_journal_syncs", "Journal writes made durable (one "
                                     "fsync covers every job submitted meanwhile)", registry=r)
        self.journal_size = Gauge("bwp_journal_size_bytes", "Size of this process's journal file "
                                  "(compacted when it outgrows its live jobs)", registry=r)
        self.host_errors = Counter("bwp_host_errors", "Errors and >=400 answers per destination "
                                   f"host (hostMetrics jobs; at most {max_hosts} hosts, then "
                                   f"'{OTHER_HOSTS}')", ["host"], registry=r)
        self.host_timeouts = Counter("bwp_host_timeouts", "Timeouts per destination host "
                                     "(hostMetrics jobs)", ["host"], registry=r)
        self.queue_length = Gauge("bwp_queue_length", "Jobs waiting, delayed ones included",
                                  ["queue"], registry=r)
        self.queue_capacity = Gauge("bwp_queue_capacity", "Bound of the queue", ["queue"],
                                    registry=r)
        self.busy_workers = Gauge("bwp_busy_workers", "Workers sending a request", ["queue"],
                                  registry=r)
        self.workers = Gauge("bwp_workers", "Workers of the queue", ["queue"], registry=r)
        # counted at scrape time only; render() runs in the event loop's thread, so
        # all_tasks() finds the loop (a leak of tasks shows here first)
        self.tasks = Gauge("bwp_asyncio_tasks", "asyncio tasks alive in the event loop",
                           registry=r)
        self.tasks.set_function(lambda: len(asyncio.all_tasks()))
        self.requests_by_class = [self.requests.labels(c) for c in STATUS_CLASSES]
        self.rejected_by = {reason: self.rejected.labels(reason) for reason in REJECT_REASONS}
        self._hosts: set[str] = set()
        for name in queues:
            for c in (self.accepted, self.succeeded, self.failed, self.abandoned, self.retries,
                      self.replayed, self.recovered, self.callbacks):
                c.labels(name)

    def watch_queue(self, name: str, capacity: int, workers: int,
                    length: Callable[[], float], busy: Callable[[], float],
                    delayed: Callable[[], float]) -> None:
        self.queue_capacity.labels(name).set(capacity)
        self.workers.labels(name).set(workers)
        self.queue_length.labels(name).set_function(length)
        self.busy_workers.labels(name).set_function(busy)
        self.delayed.labels(name).set_function(delayed)

    def observe_status(self, status: int) -> None:
        index = status // 100 - 1
        if 0 <= index < len(STATUS_CLASSES):
            self.requests_by_class[index].inc()

    def host_label(self, host: str) -> str:
        if host in self._hosts:
            return host
        if len(self._hosts) < self.max_hosts:
            self._hosts.add(host)
            return host
        return OTHER_HOSTS

    def render(self) -> bytes:
        return generate_latest(self.registry)
