"""Prometheus metrics, all named `bwp_*`, in a registry of the process's own.

Queue lengths and busy workers are read through callbacks at scrape time, so the hot path
does not pay for gauge updates; counters used per job are resolved to their label children
once, up front.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__

# `_created` series double the page and nobody alerts on them
disable_created_metrics()

REJECT_REASONS = ("invalid", "too_large", "timeout", "queue_full", "draining", "unauthorized",
                  "unavailable")  # unavailable: the broker did not confirm
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
OTHER_HOSTS = "other"  # label for hosts past the cardinality bound
MAX_OPEN_LABELS = 50  # destinations named in bwp_breaker_open
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
OUTBOUND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
WAIT_BUCKETS = (0.001, 0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
API_ENDPOINTS = ("submit", "job", "jobs", "retry", "cancel", "healthz", "metrics", "other")


class Buckets:
    """One histogram's counts, observed in ~0.15 µs (prometheus-client's Histogram takes ~1 µs:
    a lock and a Python loop), for what is observed once per request or job."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds, self.counts, self.sum = bounds, [0] * (len(bounds) + 1), 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        out, total = [], 0
        for bound, n in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


def _count_class(counts: list[int], status: int) -> None:
    """One more in `status`'s class (counts are by STATUS_CLASSES; others are not counted)."""
    index = status // 100 - 1
    if 0 <= index < len(STATUS_CLASSES):
        counts[index] += 1


class HotPathCollector(Collector):
    """What is counted once per request or job, in plain ints and lists (prometheus-client's
    Counter.inc takes ~0.35 µs, a lock; Histogram.observe ~0.7 µs), turned into metric
    families only when scraped: the API's requests (by endpoint and status class, latency by
    endpoint), jobs accepted and succeeded by queue, the time jobs wait before their first
    attempt, and the outbound requests answered (by status class, and their duration)."""

    def __init__(self, queues: Iterable[str]):
        queues = list(queues)
        self.api = {e: Buckets(LATENCY_BUCKETS) for e in API_ENDPOINTS}
        self.api_codes = {e: [0] * len(STATUS_CLASSES) for e in API_ENDPOINTS}
        self.wait = {q: Buckets(WAIT_BUCKETS) for q in queues}
        self.accepted = dict.fromkeys(queues, 0)
        self.succeeded = dict.fromkeys(queues, 0)
        self.outbound_codes = [0] * len(STATUS_CLASSES)
        self.outbound = Buckets(OUTBOUND_BUCKETS)

    def observe_api(self, endpoint: str, status: int, seconds: float) -> None:
        self.api[endpoint].observe(seconds)
        _count_class(self.api_codes[endpoint], status)

    def observe_outbound(self, status: int, seconds: float) -> None:
        """A destination answered with `status` after `seconds`."""
        self.outbound.observe(seconds)
        _count_class(self.outbound_codes, status)

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("bwp_api_requests", "Requests the API answered, by "
                                       "endpoint and status class", labels=["endpoint", "code"])
        for endpoint, counts in self.api_codes.items():
            for code, n in zip(STATUS_CLASSES, counts, strict=True):
                requests.add_metric([endpoint, code], n)
        yield requests
        yield self._histogram("bwp_api_request_duration_seconds", "Time the API took to answer, "
                              "body read included", "endpoint", self.api)
        yield self._histogram("bwp_job_queue_wait_seconds", "Time from a job being due (accepted, "
                              "or its delay over) to the start of its first attempt", "queue",
                              self.wait)
        yield self._by_queue("bwp_jobs_accepted", "Jobs accepted for delivery", self.accepted)
        yield self._by_queue("bwp_jobs_succeeded", "Jobs finished with a 1xx-3xx response",
                             self.succeeded)
        # "outbound": what bwp sent to destinations; the API's own are bwp_api_*
        outbound = CounterMetricFamily("bwp_outbound_requests", "Requests bwp sent to "
                                       "destinations that were answered, by status class",
                                       labels=["code"])
        for code, n in zip(STATUS_CLASSES, self.outbound_codes, strict=True):
            outbound.add_metric([code], n)
        yield outbound
        duration = HistogramMetricFamily("bwp_outbound_request_duration_seconds", "Duration of "
                                         "a request to a destination, connecting to the end of "
                                         "the answer")
        duration.add_metric([], self.outbound.cumulative(), self.outbound.sum)
        yield duration

    @staticmethod
    def _by_queue(name: str, doc: str, counts: dict[str, int]) -> Metric:
        family = CounterMetricFamily(name, doc, labels=["queue"])
        for queue, n in counts.items():
            family.add_metric([queue], n)
        return family

    @staticmethod
    def _histogram(name: str, doc: str, label: str, series: dict[str, Buckets]) -> Metric:
        family = HistogramMetricFamily(name, doc, labels=[label])
        for value, b in series.items():
            family.add_metric([value], b.cumulative(), b.sum)
        return family


