"""Publish/consume rates of bwp.amqp against a running broker (numbers in docs/rabbitmq.md).

    python scripts/bench_amqp.py amqp://guest:guest@127.0.0.1:5672/ [--uvloop] [-n 5000]

Declares its own prefix and deletes it afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import time

from bwp.amqp import Broker


async def main(url: str, n: int, window: int) -> None:
    b = Broker(url, f"bench-{secrets.token_hex(3)}")
    await b.connect()
    try:
        await b.declare_queue("q", max_length=10 * n, dead_max_length=10, dead_ttl=60)
        body = b"x" * 200
        t0 = time.monotonic()
        for _ in range(n // 5):
            await b.publish("q", body)
        seq = (n // 5) / (time.monotonic() - t0)
        t0 = time.monotonic()
        await asyncio.gather(*(b.publish("q", body) for _ in range(n)))
        gathered = n / (time.monotonic() - t0)
        sem = asyncio.Semaphore(window)

        async def one() -> None:
            async with sem:
                await b.publish("q", body)
        t0 = time.monotonic()
        await asyncio.gather(*(one() for _ in range(n)))
        windowed = n / (time.monotonic() - t0)
        total = n // 5 + 2 * n
        consumer = await b.consume("q", prefetch=100)
        t0 = time.monotonic()
        for _ in range(total):
            d = await consumer.get()
            await d.ack()
        consumed = total / (time.monotonic() - t0)
        print(f"confirmed publishes/s: sequential {seq:.0f}, {n} at once {gathered:.0f}, "
              f"window {window} {windowed:.0f}; consume+ack (prefetch 100) {consumed:.0f}/s")
    finally:
        await b.delete_topology()
        await b.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("-n", type=int, default=5000)
    ap.add_argument("--window", type=int, default=500)
    ap.add_argument("--uvloop", action="store_true")
    a = ap.parse_args()
    if a.uvloop:
        import uvloop
        uvloop.install()
    asyncio.run(main(a.url, a.n, a.window))
