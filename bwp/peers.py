"""Sibling worker processes (`processes: N`): each owns the jobs it accepted.

Every worker also serves the API on a private unix socket (in the master's 0700 runtime
directory).  What one process cannot answer alone goes to its siblings there: a status lookup
or a replay of a job it does not know, the dead-letter list, the metrics.  A submit with a
`unique`/`once` id goes to the id's owner (a hash of the id), so duplicates are caught across
processes.  Peer requests are answered locally and never passed on again.  `SiblingJobs` is
the jobs service (bwp/service.py) of a process with siblings: it asks them what it cannot
answer alone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.parse
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import aiohttp
from prometheus_client import Metric, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from .balance import LoadBoard
from .index import JobIndex, listing_order
from .jobs import Job, Submission
from .metrics import Metrics
from .pool import Pool
from .service import RELAY_DEADLINE, Accepted, Jobs, QueueFull, Relayed, UnknownJob

log = logging.getLogger("bwp.peers")
LOOKUP_TIMEOUT = aiohttp.ClientTimeout(total=5)
# a forwarded submit may carry `wait`: only the connection is bounded
FORWARD_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=2)
# a submit relayed for room, without `wait`: a sibling stalled since its last post is not
# waited for long (past this, it is refused here)...
RELAY_TIMEOUT = aiohttp.ClientTimeout(total=5, sock_connect=2)
# ...and the sibling takes it only within this (RELAY_DEADLINE), or else a stall there would
# leave jobs accepted behind our refusal, to be submitted again by the client
RELAY_DECIDE = 4.0
Answer = tuple[int, bytes]


class Peers:
    def __init__(self, index: int, paths: Iterable[str]):
        self.paths = tuple(paths)
        self.index = index
        self._sessions: dict[int, aiohttp.ClientSession] = {}

    @property
    def others(self) -> list[int]:
        return [i for i in range(len(self.paths)) if i != self.index]

    def owner(self, job_id: str) -> int:
        """The process that decides about a caller's id (stable across restarts)."""
        return zlib.crc32(job_id.encode()) % len(self.paths)

    def _session(self, index: int) -> aiohttp.ClientSession:
        session = self._sessions.get(index)
        if session is None or session.closed:
            session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=self.paths[index]))
            self._sessions[index] = session
        return session

    async def ask(self, index: int, method: str, path: str, headers: Mapping[str, str],
                  body: bytes | None = None,
                  timeout: aiohttp.ClientTimeout = LOOKUP_TIMEOUT) -> Answer | None:
        """One sibling's answer, or None when it cannot be reached (restarting, stopping)."""
        try:
            async with self._session(index).request(method, "http://peer" + path, data=body,
                                                    headers=headers, timeout=timeout) as resp:
                return resp.status, await resp.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            log.warning("worker %d did not answer %s %s: %s", index, method, path, e)
            return None

    async def ask_others(self, method: str, path: str, headers: Mapping[str, str],
                         body: bytes | None = None) -> list[Answer]:
        answers = await asyncio.gather(*(self.ask(i, method, path, headers, body)
                                         for i in self.others))
        return [a for a in answers if a is not None]

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()


def _passed_on(headers: Mapping[str, str], content_type: str | None = None) -> dict[str, str]:
    """The headers a sibling needs to answer a request made to us."""
    out = {"Content-Type": content_type} if content_type else {}
    if "Authorization" in headers:
        out["Authorization"] = headers["Authorization"]
    return out


