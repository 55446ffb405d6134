"""The bare ceiling for dispatch: one aiohttp ClientSession (uvloop) whose tasks send GETs
to the sink as fast as they can for a fixed time; prints {"requests": N, "seconds": S}.

    python scripts/bare_client.py http://127.0.0.1:7098/hook 50 10
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import aiohttp
import uvloop


async def worker(session: aiohttp.ClientSession, url: str, deadline: float, counts: list[int]) -> None:
    while time.monotonic() < deadline:
        async with session.get(url) as resp:
            await resp.read()
            if resp.status < 400:
                counts[0] += 1


async def run(url: str, concurrency: int, seconds: float) -> dict[str, float]:
    counts = [0]
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.monotonic()
        deadline = start + seconds
        await asyncio.gather(*(worker(session, url, deadline, counts) for _ in range(concurrency)))
        elapsed = time.monotonic() - start
    return {"requests": counts[0], "seconds": elapsed}


def main() -> None:
    url, concurrency, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    print(json.dumps(uvloop.run(run(url, concurrency, seconds))))


if __name__ == "__main__":
    main()
