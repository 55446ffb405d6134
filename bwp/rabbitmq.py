"""Queues shared by several bwp hosts through RabbitMQ (config `rabbitmq: {url, prefix}`).

Every host publishes what it accepts to the broker and consumes from it with prefetch = the
queue's workers, so whichever host has a free worker sends the job, from its own source
address by its own routing table.  A submit is confirmed only once the broker confirmed every
message (publisher confirms, pipelined on one channel by bwp/amqp.py).  Delays and retry
backoff wait in the broker (binary TTL levels, exact whatever the order of submission), so
no host holds a job it is not sending and a reload hands nothing over.  A delivery is acked
after its attempt is settled: done, published again with its retry delay, or published to
PREFIX.NAME_dead, each confirmed first.  Delivery is therefore at-least-once: a host that dies
mid-attempt has its job sent again by another (redelivered, counted).

The message is the job's record (Job.to_record, the body inline in base64) as JSON, the same
checked form the journal writes, so a damaged or foreign message costs only itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING

from .amqp import DELAY_LEVELS, Broker, BrokerError, BrokerRefused, Consumer
from .amqp import Delivery as Message
from .config import QueueConfig
from .jobs import HeldBytes, Job
from .store import (
    JobStore,
    NotAdmitted,
    QueueFull,
    Restore,
    SplitStore,
    StoreError,
    _bound_key,
)

if TYPE_CHECKING:
    from .config import Config
    from .metrics import Metrics

log = logging.getLogger("bwp.rabbitmq")
QUIET_INTERVAL = 10.0  # seconds between two lines of aio-pika's reconnect chatter
# a filter applies to the logger it is on, not to its children: each one that logs
_CLIENT_LOGGERS = ("aiormq.connection", "aio_pika.robust_connection", "aio_pika.connection",
                   "aio_pika.tools", "aio_pika.channel", "aio_pika.robust_channel",
                   "aio_pika.queue", "aio_pika.robust_queue")
DEPTH_INTERVAL = 1.0  # seconds between reads of the queues' depths from the broker


def encode(job: Job) -> bytes:
    return json.dumps(job.to_record(), separators=(",", ":")).encode()


def decode(body: bytes) -> Job:
    return Job.from_record(json.loads(body))


class RabbitDelivery:
    """A job consumed from the broker; settled by acking its message, after publishing the
    job again (a retry) or to the dead letters when the attempt asks for that."""

    __slots__ = ("job", "message", "store")

    def __init__(self, store: RabbitStore, message: Message, job: Job):
        self.store, self.message, self.job = store, message, job

    async def ack(self) -> None:
        try:
            await self.message.ack()
        except BrokerError as e:  # not acked: the broker delivers it again (at-least-once)
            raise StoreError(str(e)) from None

    async def retry_at(self, when: float) -> None:
        job = self.job
        try:
            await self.store.broker.publish(job.queue, encode(job), message_id=job.id,
                                            delay=max(0.0, when - time.time()))
            await self.message.ack()
        except BrokerError as e:
            raise StoreError(str(e)) from None

    async def dead(self) -> None:
        job = self.job
        try:
            await self.store.broker.publish_dead(job.queue, encode(job), message_id=job.id)
            await self.message.ack()
        except BrokerError as e:
            raise StoreError(str(e)) from None


class RabbitStore:
    """The queue backend for queues that live in RabbitMQ (store.JobStore)."""

    durable = True  # what is not acked stays in the broker

    def __init__(self, queues: Sequence[QueueConfig], broker: Broker, metrics: Metrics,
                 dead_max_length: int, dead_ttl: float, connect_timeout: float = 30.0):
        self.queues = {q.name: q for q in queues}
        self.broker, self.metrics = broker, metrics
        self.dead_max_length, self.dead_ttl = dead_max_length, dead_ttl
        self.connect_timeout = connect_timeout
        self.held = HeldBytes(1 << 62)  # the broker holds the jobs, not this process
        self._depth = dict.fromkeys(self.queues, 0)  # ready messages, as last read
        self._dead = dict.fromkeys(self.queues, 0)
        self._publishing = dict.fromkeys(self.queues, 0)  # not yet confirmed
        self._consumers: dict[str, Consumer] = {}
        self._refresher: asyncio.Task[None] | None = None
        self._stopped = False  # stop_taking(): nothing more is delivered here
        self._nacks = {name: metrics.broker_nacks.labels(name) for name in self.queues}
        self._redelivered = {name: metrics.redelivered.labels(name) for name in self.queues}
        metrics.broker_up.set_function(lambda: 1.0 if broker.up else 0.0)
        for name in self.queues:
            metrics.broker_dead.labels(name).set_function(lambda n=name: self._dead[n])

    async def start(self, restore: Restore) -> None:
        """Connect, declare the topology, consume; nothing to restore (the broker kept it).
        StoreError when the broker cannot be used: the process does not start (a reload
        then leaves the old one serving)."""
        broker = self.broker
        try:
            await broker.connect(self.connect_timeout)
            for q in self.queues.values():
                try:
                    await broker.declare_queue(q.name, q.queue_size, self.dead_max_length,
                                               self.dead_ttl)
                except BrokerError as e:
                    if "PRECONDITION" not in str(e) and "406" not in str(e):
                        raise
                    raise StoreError(
                        f"RabbitMQ queue {broker.prefix}.{q.name} exists with other settings "
                        f"(was {_bound_key(q.name)} or history changed?): RabbitMQ cannot change "
                        "them on a live queue; set them with a policy, or delete the queue "
                        "once it is empty") from None
            for q in self.queues.values():
                self._consumers[q.name] = await broker.consume(q.name, q.size)
        except BrokerError as e:
            raise StoreError(f"RabbitMQ: {e}") from None
        await self._read_depths()
        self._refresher = asyncio.get_running_loop().create_task(self._refresh())

    def admit(self, jobs: Sequence[Job]) -> Awaitable[None] | None:
        """Refuse at once what the last known depth says cannot fit; publish the rest."""
        needed: dict[str, int] = {}
        for job in jobs:
            needed[job.queue] = needed.get(job.queue, 0) + 1
        for name, n in needed.items():
            if self._depth[name] + self._publishing[name] + n > self.queues[name].queue_size:
                raise QueueFull(name, f"{self.queues[name].queue_size} jobs, {_bound_key(name)}")
        if not jobs:
            return None
        now = time.time()
        for job in jobs:  # as the memory queue shows them (a refused one is dropped)
            job.state = "delayed" if job.not_before and job.not_before > now else "queued"
        return self._publish(jobs)

    async def _publish(self, jobs: Sequence[Job]) -> None:
        """Every job confirmed by the broker, or NotAdmitted naming those that were."""
        publishing, now = self._publishing, time.time()
        for job in jobs:
            publishing[job.queue] += 1
        broker = self.broker
        started = time.perf_counter()
        try:
            results = await asyncio.gather(*(
                broker.publish(job.queue, encode(job), message_id=job.id,
                               delay=max(0.0, (job.not_before or now) - now))
                for job in jobs), return_exceptions=True)
        finally:
            for job in jobs:
                publishing[job.queue] -= 1
        self.metrics.broker_publish.observe(time.perf_counter() - started)
        admitted = [job for job, r in zip(jobs, results, strict=True) if r is None]
        for job in admitted:
            self._depth[job.queue] += 1  # until the next read says otherwise
        if len(admitted) == len(jobs):
            return
        for job, r in zip(jobs, results, strict=True):
            if r is not None:
                self._nacks[job.queue].inc()
        errors = [r for r in results if r is not None]
        for r in errors:
            if not isinstance(r, Exception):
                raise r  # cancelled: the client went away (the confirms may still come)
        refused = any(isinstance(r, BrokerRefused) for r in errors)
        why = ("the broker refused them (queue at its x-max-length)" if refused else
               f"the broker did not confirm them: {errors[0]}")
        raise NotAdmitted(why, admitted, [j for j in jobs if j not in admitted])

    async def take(self, queue: str) -> RabbitDelivery:
        consumer = self._consumers[queue]
        while True:
            try:
                message = await consumer.get()
            except BrokerError:
                if not self._stopped:
                    raise
                await asyncio.get_running_loop().create_future()  # idle until the drain ends us
                raise
            try:
                job = decode(message.body)
            except Exception as e:  # not ours, or damaged: into the dead letters, as it came
                log.error("queue %s: a message that is no job (%s): moved to %s_dead", queue,
                          e, queue)
                with contextlib.suppress(BrokerError):
                    await self.broker.publish_dead(queue, message.body,
                                                   message_id=message.message_id)
                    await message.ack()
                continue
            self._depth[queue] = max(0, self._depth[queue] - 1)  # until the next read
            if message.redelivered:
                self._redelivered[queue].inc()
            wait = (job.not_before or 0.0) - time.time()
            if wait > 0:  # delays round up to whole seconds; a clock ahead of ours
                await asyncio.sleep(min(wait, 1.0))
            job.queue = queue
            return RabbitDelivery(self, message, job)

    def cancel(self, job: Job) -> bool:
        return True  # a message cannot be taken out of a queue: the worker taking it skips it

    def length(self, queue: str) -> int:
        return self._depth[queue]

    def delayed(self, queue: str) -> int:
        return 0  # waiting in the broker's delay levels, which all queues share

    def oldest_due(self, queue: str) -> float:
        return 0.0  # the broker does not say

    def remaining(self) -> list[Job]:
        return []  # everything not settled stays in the broker

    def pending(self) -> int:
        return 0

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(DEPTH_INTERVAL)
            await self._read_depths()

    async def _read_depths(self) -> None:
        for name in self.queues:
            with contextlib.suppress(BrokerError):  # the last known value stands
                self._depth[name], self._dead[name] = await self.broker.depth(name)

    async def stop_taking(self) -> None:
        """A stop or reload: no new deliveries; those buffered go back to the broker."""
        self._stopped = True
        for consumer in self._consumers.values():
            with contextlib.suppress(BrokerError):
                await consumer.cancel()

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        await self.stop_taking()
        await self.broker.close()


class _OncePerInterval(logging.Filter):
    """While the broker is away, aio-pika and aiormq log each reconnect attempt of each
    connection, four lines a second: let one line per logger and level through every
    QUIET_INTERVAL (bwp_broker_up shows the state meanwhile)."""

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[tuple[str, int], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key, now = (record.name, record.levelno), time.monotonic()
        if now - self._last.get(key, -QUIET_INTERVAL) < QUIET_INTERVAL:
            return False
        self._last[key] = now
        return True


def _quiet_client_logs() -> None:
    quiet = _OncePerInterval()
    for name in _CLIENT_LOGGERS:
        logging.getLogger(name).addFilter(quiet)


def rabbit_store(cfg: Config, queues: Sequence[QueueConfig], metrics: Metrics) -> RabbitStore:
    _quiet_client_logs()
    rabbit = cfg.rabbitmq
    assert rabbit is not None and rabbit.url
    broker = Broker(rabbit.url, rabbit.prefix, heartbeat=rabbit.heartbeat)
    return RabbitStore(queues, broker, metrics, cfg.history.max_jobs, cfg.history.max_age,
                       rabbit.connect_timeout)


def broker_of(store: JobStore) -> Broker:
    """The broker connection of the daemon's store (its shared half when split)."""
    shared = store.shared if isinstance(store, SplitStore) else store
    assert isinstance(shared, RabbitStore)
    return shared.broker