class SiblingJobs(Jobs):
    """The jobs service of one of several processes: what this one cannot answer alone (a job
    it does not know, the dead letters, the metrics) it asks its siblings; a submit with a
    unique/once id goes to the id's owner, so duplicates are caught across processes; a submit
    this one has no room for goes to a sibling that has (the full queues of each are on
    bwp/balance.py's board)."""

    def __init__(self, pool: Pool, index: JobIndex, metrics: Metrics, peers: Peers,
                 board: LoadBoard, shared_queues: Iterable[str] = ()):
        super().__init__(pool, index, metrics)
        self.peers, self.board = peers, board
        self.shared_queues = frozenset(shared_queues)  # in a broker: every process sees them

    def full(self) -> bool:
        return super().full() and not self.board.room_anywhere(self.pool.all_queues)

    async def submit(self, sub: Submission, raw: bytes,
                     headers: Mapping[str, str]) -> Accepted | Relayed:
        owner = self._owner(sub.jobs)
        if owner is not None:
            answer = await self.peers.ask(owner, "POST", "/post/http",
                                          _passed_on(headers, "application/json"), raw,
                                          FORWARD_TIMEOUT)
            if answer is not None:
                return Relayed(*answer)
            # its owner is restarting: better a job whose duplicate check was local than none
        try:
            return await super().submit(sub, raw, headers)
        except QueueFull:
            relayed = await self._to_room(sub, raw, headers)
            if relayed is None:
                raise
            return relayed

    async def _to_room(self, sub: Submission, raw: bytes,
                       headers: Mapping[str, str]) -> Relayed | None:
        """The whole submit (all or none there, as here) to a sibling with room in its
        queues; its answer, a 503 of its own included.  Not for a unique/once id (its owner
        decides about it, and that may be us) nor a broker's queue (the same for all)."""
        jobs = sub.jobs
        if not jobs or any(j.unique or j.once or j.queue in self.shared_queues for j in jobs):
            return None
        bit = self.pool.queue_bit
        sibling = self.board.sibling_with_room(sum({bit[j.queue] for j in jobs}))
        if sibling is None:
            return None
        passed, timeout = _passed_on(headers, "application/json"), FORWARD_TIMEOUT
        if sub.wait is None:
            passed[RELAY_DEADLINE] = repr(time.monotonic() + RELAY_DECIDE)
            timeout = RELAY_TIMEOUT
        answer = await self.peers.ask(sibling, "POST", "/post/http", passed, raw, timeout)
        return None if answer is None else Relayed(*answer)

    def _owner(self, jobs: list[Job]) -> int | None:
        """The sibling that decides about the batch's first unique/once id, if not us."""
        for job in jobs:
            if job.unique or job.once:
                owner = self.peers.owner(job.id)
                return None if owner == self.peers.index else owner
        return None

    async def status(self, job_id: str, headers: Mapping[str, str]) -> dict[str, Any] | Relayed:
        try:
            return await super().status(job_id, headers)
        except UnknownJob:
            for status, body in await self.peers.ask_others("GET", _job_path(job_id),
                                                            _passed_on(headers)):
                if status == 200:
                    return Relayed(status, body)
            raise

    async def jobs_page(self, state: str, queue: str | None, offset: int, limit: int,
                        headers: Mapping[str, str],
                        shared: bool = True) -> tuple[list[dict[str, Any]], int]:
        """Everyone's first offset+limit, merged; a broker's jobs once (every process sees
        them all), the others' own jobs from each."""
        own, total = await super().jobs_page(state, queue, 0, offset + limit, headers, shared)
        query = {"state": state, "offset": 0, "limit": offset + limit, "scope": "local",
                 **({"queue": queue} if queue is not None else {})}
        answers = await self.peers.ask_others(
            "GET", "/jobs?" + urllib.parse.urlencode(query), _passed_on(headers))
        pages = [json.loads(body) for status, body in answers if status == 200]
        return merge_job_pages(state, own, total, pages, offset, limit)

    async def replay(self, job_id: str, headers: Mapping[str, str]) -> str | Relayed:
        try:
            return await super().replay(job_id, headers)
        except UnknownJob:
            answer = await self._holder_answers("POST", _job_path(job_id) + "/retry", headers)
            if answer is None:
                raise
            return answer

    async def cancel(self, job_id: str, headers: Mapping[str, str]) -> dict[str, Any] | Relayed:
        try:
            return await super().cancel(job_id, headers)
        except UnknownJob:
            answer = await self._holder_answers("DELETE", _job_path(job_id), headers)
            if answer is None:
                raise
            return answer

    async def _holder_answers(self, method: str, path: str,
                              headers: Mapping[str, str]) -> Relayed | None:
        """A request about a job we do not know, to the siblings one at a time (only the one
        that holds it may act on it): its answer, None if none knows the job."""
        for index in self.peers.others:
            answer = await self.peers.ask(index, method, path, _passed_on(headers))
            if answer is not None and answer[0] != 404:
                return Relayed(*answer)
        return None

    async def metrics_page(self) -> bytes:
        """One view of every process: samples summed."""
        answers = await self.peers.ask_others("GET", "/metrics", {})
        texts = [text.decode() for status, text in answers if status == 200]
        return generate_latest(MergedMetrics(self.metrics.registry.collect(), texts,
                                             self.shared_queues))


