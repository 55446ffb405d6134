"""Transport between bwp and RabbitMQ, on aio-pika: bytes + headers in, bytes + headers out.

Knows nothing about jobs. Topology under a prefix P (see docs/rabbitmq.md):

- ``P.jobs`` direct exchange, routing key = queue name, -> quorum queue ``P.NAME``
  (x-max-length + reject-publish, x-delivery-limit 5, dead-letters to ``P.NAME_dead``);
- ``P.NAME_dead`` quorum queue (x-message-ttl, x-max-length, drop-head);
- delays: kombu/celery's "native delayed delivery" binary TTL levels ``P.delay.21`` .. ``P.delay.0``
  and ``P.delay.deliver``, shared by every queue of the prefix.

Two robust connections, as RabbitMQ advises: publishing is throttled per connection
(connection.blocked) and aio-pika restores a connection's channels one after the other, so a
consumer whose restore hangs must not hold up publishing. On the first: a channel for
declarations, one for publishing (confirms, mandatory), one for passive declares (a 404 closes
a channel; this one has nothing to restore). On the second: one channel per consumer.
aio-pika re-declares what was declared on them and restores consumers after a reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustQueue
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from aio_pika.robust_connection import RobustConnection
from aiormq.exceptions import DeliveryError, PublishError

log = logging.getLogger("bwp.amqp")

DELAY_LEVELS = 22  # level L holds a message 2^L s: up to 2^22 - 1 s, about 48.5 days
MAX_DELAY = (1 << DELAY_LEVELS) - 1
DELIVERY_LIMIT = 5  # a message that crashes its consumer this often goes to NAME_dead
NAME_RE = re.compile(r"[A-Za-z0-9_-]+")  # one topic word: no dots, no * or #
DECLARE_TIMEOUT = 30.0  # a first declaration creates ~25 quorum queues: give it time

# what a dead connection or channel raises out of aio-pika/aiormq
_BROKEN = (*CONNECTION_EXCEPTIONS, aiormq.exceptions.ChannelInvalidStateError)


class BrokerError(Exception):
    """The broker did not take it: unreachable, channel closed, confirm timeout, unroutable."""


class BrokerRefused(BrokerError):
    """A negative confirm, e.g. the queue is at x-max-length with x-overflow reject-publish."""


def _interrupted(what: str) -> BrokerError:
    """aiormq cancels the waiters of a connection it declares "stuck" (no frames within
    3 x (heartbeat + 1) s): that CancelledError is a broker failure, unless this task
    itself is being cancelled, in which case the caller re-raises it."""
    return BrokerError(f"{what}: the connection to the broker was lost")


def _own_cancel() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class _call:
    """One broker operation bounded by `timeout`, whatever fails in it a BrokerError: the
    timeout, a dead channel or connection, and a stuck connection's CancelledError (see
    _interrupted) unless this task itself is being cancelled.  A class, not a generator:
    it is on the path of every publish."""

    __slots__ = ("late", "timeout", "timer", "what")

    def __init__(self, what: str, timeout: float, late: str = "no answer"):
        self.what, self.timeout, self.late = what, timeout, late
        self.timer = asyncio.timeout(timeout)

    async def __aenter__(self) -> None:
        await self.timer.__aenter__()

    async def __aexit__(self, kind: type[BaseException] | None, e: BaseException | None,
                        tb: object) -> bool:
        try:
            await self.timer.__aexit__(kind, e, tb)
        except TimeoutError:
            raise BrokerError(f"{self.what}: {self.late} within {self.timeout} s") from None
        if e is None:
            return False
        if isinstance(e, asyncio.CancelledError):
            if _own_cancel():
                return False
            raise _interrupted(self.what) from None
        if isinstance(e, _BROKEN):
            raise BrokerError(f"{self.what}: {e!r}") from e
        return False


def delay_routing_key(seconds: int, name: str) -> str:
    """Bits of the delay, most significant first, one topic word each, then the queue name."""
    return ".".join(str((seconds >> level) & 1) for level in range(DELAY_LEVELS - 1, -1, -1)) + "." + name


def delay_seconds(delay: float) -> int:
    """Whole seconds, rounded up (the consumer waits out any remainder itself)."""
    # round() first so that 3.0000000001 from float arithmetic stays 3
    s = math.ceil(round(delay, 6))
    if s > MAX_DELAY:
        raise ValueError(f"delay {delay} s is over the maximum of {MAX_DELAY} s")
    return max(s, 0)


class Delivery:
    """One consumed message; ack() or requeue() it exactly once."""

    __slots__ = ("_consumer", "_message", "body", "correlation_id", "headers", "message_id",
                 "redelivered", "reply_to")

    def __init__(self, message: AbstractIncomingMessage, consumer: Consumer | None = None) -> None:
        self._message = message
        self._consumer = consumer
        self.body: bytes = message.body
        self.headers: dict[str, Any] = dict(message.headers or {})
        self.redelivered: bool = bool(message.redelivered)
        self.message_id: str | None = message.message_id
        self.reply_to: str | None = message.reply_to
        self.correlation_id: str | None = message.correlation_id

    @property
    def stale(self) -> bool:
        """Its channel is gone: the broker has put it back and will deliver it again."""
        channel = self._message.channel
        return channel.is_closed

    async def ack(self) -> None:
        await self._settle(self._message.ack(), "ack")

    async def requeue(self) -> None:
        """nack(requeue=True). On a quorum queue this counts towards x-delivery-limit."""
        await self._settle(self._message.nack(requeue=True), "requeue")

    async def _settle(self, op: Awaitable[None], what: str) -> None:
        timeout = self._consumer.settle_timeout if self._consumer else 5.0
        # a dead channel takes its deliveries with it: the broker requeues them by itself
        async with _call(what, timeout, "not written"):
            await op


class Consumer:
    """Deliveries of one queue on their own channel, with prefetch; survives reconnects."""

    def __init__(self, channel: AbstractRobustChannel, queue: AbstractRobustQueue,
                 settle_timeout: float) -> None:
        self._channel = channel
        self._queue = queue
        self._tag = ""
        self._buffer: asyncio.Queue[Delivery | None] = asyncio.Queue()
        self._cancelled = False
        self.settle_timeout = settle_timeout

    async def _start(self) -> None:
        self._tag = await self._queue.consume(self._on_message, no_ack=False)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        delivery = Delivery(message, self)
        if self._cancelled:
            # sent before the broker saw our basic.cancel: hand it back at once
            with contextlib.suppress(BrokerError):
                await delivery.requeue()
            return
        self._buffer.put_nowait(delivery)

    async def get(self) -> Delivery:
        """The next delivery; waits across reconnects. BrokerError once cancelled."""
        while True:
            if self._cancelled and self._buffer.empty():
                raise BrokerError("consumer cancelled")
            delivery = await self._buffer.get()
            if delivery is None:  # cancel() woke us up
                continue
            if delivery.stale:
                continue  # from a channel that died: redelivered on the new one
            return delivery

    def ready(self) -> list[Delivery]:
        """The deliveries buffered right now (taken, as get() takes them), without waiting."""
        out = []
        while not self._buffer.empty():
            delivery = self._buffer.get_nowait()
            if delivery is not None and not delivery.stale:
                out.append(delivery)
        return out

    async def cancel(self) -> None:
        """basic.cancel, then requeue what is buffered but was not returned by get().

        Deliveries already returned by get() stay on the channel for their ack/requeue.
        """
        if self._cancelled:
            return
        self._cancelled = True
        try:
            async with asyncio.timeout(self.settle_timeout):
                await self._queue.cancel(self._tag)
        except (TimeoutError, *_BROKEN) as e:
            # a dead channel has no consumer left, and its deliveries go back anyway
            log.debug("basic.cancel failed: %r", e)
        while not self._buffer.empty():
            delivery = self._buffer.get_nowait()
            if delivery is not None and not delivery.stale:
                with contextlib.suppress(BrokerError):
                    await delivery.requeue()
        self._buffer.put_nowait(None)  # wake a get() waiting on an empty buffer

    def _shutdown(self) -> None:
        """The connection is going away: wake get() (BrokerError), take nothing more."""
        self._cancelled = True
        self._buffer.put_nowait(None)

    async def close(self) -> None:
        """cancel(), then close the channel: deliveries still unacked go back to the queue."""
        await self.cancel()
        with contextlib.suppress(Exception):
            await self._channel.close()


class Broker:
    """One robust connection to RabbitMQ and the queues of one prefix."""

    def __init__(self, url: str, prefix: str = "bwp", *, heartbeat: int = 5,
                 publish_timeout: float = 5.0, reconnect_interval: float = 1.0) -> None:
        self.url = url
        self.prefix = prefix
        self.heartbeat = heartbeat
        self.publish_timeout = publish_timeout
        self.reconnect_interval = reconnect_interval
        self._conn: RobustConnection | None = None  # declarations, publishing, passive declares
        self._cconn: RobustConnection | None = None  # consumers
        self._topo: AbstractRobustChannel | None = None
        self._pub: AbstractRobustChannel | None = None
        self._probe: AbstractRobustChannel | None = None
        self._delay_declared = False
        self._declared: dict[str, tuple[int, int, float]] = {}
        self._queue_args: dict[str, dict[str, Any]] = {}
        self._consumers: list[Consumer] = []
        self._topology_lock = asyncio.Lock()
        self._status_args: dict[str, Any] | None = None  # as declared by us
        self._status_seen = False  # exists, declared by someone else
        self._admit_declared = False
        self._rpc: AbstractRobustChannel | None = None  # requests and direct replies: one channel
        self._rpc_raw: aiormq.abc.AbstractChannel | None = None  # where the reply consumer runs
        self._rpc_lock = asyncio.Lock()
        self._replies: dict[str, asyncio.Future[bytes]] = {}

    # ---- names -------------------------------------------------------------------------
    def _q(self, name: str) -> str:
        if not NAME_RE.fullmatch(name):
            raise ValueError(f"queue name {name!r}: only letters, digits, _ and -")
        return f"{self.prefix}.{name}"

    def _level(self, level: int) -> str:
        return f"{self.prefix}.delay.{level}"

    @property
    def _jobs(self) -> str:
        return f"{self.prefix}.jobs"

    @property
    def _deliver(self) -> str:
        return f"{self.prefix}.delay.deliver"

    # ---- connection --------------------------------------------------------------------
    @property
    def up(self) -> bool:
        """Connected right now (a frozen broker still looks up until the heartbeat notices)."""
        conn = self._conn
        if conn is None or conn.is_closed or not conn.connected.is_set():
            return False
        transport = conn.transport
        return transport is not None and not transport.connection.is_closed

    async def connect(self, timeout: float = 10.0) -> None:
        """Connect (retrying every reconnect_interval); BrokerError if not reachable in time."""
        if self._conn is not None:
            return
        # one attempt may hang on a broker that accepts TCP but does not answer (frozen);
        # robust reconnects reuse this per-attempt timeout
        attempt = max(2.0, 2.0 * self.heartbeat)
        url = aio_pika.connection.make_url(
            self.url, heartbeat=self.heartbeat, reconnect_interval=self.reconnect_interval,
            fail_fast=0)  # fail_fast=0: keep retrying until our own deadline
        conn = RobustConnection(url, client_properties={"connection_name": f"bwp {self.prefix} publish"})
        cconn = RobustConnection(url, client_properties={"connection_name": f"bwp {self.prefix} consume"})
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(conn.connect(timeout=attempt), cconn.connect(timeout=attempt))
                self._topo = await conn.channel(publisher_confirms=False)
                self._pub = await conn.channel(publisher_confirms=True, on_return_raises=True)
                self._probe = await conn.channel(publisher_confirms=False)
        except BaseException as e:
            await asyncio.gather(self._close_conn(conn), self._close_conn(cconn))
            if isinstance(e, (TimeoutError, *_BROKEN)):
                raise BrokerError(f"broker {conn} not reachable within {timeout} s: {e!r}") from None
            raise
        self._conn, self._cconn = conn, cconn

    @staticmethod
    async def _close_conn(conn: RobustConnection) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await conn.close()

    async def close(self) -> None:
        """Close the connection; unacked deliveries go back to their queues."""
        for consumer in self._consumers:
            consumer._shutdown()
        conns = [c for c in (self._cconn, self._conn) if c is not None]
        self._conn = self._cconn = None
        await asyncio.gather(*(self._close_conn(c) for c in conns))
        self._consumers.clear()
        self._rpc = self._rpc_raw = None
        # a later connect() starts with fresh channels: declare everything again on them
        self._declared.clear()
        self._queue_args.clear()
        self._delay_declared = self._admit_declared = self._status_seen = False
        self._status_args = None

    @staticmethod
    async def _raw(channel: AbstractRobustChannel) -> aiormq.abc.AbstractChannel:
        """The open aiormq channel under a robust one. Right after a channel error aio-pika
        still reports the old channel ready until its close callbacks ran: wait for the new."""
        while True:
            await channel.ready()
            raw = await channel.get_underlay_channel()
            if not raw.is_closed:
                return raw
            await asyncio.sleep(0.02)

    def _need(self, channel: AbstractRobustChannel | None, what: str) -> AbstractRobustChannel:
        if channel is None:
            raise BrokerError(f"{what}: not connected (call connect() first)")
        if not self.up:
            raise BrokerError(f"{what}: the broker is not connected")
        return channel

    # ---- topology ----------------------------------------------------------------------
    async def declare_queue(self, name: str, max_length: int, dead_max_length: int,
                            dead_ttl: float) -> None:
        """Declare P.NAME, P.NAME_dead, their bindings and the shared delay levels. Idempotent.

        Declaring an existing queue with other arguments (another max_length) is refused by
        RabbitMQ (406): BrokerError; changing a live queue's limits needs a policy.
        """
        queue, dead = self._q(name), self._q(name + "_dead")
        topo = self._need(self._topo, "declare_queue")
        params = (max_length, dead_max_length, dead_ttl)
        async with self._topology_lock, _call(f"declare_queue {name}", DECLARE_TIMEOUT):
            await topo.ready()
            if self._declared.get(name) == params:
                return
            await self._declare_delays(topo)
            jobs = await topo.declare_exchange(self._jobs, aio_pika.ExchangeType.DIRECT, durable=True)
            await topo.declare_queue(dead, durable=True, arguments={
                "x-queue-type": "quorum",
                "x-message-ttl": max(1, round(dead_ttl * 1000)),
                "x-max-length": dead_max_length,
                "x-overflow": "drop-head",  # the oldest dead letter makes room
            })
            args = {
                "x-queue-type": "quorum",
                "x-max-length": max_length,
                "x-overflow": "reject-publish",
                "x-delivery-limit": DELIVERY_LIMIT,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": dead,
                # kept here until NAME_dead confirms it (needs reject-publish, which we have)
                "x-dead-letter-strategy": "at-least-once",
            }
            q = await topo.declare_queue(queue, durable=True, arguments=args)
            await q.bind(jobs, routing_key=name)
            await q.bind(self._deliver, routing_key=f"#.{name}")
            self._queue_args[name] = args
            self._declared[name] = params

    async def _declare_delays(self, topo: AbstractRobustChannel) -> None:
        """The binary TTL levels, kombu's native delayed delivery: level L holds a message
        2^L s if bit L of its delay is 1, else an exchange-to-exchange binding skips it."""
        if self._delay_declared:
            return
        exchanges = {}
        # sources before destinations: a robust restore replays them in this order
        for level in range(DELAY_LEVELS - 1, -1, -1):
            exchanges[level] = await topo.declare_exchange(
                self._level(level), aio_pika.ExchangeType.TOPIC, durable=True)
        deliver = await topo.declare_exchange(self._deliver, aio_pika.ExchangeType.TOPIC, durable=True)
        for level in range(DELAY_LEVELS - 1, -1, -1):
            skip = "*." * (DELAY_LEVELS - 1 - level)  # the words of the higher bits
            nxt = exchanges[level - 1] if level > 0 else deliver
            q = await topo.declare_queue(self._level(level), durable=True, arguments={
                # quorum + at-least-once, as kombu does: a message moving between levels (or
                # into a full target) stays put until the next queue confirms it. Classic levels
                # lost it in 2 of 2 clean broker restarts (3.10.8, docs/rabbitmq.md).
                "x-queue-type": "quorum",
                "x-message-ttl": (1 << level) * 1000,
                "x-overflow": "reject-publish",  # at-least-once requires it; no max-length here
                "x-dead-letter-exchange": nxt.name,
                "x-dead-letter-strategy": "at-least-once",
            })
            await q.bind(exchanges[level], routing_key=skip + "1.#")
            await nxt.bind(exchanges[level], routing_key=skip + "0.#")
        self._delay_declared = True

    async def delete_topology(self) -> None:
        """Delete every queue and exchange this Broker declared (tests, and removing a prefix).

        RabbitMQ 3.10.8 bug (measured): deleting at-least-once quorum queues within seconds of a
        node start crashes their dead-letter workers, and two crashes in 5 s stop
        rabbit_fifo_dlx_sup for good: no at-least-once quorum queue can then be declared or
        elect a leader until the node restarts. Do not call this right after a broker restart.
        """
        await self._delete(self._declared, self._status_args is not None, self._admit_declared,
                           self._delay_declared)

    async def delete_prefix(self, queues: Iterable[str]) -> None:
        """Delete everything bwp declares under this prefix for these queue names, whoever
        declared it (a test's daemons; removing a site).  Same caveat as delete_topology."""
        await self._delete(queues, True, True, True)

    async def _delete(self, queues: Iterable[str], status: bool, admit: bool, delays: bool) -> None:
        topo = self._need(self._topo, "delete_topology")
        queues = list(queues)
        names = [self._q(n) for n in queues] + [self._q(n + "_dead") for n in queues]
        exchanges = [self._jobs]
        if status:
            names.append(self._status)
        if admit:
            names.append(self._admit)
        if delays:
            names += [self._level(level) for level in range(DELAY_LEVELS)]
            exchanges += [self._level(level) for level in range(DELAY_LEVELS)] + [self._deliver]
        try:
            async with asyncio.timeout(DECLARE_TIMEOUT):
                for consumer in self._consumers:
                    await consumer.close()
                for name in names:
                    # if_unused=False: on a quorum queue, if_unused is a connection error (540)
                    await topo.queue_delete(name, if_unused=False, if_empty=False)
                for name in exchanges:
                    await topo.exchange_delete(name)
        except (TimeoutError, *_BROKEN) as e:
            raise BrokerError(f"delete_topology: {e!r}") from e
        self._declared.clear()
        self._delay_declared = self._admit_declared = False
        self._status_args = None

    # ---- publishing --------------------------------------------------------------------
    async def publish(self, queue: str, body: bytes, *, delay: float = 0.0,
                      headers: dict[str, Any] | None = None, message_id: str | None = None) -> None:
        """Persistent, confirmed, mandatory publish to P.NAME, through the delay levels if
        delay > 0 (rounded up to whole seconds). BrokerRefused on a Nack (queue full),
        BrokerError when down, unroutable, or not confirmed within publish_timeout.

        Concurrent calls pipeline on one channel: each waits only for its own confirm.
        A lost confirm is not a refusal: the message may be in the queue anyway.
        """
        self._q(queue)
        seconds = delay_seconds(delay) if delay > 0 else 0
        if seconds:
            await self._publish(self._level(DELAY_LEVELS - 1), delay_routing_key(seconds, queue),
                                body, headers, message_id)
        else:
            await self._publish(self._jobs, queue, body, headers, message_id)

    async def publish_dead(self, queue: str, body: bytes, *, headers: dict[str, Any] | None = None,
                           message_id: str | None = None) -> None:
        """To P.NAME_dead (through the default exchange), confirmed."""
        await self._publish("", self._q(queue + "_dead"), body, headers, message_id)

    async def _publish(self, exchange: str, routing_key: str, body: bytes,
                       headers: dict[str, Any] | None, message_id: str | None, *,
                       correlation_id: str | None = None, mandatory: bool = True) -> None:
        pub = self._need(self._pub, "publish")
        properties = aiormq.spec.Basic.Properties(
            delivery_mode=2, headers=headers, message_id=message_id,  # 2: persistent
            correlation_id=correlation_id)
        async with _call("publish", self.publish_timeout, "no confirm"):
            channel = await self._raw(pub)  # restored after a reconnect
            try:
                await channel.basic_publish(body, exchange=exchange, routing_key=routing_key,
                                            properties=properties, mandatory=mandatory)
            except PublishError:  # a Basic.Return: before DeliveryError, its base class
                raise BrokerError(f"publish: unroutable (exchange {exchange!r}, key "
                                  f"{routing_key!r})") from None
            except DeliveryError:
                raise BrokerRefused(f"publish: refused by the broker (key {routing_key!r}): "
                                    "full?") from None

    # ---- consuming ---------------------------------------------------------------------
    async def consume(self, queue: str, prefetch: int) -> Consumer:
        """Consume P.NAME on a channel of its own with basic.qos(prefetch), manual acks."""
        return await self._consume(self._q(queue), self._queue_args.get(queue), prefetch)

    async def _consume(self, name: str, args: dict[str, Any] | None, prefetch: int) -> Consumer:
        conn = self._cconn
        if conn is None or not self.up:
            raise BrokerError(f"consume {name}: the broker is not connected")
        channel: AbstractRobustChannel | None = None
        try:
            async with asyncio.timeout(DECLARE_TIMEOUT):
                channel = await conn.channel(publisher_confirms=False)
                await channel.set_qos(prefetch_count=prefetch)
                if args is not None:
                    # same arguments as declared: a restore re-creates it if it went away
                    q = await channel.declare_queue(name, durable=True, arguments=args)
                else:
                    q = await channel.declare_queue(name, passive=True)
                consumer = Consumer(channel, q, self.publish_timeout)
                await consumer._start()
        except BaseException as e:
            if channel is not None:
                with contextlib.suppress(Exception):
                    await channel.close()
            if isinstance(e, TimeoutError):
                raise BrokerError(f"consume {name}: no answer within {DECLARE_TIMEOUT} s") from None
            if isinstance(e, asyncio.CancelledError) and not _own_cancel():
                raise _interrupted(f"consume {name}") from None
            if isinstance(e, _BROKEN):
                raise BrokerError(f"consume {name}: {e!r}") from e
            raise
        self._consumers.append(consumer)
        return consumer

    # ---- inspection --------------------------------------------------------------------
    async def depth(self, queue: str) -> tuple[int, int]:
        """(ready messages in P.NAME, in P.NAME_dead), by passive declares."""
        names = (self._q(queue), self._q(queue + "_dead"))
        probe = self._need(self._probe, "depth")
        counts = []
        async with _call(f"depth {queue}", self.publish_timeout):
            channel = await self._raw(probe)
            for name in names:
                # on the raw channel: aio-pika's RobustChannel answers a passive declare of a
                # queue it knows from its cache, with the count of the first declaration
                ok = await channel.queue_declare(name, passive=True)
                counts.append(ok.message_count or 0)
        return counts[0], counts[1]

    # ---- status stream -----------------------------------------------------------------
    @property
    def _status(self) -> str:
        return f"{self.prefix}.status"

    async def declare_status(self, max_age: float = 7 * 86400, max_length_bytes: int = 1 << 30) -> None:
        """Declare the stream P.status (kept max_age s and at most max_length_bytes; the broker
        drops whole segments, 500 MB by default, so retention is coarse). Idempotent."""
        args = {"x-queue-type": "stream", "x-max-age": f"{max(1, round(max_age))}s",
                "x-max-length-bytes": max_length_bytes}
        topo = self._need(self._topo, "declare_status")
        async with self._topology_lock, _call("declare_status", DECLARE_TIMEOUT):
            if self._status_args == args:
                return
            # robust=False: after a node restart a stream answers 404 ("home node down")
            # for a while, and a failing restore would hold up the whole publish
            # connection; it is durable, and events() re-subscribes by itself
            await topo.declare_queue(self._status, durable=True, arguments=args, robust=False)
            self._status_args = args

    async def _ensure_status(self) -> None:
        """Use P.status as it is if it exists (another host declared it, maybe with other
        limits: a declare with different arguments is a 406); else declare the defaults."""
        if self._status_args is not None or self._status_seen:
            return
        probe = self._need(self._probe, "status")
        try:
            async with asyncio.timeout(self.publish_timeout):
                await (await self._raw(probe)).queue_declare(self._status, passive=True)
            self._status_seen = True
        except aiormq.exceptions.ChannelNotFoundEntity:
            await self.declare_status()
        except (TimeoutError, *_BROKEN) as e:
            raise BrokerError(f"status: {e!r}") from e

    async def publish_event(self, body: bytes) -> None:
        """Append to P.status, confirmed (declared with the defaults if nobody did)."""
        await self._ensure_status()
        await self._publish("", self._status, body, None, None)

    async def events(self, since: float | None = None, prefetch: int = 1000) -> AsyncIterator[bytes]:
        """Every event of P.status from `since` (a time.time(); None: the first one kept), then
        new ones as they come, forever; survives reconnects.

        A timestamp starts at the stream chunk holding it, so a few earlier events may come
        first. After a reconnect it resumes at the offset after the last event it yielded:
        nothing is skipped; an event yielded but not yet acked when the channel died is not
        repeated, since offsets, not acks, decide (streams ignore requeues).
        """
        await self._ensure_status()
        offset: Any = "first" if since is None else datetime.fromtimestamp(since, tz=UTC)
        while True:
            conn = self._cconn
            if conn is None:
                raise BrokerError("events: not connected")
            if not conn.connected.is_set():  # reconnecting; polled, so that close() ends us
                await asyncio.sleep(self.reconnect_interval)
                continue
            try:
                channel = await conn.channel(publisher_confirms=False)
            except _BROKEN:
                await asyncio.sleep(self.reconnect_interval)
                continue
            try:
                inbox: asyncio.Queue[aiormq.abc.DeliveredMessage] = asyncio.Queue()

                async def deliver(message: aiormq.abc.DeliveredMessage,
                                  inbox: asyncio.Queue[aiormq.abc.DeliveredMessage] = inbox) -> None:
                    inbox.put_nowait(message)
                async with asyncio.timeout(DECLARE_TIMEOUT):
                    raw = await self._raw(channel)
                    # streams over AMQP 0.9.1 need a prefetch and manual acks (acks are credit)
                    await raw.basic_qos(prefetch_count=prefetch)
                    await raw.basic_consume(self._status, deliver, no_ack=False,
                                            arguments={"x-stream-offset": offset})
                closing = raw.closing
                while True:
                    getter = asyncio.ensure_future(inbox.get())
                    try:
                        await asyncio.wait({getter, closing}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        if not getter.done():
                            getter.cancel()
                    if not getter.done() or getter.cancelled():
                        break  # the channel died: open a new one at `offset`
                    message = getter.result()
                    headers = message.header.properties.headers or {}
                    if isinstance(headers.get("x-stream-offset"), int):
                        offset = headers["x-stream-offset"] + 1
                    yield message.body
                    with contextlib.suppress(*_BROKEN):
                        await raw.basic_ack(message.delivery.delivery_tag)
            except (TimeoutError, *_BROKEN) as e:
                log.debug("events: channel lost: %r", e)
            finally:
                # not restored by aio-pika: this loop opens a new one at the right offset
                with contextlib.suppress(Exception):
                    await channel.close()
            await asyncio.sleep(self.reconnect_interval)

    # ---- single decider ----------------------------------------------------------------
    @property
    def _admit(self) -> str:
        return f"{self.prefix}.admit"

    _ADMIT_ARGS: dict[str, Any] = {  # noqa: RUF012 - constant
        "x-queue-type": "quorum",
        "x-single-active-consumer": True,  # one decider at a time; a standby takes over
        "x-delivery-limit": DELIVERY_LIMIT,  # a request that crashes deciders is dropped
    }

    async def _declare_admit(self) -> None:
        if self._admit_declared:
            return
        topo = self._need(self._topo, "declare admit")
        try:
            async with self._topology_lock, asyncio.timeout(DECLARE_TIMEOUT):
                await topo.declare_queue(self._admit, durable=True, arguments=self._ADMIT_ARGS)
        except (TimeoutError, *_BROKEN) as e:
            raise BrokerError(f"declare {self._admit}: {e!r}") from e
        self._admit_declared = True

    async def serve_decider(self,
                            handler: Callable[[list[bytes]], Awaitable[list[bytes]]]) -> None:
        """Be (or stand by to be) the one decider: answer the requests of P.admit with
        handler(bodies) -> replies, in order, a batch at a time (all that are waiting: one
        decision's cost, a confirmed write, serves them all).  Runs until cancelled; survives
        reconnects.

        The replies are sent before the acks: a decider that dies in between has the requests
        redelivered to the next one, so handler must be idempotent (same request, same answer).
        A handler that raises gets the batch requeued (dropped after the 5th delivery).
        """
        await self._declare_admit()
        consumer = await self._consume(self._admit, self._ADMIT_ARGS, prefetch=64)
        try:
            while True:
                batch = [await consumer.get(), *consumer.ready()]
                try:
                    replies = await handler([d.body for d in batch])
                except Exception:
                    log.exception("decider handler failed; requests requeued")
                    for d in batch:
                        with contextlib.suppress(BrokerError):
                            await d.requeue()
                    continue
                for d, reply in zip(batch, replies, strict=True):
                    try:
                        if d.reply_to:
                            # not mandatory: a requester that gave up has no reply queue any more
                            await self._publish("", d.reply_to, reply, None, None,
                                                correlation_id=d.correlation_id, mandatory=False)
                        await d.ack()
                    except BrokerError as e:
                        log.warning("decider could not answer (the request comes back): %s", e)
        finally:
            with contextlib.suppress(Exception):
                await consumer.close()

    async def _rpc_channel(self) -> aiormq.abc.AbstractChannel:
        """The channel of requests and their direct replies, with its reply consumer: replies
        to amq.rabbitmq.reply-to arrive only on the channel that published the request."""
        conn = self._conn
        if conn is None or not self.up:
            raise BrokerError("ask_decider: the broker is not connected")
        async with self._rpc_lock:
            if self._rpc is None:
                self._rpc = await conn.channel(publisher_confirms=True, on_return_raises=True)
            raw = await self._raw(self._rpc)
            if raw is not self._rpc_raw:  # first use, or the channel was reopened
                await raw.basic_consume("amq.rabbitmq.reply-to", self._on_reply, no_ack=True)
                self._rpc_raw = raw
            return raw

    async def _on_reply(self, message: aiormq.abc.DeliveredMessage) -> None:
        future = self._replies.pop(message.header.properties.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(message.body)

    async def ask_decider(self, body: bytes, timeout: float) -> bytes:
        """Send a request to the decider and wait for its answer: BrokerError after timeout s
        (the request expires in P.admit then too, so a late decider does not act on it)."""
        await self._declare_admit()
        cid = secrets.token_hex(8)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._replies[cid] = future
        try:
            async with _call("ask_decider", timeout):
                raw = await self._rpc_channel()
                try:
                    await raw.basic_publish(
                        body, exchange="", routing_key=self._admit, mandatory=True,
                        properties=aiormq.spec.Basic.Properties(
                            delivery_mode=2, correlation_id=cid, reply_to="amq.rabbitmq.reply-to",
                            expiration=str(max(1, round(timeout * 1000)))))
                except DeliveryError as e:  # Nack, or returned (P.admit missing)
                    raise BrokerError(f"ask_decider: not taken by the broker: {e!r}") from None
                return await future
        finally:
            self._replies.pop(cid, None)


__all__ = ["Broker", "BrokerError", "BrokerRefused", "Consumer", "Delivery", "delay_routing_key"]
