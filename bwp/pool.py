"""The worker pool: fixed workers per named queue, taking jobs from the queue backend
(bwp/store.py), sending them, and settling each delivery by the outcome and retry policy."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from .config import DEFAULT_QUEUE, QueueConfig
from .index import JobIndex
from .jobs import CANCELLABLE, MAX_RETRIES, Job, Outcome, TooMany
from .lifecycle import ThrottledLog
from .metrics import Metrics
from .retry import RetryPolicy
from .store import (
    Delivery,
    Draining,
    HandsOver,
    JobStore,
    NotAdmitted,
    NotCancellable,
    NotReplayable,
    QueueFull,
    StoreError,
    _bound_key,
    _no_room,
)

log = logging.getLogger("bwp.pool")
QUEUE_BITS = 63  # full_queues() fits a signed 64-bit cell: queues past the 62nd share a bit
Send = Callable[[Job], Awaitable[Outcome]]


class Pool:
    """Fixed workers per named queue; admission is all or nothing."""

    def __init__(self, queues: Iterable[QueueConfig], store: JobStore, send: Send,
                 metrics: Metrics, index: JobIndex):
        self.queues = {q.name: q for q in queues}
        self.store, self.send, self.metrics, self.index = store, send, metrics, index
        self.policies = {name: RetryPolicy(q.retry) for name, q in self.queues.items()}
        # label children resolved once: .labels() is a locked dict lookup per call
        self._recovered = {name: metrics.recovered.labels(name) for name in self.queues}
        self._failed = {name: metrics.failed.labels(name) for name in self.queues}
        self._accepted, self._succeeded = metrics.hot.accepted, metrics.hot.succeeded  # ints
        self._callbacks = {name: metrics.callbacks.labels(name) for name in self.queues}
        self._retries = {name: metrics.retries.labels(name) for name in self.queues}
        self.busy = dict.fromkeys(self.queues, 0)
        self._high_water = {name: q.queue_size - min(q.size, q.queue_size // 100)
                            for name, q in self.queues.items()}
        # a bit per queue, in the config's order (the same in every sibling), for full_queues()
        self.queue_bit = {name: 1 << min(i, QUEUE_BITS - 1) for i, name in enumerate(self.queues)}
        self.all_queues = (1 << min(len(self.queues), QUEUE_BITS)) - 1
        self.running: set[Job] = set()
        # jobs this host lacked the fds or ports to send, by times in a row (_local_shortage)
        self._shortages: dict[Job, int] = {}
        self._shortage_log = ThrottledLog(log, logging.WARNING)  # EMFILE hits every job
        self._settle_log = ThrottledLog(log, logging.WARNING)  # a broker outage hits every job
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
        metrics.dead_letters.set_function(lambda: index.dead_letters)
        metrics.shared_dead_letters.set_function(lambda: index.shared_dead_letters)
        metrics.held_bytes.set_function(lambda: store.held.total)

    async def start(self) -> None:
        await self.store.start(self._restore)
        for name, q in self.queues.items():
            for i in range(q.size):
                self._workers.append(asyncio.create_task(self._work(name), name=f"{name}-{i}"))

    def submit(self, jobs: Sequence[Job]) -> Awaitable[None] | None:
        """Admit a whole batch (already past the index's `claim`) or raise (QueueFull,
        Draining, TooMany) having admitted nothing.  Returns what to await before confirming
        the jobs (the store's durability, see JobStore.admit)."""
        if self.draining:
            raise Draining()
        durable = self.store.admit(jobs)
        add = self.index.add
        for job in jobs:
            add(job)
        if durable is None:
            self._count_accepted(jobs)
            return None
        return self._confirmed(jobs, durable)

    async def _confirmed(self, jobs: Sequence[Job], durable: Awaitable[None]) -> None:
        """The store's confirmation; what a broker did not take was never accepted."""
        try:
            await durable
        except NotAdmitted as e:
            for job in e.refused:
                self.index.dropped(job)
            self._count_accepted(e.admitted)
            raise
        except StoreError:  # admitted all the same, only not durable
            self._count_accepted(jobs)
            raise
        self._count_accepted(jobs)

    def _count_accepted(self, jobs: Sequence[Job]) -> None:
        if len(self.queues) == 1:  # the common case: one counter update per request
            self._accepted[DEFAULT_QUEUE] += len(jobs)
        else:
            for job in jobs:
                self._accepted[job.queue] += 1

    def _restore(self, jobs: Sequence[Job]) -> None:
        """Jobs another process left unfinished (now in our store) become ours."""
        for job in jobs:
            self.index.add(job)
            self._recovered[job.queue].inc()
        log.info("recovered %d unfinished jobs from the journal", len(jobs))

    def replay(self, job_id: str) -> tuple[Job, Awaitable[None] | None]:
        """Enqueue a dead letter again under the same id (and what to await, as submit)."""
        if self.draining:
            raise Draining()
        job = self.index.get(job_id)
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
        self.index.reopen(job)
        self.metrics.replayed.labels(job.queue).inc()
        return job, durable

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a job that has not started: it will not be sent (None: no such job)."""
        job = self.index.get(job_id)
        if job is None:
            return None
        state = "running" if any(j.id == job_id for j in self.running) else job.state
        if state not in CANCELLABLE:  # running here: a broker's index may not know it yet
            raise NotCancellable(f"job {job_id} is {state}: only a job that has not started "
                                 "(queued, delayed, retrying) can be cancelled")
        if not self.store.cancel(job):  # handed over to a successor, or just taken
            raise NotCancellable(f"job {job_id} is no longer waiting in this process (being "
                                 "sent, or handed to the process replacing it)")
        self._shortages.pop(job, None)
        job.state, job.finished = "cancelled", time.time()
        job.body = job.headers = None  # history keeps the status, as for a success
        self.index.cancelled(job)
        self.metrics.cancelled.labels(job.queue).inc()
        log.info("job %s: cancelled", job_id, extra={"job": job_id, "queue": job.queue})
        return job

    def hand_over(self, max_clones: int) -> list[tuple[list[Job], dict[str, Any]]]:
        """Take the delayed and retrying jobs out, with the submissions that recreate them in
        the process replacing this one (their time may lie past our drain deadline).  Jobs
        that share a body (clones) go as one root carrying it and `clones`: encoded once, and
        shared again by the successor."""
        store = self.store
        if not isinstance(store, HandsOver):
            return []  # the backend keeps delayed jobs itself (a broker)
        by_body: dict[int, list[Job]] = {}
        for job in store.pop_delayed():
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
        store = self.store
        assert isinstance(store, HandsOver)
        for job in jobs:
            store.keep(job)

    def handed_over(self, jobs: Iterable[Job]) -> None:
        """The successor has confirmed these: they are no longer ours."""
        store = self.store
        assert isinstance(store, HandsOver)
        for job in jobs:
            store.released(job)
            self._shortages.pop(job, None)
            self.index.released(job)  # a `wait` for it ends here: we will not see it finish

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
        if len(self._high_water) == 1:  # one queue: no generator for it on every submit
            ((name, mark),) = self._high_water.items()
            return length(name) >= mark
        return all(length(n) >= mark for n, mark in self._high_water.items())

    def full_queues(self) -> int:
        """The queues at their high-water mark, as `queue_bit`s (every one when the bytes
        bound is reached); a sibling relays none of their submits here."""
        held = self.store.held
        if held.total >= held.limit:
            return self.all_queues
        length, bits, full = self.store.length, self.queue_bit, 0
        for name, mark in self._high_water.items():
            if length(name) >= mark:
                full |= bits[name]
        return full

    def outstanding(self) -> int:
        return self.store.pending() + len(self.running)

    def due(self) -> int:
        """Jobs to send now: queued and running (not those waiting for a delay or a retry)."""
        store = self.store
        return sum(store.length(q) - store.delayed(q) for q in self.queues) + len(self.running)

    async def _work(self, queue: str) -> None:
        store, busy, running = self.store, self.busy, self.running
        policy = self.policies[queue]
        waited = self.metrics.hot.wait[queue]
        while True:
            delivery = await store.take(queue)
            job = delivery.job
            if self.index.is_cancelled(job):  # while it waited in a broker's queue
                await self._drop_cancelled(delivery)
                continue
            if job.outcome is None:  # its first attempt: how long it waited for a worker
                waited.observe(time.time() - (job.not_before or job.created))
            busy[queue] += 1
            running.add(job)  # until its outcome is settled: a cancel meanwhile is refused
            job.state = "running"
            try:
                try:
                    outcome = await self.send(job)
                except Exception as e:  # a bug, not the network: keep the worker and the job
                    log.exception("job %s: sending failed unexpectedly", job.id)
                    outcome = Outcome(error=f"internal error: {type(e).__name__}: {e}")
                finally:
                    busy[queue] -= 1
                try:
                    await self._settle(delivery, outcome, policy)
                except StoreError as e:  # the backend redelivers what it did not settle
                    self._settle_log("settle", "job %s: its outcome could not be recorded (%s): "
                                     "it will be delivered again", job.id, e)
                except Exception:
                    log.exception("job %s: settling its delivery failed", job.id)
            finally:
                running.discard(job)
            if self.draining:
                if job.not_before is not None and job.not_before > self._drain_deadline:
                    self._let_go_unreachable()  # its retry is due after the deadline
                if not self.outstanding():
                    self._idle.set()

    async def _drop_cancelled(self, delivery: Delivery) -> None:
        try:
            await delivery.ack()
        except StoreError as e:  # delivered again, and skipped again
            self._settle_log("settle", "job %s: cancelled, but its message could not be acked "
                             "(%s)", delivery.job.id, e)

    async def _settle(self, delivery: Delivery, outcome: Outcome, policy: RetryPolicy) -> None:
        """The job's next state by its outcome: done, failed for good, or due again."""
        job = delivery.job
        if outcome.local:
            return await self._local_shortage(delivery, outcome)
        if outcome.held_until is not None:
            return await self._held(delivery, outcome)
        if self._shortages:
            self._shortages.pop(job, None)
        job.attempts += 1
        job.outcome = outcome
        delay = policy.delay(job, outcome)
        if delay is None:
            return await self._finish(delivery, outcome)
        self._retries[job.queue].inc()
        log.info("job %s: %s; retrying in %gs (attempt %d/%d)", job.id, outcome.reason,
                 round(delay, 3), job.attempts + 1, policy.limit(job) + 1, extra={
                     "job": job.id, "queue": job.queue, "attempt": job.attempts + 1,
                     "error": outcome.reason})
        await self._due_again(delivery, time.time() + delay)
        self.index.retrying(job)

    @staticmethod
    async def _due_again(delivery: Delivery, when: float) -> None:
        """Back to the store, due at `when` (its attempts and outcome already set)."""
        job = delivery.job
        job.state = "retrying"
        job.not_before = when
        await delivery.retry_at(when)

    async def _local_shortage(self, delivery: Delivery, outcome: Outcome) -> None:
        """The job could not be sent for want of a local resource (EMFILE, ports...): nothing
        reached the destination, so it is no attempt and, whatever the retry policy (none
        included), never the end of the job.  It waits 0.5 s, doubling each time in a row up
        to 30 s, and keeps its attempts; warned of at most once a second."""
        job = delivery.job
        times = self._shortages.get(job, 0)
        delay = min(30.0, 0.5 * 2 ** min(times, 16))
        self._shortages[job] = times + 1
        self._shortage_log("shortage", "job %s: %s: this host is short of a resource; not "
                           "counted as an attempt, sending again in %gs", job.id, outcome.error,
                           delay)
        job.outcome = outcome  # shown by GET /jobs/{id}; attempts stay as they were
        await self._due_again(delivery, time.time() + delay)

    async def _held(self, delivery: Delivery, outcome: Outcome) -> None:
        """Its destination's breaker is open: nothing was sent, so it is no attempt; the job
        waits (holding no worker) until the breaker lets a probe through."""
        assert outcome.held_until is not None
        delivery.job.outcome = outcome  # shown by GET /jobs/{id}; attempts stay as they were
        await self._due_again(delivery, outcome.held_until)
        self.index.retrying(delivery.job)

    async def _finish(self, delivery: Delivery, outcome: Outcome) -> None:
        job = delivery.job
        if not outcome.ok:
            log.warning("job %s failed for good after %d attempt%s: %s", job.id, job.attempts,
                        "" if job.attempts == 1 else "s", outcome.reason, extra={
                            "job": job.id, "queue": job.queue, "attempt": job.attempts,
                            "status": outcome.status, "error": outcome.reason})
        job.state = "succeeded" if outcome.ok else "failed"
        job.finished = time.time()
        if outcome.ok:
            self._succeeded[job.queue] += 1
            await delivery.ack()
            job.body = job.headers = None  # only a dead letter needs them again
        else:
            self._failed[job.queue].inc()
            await delivery.dead()
        self.index.finished(job)
        if job.callback is not None:
            await self._send_callback(job)

    async def _send_callback(self, job: Job) -> None:
        """The outcome goes to the job's callback URL as a job of its own, through the router."""
        # counted like an accepted job, so accepted + callbacks = succeeded + failed + pending
        self._callbacks[job.queue].inc()
        body = json.dumps(self.index.describe(job)).encode()
        cb = Job(f"{job.id}.callback", job.callback, "POST",
                 {"Content-Type": "application/json"}, body, job.queue)
        try:
            durable = self.store.admit([cb])
            self.index.add(cb)
            if durable is not None:
                await durable
        except (QueueFull, TooMany, NotAdmitted) as e:
            log.error("callback for job %s dropped: %s", job.id, e)
            self.index.dropped(cb)
            self._failed[job.queue].inc()
        except StoreError as e:  # queued all the same
            log.warning("callback for job %s is queued but not durable: %s", job.id, e)

    async def drain(self, timeout: float) -> int:
        """Stop admitting, let the workers finish what can finish within `timeout`; return how
        many jobs were abandoned (logged and counted).  With a durable store nothing is: the
        unfinished stay there for the next process."""
        self.draining = True
        self._drain_deadline = time.time() + timeout
        await self.store.stop_taking()
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
        store = self.store
        jobs = store.pop_delayed(after=self._drain_deadline) if isinstance(store, HandsOver) \
            else []
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
            url = self.index.redact(job.url)
            log.error("abandoned job %s %s %s (queue %s, %d attempts, %s)", job.id, job.method,
                      url, job.queue, job.attempts, why,
                      extra={"job": job.id, "queue": job.queue, "url": url, "error": why})

