"""The bare ceiling for ingest: aiohttp + uvloop answering {"success":true} to every POST.

It reads the request body (as any real handler must) and does nothing else: no JSON parsing,
no queue, no metrics. scripts/bench.py drives it with the same wrk script as the daemons.

    python scripts/bare_server.py 127.0.0.1 7099
"""

from __future__ import annotations

import asyncio
import sys

import uvloop
from aiohttp import web

ANSWER = b'{"success":true}'


async def handle(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=ANSWER, content_type="application/json")


async def serve(host: str, port: int) -> None:
    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    print(f"bare server on {host}:{port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    uvloop.run(serve(host, port))


if __name__ == "__main__":
    main()