def _job_path(job_id: str) -> str:
    return "/jobs/" + urllib.parse.quote(job_id, safe="")


# What every process reads from the broker for a shared queue: the same value, not a share.
_BROKER_GAUGES = frozenset(("bwp_queue_length", "bwp_queue_capacity", "bwp_queue_delayed",
                            "bwp_queue_oldest_due_seconds", "bwp_broker_dead_letters"))
# every process counts the shared history's dead letters in its own bwp_dead_letters
_SHARED_DEAD = "bwp_shared_dead_letters"
# merged by the lowest: 0 when any process is cut off; the oldest process's start
_LOWEST = frozenset(("bwp_broker_up", "bwp_start_time_seconds"))


class MergedMetrics(Collector):
    """Our own metric families plus the siblings' (Prometheus text), samples summed; but a
    broker's figures for a shared queue are taken once (the largest), as are the shared
    history's dead letters (in bwp_dead_letters too), and _LOWEST ones are the lowest."""

    def __init__(self, own: Iterable[Metric], texts: Iterable[str],
                 shared_queues: frozenset[str] = frozenset()):
        self.shared_queues = shared_queues
        self._shared_dead: list[float] = []  # each process's count of the same dead letters
        self.families: dict[str, Metric] = {}
        self.values: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
        for family in own:
            self._add(family)
        for text in texts:
            for family in text_string_to_metric_families(text):
                self._add(family)
        if len(self._shared_dead) > 1:  # summed N times: once is the count
            extra = sum(self._shared_dead) - max(self._shared_dead)
            for name in ("bwp_dead_letters", _SHARED_DEAD):
                key = (name, name, ())
                if key in self.values:
                    self.values[key] -= extra

    def _add(self, family: Metric) -> None:
        self.families.setdefault(family.name, family)
        once = family.name in _BROKER_GAUGES
        if family.name == _SHARED_DEAD:
            self._shared_dead += [s.value for s in family.samples]
        for s in family.samples:
            key = (family.name, s.name, tuple(sorted(s.labels.items())))
            old = self.values.get(key)
            if old is None:
                self.values[key] = s.value
            elif family.name in _LOWEST:
                self.values[key] = min(old, s.value)
            elif once and s.labels.get("queue") in self.shared_queues:
                self.values[key] = max(old, s.value)
            else:
                self.values[key] = old + s.value

    def collect(self) -> Iterable[Metric]:
        merged: dict[str, Metric] = {}
        for (name, sample, labels), value in self.values.items():
            out = merged.get(name)
            if out is None:
                family = self.families[name]
                out = merged[name] = Metric(family.name, family.documentation, family.type)
            out.add_sample(sample, dict(labels), value)
        return merged.values()


def merge_job_pages(state: str, own: list[dict[str, Any]], own_total: int,
                    pages: Iterable[dict[str, Any]], offset: int,
                    limit: int) -> tuple[list[dict[str, Any]], int]:
    """One listing across processes: each page holds its first offset+limit."""
    jobs, total = list(own), own_total
    for page in pages:
        jobs += page["jobs"]
        total += page["total"]
    key, reverse = listing_order(state)
    jobs.sort(key=key, reverse=reverse)
    return jobs[offset:offset + limit], total
