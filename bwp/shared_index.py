"""Job status shared by every host through RabbitMQ (the index.JobIndex of a broker's queues).

Each host publishes what happens to the jobs it accepts and sends — accepted, retrying,
succeeded, failed (with the job's record, for a replay from anywhere), replayed, dropped — as
events on the stream PREFIX.status, and reads every host's events from it, its own included.
So GET /jobs/{id}, the dead letters, replay and `wait` answer alike on every host: a job
accepted by A and sent by B is seen finished by A.  Events go in batches of 10 ms, one message
each; a state never goes back (an event arriving late, e.g. A's "accepted" after B's
"succeeded", does not undo the outcome).

`unique`/`once` are decided by one host at a time, the active consumer of the single-active-
consumer queue PREFIX.admit: it answers from this same view plus the claims it granted, and
publishes each grant to the stream before answering, so a decider that takes over (the
previous one died) first reads the stream to its end and knows them too.  A host whose
admission then fails publishes "dropped", which frees the id again.

Jobs of `local: true` queues stay in the LocalIndex it wraps.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .amqp import Broker, BrokerError
from .index import LocalIndex, iso_time, listed, listing_order, status_document
from .jobs import FINISHED, PENDING, Job
from .lifecycle import ThrottledLog
from .store import NotAdmitted, StoreError

log = logging.getLogger("bwp.status")
CLAIM_TIMEOUT = 5.0  # seconds a submit waits for the decider
CLAIM_TTL = 60.0  # seconds a granted id stays taken without an event (its host died)
STREAM_SETUP_TIMEOUT = 20.0  # seconds a starting process retries the status stream
STREAM_BYTES = 1 << 30  # the status stream's bound (the broker drops whole 500 MB segments)
EVENT_BATCH = 0.01  # seconds of status events sent together
MAX_GRANTED = 10_000  # claims kept before the expired ones are swept
MAX_CANCELS = 10_000  # cancels kept before the expired ones are swept
CATCH_UP_AFTER = 1.0  # a decider idle this long reads the stream to its end before answering
_RANK = {"queued": 0, "delayed": 0, "running": 1, "retrying": 1, "succeeded": 2, "failed": 2,
         "cancelled": 2}


class _Entry:
    """What the stream says of the newest job with one id."""

    __slots__ = ("created", "doc", "due", "finished", "record", "size")

    def __init__(self, created: float, due: float, finished: float | None, doc: dict[str, Any],
                 record: dict[str, Any] | None):
        self.created, self.due, self.finished, self.doc, self.record = \
            created, due, finished, doc, record
        self.size = len(json.dumps(record)) if record is not None else 0


class SharedIndex:
    """The jobs of the broker's queues as every host sees them (JobIndex)."""

    def __init__(self, local: LocalIndex, broker: Broker, shared_queues: Iterable[str],
                 max_jobs: int, max_age: float, max_bytes: int, host: str | None = None):
        self.local, self.broker = local, broker
        self.redact: Callable[[str], str] = local.redact
        self._shared = frozenset(shared_queues)
        self.max_jobs, self.max_age, self.max_bytes = max_jobs, max_age, max_bytes
        # who wrote an event; the token: containers often share a hostname and run as pid 1
        self.host = host or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        # how this process's event batches begin: read back, they are skipped undecoded,
        # having been applied here when they happened (in that order); markers carry no
        # "kind" and come back
        self._echo = b'{"v":1,"host":%s,"kind":"status","events":' % json.dumps(self.host).encode()
        self._view: OrderedDict[str, _Entry] = OrderedDict()  # by id, least recently changed first
        self._dead_bytes = 0
        self._dead = 0  # entries that are dead letters (failed): read on every scrape
        self._waiters: dict[tuple[str, float], list[asyncio.Future[None]]] = {}
        self._outbox: list[dict[str, Any]] = []
        self._flushing = False
        # decider: id -> (when, the request granted it), until the job's own events arrive
        self._granted: dict[str, tuple[float, str]] = {}
        self._markers: dict[str, asyncio.Future[None]] = {}
        # (id, created) of cancelled jobs -> until when: whatever the view says later (a new
        # job with the id, an eviction), the worker that takes one of them skips it
        self._cancels: dict[tuple[str, float], float] = {}
        self._last_decision = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._unpublished = ThrottledLog(log, logging.WARNING)

    @property
    def dead_letters(self) -> int:
        return self.local.dead_letters + self._dead

    @property
    def shared_dead_letters(self) -> int:
        return self._dead

    async def start(self) -> None:
        """Read the stream from the retained history on, and stand by as the decider."""
        loop = asyncio.get_running_loop()
        # A confirmed write first: a stream consumed the moment it is declared may not be up
        # yet, and RabbitMQ 3.10 then closes the whole connection (stream_not_found).  A
        # write right after another host (or process) created it can fail the same way
        # (541): the connection comes back by itself, so try again for a while.
        deadline = loop.time() + STREAM_SETUP_TIMEOUT
        while True:
            marker, seen = self._marker()
            try:
                await self.broker.declare_status(self.max_age, STREAM_BYTES)
                await self.broker.publish_event(marker)
                break
            except BrokerError as e:
                self._markers = {k: f for k, f in self._markers.items() if f is not seen}
                if loop.time() > deadline:
                    raise StoreError(f"RabbitMQ status stream: {e}") from None
                log.info("status stream not ready yet (%s): trying again", e)
                await asyncio.sleep(0.5)
        self._tasks.append(loop.create_task(self._read(time.time() - self.max_age)))
        self._tasks.append(loop.create_task(self.broker.serve_decider(self._decide)))
        try:
            await self._until_seen(seen)
        except BrokerError as e:
            raise StoreError(f"RabbitMQ status stream: {e}") from None

    async def close(self) -> None:
        await self._flush()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- what the pool reports ---------------------------------------------------------------

    def _mine(self, job: Job) -> bool:
        return job.queue not in self._shared

    def add(self, job: Job) -> None:
        if self._mine(job):
            return self.local.add(job)
        self._emit(job, "accepted")

    def dropped(self, job: Job) -> None:
        if self._mine(job):
            return self.local.dropped(job)
        self._share({"e": "dropped", "id": job.id, "created": job.created})

    def retrying(self, job: Job) -> None:
        if not self._mine(job):
            self._emit(job, "retrying")

    def finished(self, job: Job) -> None:
        if self._mine(job):
            return self.local.finished(job)
        self._emit(job, "finished", record=job.to_record() if job.state == "failed" else None)

    def reopen(self, job: Job) -> None:
        if self._mine(job):
            return self.local.reopen(job)
        self._emit(job, "replayed")

    def cancelled(self, job: Job) -> None:
        if self._mine(job):
            return self.local.cancelled(job)
        entry = self._view.get(job.id)
        if entry is None or entry.created != job.created:
            return
        # from what the view holds (attempts, the last outcome): `job` may be a stand-in
        doc = {**entry.doc, "state": "cancelled", "next_attempt": None,
               "finished": iso_time(job.finished)}
        self._share({"e": "finished", "id": job.id, "created": job.created,
                     "finished": job.finished, "due": entry.due, "doc": doc})

    def is_cancelled(self, job: Job) -> bool:
        if self._mine(job):
            return self.local.is_cancelled(job)
        return (job.id, job.created) in self._cancels

    def _remember_cancel(self, job_id: str, created: float, due: float) -> None:
        """Kept until the job was due plus the history's age (a backlog may hold it longer)."""
        now = time.time()
        if len(self._cancels) >= MAX_CANCELS:
            self._cancels = {k: until for k, until in self._cancels.items() if until > now}
        self._cancels[(job_id, created)] = max(due, now) + self.max_age

    def released(self, job: Job) -> None:
        self.local.released(job)  # only local queues hand jobs over

    def _emit(self, job: Job, kind: str, record: dict[str, Any] | None = None) -> None:
        event = {"e": kind, "id": job.id, "created": job.created, "finished": job.finished,
                 "due": job.not_before or job.created, "doc": self.describe(job)}
        if record is not None:
            event["record"] = record
        self._share(event)

    def _share(self, event: dict[str, Any]) -> None:
        """Applied here at once, and queued for the other hosts: what EVENT_BATCH seconds
        bring goes in one message (each would otherwise cost the broker a confirmed write
        as dear as the job's own)."""
        self._apply(event)
        self._outbox.append(event)
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_later(EVENT_BATCH, self._start_flush)

    def _start_flush(self) -> None:
        task = asyncio.get_running_loop().create_task(self._flush())
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    async def _flush(self) -> None:
        self._flushing = False
        events, self._outbox = self._outbox, []
        if not events:
            return
        try:
            await self.broker.publish_event(self._batch(events))
        except BrokerError as e:  # the jobs are safe; other hosts' view of them is not
            self._unpublished("events", "%d job status events not published (other hosts "
                              "will not see them): %s", len(events), e)

    def _batch(self, events: list[dict[str, Any]]) -> bytes:
        return self._echo + json.dumps(events, separators=(",", ":")).encode() + b"}"

    # -- reading the stream ----------------------------------------------------------------

    async def _read(self, since: float) -> None:
        echo = self._echo
        async for body in self.broker.events(since):
            if body.startswith(echo):
                continue
            try:
                message = json.loads(body)
                for event in message["events"]:
                    self._apply(event)
            except Exception as e:  # a damaged or foreign message costs only itself
                log.error("a status event that cannot be read is skipped: %s", e)

    def _apply(self, event: dict[str, Any]) -> None:
        kind, job_id = event["e"], event["id"]
        if kind == "marker":
            fut = self._markers.pop(job_id, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
            return
        if kind == "claimed":
            self._granted.setdefault(job_id, (float(event["created"]), str(event.get("by", ""))))
            return
        created = float(event["created"])
        view = self._view
        entry = view.get(job_id)
        if kind == "dropped":
            self._granted.pop(job_id, None)
            if entry is not None and entry.created == created:
                self._forget(job_id, entry)
            return
        self._granted.pop(job_id, None)
        doc = event["doc"]
        due = float(event.get("due", created))
        if doc["state"] == "cancelled":
            self._remember_cancel(job_id, created, due)
        # a job's due time only grows (a retry, a replay): with state and attempts it orders
        # the events of one job, whatever host they come from and however late
        if entry is not None and entry.created == created:
            old = entry.doc
            if old["state"] == "cancelled" and doc["state"] in PENDING:
                return  # a retry scheduled as it was cancelled: skipped when it comes due
            if (entry.due, _RANK[old["state"]], old["attempts"]) > \
                    (due, _RANK[doc["state"]], doc["attempts"]):
                return  # late news: the job is further along already
        if entry is not None:
            self._forget(job_id, entry)
        entry = _Entry(created, due, event.get("finished"), doc, event.get("record"))
        view[job_id] = entry
        self._dead_bytes += entry.size
        self._dead += doc["state"] == "failed"
        if doc["state"] in FINISHED:
            self._wake(job_id, created)
        self._evict(time.time())

    def _forget(self, job_id: str, entry: _Entry) -> None:
        del self._view[job_id]
        self._dead_bytes -= entry.size
        self._dead -= entry.doc["state"] == "failed"

    def _evict(self, now: float) -> None:
        """Oldest first: past max_jobs, finished past max_age, dead letters past max_bytes."""
        view, oldest = self._view, now - self.max_age
        while view:
            job_id, entry = next(iter(view.items()))
            finished_at = entry.finished or now
            if len(view) <= self.max_jobs and self._dead_bytes <= self.max_bytes \
                    and (entry.doc["state"] not in FINISHED or finished_at >= oldest):
                break
            self._forget(job_id, entry)

    def _marker(self) -> tuple[bytes, asyncio.Future[None]]:
        """An event only this host waits for: read back, everything before it has been."""
        marker = f"{self.host}:{time.monotonic_ns()}"
        seen = asyncio.get_running_loop().create_future()
        self._markers[marker] = seen
        body = json.dumps({"v": 1, "host": self.host, "events": [{"e": "marker", "id": marker}]})
        return body.encode(), seen

    async def _until_seen(self, seen: asyncio.Future[None], timeout: float = 10.0) -> None:
        try:
            await asyncio.wait_for(seen, timeout)
        except TimeoutError:
            raise BrokerError(f"the status stream did not answer within {timeout:g}s") from None
        finally:
            for key, fut in list(self._markers.items()):
                if fut is seen:
                    del self._markers[key]

    async def _caught_up(self) -> None:
        """Until this host has read every event published before now."""
        marker, seen = self._marker()
        await self.broker.publish_event(marker)
        await self._until_seen(seen)

    # -- what the service asks ---------------------------------------------------------------

    async def claim(self, jobs: Sequence[Job]) -> tuple[list[Job], list[Job]]:
        shared = [j for j in jobs if (j.unique or j.once) and not self._mine(j)]
        if not shared:
            return await self.local.claim(jobs)
        ask = json.dumps({"ask": secrets.token_hex(8), "jobs": [
            {"id": j.id, "once": j.once, "created": j.created} for j in shared]}).encode()
        try:
            answer = json.loads(await self.broker.ask_decider(ask, CLAIM_TIMEOUT))
        except BrokerError as e:  # nothing admitted: a retry is safe
            raise NotAdmitted(f"no decision on unique/once ids: {e}", [], jobs) from None
        taken = set(answer["duplicates"])
        mine, _ = await self.local.claim([j for j in jobs if self._mine(j)])
        kept = {id(j) for j in mine}
        fresh: list[Job] = []
        duplicates: list[Job] = []
        for job in jobs:
            if self._mine(job):
                (fresh if id(job) in kept else duplicates).append(job)
            elif (job.unique or job.once) and job.id in taken:
                duplicates.append(job)
            else:
                fresh.append(job)
        return fresh, duplicates

    async def _decide(self, requests: list[bytes]) -> list[bytes]:
        """The decider's answers, in order: which ids of each request are taken (the others
        are then granted to it).  A request seen again (its decider died before acking it)
        gets the same answer: what it was granted is still its own."""
        if time.time() - self._last_decision > CATCH_UP_AFTER:
            await self._caught_up()  # we may have just become the decider
        now = self._last_decision = time.time()
        if len(self._granted) > MAX_GRANTED:  # of hosts that died before admitting
            self._granted = {k: g for k, g in self._granted.items() if now - g[0] <= CLAIM_TTL}
        answers, grants = [], []
        for request in requests:
            asked = json.loads(request)
            ask = str(asked.get("ask", ""))
            duplicates = []
            for item in asked["jobs"]:
                job_id = item["id"]
                claimed = self._granted.get(job_id)
                if claimed is not None and now - claimed[0] > CLAIM_TTL:
                    del self._granted[job_id]
                    claimed = None
                if claimed is not None and claimed[1] == ask and ask:
                    continue  # granted to this very request before
                entry = self._view.get(job_id)
                if claimed is not None or (entry is not None and (
                        item["once"] or entry.doc["state"] not in FINISHED)):
                    duplicates.append(job_id)
                    continue
                self._granted[job_id] = (now, ask)  # later ids, in this request or the next
                grants.append({"e": "claimed", "id": job_id, "created": now, "by": ask})
            answers.append(json.dumps({"duplicates": duplicates}).encode())
        if grants:  # on the stream before the answers: a decider after us knows them
            await self.broker.publish_event(self._batch(grants))
        return answers

    def get(self, job_id: str) -> Job | None:
        """For a replay: a dead letter rebuilt from its record, wherever it failed."""
        job = self.local.get(job_id)
        if job is not None:
            return job
        entry = self._view.get(job_id)
        if entry is None:
            return None
        if entry.record is None or entry.doc["state"] != "failed":
            # known, not replayable: a stand-in that says its state
            return Job(job_id, entry.doc["url"], entry.doc["method"], None, None,
                       entry.doc["queue"], state=entry.doc["state"], created=entry.created)
        job = Job.from_record(entry.record)
        job.state = "failed"
        return job

    def status(self, job_id: str) -> dict[str, Any] | None:
        found = self.local.status(job_id)
        if found is not None:
            return found
        entry = self._view.get(job_id)
        return None if entry is None else entry.doc

    def page(self, state: str, queue: str | None, offset: int, limit: int,
             shared: bool = True) -> tuple[list[dict[str, Any]], int]:
        if not shared:
            return self.local.page(state, queue, offset, limit)
        own, own_total = self.local.page(state, queue, 0, offset + limit)
        theirs = [e.doc for e in self._view.values()
                  if listed(state, queue, e.doc["state"], e.doc["queue"])]
        key, reverse = listing_order(state)
        merged = sorted([*own, *theirs], key=key, reverse=reverse)
        return merged[offset:offset + limit], own_total + len(theirs)

    def describe(self, job: Job) -> dict[str, Any]:
        return status_document(job, self.redact(job.url))

    def document(self, job: Job) -> dict[str, Any]:
        if self._mine(job):
            return self.local.document(job)
        entry = self._view.get(job.id)
        if entry is not None and entry.created == job.created:
            return entry.doc
        return self.describe(job)

    async def wait(self, jobs: Sequence[Job], timeout: float) -> list[Job]:
        mine = [j for j in jobs if self._mine(j)]
        theirs = [j for j in jobs if not self._mine(j)]
        loop = asyncio.get_running_loop()
        futures = []
        for job in theirs:
            if not self._finished(job):
                fut = loop.create_future()
                self._waiters.setdefault((job.id, job.created), []).append(fut)
                futures.append(fut)
        deadline = loop.time() + timeout
        unfinished = await self.local.wait(mine, timeout) if mine else []
        if futures:
            _, pending = await asyncio.wait(futures, timeout=max(0.0, deadline - loop.time()))
            for fut in pending:
                fut.cancel()
            for job in theirs:
                key = (job.id, job.created)
                waiting = [f for f in self._waiters.get(key, ()) if not f.done()]
                if waiting:
                    self._waiters[key] = waiting
                else:
                    self._waiters.pop(key, None)
        return [*unfinished, *(j for j in theirs if not self._finished(j))]

    def _finished(self, job: Job) -> bool:
        entry = self._view.get(job.id)
        return entry is not None and entry.created == job.created \
            and entry.doc["state"] in FINISHED

    def _wake(self, job_id: str, created: float) -> None:
        for fut in self._waiters.pop((job_id, created), ()):
            if not fut.done():
                fut.set_result(None)
