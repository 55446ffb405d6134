"""CPU per delivery, layer by layer, against a local nginx sink (one process, one core).

    python scripts/bench_deliver.py [-n 50000] [--workers 50]

Each layer sends -n requests with --workers concurrent tasks to the same nginx sink that
`scripts/bench.py` uses and reports this process's CPU µs per request (process time: the
sink's share of the machine is not counted):

  raw protocol      a bare asyncio Protocol: one prebuilt request written, the answer awaited
                    until its last byte (no parser); the floor of a Python event loop here
  ConnectionPool    bwp/http1.py: the same prebuilt bytes through the keep-alive pool, parsed
                    by httptools
  HttpClient.send   bwp/client.py: a job serialised, sent, its Outcome built and counted
  daemon's pool     bwp.server.Server's workers draining -n queued jobs (store, index, retry
                    policy, metrics): what the benchmark's "backlog drain" costs per job

The differences between rows are what each layer adds (issue 16: delivery's bookkeeping).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvloop
from bench import nginx_sink

from bwp.config import DEFAULT_QUEUE, parse_config
from bwp.http1 import Connection, ConnectionPool, Key
from bwp.jobs import Job, parse_submission
from bwp.server import Server

PATH = "/webhooks/order-created?shop=bench"
BODY = b"order=1234567&status=paid&amount=19.99"


class RawConnection(asyncio.Protocol):
    """Writes a request, resolves a future when the sink's fixed-size answer has come."""

    def __init__(self, answer_size: int) -> None:
        self.answer_size = answer_size
        self.got = 0
        self.waiter: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got += len(data)
        if self.got >= self.answer_size and self.waiter is not None:
            self.got -= self.answer_size
            self.waiter.set_result(None)

    def send(self, data: bytes) -> asyncio.Future[None]:
        self.waiter = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.transport.write(data)
        return self.waiter


def cpu() -> tuple[float, float]:
    t = os.times()
    return t.user, t.system


def per_job(before: tuple[float, float], n: int) -> tuple[float, float]:
    """User and system CPU µs per job since `before`."""
    after = cpu()
    return (after[0] - before[0]) / n * 1e6, (after[1] - before[1]) / n * 1e6


async def timed(n: int, workers: int, one: Callable[[], Awaitable[object]]) -> tuple[float, float]:
    """User and system CPU µs per call of `one`, n calls spread over `workers` tasks."""
    left = [n]

    async def worker() -> None:
        while left[0] > 0:
            left[0] -= 1
            await one()

    before = cpu()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return per_job(before, n)


async def raw_protocol(port: int, n: int, workers: int, request: bytes) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    answer = await reader.read(65536)  # nginx answers in one write: its size is the answer's
    writer.close()
    conns = [(await loop.create_connection(lambda: RawConnection(len(answer)), "127.0.0.1",
                                           port))[1] for _ in range(workers)]
    free = list(conns)

    async def one() -> None:
        conn = free.pop()
        await conn.send(request)
        free.append(conn)

    try:
        return await timed(n, workers, one)
    finally:
        for conn in conns:
            assert conn.transport is not None
            conn.transport.close()


# what nginx answers the benchmark's request (the --no-sockets mode answers with it)
CANNED = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 03 Dec 2026 08:00:00 GMT\r\n"
          b"Content-Type: text/plain\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok")


class CannedTransport(asyncio.Transport):
    """Answers every write with CANNED in the next loop iteration: bwp's code with no socket."""

    def __init__(self, conn: Connection) -> None:
        super().__init__()
        self.conn = conn
        self.loop = asyncio.get_running_loop()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.loop.call_soon(self.conn.data_received, CANNED)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


def canned_connections(pool: ConnectionPool, key: Key, count: int) -> None:
    """Fill `pool` with idle connections to `key` whose transports answer by themselves."""
    for _ in range(count):
        conn = Connection(key, pool.outbox)
        conn.connection_made(CannedTransport(conn))
        conn._keep_alive = True  # as after a first answer
        pool._release(conn)


