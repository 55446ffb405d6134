"""What makes a job observable, by id: its status, `unique`/`once`, dead letters, completion.

`JobIndex` is the interface the jobs service (bwp/service.py) and the pool use; `LocalIndex`
keeps this process's jobs.  Every pending job is kept by id, plus finished ones bounded by count
and age: pending jobs are bounded by the queues themselves; finished ones are evicted oldest
first as new ones finish (past `max_jobs`, `max_age`, or `max_bytes` held by dead letters, which
keep their body and headers for a replay), so memory stays bounded without a timer.  Failed jobs
in the history are the dead letters: listable and replayable.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from .jobs import FINISHED, PENDING, HeldBytes, Job


def listing_order(state: str) -> tuple[Callable[[dict[str, Any]], Any], bool]:
    """How a listing of status documents is sorted (key, reverse): dead letters newest
    first, pending jobs in the order they came (oldest first).  ISO 8601 UTC sorts as text;
    the id breaks ties (ms resolution) the same way in every process."""
    if state == "failed":
        return (lambda d: (d.get("finished") or "", d["id"])), True
    return (lambda d: (d["created"], d["id"])), False


def listed(state: str, queue: str | None, doc_state: str, doc_queue: str) -> bool:
    """Whether a job in `doc_state` on `doc_queue` belongs to the listing of `state`."""
    if queue is not None and doc_queue != queue:
        return False
    return doc_state in PENDING if state == "pending" else doc_state == state


class JobIndex(Protocol):
    """Jobs by id.  The pool reports what happens to a job; the service reads and waits."""

    redact: Callable[[str], str]  # what a job's URL looks like when shown
    dead_letters: int  # failed jobs kept
    shared_dead_letters: int  # of those, the broker's queues' (every host's, every process's)

    async def start(self) -> None:
        """Catch up with what others know (a shared index), before serving."""

    async def close(self) -> None:
        """Publish what is buffered."""

    async def claim(self, jobs: Sequence[Job]) -> tuple[list[Job], list[Job]]:
        """The jobs to admit and those skipped by `unique`/`once` (a pending job, or for
        `once` any job the history remembers, has the id; or an earlier one in the batch)."""

    def add(self, job: Job) -> None:
        """An admitted job (or one recovered from a journal)."""

    def dropped(self, job: Job) -> None:
        """An added job was not admitted after all (a broker refused it)."""

    def finished(self, job: Job) -> None:
        """The job ended for good: succeeded or failed."""

    def reopen(self, job: Job) -> None:
        """A failed job is replayed under its id."""

    def cancelled(self, job: Job) -> None:
        """A job that had not started was cancelled (its state and finished time are set)."""

    def is_cancelled(self, job: Job) -> bool:
        """Whether a job a worker just took was cancelled while in a queue it could not be
        taken out of (a broker's)."""

    def released(self, job: Job) -> None:
        """The job went to the process replacing this one: this index will not see it end."""

    def retrying(self, job: Job) -> None:
        """The job's attempt failed and it is due again at job.not_before."""

    def get(self, job_id: str) -> Job | None:
        """The newest job with this id, pending or finished (within the history)."""

    def status(self, job_id: str) -> dict[str, Any] | None:
        """The status document of the newest job with this id."""

    def page(self, state: str, queue: str | None, offset: int, limit: int,
             shared: bool = True) -> tuple[list[dict[str, Any]], int]:
        """Status documents of the jobs in `state` (one of jobs.LISTED; `queue`: of that queue
        only), in listing_order: one page and the total; `shared`: with a broker's jobs."""

    def describe(self, job: Job) -> dict[str, Any]:
        """The public status document of GET /jobs/{id}, its URL redacted."""

    def document(self, job: Job) -> dict[str, Any]:
        """The newest status document of this very job, wherever it ran."""

    async def wait(self, jobs: Sequence[Job], timeout: float) -> list[Job]:
        """Wait until every job has ended (or was released); those that had not in time."""


class LocalIndex:
    def __init__(self, max_jobs: int, max_age: float, redact: Callable[[str], str] = str,
                 max_bytes: int = 1 << 62):
        self.max_jobs, self.max_age = max_jobs, max_age
        self.redact = redact  # what a job's URL looks like when shown
        self.held = HeldBytes(max_bytes)  # by dead letters: they keep body and headers
        self._jobs: dict[str, Job] = {}  # newest job per id, pending or finished
        self._finished: OrderedDict[str, Job] = OrderedDict()  # in order of finishing
        self.dead_letters = 0  # failed jobs among the finished
        self.shared_dead_letters = 0  # none: this process's own
        # when the oldest finished job passes max_age (it may have left since: then _evict
        # looks for nothing and sets it again), so most calls to _evict look at no job
        self._first_expires = float("inf")
        # `wait` requests holding a response, by the job they wait for
        self._waiters: dict[Job, list[asyncio.Future[None]]] = {}

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def get(self, job_id: str) -> Job | None:
        self._evict(time.time())
        return self._jobs.get(job_id)

    async def claim(self, jobs: Sequence[Job]) -> tuple[list[Job], list[Job]]:
        if len(jobs) == 1 and not (jobs[0].unique or jobs[0].once):
            return [jobs[0]], []  # most submits: no id to look up
        fresh: list[Job] = []
        duplicates: list[Job] = []
        ids_in_batch: set[str] = set()
        known = self._jobs
        evicted = False
        for job in jobs:
            if job.unique or job.once:
                if not evicted:
                    self._evict(time.time())
                    evicted = True
                other = known.get(job.id)
                if job.id in ids_in_batch or (
                        other is not None and (job.once or other.state not in FINISHED)):
                    duplicates.append(job)
                    continue
            ids_in_batch.add(job.id)
            fresh.append(job)
        return fresh, duplicates

    def add(self, job: Job) -> None:
        self._jobs[job.id] = job

    def dropped(self, job: Job) -> None:
        if self._jobs.get(job.id) is job:
            del self._jobs[job.id]

    def finished(self, job: Job) -> None:
        self._wake(job)
        if self._jobs.get(job.id) is not job:
            return  # superseded by a newer job with the same id
        previous = self._finished.pop(job.id, None)
        if previous is not None and previous.state == "failed":
            self._forget_dead_letter(previous)
        self._finished[job.id] = job
        if len(self._finished) == 1:
            self._first_expires = (job.finished or time.time()) + self.max_age
        if job.state == "failed":
            self.dead_letters += 1
            self.held.hold((job,))
        self._evict(job.finished or time.time())

    def reopen(self, job: Job) -> None:
        """A finished job runs again (a replay): it is pending, not history, until it ends."""
        if self._finished.pop(job.id, None) is not None:
            self._forget_dead_letter(job)  # only failed jobs are replayed
        self._jobs[job.id] = job

    def released(self, job: Job) -> None:
        self._wake(job)

    def cancelled(self, job: Job) -> None:
        self.finished(job)

    def is_cancelled(self, job: Job) -> bool:
        return False  # this process's stores take a cancelled job out at once

    def retrying(self, job: Job) -> None:
        pass  # the job object is the one shown

    def status(self, job_id: str) -> dict[str, Any] | None:
        job = self.get(job_id)
        return None if job is None else self.describe(job)

    def page(self, state: str, queue: str | None, offset: int, limit: int,
             shared: bool = True) -> tuple[list[dict[str, Any]], int]:
        self._evict(time.time())
        if state == "failed":  # in the order they finished
            jobs = [j for j in reversed(self._finished.values())
                    if listed(state, queue, j.state, j.queue)]
        else:
            jobs = sorted((j for j in self._jobs.values() if listed(state, queue, j.state, j.queue)),
                          key=lambda j: (j.created, j.id))
        return [self.describe(j) for j in jobs[offset:offset + limit]], len(jobs)

    async def wait(self, jobs: Sequence[Job], timeout: float) -> list[Job]:
        loop = asyncio.get_running_loop()
        futures = []
        for job in jobs:
            if job.state not in FINISHED:
                fut = loop.create_future()
                self._waiters.setdefault(job, []).append(fut)
                futures.append(fut)
        if futures:
            _, pending = await asyncio.wait(futures, timeout=timeout)
            for fut in pending:
                fut.cancel()
            for job in jobs:  # what timed out must not stay behind
                waiting = self._waiters.get(job)
                if waiting is not None:
                    waiting[:] = [f for f in waiting if not f.done()]
                    if not waiting:
                        del self._waiters[job]
        return [j for j in jobs if j.state not in FINISHED]

    def _wake(self, job: Job) -> None:
        for fut in self._waiters.pop(job, ()):
            if not fut.done():
                fut.set_result(None)

    def _forget_dead_letter(self, job: Job) -> None:
        self.dead_letters -= 1
        self.held.release(job)

    def _evict(self, now: float) -> None:
        finished, held = self._finished, self.held
        over = len(finished) - self.max_jobs
        if over <= 0 and now < self._first_expires and held.total <= held.limit:
            return
        # Past the count bound the oldest go without a look (a full history drops one job per
        # job finished). _first_expires stays the expiry of a job that left: an earlier time
        # than the new oldest's, so the next check by age looks again and sets it.
        for _ in range(over):
            self._forget(*finished.popitem(last=False))
        if now < self._first_expires and held.total <= held.limit:
            return
        oldest = now - self.max_age
        while finished:
            job_id, job = next(iter(finished.items()))
            if (job.finished or now) >= oldest and held.total <= held.limit:
                break
            del finished[job_id]
            self._forget(job_id, job)
        self._first_expires = float("inf") if not finished else (
            (next(iter(finished.values())).finished or now) + self.max_age)

    def _forget(self, job_id: str, job: Job) -> None:
        """A finished job leaves the history."""
        if job.state == "failed":
            self._forget_dead_letter(job)
        if self._jobs.get(job_id) is job:
            del self._jobs[job_id]

    def describe(self, job: Job) -> dict[str, Any]:
        return status_document(job, self.redact(job.url))

    document = describe


def status_document(job: Job, url: str) -> dict[str, Any]:
    """The status document of `job`, showing `url` as its URL."""
    out = job.outcome
    result = None
    if out is not None:
        result = {
            "status": out.status,
            "headers": out.headers or {},
            "body": out.preview.decode("utf-8", "replace"),
            "size": out.size,
            "truncated": out.truncated,
            "duration": round(out.duration, 6),
        }
    return {
        "id": job.id,
        "state": job.state,
        "attempts": job.attempts,
        "status": out.status if out else None,
        "error": out.reason if out else None,
        "queue": job.queue,
        "method": job.method,
        "url": url,
        "created": iso_time(job.created),
        "next_attempt": iso_time(job.not_before) if job.state in ("delayed", "retrying") else None,
        "finished": iso_time(job.finished) if job.finished else None,
        "result": result,
    }


def iso_time(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"
