"""Where accepted jobs wait: the queue backends, and the contract they keep.

A backend (`JobStore`) admits jobs, hands them to workers one `Delivery` at a time, and
settles each delivery as the pool decides: ack (the job ended), retry at a time, or dead
(failed for good).  Only the pool changes a job's state; a backend keeps jobs where they
are due.  `MemoryStore` is the embedded default: per queue a FIFO of due jobs plus one heap
of delayed jobs woken by a single loop timer (no polling, no scan).  It may record every
change (bwp/journal.py records to disk).  Backends are built by name from `BACKENDS`.
"""

from __future__ import annotations

import asyncio
import heapq
import importlib
import itertools
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from .config import DEFAULT_QUEUE, QueueConfig
from .jobs import HeldBytes, Job, TooMany

if TYPE_CHECKING:
    from .config import Config
    from .metrics import Metrics


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


class NotCancellable(Exception):
    """Only a job that has not started (queued, delayed, retrying) can be cancelled."""


class StoreError(Exception):
    """The store could not make admitted jobs durable (e.g. the journal's disk failed): they
    are admitted in memory all the same and will run.  Raised by start(): it cannot start."""


class NotAdmitted(Exception):
    """The broker did not take every job of a batch: those it confirmed, those it did not."""

    def __init__(self, why: str, admitted: Sequence[Job], refused: Sequence[Job]):
        super().__init__(why)
        self.admitted, self.refused = list(admitted), list(refused)


Restore = Callable[[Sequence[Job]], None]


class Delivery(Protocol):
    """One job taken by a worker, to be settled exactly once."""

    job: Job

    async def ack(self) -> None:
        """The job ended (succeeded): it leaves the backend."""

    async def retry_at(self, when: float) -> None:
        """The job is due again at `when` (job.not_before, job.attempts already updated)."""

    async def dead(self) -> None:
        """The job failed for good: it leaves the queue for the dead letters."""


class JobStore(Protocol):
    """A queue backend.  Batches: `admit` takes every job or none, in order."""

    durable: bool  # jobs left at exit survive for the next process
    held: HeldBytes  # bytes of the jobs held in this process, bounded by limits.max_queued_bytes

    async def start(self, restore: Restore) -> None:
        """Begin background work; jobs recovered from elsewhere (a journal left by a dead
        process) are placed in the store and then passed to `restore`."""

    def admit(self, jobs: Sequence[Job]) -> Awaitable[None] | None:
        """Store every job or none (raises QueueFull, TooMany).  An awaitable result must be
        awaited before the jobs are confirmed to the client: it raises StoreError (admitted,
        not durable) or NotAdmitted (a broker took none, or only some, of them)."""

    async def take(self, queue: str) -> Delivery:
        """The next due job of `queue`, waiting for one."""

    def cancel(self, job: Job) -> bool:
        """Take a waiting job (queued, delayed, retrying) out, or make sure it is never sent
        (a broker's queue: the index marks it cancelled and the worker that takes it skips
        it); False when it is not waiting here (taken, or handed over)."""

    def length(self, queue: str) -> int:
        """Jobs of `queue` waiting, delayed ones included (cached: read on every submit)."""

    def delayed(self, queue: str) -> int:
        """Jobs of `queue` waiting for their time (delay or retry backoff)."""

    def oldest_due(self, queue: str) -> float:
        """Seconds the longest-waiting due job of `queue` has been due (0 when none is)."""

    def remaining(self) -> list[Job]:
        """Every job held here and not yet taken (logged if abandoned at the drain deadline)."""

    def pending(self) -> int:
        """Jobs a stopping process must still send or leave behind (0: all are elsewhere)."""

    async def stop_taking(self) -> None:
        """A stop: deliver nothing more to this process (a broker gives the rest to others)."""

    async def close(self) -> None:
        """Release timers, files, connections; what is left stays for the next process if
        durable."""


