"""Instructions per job of bwp's own code, counted by valgrind: the same on every run.

    python scripts/bench_instructions.py [--compare NAME=SOURCE_DIR ...]

On a shared VM CPU time moves by ±10 % from one run to the next, more than most single
changes to the hot path are worth; the instructions executed do not (they agree within
0.1 %). Each workload runs in a child under `valgrind --tool=cachegrind` at two sizes, and the
difference over the difference in jobs is its count per job, start-up and imports cancelled
out:

  submit   parse_submission and the jobs service's submit of the benchmark's job
           (scripts/bench_submit.py's stages, no sockets)
  drain    the daemon's pool delivering queued jobs through HttpClient and ConnectionPool,
           answered in-process (scripts/bench_deliver.py --no-sockets): submit's count is
           taken off
  http     a whole POST /post/http of the same job through HttpServer and Api, on 50
           kept-alive connections whose transports are in-process: parse, route, submit,
           answer, write
  server   the same requests through HttpServer with a handler that only reads the body
           and answers: the server's own share of `http`

`--compare NAME=DIR` counts the same for another checkout (a worktree of an older commit),
run with its own `bwp` package on PYTHONPATH. Needs valgrind (`apt-get install valgrind`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

SMALL, LARGE = 2_000, 12_000
HERE = Path(__file__).resolve().parent
WORKLOADS = ("submit", "drain", "http", "server")
CONNECTIONS = 50


async def workload(n: int, name: str) -> None:
    if name in ("http", "server"):
        await requests(n, name == "http")
    else:
        await jobs(n, drain=name == "drain")


async def jobs(n: int, drain: bool) -> None:
    """Submit n jobs to a daemon whose connections answer in-process, then (drain) deliver
    them all."""
    sys.path.insert(0, str(HERE))
    import bench_deliver as bd

    server = bd.daemon(n, 50)
    await server.client.start()
    url = f"http://127.0.0.1:9{bd.PATH}"
    assert server.client._pool is not None
    bd.canned_connections(server.client._pool, server.client._target(url).key, 50)
    await bd.queue_jobs(server, url, n)
    if drain:
        await bd.deliver_all(server)
        await server.pool.drain(1)
    await server.client.close()


class InProcess(asyncio.Transport):
    """A client connection's transport that takes the answers and tells when one came."""

    def __init__(self) -> None:
        super().__init__()
        self.answered: asyncio.Future[None] | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.answered is not None and not self.answered.done():
            self.answered.set_result(None)

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def requests(n: int, api: bool) -> None:
    """n submits of the benchmark's job, a round at a time over CONNECTIONS connections."""
    sys.path.insert(0, str(HERE))
    from bench_submit import JOB

    from bwp.config import parse_config
    from bwp.connections import ConnectionTable
    from bwp.httpserver import HttpServer, Request, Response
    from bwp.server import Server

    cfg = parse_config({"pool": {"queue_size": 10 * n}, "limits": {"max_queued_bytes": 1 << 40}})
    ok = Response(b'{"success":true}')

    async def answer_only(request: Request) -> Response:
        await request.read()
        return ok

    handler = Server(cfg).api.handle if api else answer_only
    server = HttpServer(handler, cfg.limits, ConnectionTable(1 << 20, None))
    body = json.dumps(JOB, separators=(",", ":")).encode()
    request = (b"POST /post/http HTTP/1.1\r\nHost: 127.0.0.1:7012\r\n"
               b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
               % (len(body), body))
    clients = []
    for _ in range(CONNECTIONS):
        conn, transport = server(), InProcess()
        conn.connection_made(transport)
        clients.append((conn, transport))
    loop = asyncio.get_running_loop()
    for _ in range(n // CONNECTIONS):
        for conn, transport in clients:
            transport.answered = loop.create_future()
            conn.data_received(request)
        for _, transport in clients:
            await transport.answered


def instructions(source: Path, n: int, name: str) -> int:
    """Instructions valgrind counted for one child run of the workload (this script's, with
    the source's bwp)."""
    env = {**os.environ, "PYTHONPATH": str(source), "PYTHONHASHSEED": "0"}
    argv = ["valgrind", "--tool=cachegrind", "--cache-sim=no",
            "--cachegrind-out-file=/dev/null", sys.executable, str(Path(__file__).resolve()),
            "--child", str(n), "--workload", name]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900, check=True)
    found = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
    if found is None:
        raise SystemExit(f"no instruction count from valgrind:\n{done.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def per_job(source: Path) -> dict[str, float]:
    out = {name: (instructions(source, LARGE, name) - instructions(source, SMALL, name))
           / (LARGE - SMALL) for name in WORKLOADS}
    out["drain"] -= out["submit"]  # its jobs were submitted first
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--compare", action="append", default=[], metavar="NAME=DIR",
                   help="also count another checkout's bwp (repeatable)")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--workload", choices=WORKLOADS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        import uvloop

        uvloop.run(workload(args.child, args.workload))
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is needed: apt-get install valgrind")
    sources = {"bwp": HERE.parent}
    for spec in args.compare:
        name, _, directory = spec.partition("=")
        sources[name] = Path(directory).resolve()
    results = {name: per_job(path) for name, path in sources.items()}
    print(f"instructions per job (valgrind; {LARGE} jobs less {SMALL})")
    print(f"  {'':10}" + "".join(f" {w:>10}" for w in WORKLOADS))
    for name, r in results.items():
        print(f"  {name:10}" + "".join(f" {r[w]:10,.0f}" for w in WORKLOADS))
    base = results["bwp"]
    for name, r in results.items():
        if name != "bwp":
            print(f"  bwp / {name}: " + ", ".join(f"{w} {base[w] / r[w]:.3f}" for w in WORKLOADS))


if __name__ == "__main__":
    main()