def bench_job(server: Server, url: str) -> tuple[Job, bytes]:
    """The job every layer sends, and its request as the client serialises it."""
    client = server.client
    job = Job("bench-1", url, "POST", {"Content-Type": "application/x-www-form-urlencoded",
                                       "X-Request-Id": "bench-00000001"}, BODY, DEFAULT_QUEUE)
    return job, client._serialise(job.method, client._target(url), job.headers, job.body)


async def layers(server: Server, url: str, n: int, workers: int,
                 pooled_connections: Callable[[ConnectionPool], None]
                 ) -> list[tuple[str, tuple[float, float]]]:
    """CPU per request of each of bwp's layers, the lowest first."""
    client = server.client
    job, request = bench_job(server, url)
    key = client._target(url).key
    loop = asyncio.get_running_loop()
    pool = ConnectionPool(server.router, max_idle=workers)

    async def pooled() -> object:
        return await pool.request(key, request, deadline=loop.time() + 10, connect_timeout=5,
                                  read_timeout=5, cap=1 << 20, head_cap=1 << 16)

    rows = []
    pooled_connections(pool)
    await timed(workers, workers, pooled)  # warm
    rows.append(("ConnectionPool.request (bwp/http1.py)", await timed(n, workers, pooled)))
    pool.close()
    assert client._pool is not None
    pooled_connections(client._pool)
    await timed(workers, workers, lambda: client.send(job))
    rows.append(("HttpClient.send (bwp/client.py)",
                 await timed(n, workers, lambda: client.send(job))))

    await queue_jobs(server, url, n)
    before = cpu()
    await deliver_all(server)
    rows.append(("the daemon's pool draining n queued jobs (bwp/pool.py)", per_job(before, n)))
    await server.pool.drain(1)
    await server.client.close()
    return rows


async def queue_jobs(server: Server, url: str, n: int) -> None:
    """Submit n jobs to `url` through the daemon's jobs service, as its API would."""
    api, jobs = server.api, server.api.jobs
    raw = json.dumps({"url": url, "headers": {"X-Request-Id": "bench-00000001"},
                      "parameters": {"order": "1234567", "status": "paid",
                                     "amount": "19.99"}}).encode()
    for _ in range(n):
        sub = parse_submission(raw, api.queue_names, DEFAULT_QUEUE, api.new_id, api.limits)
        await jobs.submit(sub, raw, {})


async def deliver_all(server: Server) -> None:
    """Start the daemon's workers and wait until every queued job has been delivered."""
    await server.pool.start()
    while server.pool.outstanding():
        await asyncio.sleep(0.005)


def daemon(n: int, workers: int) -> Server:
    cfg = parse_config({"pool": {"size": workers, "queue_size": 2 * n},
                        "limits": {"max_queued_bytes": 1 << 40}})
    return Server(cfg)


async def main(n: int, workers: int, sockets: bool) -> None:
    server = daemon(n, workers)
    await server.client.start()
    if sockets:
        with tempfile.TemporaryDirectory() as tmp, nginx_sink(Path(tmp)) as sink:
            url = f"http://127.0.0.1:{sink.port}{PATH}"
            _, request = bench_job(server, url)
            rows = [("raw protocol (floor)", await raw_protocol(sink.port, n, workers, request))]
            # the pools' connections are made by their warm-up rounds
            rows += await layers(server, url, n, workers, lambda pool: None)
        where = "to nginx on 127.0.0.1"
    else:
        url = f"http://127.0.0.1:9{PATH}"
        key = server.client._target(url).key
        rows = await layers(server, url, n, workers,
                            lambda pool: canned_connections(pool, key, workers))
        where = "answered in-process, no sockets"
    print(f"{n} requests, {workers} at a time, {where}; CPU µs per request (this process)")
    print(f"  {'':56} {'user':>7} {'system':>7} {'all':>7}")
    previous = None
    for name, (user, system) in rows:
        added = "" if previous is None else f"  (+{user + system - previous:.1f})"
        print(f"  {name:56} {user:7.1f} {system:7.1f} {user + system:7.1f}{added}")
        previous = user + system


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-n", type=int, default=50_000)
    p.add_argument("--workers", type=int, default=50)
    p.add_argument("--no-sockets", action="store_true",
                   help="answer every request in-process: bwp's own CPU, without the syscalls")
    args = p.parse_args()
    uvloop.run(main(args.n, args.workers, not args.no_sockets))
