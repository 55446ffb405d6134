"""Job status: every pending job by id, plus finished ones bounded by count and age.

Pending jobs are bounded by the queues themselves; finished ones are evicted oldest first as
new ones finish (past `max_jobs`, `max_age`, or `max_bytes` held by dead letters, which keep
their body and headers for a replay), so memory stays bounded without a timer.  Failed jobs in
the history are the dead letters: listable and replayable.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from .jobs import FINISHED, HeldBytes, Job


class History:
    def __init__(self, max_jobs: int, max_age: float, redact: Callable[[str], str] = str,
                 max_bytes: int = 1 << 62):
        self.max_jobs, self.max_age = max_jobs, max_age
        self.redact = redact  # what a job's URL looks like when shown
        self.held = HeldBytes(max_bytes)  # by dead letters: they keep body and headers
        self._jobs: dict[str, Job] = {}  # newest job per id, pending or finished
        self._finished: OrderedDict[str, Job] = OrderedDict()  # in order of finishing
        self.dead_letters = 0  # failed jobs among the finished

    def get(self, job_id: str) -> Job | None:
        self._evict(time.time())
        return self._jobs.get(job_id)

    def is_pending(self, job_id: str) -> bool:
        job = self._jobs.get(job_id)
        return job is not None and job.state not in FINISHED

    def knows(self, job_id: str) -> bool:
        self._evict(time.time())
        return job_id in self._jobs

    def add(self, job: Job) -> None:
        self._jobs[job.id] = job

    def finished(self, job: Job) -> None:
        if self._jobs.get(job.id) is not job:
            return  # superseded by a newer job with the same id
        previous = self._finished.pop(job.id, None)
        if previous is not None and previous.state == "failed":
            self._forget_dead_letter(previous)
        self._finished[job.id] = job
        if job.state == "failed":
            self.dead_letters += 1
            self.held.hold((job,))
        self._evict(job.finished or time.time())

    def reopen(self, job: Job) -> None:
        """A finished job runs again (a replay): it is pending, not history, until it ends."""
        if self._finished.pop(job.id, None) is not None:
            self._forget_dead_letter(job)  # only failed jobs are replayed
        self._jobs[job.id] = job

    def _forget_dead_letter(self, job: Job) -> None:
        self.dead_letters -= 1
        self.held.release(job)

    def _evict(self, now: float) -> None:
        finished, limit, oldest, held = self._finished, self.max_jobs, now - self.max_age, self.held
        while finished:
            job_id, job = next(iter(finished.items()))
            if len(finished) <= limit and (job.finished or now) >= oldest \
                    and held.total <= held.limit:
                break
            del finished[job_id]
            if job.state == "failed":
                self._forget_dead_letter(job)
            if self._jobs.get(job_id) is job:
                del self._jobs[job_id]

    def failed(self, offset: int, limit: int) -> tuple[list[Job], int]:
        """Dead letters, newest first: one page and the total."""
        self._evict(time.time())
        dead = [j for j in reversed(self._finished.values()) if j.state == "failed"]
        return dead[offset:offset + limit], len(dead)

    def describe(self, job: Job) -> dict[str, Any]:
        """The public status document of GET /jobs/{id}, its URL redacted."""
        return status_document(job, self.redact(job.url))


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
        "created": _iso(job.created),
        "next_attempt": _iso(job.not_before) if job.state in ("delayed", "retrying") else None,
        "finished": _iso(job.finished) if job.finished else None,
        "result": result,
    }


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"
