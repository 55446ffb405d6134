"""The jobs service: what the HTTP API asks of bwp, in bwp's own terms (no HTTP here).

api.py translates requests into these calls and their results and errors into answers.
`Jobs` serves one process: its pool admits and sends, its index knows jobs by id.  With
`processes: N`, peers.SiblingJobs asks the sibling processes what this one cannot answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from .index import JobIndex
from .jobs import Job, Submission
from .metrics import Metrics
from .pool import Pool
from .store import Draining, NotAdmitted, NotCancellable, NotReplayable, QueueFull, StoreError

__all__ = ["Accepted", "Draining", "Jobs", "NotAdmitted", "NotCancellable", "NotDurable",
           "NotReplayable", "QueueFull",
           "Relayed", "Unfinished", "UnknownJob"]


class UnknownJob(Exception):
    """No job with this id (never submitted, or older than the history)."""


class NotDurable(Exception):
    """The jobs are admitted and will run, but the store could not make them durable."""

    def __init__(self, cause: StoreError, ids: list[str]):
        super().__init__(str(cause))
        self.ids = ids


class Unfinished(Exception):
    """`wait` ended before every job had: the time ran out, or they went to a successor."""

    def __init__(self, why: str, pending: list[str]):
        super().__init__(why)
        self.pending = pending


# a submit relayed for room carries the CLOCK_MONOTONIC time (all siblings share one host)
# by which the sibling must have decided, so that its answer still comes back in time
RELAY_DEADLINE = "Bwp-Relay-Deadline"


class Relayed(NamedTuple):
    """A sibling process's answer, passed on as it is."""

    status: int
    body: bytes


@dataclass(slots=True)
class Accepted:
    jobs: list[Job]
    duplicates: list[str]  # ids skipped by unique/once

    @property
    def ids(self) -> list[str]:
        return [j.id for j in self.jobs]


class Jobs:
    """Submit, look up, list dead letters, replay and wait: for this process's jobs."""

    def __init__(self, pool: Pool, index: JobIndex, metrics: Metrics):
        self.pool, self.index, self.metrics = pool, index, metrics
        # bound once: .labels() is a locked dict lookup per call
        self._duplicates = {name: metrics.duplicates.labels(name) for name in pool.queues}

    @property
    def draining(self) -> bool:
        return self.pool.draining

    def full(self) -> bool:
        return self.pool.full()

    def everything_full(self) -> QueueFull:
        return self.pool.everything_full()

    async def submit(self, sub: Submission, raw: bytes,
                     headers: Mapping[str, str]) -> Accepted | Relayed:
        """Admit the submission's jobs, all or none (raises QueueFull, Draining, TooMany);
        NotDurable when they are admitted but not on disk; NotAdmitted when a broker did not
        confirm them all (it names those it took).  `raw` and `headers` are the
        request as received, for a sibling that decides instead (peers.SiblingJobs)."""
        fresh, skipped = await self.index.claim(sub.jobs)
        for job in skipped:
            self._duplicates[job.queue].inc()
        try:
            durable = self.pool.submit(fresh)
        except BaseException:
            for job in fresh:  # the ids claimed for them are free again
                if job.unique or job.once:
                    self.index.dropped(job)
            raise
        accepted = Accepted(fresh, [j.id for j in skipped])
        if durable is not None:
            try:
                await durable
            except StoreError as e:
                raise NotDurable(e, accepted.ids) from None
        return accepted

    async def wait(self, accepted: Accepted, timeout: float) -> list[dict[str, Any]]:
        """Hold on until every job has finished: their status documents, or Unfinished."""
        index = self.index
        loop = asyncio.get_running_loop()
        start = loop.time()
        unfinished = await index.wait(accepted.jobs, timeout)
        if unfinished:
            # not finished in time, or (sooner) handed to the process replacing this one
            why = (f"jobs not finished within {timeout:g}s" if loop.time() - start >= timeout
                   else "jobs handed to the process replacing this one before they finished")
            raise Unfinished(why, [j.id for j in unfinished])
        return [index.document(j) for j in accepted.jobs]

    async def status(self, job_id: str, headers: Mapping[str, str]) -> dict[str, Any] | Relayed:
        document = self.index.status(job_id)
        if document is None:
            raise UnknownJob(job_id)
        return document

    async def jobs_page(self, state: str, queue: str | None, offset: int, limit: int,
                        headers: Mapping[str, str],
                        shared: bool = True) -> tuple[list[dict[str, Any]], int]:
        """Jobs in `state` (jobs.LISTED: dead letters newest first, pending ones oldest
        first), of `queue` or all: one page of status documents and the total (`shared`:
        with the jobs of a broker's queues)."""
        return self.index.page(state, queue, offset, limit, shared)

    async def replay(self, job_id: str, headers: Mapping[str, str]) -> str | Relayed:
        """Enqueue a dead letter again under its id (raises UnknownJob, NotReplayable,
        QueueFull, Draining, TooMany, NotDurable); its id."""
        try:
            job, durable = self.pool.replay(job_id)
        except NotReplayable:
            job = self.index.get(job_id)
            if job is None:
                raise UnknownJob(job_id) from None
            raise NotReplayable(f"job {job_id} is {job.state}: only failed jobs can be "
                                "replayed") from None
        if durable is not None:
            try:
                await durable
            except StoreError as e:
                raise NotDurable(e, [job.id]) from None
        return job.id

    async def cancel(self, job_id: str, headers: Mapping[str, str]) -> dict[str, Any] | Relayed:
        """Cancel a job that has not started (raises UnknownJob, NotCancellable): its status
        document, now "cancelled"."""
        job = self.pool.cancel(job_id)
        if job is None:
            raise UnknownJob(job_id)
        return self.index.document(job)

    async def metrics_page(self) -> bytes:
        return self.metrics.render()