@runtime_checkable
class HandsOver(Protocol):
    """A backend holding delayed jobs in this process: a reload hands them to the successor."""

    def pop_delayed(self, after: float = float("-inf")) -> list[Job]:
        """Remove and return the jobs waiting for their time that are due after `after` (all
        by default), soonest first."""

    def keep(self, job: Job) -> None:
        """A popped job stays after all (its hand-over failed): due at job.not_before."""

    def released(self, job: Job) -> None:
        """A popped job now belongs to the successor."""


class Recorder(Protocol):
    """Told of every change to a MemoryStore's jobs (bwp/journal.py writes them to disk)."""

    durable: bool

    def start(self, store: MemoryStore, restore: Restore) -> None:
        """Recover what earlier processes left: `store.place()` it, then `restore` it."""

    def admitted(self, jobs: Sequence[Job]) -> Awaitable[None] | None:
        """Record admitted jobs; the awaitable resolves once they are durable."""

    def deferred(self, job: Job) -> None:
        """Record a job rescheduled for job.not_before (with its attempts)."""

    def done(self, job: Job) -> None:
        """Record that the job is no longer this process's."""

    async def close(self) -> None:
        """Write what is buffered."""


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


class _MemoryDelivery:
    __slots__ = ("job", "store")

    def __init__(self, store: MemoryStore, job: Job):
        self.store, self.job = store, job

    async def ack(self) -> None:
        self.store.done(self.job)

    async def retry_at(self, when: float) -> None:
        self.store.defer(self.job)

    dead = ack  # the index keeps the dead letters of a memory queue


class MemoryStore:
    """Jobs in this process's memory (with `recorder`, also journaled)."""

    def __init__(self, queues: Iterable[QueueConfig], max_bytes: int = 1 << 62,
                 recorder: Recorder | None = None):
        self.lanes = {q.name: _Lane(q.queue_size) for q in queues}
        self.held = HeldBytes(max_bytes)
        self.recorder = recorder
        self.durable = recorder is not None and recorder.durable
        self._heap: list[tuple[float, int, Job]] = []
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")

    async def start(self, restore: Restore) -> None:
        if self.recorder is not None:
            self.recorder.start(self, restore)

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
        self.place(jobs, weight)
        if self.recorder is not None and jobs:
            return self.recorder.admitted(jobs)
        return None

    def place(self, jobs: Sequence[Job], weight: int | None = None) -> None:
        """Hold and enqueue the jobs, without a bound check (they were accepted earlier, or
        just now: `weight`, what they weigh)."""
        self.held.hold(jobs, weight)
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
        if self.recorder is not None:
            self.recorder.deferred(job)

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

    async def take(self, queue: str) -> _MemoryDelivery:
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
        return _MemoryDelivery(self, lane.ready.popleft())

    def done(self, job: Job) -> None:
        self.held.release(job)
        if self.recorder is not None:
            self.recorder.done(job)

    def cancel(self, job: Job) -> bool:
        lane = self.lanes[job.queue]
        if job in lane.ready:  # by identity (Job has no __eq__); a cancel is rare, O(n) is fine
            lane.ready.remove(job)
        else:
            heap = self._heap
            at = next((i for i, (_, _, j) in enumerate(heap) if j is job), None)
            if at is None:
                return False
            heap[at] = heap[-1]
            heap.pop()
            heapq.heapify(heap)
            lane.delayed -= 1
        self.done(job)
        return True

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

    def pending(self) -> int:
        return sum(len(lane.ready) + lane.delayed for lane in self.lanes.values())

    async def stop_taking(self) -> None:
        pass  # the workers empty the queues

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

    keep = defer
    released = done

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.recorder is not None:
            await self.recorder.close()