class Metrics:
    def __init__(self, queues: Iterable[str], max_hosts: int = 200):
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.max_hosts = max_hosts
        self.rejected = Counter("bwp_jobs_rejected", "Jobs or requests refused at submit",
                                ["reason"], registry=r)
        self.errors = Counter("bwp_outbound_errors", "Requests to destinations that failed "
                              "without a status (connection refused/reset, DNS, TLS, denied "
                              "destination)", registry=r)
        self.timeouts = Counter("bwp_outbound_timeouts", "Requests to destinations that timed out",
                                registry=r)
        self.local_errors = Counter("bwp_local_errors", "Outbound attempts that could not start "
                                    "for want of a local resource (EMFILE, ENFILE, ENOBUFS, "
                                    "ENOMEM, EADDRNOTAVAIL): no attempt counted, the job is sent "
                                    "again after a short backoff", registry=r)
        queues = list(queues)
        self.hot = HotPathCollector(queues)
        r.register(self.hot)
        ProcessCollector(registry=r)  # process_cpu_seconds_total, resident memory, open fds
        Info("bwp_build", "The running bwp", registry=r).info({"version": __version__})
        Gauge("bwp_start_time_seconds", "When this process started serving (Unix time)",
              registry=r).set(time.time())
        Gauge("bwp_processes", "Processes serving (1 each: summed across processes)",
              registry=r).set(1)
        self.held_bytes = Gauge("bwp_queued_bytes", "Bytes the queued jobs hold (body, url, "
                                "headers; a body clones share counts once), bounded by "
                                "limits.max_queued_bytes", registry=r)
        self.oldest = Gauge("bwp_queue_oldest_due_seconds", "Age of the oldest job that is due "
                            "and not yet taken by a worker (0 when none waits)", ["queue"],
                            registry=r)
        self.failed = Counter("bwp_jobs_failed", "Jobs finished without success", ["queue"],
                              registry=r)
        self.callbacks = Counter("bwp_callbacks", "Callback jobs made for finished jobs: each "
                                 "then counts once in bwp_jobs_succeeded or bwp_jobs_failed "
                                 "(at once as failed when its queue is full)", ["queue"],
                                 registry=r)
        self.retries = Counter("bwp_job_retries", "Attempts rescheduled after a retryable failure",
                               ["queue"], registry=r)
        self.duplicates = Counter("bwp_jobs_duplicate", "Jobs skipped by unique/once", ["queue"],
                                  registry=r)
        self.replayed = Counter("bwp_jobs_replayed", "Dead letters enqueued again", ["queue"],
                                registry=r)
        self.cancelled = Counter("bwp_jobs_cancelled", "Jobs cancelled before they were sent "
                                 "(DELETE /jobs/{id})", ["queue"], registry=r)
        self.dead_letters = Gauge("bwp_dead_letters", "Failed jobs kept in the history",
                                  registry=r)
        self.shared_dead_letters = Gauge("bwp_shared_dead_letters", "Of bwp_dead_letters, the "
                                         "broker's queues' (from every host)", registry=r)
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
        # RabbitMQ (rabbitmq.url set); bwp_queue_length of a broker queue is the broker's count
        self.broker_up = Gauge("bwp_broker_up", "1 while connected to RabbitMQ", registry=r)
        self.broker_publish = Histogram(
            "bwp_broker_publish_seconds", "From publishing a request's jobs to the broker's last "
            "confirm", buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5),
            registry=r)
        self.broker_nacks = Counter("bwp_broker_nacks", "Jobs the broker refused (a queue at its "
                                    "x-max-length) or did not confirm", ["queue"], registry=r)
        self.broker_dead = Gauge("bwp_broker_dead_letters", "Messages in the broker's NAME_dead "
                                 "queue (every host's failed jobs, as last read)", ["queue"],
                                 registry=r)
        self.redelivered = Counter("bwp_jobs_redelivered", "Jobs delivered again by the broker "
                                   "(a host died or stopped mid-attempt: at-least-once)",
                                   ["queue"], registry=r)
        self.breaker_trips = Counter("bwp_breaker_trips", "Times a destination's breaker opened "
                                     "(client.breaker_failures)", registry=r)
        self.breaker_held = Counter("bwp_breaker_held", "Attempts not made (and not counted) "
                                    "because the destination's breaker was open", registry=r)
        self.breaker_open = Gauge("bwp_breaker_open", "Destinations whose breaker is open "
                                  f"(the first {MAX_OPEN_LABELS} by name, the rest as "
                                  f"{OTHER_HOSTS!r})", ["destination"], registry=r)
        self._open_labels: dict[str, str] = {}  # destination -> its label
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
        # all_tasks() finds the loop (a leak of tasks shows here first: read it beside
        # bwp_connections, as each API connection that has made a request holds one)
        self.tasks = Gauge("bwp_asyncio_tasks", "asyncio tasks alive in the event loop (one "
                           "per API connection that has made a request among them)", registry=r)
        self.tasks.set_function(lambda: len(asyncio.all_tasks()))
        # the API's own connections (bwp/connections.py sets the callback and the limit)
        self.connections = Gauge("bwp_connections", "API connections open", registry=r)
        self.connections_max = Gauge("bwp_connections_max", "API connections allowed "
                                     "(limits.max_connections)", registry=r)
        self.connections_closed = Counter(
            "bwp_connections_closed", "API connections bwp closed to keep its capacity: evicted "
            "(idle, to make room at limits.max_connections), refused (at the limit with a request "
            "under way on every one: 503), header_timeout (no whole request head within "
            "limits.header_timeout)", ["reason"], registry=r)
        for reason in ("evicted", "refused", "header_timeout"):
            self.connections_closed.labels(reason)
        self.rejected_by = {reason: self.rejected.labels(reason) for reason in REJECT_REASONS}
        self._hosts: set[str] = set()
        for name in queues:
            for c in (self.failed, self.abandoned, self.retries,
                      self.replayed, self.cancelled, self.recovered, self.callbacks,
                      self.duplicates):
                c.labels(name)

    def watch_queue(self, name: str, capacity: int, workers: int,
                    length: Callable[[], float], busy: Callable[[], float],
                    delayed: Callable[[], float], oldest: Callable[[], float]) -> None:
        self.oldest.labels(name).set_function(oldest)
        self.queue_capacity.labels(name).set(capacity)
        self.workers.labels(name).set(workers)
        self.queue_length.labels(name).set_function(length)
        self.busy_workers.labels(name).set_function(busy)
        self.delayed.labels(name).set_function(delayed)

    def breaker_changed(self, destination: str, is_open: bool) -> None:
        """A destination's breaker opened or closed (bwp/breaker.py)."""
        if is_open:
            self.breaker_trips.inc()
            named = sum(1 for v in self._open_labels.values() if v != OTHER_HOSTS)
            label = destination if named < MAX_OPEN_LABELS else OTHER_HOSTS
            self._open_labels[destination] = label
            self.breaker_open.labels(label).inc()
            return
        label = self._open_labels.pop(destination, None)
        if label is None:
            return
        if label == OTHER_HOSTS and OTHER_HOSTS in self._open_labels.values():
            self.breaker_open.labels(label).dec()
        else:
            self.breaker_open.remove(label)

    def host_label(self, host: str) -> str:
        if host in self._hosts:
            return host
        if len(self._hosts) < self.max_hosts:
            self._hosts.add(host)
            return host
        return OTHER_HOSTS

    def render(self) -> bytes:
        return generate_latest(self.registry)