def describe(cfg: Config) -> list[str]:
    """What `bwp check` prints: the broker (no password) and the topology bwp declares."""
    rabbit = cfg.rabbitmq
    p = rabbit.prefix
    lines = [f"rabbitmq: {rabbit.shown_url}, prefix {p!r}",
             f"  exchange {p}.jobs (direct, routing key = queue name)"]
    for q in cfg.all_queues.values():
        if cfg.in_broker(q):
            lines.append(f"  queue {p}.{q.name} (quorum, x-max-length {q.queue_size}, "
                         f"reject-publish; prefetch {q.size} per process) and {p}.{q.name}_dead "
                         f"(kept {cfg.history.max_age:g}s, at most {cfg.history.max_jobs})")
    lines.append(f"  delays: {p}.delay.0 .. {p}.delay.{DELAY_LEVELS - 1} "
                 f"(TTL 2^level s, up to {2 ** DELAY_LEVELS - 1}s), then {p}.delay.deliver")
    lines.append(f"  stream {p}.status (job status events, kept {cfg.history.max_age:g}s), "
                 f"queue {p}.admit (unique/once, single active consumer)")
    local = [q.name for q in cfg.all_queues.values() if not cfg.in_broker(q)]
    if local:
        lines.append(f"  local queues (this process only): {', '.join(local)}")
    return lines