class SplitStore:
    """Queues on two backends: those shared through a broker, and `local: true` ones kept
    by this process (memory or journal).  A batch across both is checked by both before
    anything is published, so a full queue on either side refuses all of it."""

    def __init__(self, local: MemoryStore, shared: JobStore, shared_queues: Iterable[str]):
        self.local, self.shared = local, shared
        self._shared = frozenset(shared_queues)
        self.held = local.held  # the broker holds its jobs, not this process

    @property
    def durable(self) -> bool:
        return self.local.durable  # what can be left behind here is the local queues'

    def _store(self, queue: str) -> JobStore:
        return self.shared if queue in self._shared else self.local

    async def start(self, restore: Restore) -> None:
        await self.local.start(restore)
        await self.shared.start(restore)

    def admit(self, jobs: Sequence[Job]) -> Awaitable[None] | None:
        mine = [j for j in jobs if j.queue not in self._shared]
        if len(mine) == len(jobs):
            return self.local.admit(jobs)
        if not mine:
            return self.shared.admit(jobs)
        theirs = [j for j in jobs if j.queue in self._shared]
        published = self.shared.admit(theirs)  # its bound check; nothing sent until awaited
        try:
            kept = self.local.admit(mine)
        except BaseException:
            if asyncio.iscoroutine(published):
                published.close()
            raise
        return self._both(mine, kept, published)

    @staticmethod
    async def _both(mine: list[Job], kept: Awaitable[None] | None,
                    published: Awaitable[None] | None) -> None:
        try:
            if published is not None:
                await published
        except NotAdmitted as e:  # ours are queued: say so
            raise NotAdmitted(str(e), [*mine, *e.admitted], e.refused) from None
        finally:
            if kept is not None:
                await kept

    async def take(self, queue: str) -> Delivery:
        return await self._store(queue).take(queue)

    def cancel(self, job: Job) -> bool:
        return self._store(job.queue).cancel(job)

    def length(self, queue: str) -> int:
        return self._store(queue).length(queue)

    def delayed(self, queue: str) -> int:
        return self._store(queue).delayed(queue)

    def oldest_due(self, queue: str) -> float:
        return self._store(queue).oldest_due(queue)

    def remaining(self) -> list[Job]:
        return self.local.remaining()

    def pending(self) -> int:
        return self.local.pending()

    async def stop_taking(self) -> None:
        await self.shared.stop_taking()

    def pop_delayed(self, after: float = float("-inf")) -> list[Job]:
        return self.local.pop_delayed(after)

    def keep(self, job: Job) -> None:
        self.local.keep(job)

    def released(self, job: Job) -> None:
        self.local.released(job)

    async def close(self) -> None:
        await self.shared.close()
        await self.local.close()


# name -> "module:factory"; a factory takes (config, queues, metrics) and returns a JobStore
BACKENDS = {
    "memory": "bwp.store:memory_store",
    "journal": "bwp.journal:journaled_store",
    "rabbitmq": "bwp.rabbitmq:rabbit_store",
}


def memory_store(cfg: Config, queues: Sequence[QueueConfig], metrics: Metrics) -> JobStore:
    return MemoryStore(queues, cfg.limits.max_queued_bytes)


def _build(name: str, cfg: Config, queues: Sequence[QueueConfig], metrics: Metrics) -> JobStore:
    module, _, factory = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), factory)(cfg, queues, metrics)


def make_store(cfg: Config, queues: Sequence[QueueConfig], metrics: Metrics) -> JobStore:
    """The backends the config asks for, built from `BACKENDS`: the queues in the broker
    (rabbitmq.url, every queue not `local: true`), the others in memory or the journal."""
    local_kind = "journal" if cfg.journal.path else "memory"
    shared = [q for q in queues if cfg.in_broker(q)]
    if not shared:
        return _build(local_kind, cfg, queues, metrics)
    broker = _build("rabbitmq", cfg, shared, metrics)
    mine = [q for q in queues if not cfg.in_broker(q)]
    if not mine:
        return broker
    local = _build(local_kind, cfg, mine, metrics)
    assert isinstance(local, MemoryStore)
    return SplitStore(local, broker, (q.name for q in shared))
