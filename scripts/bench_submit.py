"""CPU per submit of bwp's own code, stage by stage, without sockets or aiohttp.

    python scripts/bench_submit.py [-n 50000] [--batch 1]

Builds the daemon's parts from the default config (bwp.server.Server, workers not started, a
queue large enough never to fill) and times, per submit of the benchmark's ~200-byte job:
json.loads alone (the floor of any parser in Python), parse_submission (decode + validate),
the jobs service's submit (index, pool, memory store, metrics) and the answer's bytes.
Subtracted from the daemon's whole CPU per submit (`scripts/bench.py`: "ingest, no dispatch:
daemon CPU µs per job"), the rest is the HTTP server and the event loop: what a lean server
can win (issue 16).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import uvloop

from bwp.api import _accepted
from bwp.config import DEFAULT_QUEUE, parse_config
from bwp.jobs import parse_submission
from bwp.server import Server

JOB = {"url": "http://127.0.0.1:8080/webhooks/order-created?shop=bench", "method": "POST",
       "headers": {"X-Request-Id": "bench-00000001"},
       "parameters": {"order": "1234567", "status": "paid", "amount": "19.99"}}


def per_call(fn: Callable[[], object], n: int) -> float:
    """CPU µs per call (process time: what the machine's other load does not inflate)."""
    t0 = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - t0) / n * 1e6


async def main(n: int, batch: int) -> None:
    cfg = parse_config({"pool": {"queue_size": 10 * n * batch},
                        "limits": {"max_queued_bytes": 1 << 40}})
    server = Server(cfg)
    api, jobs = server.api, server.api.jobs
    raw = json.dumps(JOB if batch == 1 else [JOB] * batch, separators=(",", ":")).encode()

    def parse() -> object:
        return parse_submission(raw, api.queue_names, DEFAULT_QUEUE, api.new_id, api.limits)

    subs = [parse() for _ in range(n)]
    t0 = time.process_time()
    for sub in subs:
        await jobs.submit(sub, raw, {})
    submit = (time.process_time() - t0) / n * 1e6
    ids = [j.id for j in subs[0].jobs]
    rows = [
        ("json.loads of the body (floor)", per_call(lambda: json.loads(raw), n)),
        ("parse_submission (decode + validate)", per_call(parse, n)),
        ("jobs service submit (index, pool, store, metrics)", submit),
        ("the answer's bytes", per_call(lambda: _accepted(ids, []), n)),
    ]
    own = sum(v for name, v in rows[1:])
    print(f"{n} submits of {batch} job(s), {len(raw)} bytes each; CPU µs per submit")
    for name, value in rows:
        print(f"  {name:52} {value:8.1f}")
    print(f"  {'bwp own code in all':52} {own:8.1f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-n", type=int, default=50_000)
    p.add_argument("--batch", type=int, default=1, help="jobs per submit (default 1)")
    args = p.parse_args()
    uvloop.run(main(args.n, args.batch))
