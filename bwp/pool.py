"""Named bounded queues, the delay scheduler and the worker pool.

`JobStore` is the seam for other backends (the on-disk journal, a shared broker): the API
admits through it and the workers take from it, and neither knows how it keeps jobs.
`MemoryStore` is the default: per queue a FIFO of due jobs plus one heap of delayed jobs
woken by a single loop timer (no polling, no scan).  `journal.JournaledStore` extends it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import heapq
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

from aiohttp_retry import ExponentialRetry, JitterRetry, RetryOptionsBase

from .config import DEFAULT_QUEUE, QueueConfig, RetryConfig
from .history import History
from .jobs import MAX_RETRIES, HeldBytes, Job, Outcome, TooMany
from .lifecycle import ThrottledLog
from .metrics import Metrics

log = logging.getLogger("bwp.pool")


class QueueFull(Exception):
    """Not enough room for the whole batch in `queue`; nothing was admitted."""

    def __init__(self, queue: str | None, why: str = ""):
        if queue:
            super().__init__(f"queue {queue!r} is full" + (f" ({why})" if why else ""))
        else:
            super().__init__(why or "every queue is full")
        self.queue = queue


class Draining(Exception):
    """The process is stopping and accepts no new jobs."""


class NotReplayable(Exception):
    """Only failed jobs still in the history can be replayed."""


class StoreError(Exception):
    """The store could not make admitted jobs durable (e.g. the journal's disk failed).

    The jobs are admitted in memory all the same and will run."""


Restore = Callable[[Sequence["Job"]], None]


class JobStore(Protocol):
    """Where accepted jobs wait until a worker takes them."""

    durable: bool  # jobs left at exit survive for the next process
    held: HeldBytes  # bytes of the jobs in the store, bounded by limits.max_queued_bytes

    def start(self, restore: Restore) -> None:
        """Begin background work; jobs recovered from elsewhere (a journal left by a dead
        process) are placed in the store and then passed to `restore`."""

    def admit(self, jobs: Sequence[Job]) -> Awaitable[None] | None:
        """Store every job or none (raises QueueFull).  An awaitable result must be awaited
        before the jobs are confirmed to the client (raises StoreError)."""

    async def take(self, queue: str) -> Job:
        """The next due job of `queue`, waiting for one."""

    def defer(self, job: Job) -> None:
        """Put an already admitted job back, due at job.not_before (a retry; no bound check)."""

    def done(self, job: Job) -> None:
        """The job is no longer this store's: finished for good, or handed to another process."""

    def length(self, queue: str) -> int:
        """Jobs of `queue` waiting, delayed ones included."""

    def delayed(self, queue: str) -> int:
        """Jobs of `queue` waiting for their time (delay or retry backoff)."""

    def oldest_due(self, queue: str) -> float:
        """Seconds the longest-waiting due job of `queue` has been due (0 when none is)."""

    def remaining(self) -> list[Job]:
        """Every job not yet taken (used at the drain deadline)."""

    def pop_delayed(self, after: float = float("-inf")) -> list[Job]:
        """Remove and return the jobs waiting for their time that are due after `after` (all
        by default: handed to a successor), soonest first."""

    async def close(self) -> None:
        """Release timers and files; what is left stays for the next process if durable."""


class _Lane:
    """One named queue in memory: due jobs in order, a count of delayed ones, idle takers."""

    __slots__ = ("capacity", "delayed", "ready", "takers")

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.ready: deque[Job] = deque()
        self.delayed = 0
        self.takers: deque[asyncio.Future[None]] = deque()

    def push(self, job: Job) -> None:
        self.ready.append(job)
        # Jobs stay in `ready` until a worker really runs: a cancelled taker loses nothing.
        while self.takers:
            fut = self.takers.popleft()
            if not fut.done():
                fut.set_result(None)
                break


def _no_room(held: HeldBytes) -> QueueFull:
    return QueueFull(None, f"no room: the queued jobs hold {held.total} of the {held.limit} "
                           "bytes allowed (limits.max_queued_bytes)")


def _bound_key(queue: str) -> str:
    return "pool.queue_size" if queue == DEFAULT_QUEUE else f"queues.{queue}.queue_size"


class MemoryStore:
    durable = False

    def __init__(self, queues: Iterable[QueueConfig], max_bytes: int = 1 << 62):
        self.lanes = {q.name: _Lane(q.queue_size) for q in queues}
        self.held = HeldBytes(max_bytes)
        self._heap: list[tuple[float, int, Job]] = []
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")

    def start(self, restore: Restore) -> None:
        pass  # nothing outlives a process in memory

    def admit(self, jobs: Sequence[Job]) -> Awaitable[None] | None:
        needed: dict[str, int] = {}
        for job in jobs:
            needed[job.queue] = needed.get(job.queue, 0) + 1
        for name, n in needed.items():
            lane = self.lanes[name]
            if len(lane.ready) + lane.delayed + n > lane.capacity:
                raise QueueFull(name, f"{lane.capacity} jobs, {_bound_key(name)}")
        held = self.held
        weight = held.weigh(jobs)
        if weight > held.limit:
            raise TooMany(f"the jobs of this request hold {weight} bytes, over the limit of "
                          f"{held.limit} for everything queued (limits.max_queued_bytes)")
        if held.total + weight > held.limit:
            raise _no_room(held)
        self._place(jobs)
        return None

    def _place(self, jobs: Sequence[Job]) -> None:
        self.held.hold(jobs)
        for job in jobs:
            self._enqueue(job)

    def _enqueue(self, job: Job) -> None:
        if job.not_before is not None and job.not_before > time.time():
            job.state = "delayed"
            self._schedule(job)
        else:
            job.state = "queued"
            self.lanes[job.queue].push(job)

    def defer(self, job: Job) -> None:
        self._schedule(job)

    def _schedule(self, job: Job) -> None:
        assert job.not_before is not None
        self.lanes[job.queue].delayed += 1
        heapq.heappush(self._heap, (job.not_before, next(self._seq), job))
        if job.not_before < self._timer_at:
            self._arm(job.not_before)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer_at = when
        self._timer = loop.call_at(loop.time() + max(0.0, when - time.time()), self._wake)

    def _wake(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        now = time.time()
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, job = heapq.heappop(heap)
            lane = self.lanes[job.queue]
            lane.delayed -= 1
            job.state = "queued"
            lane.push(job)
        if heap:
            self._arm(heap[0][0])

    async def take(self, queue: str) -> Job:
        lane = self.lanes[queue]
        while not lane.ready:
            fut = asyncio.get_running_loop().create_future()
            lane.takers.append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut in lane.takers:
                    lane.takers.remove(fut)
                raise
        return lane.ready.popleft()

    def done(self, job: Job) -> None:
        self.held.release(job)

    def length(self, queue: str) -> int:
        lane = self.lanes[queue]
        return len(lane.ready) + lane.delayed

    def delayed(self, queue: str) -> int:
        return self.lanes[queue].delayed

    def oldest_due(self, queue: str) -> float:
        ready = self.lanes[queue].ready
        if not ready:
            return 0.0
        job = ready[0]  # due in order: the first has waited longest (near enough for retries)
        return max(0.0, time.time() - (job.not_before or job.created))

    def remaining(self) -> list[Job]:
        jobs = [job for lane in self.lanes.values() for job in lane.ready]
        jobs += [job for _, _, job in sorted(self._heap)]
        return jobs

    def pop_delayed(self, after: float = float("-inf")) -> list[Job]:
        keep, out = [], []
        for entry in self._heap:
            (out if entry[0] > after else keep).append(entry)
        heapq.heapify(keep)
        self._heap = keep
        for _, _, job in out:
            self.lanes[job.queue].delayed -= 1
        return [job for _, _, job in sorted(out)]

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


Send = Callable[[Job], Awaitable[Outcome]]


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


class Pool:
    """Fixed workers per named queue; admission is all or nothing."""

    def __init__(self, queues: Iterable[QueueConfig], store: JobStore, send: Send,
                 metrics: Metrics, history: History):
        self.queues = {q.name: q for q in queues}
        self.store, self.send, self.metrics, self.history = store, send, metrics, history
        self.policies = {name: RetryPolicy(q.retry) for name, q in self.queues.items()}
        # label children resolved once: .labels() is a locked dict lookup per call
        self._accepted = {name: metrics.accepted.labels(name) for name in self.queues}
        self._recovered = {name: metrics.recovered.labels(name) for name in self.queues}
        self._succeeded = {name: metrics.succeeded.labels(name) for name in self.queues}
        self._failed = {name: metrics.failed.labels(name) for name in self.queues}
        self._callbacks = {name: metrics.callbacks.labels(name) for name in self.queues}
        self._duplicates = {name: metrics.duplicates.labels(name) for name in self.queues}
        self.busy = dict.fromkeys(self.queues, 0)
        self._high_water = {name: q.queue_size - min(q.size, q.queue_size // 100)
                            for name, q in self.queues.items()}
        self.running: set[Job] = set()
        # jobs this host lacked the fds or ports to send, by times in a row (_local_shortage)
        self._shortages: dict[Job, int] = {}
        self._shortage_log = ThrottledLog(log, logging.WARNING)  # EMFILE hits every job
        self.draining = False
        self._drain_deadline = float("inf")  # wall clock; set by drain()
        self._abandoned = 0  # jobs given up by the drain
        self._workers: list[asyncio.Task[None]] = []
        self._idle = asyncio.Event()
        for name, q in self.queues.items():
            metrics.watch_queue(name, q.queue_size, q.size,
                                length=lambda n=name: store.length(n),
                                busy=lambda n=name: self.busy[n],
                                delayed=lambda n=name: store.delayed(n),
                                oldest=lambda n=name: store.oldest_due(n))
        metrics.dead_letters.set_function(lambda: history.dead_letters)
        metrics.held_bytes.set_function(lambda: store.held.total)

    def start(self) -> None:
        self.store.start(self._restore)
        for name, q in self.queues.items():
            for i in range(q.size):
                self._workers.append(asyncio.create_task(self._work(name), name=f"{name}-{i}"))

    def submit(self, jobs: Sequence[Job]) -> tuple[list[Job], list[str], Awaitable[None] | None]:
        """Admit a whole batch or raise (QueueFull, Draining) having admitted nothing.

        Returns the admitted jobs, the ids skipped by `unique`/`once`, and what to await
        before confirming them (the store's durability, see JobStore.admit).
        """
        if self.draining:
            raise Draining()
        history = self.history
        fresh: list[Job] = []
        duplicates: list[str] = []
        ids_in_batch: set[str] = set()
        for job in jobs:
            if job.unique or job.once:
                known = history.knows(job.id) if job.once else history.is_pending(job.id)
                if known or job.id in ids_in_batch:
                    duplicates.append(job.id)
                    self._duplicates[job.queue].inc()
                    continue
            ids_in_batch.add(job.id)
            fresh.append(job)
        durable = self.store.admit(fresh)
        for job in fresh:
            history.add(job)
        if len(self.queues) == 1:  # the common case: one counter update per request
            self._accepted[DEFAULT_QUEUE].inc(len(fresh))
        else:
            for job in fresh:
                self._accepted[job.queue].inc()
        return fresh, duplicates, durable

    def _restore(self, jobs: Sequence[Job]) -> None:
        """Jobs another process left unfinished (now in our store) become ours."""
        for job in jobs:
            self.history.add(job)
            self._recovered[job.queue].inc()
        log.info("recovered %d unfinished jobs from the journal", len(jobs))

    def replay(self, job_id: str) -> tuple[Job, Awaitable[None] | None]:
        """Enqueue a dead letter again under the same id (and what to await, as submit)."""
        if self.draining:
            raise Draining()
        job = self.history.get(job_id)
        if job is None or job.state != "failed":
            raise NotReplayable(job_id)
        before = job.attempts, job.outcome, job.finished
        job.not_before = time.time()  # due now: its queue wait counts from here
        job.attempts, job.outcome, job.finished = 0, None, None  # as journaled by admit
        try:
            durable = self.store.admit([job])
        except (QueueFull, TooMany):
            job.attempts, job.outcome, job.finished = before  # the dead letter stays as it was
            raise
        self.history.reopen(job)
        self.metrics.replayed.labels(job.queue).inc()
        return job, durable

    def hand_over(self, max_clones: int) -> list[tuple[list[Job], dict[str, Any]]]:
        """Take the delayed and retrying jobs out, with the submissions that recreate them in
        the process replacing this one (their time may lie past our drain deadline).  Jobs
        that share a body (clones) go as one root carrying it and `clones`: encoded once, and
        shared again by the successor."""
        by_body: dict[int, list[Job]] = {}
        for job in self.store.pop_delayed():
            by_body.setdefault(id(job.body) if job.body else id(job), []).append(job)
        out = []
        for jobs in by_body.values():
            shared = len(jobs) > 1
            for i in range(0, len(jobs), max_clones):
                group = jobs[i:i + max_clones]
                try:
                    subs = [job.as_submission(self._retries_left(job), with_body=not shared)
                            for job in group]
                    if shared:
                        body = base64.b64encode(group[0].body or b"").decode()
                        out.append((group, {"body": body, "clones": subs}))
                    else:
                        out.append((group, subs[0]))
                except Exception:  # jobs that cannot be described must not cost the others
                    log.exception("jobs %s cannot be handed over: they stay in this process",
                                  ", ".join(job.id for job in group))
                    self.keep(group)
        return out

    def _retries_left(self, job: Job) -> int:
        return min(MAX_RETRIES, max(0, self.policies[job.queue].limit(job) - job.attempts))

    def keep(self, jobs: Iterable[Job]) -> None:
        """Jobs whose hand-over failed stay here, to be drained or logged as abandoned."""
        for job in jobs:
            self.store.defer(job)

    def handed_over(self, jobs: Iterable[Job]) -> None:
        """The successor has confirmed these: they are no longer ours."""
        for job in jobs:
            self.store.done(job)
            self._shortages.pop(job, None)
            _wake(job)  # a `wait` for it ends here: this process will not see it finish

    def everything_full(self) -> QueueFull:
        """What to answer when full() refuses a submit before parsing it."""
        held = self.store.held
        if held.total >= held.limit:
            return _no_room(held)
        if len(self.queues) == 1:
            ((name, q),) = self.queues.items()
            return QueueFull(name, f"{q.queue_size} jobs, {_bound_key(name)}")
        return QueueFull(None, "every queue is full (each at its queue_size)")

    def full(self) -> bool:
        """Every queue is at its high-water mark: a submit can be refused before parsing it.

        The mark leaves min(workers, 1 %) of the bound: under overload the last slots would
        only be parsed for and fought over, taking the CPU the workers need to empty them."""
        held = self.store.held
        if held.total >= held.limit:
            return True
        length = self.store.length
        return all(length(n) >= mark for n, mark in self._high_water.items())

    def outstanding(self) -> int:
        return sum(self.store.length(n) for n in self.queues) + len(self.running)

    async def _work(self, queue: str) -> None:
        store, busy, running = self.store, self.busy, self.running
        policy = self.policies[queue]
        retries = self.metrics.retries.labels(queue)
        shorts = self._shortages
        waited = self.metrics.hot.wait[queue]
        while True:
            job = await store.take(queue)
            if job.outcome is None:  # its first attempt: how long it waited for a worker
                waited.observe(time.time() - (job.not_before or job.created))
            busy[queue] += 1
            running.add(job)
            job.state = "running"
            try:
                outcome = await self.send(job)
            except Exception as e:  # a bug, not the network: keep the worker and the job
                log.exception("job %s: sending failed unexpectedly", job.id)
                outcome = Outcome(error=f"internal error: {type(e).__name__}: {e}")
            finally:
                running.discard(job)
                busy[queue] -= 1
            if outcome.local:
                self._local_shortage(job, outcome)
            else:
                if shorts:
                    shorts.pop(job, None)
                job.attempts += 1
                job.outcome = outcome
                delay = policy.delay(job, outcome)
                if delay is None:
                    self._finish(job, outcome)
                else:
                    retries.inc()
                    log.info("job %s: %s; retrying in %gs (attempt %d/%d)", job.id,
                             outcome.reason, round(delay, 3), job.attempts + 1,
                             policy.limit(job) + 1, extra={
                                 "job": job.id, "queue": queue, "attempt": job.attempts + 1,
                                 "error": outcome.reason})
                    job.state = "retrying"
                    job.not_before = time.time() + delay
                    store.defer(job)
            if self.draining:
                if job.not_before is not None and job.not_before > self._drain_deadline:
                    self._let_go_unreachable()  # its retry is due after the deadline
                if not self.outstanding():
                    self._idle.set()

    def _local_shortage(self, job: Job, outcome: Outcome) -> None:
        """The job could not be sent for want of a local resource (EMFILE, ports...): nothing
        reached the destination, so it is no attempt and, whatever the retry policy (none
        included), never the end of the job.  It waits 0.5 s, doubling each time in a row up
        to 30 s, and keeps its attempts; warned of at most once a second."""
        times = self._shortages.get(job, 0)
        delay = min(30.0, 0.5 * 2 ** min(times, 16))
        self._shortages[job] = times + 1
        self._shortage_log("shortage", "job %s: %s: this host is short of a resource; not "
                           "counted as an attempt, sending again in %gs", job.id, outcome.error,
                           delay)
        job.outcome = outcome  # shown by GET /jobs/{id}; attempts stay as they were
        job.state = "retrying"
        job.not_before = time.time() + delay
        self.store.defer(job)

    def _finish(self, job: Job, outcome: Outcome) -> None:
        if not outcome.ok:
            log.warning("job %s failed for good after %d attempt%s: %s", job.id, job.attempts,
                        "" if job.attempts == 1 else "s", outcome.reason, extra={
                            "job": job.id, "queue": job.queue, "attempt": job.attempts,
                            "status": outcome.status, "error": outcome.reason})
        job.state = "succeeded" if outcome.ok else "failed"
        job.finished = time.time()
        (self._succeeded if outcome.ok else self._failed)[job.queue].inc()
        self.store.done(job)
        if outcome.ok:
            job.body = job.headers = None  # only a dead letter needs them again
        self.history.finished(job)
        _wake(job)
        if job.callback is not None:
            self._send_callback(job)

    def _send_callback(self, job: Job) -> None:
        """The outcome goes to the job's callback URL as a job of its own, through the router."""
        # counted like an accepted job, so accepted + callbacks = succeeded + failed + pending
        self._callbacks[job.queue].inc()
        body = json.dumps(self.history.describe(job)).encode()
        cb = Job(f"{job.id}.callback", job.callback, "POST",
                 {"Content-Type": "application/json"}, body, job.queue)
        try:
            self.store.admit([cb])
        except (QueueFull, TooMany) as e:
            log.error("callback for job %s dropped: %s", job.id, e)
            self._failed[job.queue].inc()
            return
        self.history.add(cb)

    async def drain(self, timeout: float) -> int:
        """Stop admitting, let the workers finish what can finish within `timeout`; return how
        many jobs were abandoned (logged and counted).  With a durable store nothing is: the
        unfinished stay there for the next process."""
        self.draining = True
        self._drain_deadline = time.time() + timeout
        self._let_go_unreachable()
        if self.outstanding():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout)
        unfinished = [*self.running, *self.store.remaining()]
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()
        self._abandon(unfinished, "at the drain deadline")
        return self._abandoned

    def _let_go_unreachable(self) -> None:
        """Delayed jobs due after the drain deadline cannot run here, so the drain does not
        wait for them: a durable store keeps them for the next process; without one they are
        abandoned now, not at the deadline."""
        jobs = self.store.pop_delayed(after=self._drain_deadline)
        if jobs and self.store.durable:
            log.info("%d delayed jobs are due after the drain deadline: they stay in the "
                     "journal for the next process", len(jobs))
        elif jobs:
            self._abandon(jobs, "due after the drain deadline")

    def _abandon(self, jobs: list[Job], why: str) -> None:
        if self.store.durable:
            return
        self._abandoned += len(jobs)
        for job in jobs:
            self.metrics.abandoned.labels(job.queue).inc()
            url = self.history.redact(job.url)
            log.error("abandoned job %s %s %s (queue %s, %d attempts, %s)", job.id, job.method,
                      url, job.queue, job.attempts, why,
                      extra={"job": job.id, "queue": job.queue, "url": url, "error": why})


def _wake(job: Job) -> None:
    """Resolve the `wait` requests held for the job."""
    if job.waiters:
        for fut in job.waiters:
            if not fut.done():
                fut.set_result(None)
        job.waiters = None
