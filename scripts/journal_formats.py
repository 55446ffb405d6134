"""Which on-disk journal format? Append-only JSON-lines log vs SQLite (WAL) vs no journal at all.

C concurrent submitters each encode one job (1 KiB body) and await its group commit: a single flusher
writes everything buffered so far in one executor thread, one fsync (or one SQLite transaction) per
group, so one fsync covers every submit that arrived while the previous one ran. Each job's "done"
record is then buffered without waiting and rides along with a later group. Then replay: rebuild the
live set from 100 000 adds with 50% done (cold page cache via fadvise, and warm).

    python scripts/journal_formats.py --duration 3 --runs 3 [--dir /var/tmp] [--formats none log sqlite]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import os
import shutil
import sqlite3
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

BODY = os.urandom(1024)
DUMPS = json.JSONEncoder(separators=(",", ":")).encode


def make_job(seq: int) -> dict[str, Any]:
    return {"id": f"{seq:032x}", "url": f"https://hooks.example.com/v1/deliver/{seq}", "method": "POST",
            "headers": {"Content-Type": "application/json", "X-Signature": "ab" * 32},
            "queue": "default", "retries": 5, "not_before": None, "created": time.time(), "body": BODY}


class LogSink:
    """`["a", seq, {job}]` / `["d", seq]` lines appended with os.write + os.fsync."""

    def __init__(self, path: str) -> None:
        self.path, self.fd = path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    @staticmethod
    def encode(seq: int, job: dict[str, Any]) -> bytes:  # on the event loop; write(): in the thread
        return DUMPS(["a", seq, dict(job, body=base64.b64encode(job["body"]).decode())]).encode() + b"\n"

    def write(self, adds: list[Any], dones: list[int]) -> None:
        data = memoryview(b"".join([*adds, *(b'["d",%d]\n' % s for s in dones)]))
        while data:
            data = data[os.write(self.fd, data):]
        os.fsync(self.fd)

    def close(self) -> int:
        size = os.fstat(self.fd).st_size
        os.close(self.fd)
        return size


class SqliteSink:
    """Table jobs(seq, job JSON without the body, body BLOB): one transaction per group, done = DELETE."""

    def __init__(self, path: str, synchronous: str = "FULL") -> None:
        self.path = path  # the connection is then only used by the flusher thread
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # FULL: the WAL is fsync'd at every COMMIT, so a committed job survives power loss. NORMAL in WAL
        # mode only fsyncs at checkpoints: commits survive a process crash but not an OS crash/power cut.
        self.db.execute(f"PRAGMA synchronous={synchronous}")
        self.db.execute("CREATE TABLE IF NOT EXISTS jobs (seq INTEGER PRIMARY KEY, job TEXT, body BLOB)")

    @staticmethod
    def encode(seq: int, job: dict[str, Any]) -> tuple[int, str, bytes]:
        return seq, DUMPS({k: v for k, v in job.items() if k != "body"}), job["body"]

    def write(self, adds: list[Any], dones: list[int]) -> None:
        self.db.execute("BEGIN")
        self.db.executemany("INSERT INTO jobs VALUES (?, ?, ?)", adds)
        self.db.executemany("DELETE FROM jobs WHERE seq = ?", [(s,) for s in dones])
        self.db.execute("COMMIT")

    def close(self) -> int:  # bytes on disk (db + WAL) before the closing checkpoint
        size = sum(os.path.getsize(p) for p in (self.path, self.path + "-wal") if os.path.exists(p))
        self.db.close()
        return size


Sink = LogSink | SqliteSink


class Committer:
    """Group commit: adds share one future per group; a single flusher writes a group at a time."""

    def __init__(self, sink: Sink, executor: ThreadPoolExecutor) -> None:
        self.sink, self.executor, self.loop = sink, executor, asyncio.get_running_loop()
        self.adds: list[Any] = []
        self.dones: list[int] = []
        self.fut: asyncio.Future[None] | None = None
        self.wake, self.closing = asyncio.Event(), False
        self.groups, self.committed, self.flush_s = 0, 0, 0.0

    def add(self, seq: int, job: dict[str, Any]) -> asyncio.Future[None]:
        self.adds.append(self.sink.encode(seq, job))
        if self.fut is None:
            self.fut = self.loop.create_future()
            self.wake.set()
        return self.fut

    def done(self, seq: int) -> None:
        self.dones.append(seq)  # no wake-up: rides along with the next group

    async def run(self) -> None:
        while not (self.closing and not self.adds and not self.dones):
            await self.wake.wait()
            self.wake.clear()
            adds, dones, fut = self.adds, self.dones, self.fut
            self.adds, self.dones, self.fut = [], [], None
            t0 = time.perf_counter()
            try:
                await self.loop.run_in_executor(self.executor, self.sink.write, adds, dones)
            except Exception as e:  # every submitter of the group gets the error (a 500, not a 200)
                if fut is not None:
                    fut.set_exception(e)
                raise
            if fut is not None:
                fut.set_result(None)
                self.groups += 1
                self.committed += len(adds)
                self.flush_s += time.perf_counter() - t0


@dataclass
class Result:
    rate: float
    group: float = float("nan")  # jobs per fsync
    flush_ms: float = float("nan")  # write + fsync (or transaction) per group, in the thread
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    file_per_job: float = float("nan")  # file size at the end / jobs
    disk_per_job: float = float("nan")  # bytes sent to the block device / jobs


def disk_written() -> int:  # bytes this process sent to the block device
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("write_bytes"))


def make_sink(fmt: str, where: str) -> Sink:
    if fmt == "log":
        return LogSink(os.path.join(where, "journal.jsonl"))
    return SqliteSink(os.path.join(where, "journal.db"), "NORMAL" if fmt == "sqlite-normal" else "FULL")


async def bench(fmt: str, conc: int, duration: float, root: str) -> Result:
    """C submitters for `duration` seconds; fmt "none" = the bare loop (build the job, yield once)."""
    seqs, lat, loop = itertools.count(), list[float](), asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=1)
    sink = None if fmt == "none" else make_sink(fmt, tempfile.mkdtemp(dir=root))
    committer = None if sink is None else Committer(sink, executor)
    flusher = None if committer is None else asyncio.create_task(committer.run())

    async def submitter() -> None:
        while time.perf_counter() < deadline:
            seq = next(seqs)
            t0 = time.perf_counter()
            job = make_job(seq)
            await (asyncio.sleep(0) if committer is None else committer.add(seq, job))
            lat.append(time.perf_counter() - t0)
            if committer is not None:
                committer.done(seq)  # completion: buffered, not awaited

    disk0 = disk_written()
    start = time.perf_counter()
    deadline = start + duration
    await asyncio.gather(*(submitter() for _ in range(conc)))
    elapsed = time.perf_counter() - start
    q, n = statistics.quantiles(lat, n=100), len(lat)
    if sink is None or committer is None or flusher is None:
        executor.shutdown()
        return Result(n / elapsed, p50_ms=q[49] * 1e3, p99_ms=q[98] * 1e3)
    committer.closing = True
    committer.wake.set()
    await flusher
    disk = disk_written() - disk0
    size = await loop.run_in_executor(executor, sink.close)
    executor.shutdown()
    shutil.rmtree(os.path.dirname(sink.path))
    groups = committer.groups
    return Result(n / elapsed, committer.committed / groups, committer.flush_s / groups * 1e3,
                  q[49] * 1e3, q[98] * 1e3, size / n, disk / n)


def replay(sink: Sink) -> int:
    """Rebuild the live set {seq: job} from the journal (with the job bodies as bytes)."""
    live: dict[int, dict[str, Any]] = {}
    if isinstance(sink, LogSink):
        with open(sink.path, "rb") as f:
            for line in f:
                rec = json.loads(line)
                if rec[0] == "a":
                    rec[2]["body"] = base64.b64decode(rec[2]["body"])
                    live[rec[1]] = rec[2]
                elif rec[0] == "d":
                    live.pop(rec[1], None)
                else:  # ["r", seq, attempts, not_before]
                    live[rec[1]].update(attempts=rec[2], not_before=rec[3])
    else:
        db = sqlite3.connect(sink.path)
        for seq, meta, body in db.execute("SELECT seq, job, body FROM jobs"):
            live[seq] = json.loads(meta) | {"body": body}
        db.close()
    return len(live)


def spread(xs: list[float], f: str = "{:.0f}") -> str:
    return f"{f.format(statistics.median(xs))} ({f.format(min(xs))}–{f.format(max(xs))})"


COLUMNS = [("jobs/fsync", "group", "{:11.1f}"), ("flush ms", "flush_ms", "{:9.2f}"),
           ("p50 ms", "p50_ms", "{:8.2f}"), ("p99 ms", "p99_ms", "{:8.2f}"),
           ("file B/job", "file_per_job", "{:11.0f}"), ("disk B/job", "disk_per_job", "{:11.0f}")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/var/tmp", help="parent of the temp dir (a real disk, not tmpfs)")
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 10, 50, 200])
    ap.add_argument("--formats", nargs="+", default=["none", "log", "sqlite"],
                    choices=["none", "log", "sqlite", "sqlite-normal"])
    ap.add_argument("--replay-jobs", type=int, default=100_000)
    args = ap.parse_args()
    try:
        import uvloop
        run, loop_name = uvloop.run, f"uvloop {uvloop.__version__}"
    except ImportError:
        run, loop_name = asyncio.run, "asyncio"
    root = tempfile.mkdtemp(prefix="journal-bench-", dir=args.dir)
    st = os.statvfs(root)
    print(f"dir {root} ({st.f_bavail * st.f_frsize >> 30} GiB free), {loop_name}, SQLite"
          f" {sqlite3.sqlite_version}, log add record {len(LogSink.encode(0, make_job(0)))} B,"
          f" {args.runs} runs x {args.duration:g} s\n")
    print(f"{'format':<14}{'C':>4}  {'jobs/s median (min–max)':<26}{'x none':>7}"
          + "".join(h.rjust(len(f.format(0))) for h, _, f in COLUMNS))
    base: dict[int, float] = {}
    try:
        for conc in args.concurrency:  # runs interleave the formats, so load drifts hit them alike
            results: dict[str, list[Result]] = {fmt: [] for fmt in args.formats}
            for _ in range(args.runs):
                for fmt, rs in results.items():
                    rs.append(run(bench(fmt, conc, args.duration, root)))
            for fmt, rs in results.items():
                rate = statistics.median(r.rate for r in rs)
                if fmt == "none":
                    base[conc] = rate
                ratio = f"{rate / base[conc]:.3f}" if conc in base else "-"
                cells = (f.format(statistics.median(getattr(r, a) for r in rs)).replace("nan", "-")
                         for _, a, f in COLUMNS)
                print(f"{fmt:<14}{conc:>4}  {spread([r.rate for r in rs]):<26}{ratio:>7}" + "".join(cells),
                      flush=True)
        print(f"\nreplay: {args.replay_jobs} adds, 50% done; rebuild the live set incl. bodies; seconds")
        sinks: dict[str, Sink] = {f: make_sink(f, tempfile.mkdtemp(dir=root)) for f in ("log", "sqlite")}
        live: dict[str, int] = {}
        for sink in sinks.values():
            for lo in range(0, args.replay_jobs, 1000):  # 1000 adds + done records for the even half
                seqs = range(lo, min(args.replay_jobs, lo + 1000))
                sink.write([sink.encode(s, make_job(s)) for s in seqs], [s for s in seqs if s % 2 == 0])
            sink.close()
        times = {(fmt, kind): list[float]() for fmt in sinks for kind in ("cold", "warm")}
        for _ in range(args.runs):
            for (fmt, kind), ts in times.items():
                if kind == "cold":  # drop the file's clean pages from the page cache
                    fd = os.open(sinks[fmt].path, os.O_RDONLY)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    os.close(fd)
                t0 = time.perf_counter()
                live[fmt] = replay(sinks[fmt])
                ts.append(time.perf_counter() - t0)
        for fmt, sink in sinks.items():
            where = os.path.dirname(sink.path)
            size = sum(os.path.getsize(os.path.join(where, p)) for p in os.listdir(where))
            print(f"  {fmt:<7} {size / 2**20:6.1f} MiB  live {live[fmt]}  cold (page cache dropped)"
                  f" {spread(times[fmt, 'cold'], '{:.3f}')}  warm {spread(times[fmt, 'warm'], '{:.3f}')}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
