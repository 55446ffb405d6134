"""Named bounded queues, the delay scheduler and the worker pool.

`JobStore` is the seam for other backends (an on-disk journal, a shared broker): the API
admits through it and the workers take from it, and neither knows how it keeps jobs.
`MemoryStore` is the default: per queue a FIFO of due jobs plus one heap of delayed jobs
woken by a single loop timer (no polling, no scan).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Protocol

from .client import Outcome
from .config import QueueConfig
from .jobs import Job
from .metrics import Metrics

log = logging.getLogger("bwp.pool")


class QueueFull(Exception):
    """Not enough room for the whole batch in `queue`; nothing was admitted."""

    def __init__(self, queue: str):
        super().__init__(f"queue {queue!r} is full")
        self.queue = queue


class Draining(Exception):
    """The process is stopping and accepts no new jobs."""


class JobStore(Protocol):
    """Where accepted jobs wait until a worker takes them."""

    def admit(self, jobs: Sequence[Job]) -> None:
        """Store every job or none (raises QueueFull)."""

    async def take(self, queue: str) -> Job:
        """The next due job of `queue`, waiting for one."""

    def done(self, job: Job) -> None:
        """A taken job has finished (delivered or failed for good)."""

    def length(self, queue: str) -> int:
        """Jobs of `queue` waiting, delayed ones included."""

    def remaining(self) -> list[Job]:
        """Every job not yet taken (used at the drain deadline)."""


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


class MemoryStore:
    def __init__(self, queues: Iterable[QueueConfig]):
        self.lanes = {q.name: _Lane(q.queue_size) for q in queues}
        self._heap: list[tuple[float, int, Job]] = []
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")

    def admit(self, jobs: Sequence[Job]) -> None:
        needed: dict[str, int] = {}
        for job in jobs:
            needed[job.queue] = needed.get(job.queue, 0) + 1
        for name, n in needed.items():
            lane = self.lanes[name]
            if len(lane.ready) + lane.delayed + n > lane.capacity:
                raise QueueFull(name)
        now = time.time()
        for job in jobs:
            if job.not_before is not None and job.not_before > now:
                self._delay(job)
            else:
                self.lanes[job.queue].push(job)

    def _delay(self, job: Job) -> None:
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
        pass  # memory needs no completion record

    def length(self, queue: str) -> int:
        lane = self.lanes[queue]
        return len(lane.ready) + lane.delayed

    def remaining(self) -> list[Job]:
        jobs = [job for lane in self.lanes.values() for job in lane.ready]
        jobs += [job for _, _, job in sorted(self._heap)]
        return jobs

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


Send = Callable[[Job], Awaitable[Outcome]]


class Pool:
    """Fixed workers per named queue; admission is all or nothing."""

    def __init__(self, queues: Iterable[QueueConfig], store: JobStore, send: Send,
                 metrics: Metrics):
        self.queues = {q.name: q for q in queues}
        self.store, self.send, self.metrics = store, send, metrics
        self.busy = dict.fromkeys(self.queues, 0)
        self.running: set[Job] = set()
        self.draining = False
        self._workers: list[asyncio.Task[None]] = []
        self._idle = asyncio.Event()
        for name, q in self.queues.items():
            metrics.watch_queue(name, q.queue_size, q.size,
                                length=lambda n=name: store.length(n),
                                busy=lambda n=name: self.busy[n])

    def start(self) -> None:
        for name, q in self.queues.items():
            for i in range(q.size):
                self._workers.append(asyncio.create_task(self._work(name), name=f"{name}-{i}"))

    def submit(self, jobs: Sequence[Job]) -> None:
        """Admit a whole batch or raise (QueueFull, Draining) having admitted nothing."""
        if self.draining:
            raise Draining()
        self.store.admit(jobs)
        accepted = self.metrics.accepted
        for job in jobs:
            accepted.labels(job.queue).inc()

    def outstanding(self) -> int:
        return sum(self.store.length(n) for n in self.queues) + len(self.running)

    async def _work(self, queue: str) -> None:
        store, busy, running = self.store, self.busy, self.running
        succeeded = self.metrics.succeeded.labels(queue)
        failed = self.metrics.failed.labels(queue)
        while True:
            job = await store.take(queue)
            busy[queue] += 1
            running.add(job)
            try:
                job.attempts += 1
                outcome = await self.send(job)
            finally:
                running.discard(job)
                busy[queue] -= 1
            (succeeded if outcome.ok else failed).inc()
            store.done(job)
            if self.draining and not self.outstanding():
                self._idle.set()

    async def drain(self, timeout: float) -> list[Job]:
        """Stop admitting, let the workers finish within `timeout`; return what was abandoned."""
        self.draining = True
        if self.outstanding():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout)
        abandoned = [*self.running, *self.store.remaining()]
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()
        for job in abandoned:
            self.metrics.abandoned.labels(job.queue).inc()
        return abandoned
