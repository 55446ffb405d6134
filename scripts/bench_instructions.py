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

`--compare NAME=DIR` counts the same for another checkout (a worktree of an older commit),
run with its own `bwp` package on PYTHONPATH. Needs valgrind (`apt-get install valgrind`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

SMALL, LARGE = 2_000, 12_000
HERE = Path(__file__).resolve().parent


async def workload(n: int, drain: bool) -> None:
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


def instructions(source: Path, n: int, drain: bool) -> int:
    """Instructions valgrind counted for one child run of the workload."""
    env = {**os.environ, "PYTHONPATH": str(source), "PYTHONHASHSEED": "0"}
    script = source / "scripts" / "bench_instructions.py"
    if not script.exists():  # an older checkout: its bwp, this script's workload
        script = Path(__file__).resolve()
    argv = ["valgrind", "--tool=cachegrind", "--cache-sim=no",
            "--cachegrind-out-file=/dev/null", sys.executable, str(script), "--child", str(n)]
    if drain:
        argv.append("--drain")
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900, check=True)
    found = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
    if found is None:
        raise SystemExit(f"no instruction count from valgrind:\n{done.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def per_job(source: Path) -> dict[str, float]:
    counts = {(n, drain): instructions(source, n, drain)
              for n in (SMALL, LARGE) for drain in (False, True)}
    jobs = LARGE - SMALL
    submit = (counts[LARGE, False] - counts[SMALL, False]) / jobs
    both = (counts[LARGE, True] - counts[SMALL, True]) / jobs
    return {"submit": submit, "drain": both - submit}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--compare", action="append", default=[], metavar="NAME=DIR",
                   help="also count another checkout's bwp (repeatable)")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--drain", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        import uvloop

        uvloop.run(workload(args.child, args.drain))
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is needed: apt-get install valgrind")
    sources = {"bwp": HERE.parent}
    for spec in args.compare:
        name, _, directory = spec.partition("=")
        sources[name] = Path(directory).resolve()
    results = {name: per_job(path) for name, path in sources.items()}
    print(f"instructions per job (valgrind; {LARGE} jobs less {SMALL})")
    print(f"  {'':10} {'submit':>10} {'drain':>10}")
    for name, r in results.items():
        print(f"  {name:10} {r['submit']:10,.0f} {r['drain']:10,.0f}")
    base = results["bwp"]
    for name, r in results.items():
        if name != "bwp":
            print(f"  bwp / {name}: submit {base['submit'] / r['submit']:.3f}, "
                  f"drain {base['drain'] / r['drain']:.3f}")


if __name__ == "__main__":
    main()
