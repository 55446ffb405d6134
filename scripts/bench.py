#!/usr/bin/env python3
"""Benchmark bwp on this machine, optionally side by side with other daemons of the same API.

    python scripts/bench.py                                   # bwp alone, 3 runs
    python scripts/bench.py --compare go=/path/to/bwp-go      # and the Go daemon beside it
    python scripts/bench.py --only ingest --runs 5 --duration 5 --json out.json
    python scripts/bench.py --profile prof/                   # plus py-spy profiles of bwp
    python scripts/bench.py --journal /var/tmp                # and bwp with its journal on
    python scripts/bench.py --processes 2                     # and bwp with 2 worker processes
    python scripts/bench.py --rabbitmq start                  # and bwp on a RabbitMQ node it starts
    python scripts/bench.py --rabbitmq amqp://u:p@127.0.0.1:5672/   # ... or on one running there

What it measures, each over --runs runs (median and min–max):

  ingest    wrk (1 thread, 50 connections) POSTs one fixed ~200-byte job to /post/http:
            accepted submits/s, p50/p99 latency; the jobs go to a local nginx sink, so the
            daemon delivers meanwhile. Again with the jobs aimed at a destination that never
            answers ("no dispatch"): the cost of the API alone.
            Ceiling: the same wrk against scripts/bare_server.py (aiohttp+uvloop, no work).
  dispatch  jobs/s the sink receives: while wrk keeps a 10 000-job queue full (POSTs of 10
            jobs, most refused with 503), and how fast a prefilled backlog of --backlog jobs
            drains (the sink is paused with SIGSTOP while the queue is filled).
            Ceiling: scripts/bare_client.py, one aiohttp session with 50 tasks GETting the sink;
            and wrk straight at the sink shows nginx is not the limit either.
  memory    RSS idle, and with 10 000 jobs of 1 KiB bodies queued behind a destination that
            accepts connections and never answers; bytes per queued job, with one URL for all
            and with a URL of its own per job.

Every process it starts (daemons, nginx, helpers) it stops by pid in a finally block. All
traffic stays on 127.0.0.1. Needs wrk and nginx (installed with apt-get when missing and
running as root), and an interpreter with aiohttp and uvloop for the helpers (this one, or the
one the `bwp` script runs with). --profile needs py-spy (pip install py-spy).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import itertools
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import profile_top

HERE = Path(__file__).resolve().parent
WRK_LUA = HERE / "post.lua"
HOST = "127.0.0.1"
POOL_SIZE = 50
CONNECTIONS = 50
LOAD_QUEUE = 10_000  # the default queue bound, kept full by wrk in the dispatch-under-load run
LOAD_BATCH = 10  # jobs per POST in that run: single jobs would not outpace a Python daemon's dispatch
INGEST_QUEUE = 1_000_000  # big enough that no submit is refused during an ingest run
MEMORY_JOBS = 10_000
MEMORY_BODY = 1024
MEMORY_SETTLE = 2.0  # seconds after the last submit before reading RSS (well under read timeouts)
PREFILL_LIMIT = 8.0  # seconds: the stuck requests of a paused sink time out after 10 s
BATCH = 1000  # jobs per POST when filling a queue
START_TIMEOUT = 15.0
DRAIN_TIMEOUT = 120.0
MEASUREMENTS = ("ingest", "dispatch", "memory")


class BenchError(Exception):
    """A measurement could not be taken; the message says why."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes], grace: float = 2.0) -> None:
    """SIGTERM the process's own group (it was started as a session leader), SIGKILL it after
    `grace` seconds, and reap it, even when an interrupt arrives meanwhile."""
    try:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGCONT)  # a paused sink must see the SIGTERM
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@contextlib.contextmanager
def process(argv: list[str], logfile: Path, env: dict[str, str] | None = None,
            grace: float = 2.0) -> Iterator[subprocess.Popen[bytes]]:
    with logfile.open("ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    try:
        yield proc
    finally:
        stop_process(proc, grace)


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def descendants(pid: int) -> list[int]:
    """pid and every process below it."""
    found = [pid]
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                for child in (task / "children").read_text().split():
                    found += descendants(int(child))
    return found


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU time of these processes and their descendants (exited children not
    counted: the daemons' processes live through a measurement)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in {d for p in pids if p for d in descendants(p)}:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def rss_bytes(pid: int) -> int:
    """VmRSS of the process and all its descendants."""
    total = 0
    for p in descendants(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


# --------------------------------------------------------------------------- HTTP helpers


def request(port: int, method: str, path: str, body: bytes | None = None,
            timeout: float = 10.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_http(port: int, path: str, proc: subprocess.Popen[bytes], logfile: Path,
              method: str = "GET", body: bytes | None = None) -> None:
    """Wait until the process answers `method path` with 200."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{proc.args!r} exited with {proc.returncode}:\n{log_tail(logfile)}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            if request(port, method, path, body, timeout=1.0)[0] == 200:
                return
        time.sleep(0.05)
    raise BenchError(f"{proc.args!r} did not answer {method} {path} in {START_TIMEOUT:g}s")


def submit(port: int, job: str, total: int, batch: int) -> None:
    """POST `total` copies of `job` as JSON arrays of `batch`; every POST must be accepted.
    A connection per POST, as PHP does: a daemon of several processes gets them all busy.
    A `{n}` in the job becomes the job's number (distinct URLs)."""
    sent = 0
    numbered = "{n}" in job
    while sent < total:
        n = min(batch, total - sent)
        jobs = [job.replace("{n}", str(i)) for i in range(sent, sent + n)] if numbered else [job] * n
        conn = http.client.HTTPConnection(HOST, port, timeout=30)
        try:
            conn.request("POST", "/post/http", body=f"[{','.join(jobs)}]".encode(),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            answer = resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            raise BenchError(f"submit refused: {resp.status} {answer[:200]!r}")
        sent += n


def queue_length(port: int) -> float | None:
    """Jobs waiting, from the daemon's /metrics (bwp_queue_length, or the Go daemon's queue_size)."""
    _, page = request(port, "GET", "/metrics")
    found = None
    for line in page.decode().splitlines():
        name, _, value = line.rpartition(" ")
        if name.startswith("bwp_queue_length") or name == "queue_size":
            found = (found or 0.0) + float(value)
    return found


# --------------------------------------------------------------------------- sink (nginx)

NGINX_CONF = """\
daemon off;
master_process off;
worker_rlimit_nofile 65536;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 75s;
    server {{
        listen {host}:{port} backlog=4096;
        location = /nginx_status {{ stub_status; }}
        location / {{ return 200 "ok"; }}
    }}
}}
"""


class Sink:
    """nginx answering 200 "ok" to everything; counts requests through stub_status.

    One single process (master_process off), so pausing it with SIGSTOP pauses the sink.
    """

    def __init__(self, proc: subprocess.Popen[bytes], port: int):
        self.proc, self.port = proc, port
        self._polls = 0
        self._conn = http.client.HTTPConnection(HOST, port, timeout=10)

    def url(self, path: str = "/hook") -> str:
        return f"http://{HOST}:{self.port}{path}"

    def count(self) -> int:
        """Requests the sink has answered, our own status polls excluded."""
        self._polls += 1
        try:
            self._conn.request("GET", "/nginx_status")
            text = self._conn.getresponse().read().decode()
        except (OSError, http.client.HTTPException):
            self._conn.close()  # reconnect once: nginx may have closed a keep-alive connection
            self._conn.request("GET", "/nginx_status")
            text = self._conn.getresponse().read().decode()
        # "Active connections: 1\nserver accepts handled requests\n 1 1 5\n..."
        return int(text.splitlines()[2].split()[2]) - self._polls

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        os.kill(self.proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.proc.pid, signal.SIGCONT)

    def close(self) -> None:
        self._conn.close()


@contextlib.contextmanager
def nginx_sink(tmp: Path) -> Iterator[Sink]:
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, host=HOST, port=port))
    logfile = tmp / "nginx.log"
    argv = ["nginx", "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "nginx-error.log")]
    with process(argv, logfile) as proc:
        wait_http(port, "/nginx_status", proc, logfile)
        sink = Sink(proc, port)
        try:
            yield sink
        finally:
            sink.close()


class Blackhole:
    """A TCP listener on 127.0.0.1 that accepts connections and never answers."""

    def __init__(self) -> None:
        self.sock = socket.create_server((HOST, 0), backlog=4096)
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                conn, _ = self.sock.accept()
                self._conns.append(conn)  # kept open, never read, never answered

    def __enter__(self) -> Blackhole:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for conn in self._conns:
            conn.close()
        self.sock.close()


# --------------------------------------------------------------------------- wrk


@dataclass
class WrkResult:
    requests: int
    seconds: float
    non2xx: int
    errors: int
    p50_ms: float
    p99_ms: float

    @property
    def ok(self) -> int:
        return self.requests - self.non2xx

    @property
    def ok_per_s(self) -> float:
        return self.ok / self.seconds


def wrk(url: str, duration: float, body: str | None = None, method: str = "POST") -> WrkResult:
    env = {**os.environ, "BENCH_METHOD": method, "BENCH_BODY": body or ""}
    argv = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{duration:g}s", "--timeout", "5s",
            "-s", str(WRK_LUA), url]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=duration + 60)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if line is None:
        raise BenchError(f"wrk gave no summary (exit {done.returncode}): {done.stderr or done.stdout}")
    s = json.loads(line.removeprefix("BENCH "))
    errors = s["connect_errors"] + s["read_errors"] + s["write_errors"] + s["timeouts"]
    return WrkResult(s["requests"], s["duration_us"] / 1e6, s["non2xx"], errors,
                     s["p50_us"] / 1000, s["p99_us"] / 1000)


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    name: str
    command: Callable[[str, int], list[str]]  # (listen address, queue size) -> argv
    broker_pid: int = 0  # a broker this target's jobs go through: its CPU per job is reported


def bwp_target(bwp: str) -> Target:
    return Target("bwp", lambda listen, queue: [
        bwp, "serve", "--listen", listen, "--pool-size", str(POOL_SIZE), "--queue-size", str(queue)])


def configured_target(name: str, bwp: str, directory: Path,
                      settings: Callable[[Path], dict[str, object]], queue_scale: int = 1,
                      broker_pid: int = 0) -> Target:
    """bwp with a config file; every start gets a fresh directory (a journal: nothing to
    take over) and the file holds settings(that directory).  `queue_scale`: N processes
    share the bound, and connections need not spread evenly; the run must not see a 503."""
    starts = itertools.count()

    def command(listen: str, queue: int) -> list[str]:
        run = directory / f"{name}-{next(starts)}"
        run.mkdir()
        config = run / "bwp.yaml"
        config.write_text(json.dumps(settings(run)))  # JSON is YAML
        return [*bwp_target(bwp).command(listen, queue * queue_scale), "-c", str(config)]

    return Target(name, command, broker_pid)


@contextlib.contextmanager
def rabbitmq_node() -> Iterator[object]:
    """A RabbitMQ node on 127.0.0.1 in a temp dir, started and stopped (by pid) as the tests
    do it (tests/broker.py)."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    import broker  # the tests' own node controller

    if not broker.installed():
        raise BenchError(f"--rabbitmq start: {broker.INSTALL_HINT}")
    with broker.running_node() as node:
        log(f"RabbitMQ on 127.0.0.1:{node.port}")
        yield node


def go_style_target(spec: str) -> Target:
    """NAME=CMD, started as `CMD -listen ADDR -pool-size 50 -pool-queue-size N`."""
    name, sep, cmd = spec.partition("=")
    if not sep or not name or not cmd:
        raise argparse.ArgumentTypeError(f"--compare wants NAME=CMD, not {spec!r}")
    base = shlex.split(cmd)
    return Target(name, lambda listen, queue: [
        *base, "-listen", listen, "-pool-size", str(POOL_SIZE), "-pool-queue-size", str(queue)])


@dataclass
class Daemon:
    port: int
    pid: int


@dataclass
class Context:
    tmp: Path
    sink: Sink
    python: str
    duration: float
    backlog: int

    def job(self, base: str | None = None) -> str:
        """The fixed ~200-byte job that wrk submits: a form POST to the sink (or to `base`)."""
        return json.dumps({
            "url": (base or self.sink.url("")) + "/webhooks/order-created?shop=bench",
            "method": "POST",
            "headers": {"X-Request-Id": "bench-00000001"},
            "parameters": {"order": "1234567", "status": "paid", "amount": "19.99"},
        }, separators=(",", ":"))

    @contextlib.contextmanager
    def daemon(self, target: Target, queue: int, grace: float = 2.0) -> Iterator[Daemon]:
        port = free_port()
        logfile = self.tmp / f"{target.name}.log"
        with process(target.command(f"{HOST}:{port}", queue), logfile, grace=grace) as proc:
            wait_http(port, "/metrics", proc, logfile)
            yield Daemon(port, proc.pid)


# --------------------------------------------------------------------------- measurements

Sample = dict[str, float]


def cpu_per_job(prefix: str, target: Target, d: Daemon, before: tuple[float, float],
                jobs: float) -> Sample:
    """CPU µs per accepted job of the daemon (all its processes) and of its broker, if any,
    since `before` (cpu_snapshot)."""
    daemon, broker = cpu_snapshot(target, d)
    sample = {f"{prefix}_cpu_us": (daemon - before[0]) / max(jobs, 1) * 1e6}
    if target.broker_pid:
        sample[f"{prefix}_broker_cpu_us"] = (broker - before[1]) / max(jobs, 1) * 1e6
    return sample


def cpu_snapshot(target: Target, d: Daemon) -> tuple[float, float]:
    return cpu_seconds([d.pid]), cpu_seconds([target.broker_pid])


def measure_ingest(ctx: Context, target: Target) -> Sample:
    with ctx.daemon(target, INGEST_QUEUE) as d:
        before, cpu = ctx.sink.count(), cpu_snapshot(target, d)
        w = wrk(f"http://{HOST}:{d.port}/post/http", ctx.duration, ctx.job())
        delivered = ctx.sink.count() - before
        used = cpu_per_job("ingest", target, d, cpu, w.ok)
    if w.non2xx or w.errors:
        log(f"  warning: {target.name} ingest: {w.non2xx} non-2xx answers, {w.errors} socket errors")
    return {"ingest_rps": w.ok_per_s, "ingest_p50_ms": w.p50_ms, "ingest_p99_ms": w.p99_ms,
            "ingest_refused": w.non2xx + w.errors, "ingest_delivered_rps": delivered / w.seconds,
            **used}


def measure_ingest_alone(ctx: Context, target: Target) -> Sample:
    """Ingest with no dispatch work: the jobs go to a destination that never answers, so the 50
    workers sit stuck on it and the daemon does nothing but accept and queue."""
    with Blackhole() as hole, ctx.daemon(target, INGEST_QUEUE, grace=0.5) as d:
        job = ctx.job(base=f"http://{HOST}:{hole.port}")
        cpu = cpu_snapshot(target, d)
        w = wrk(f"http://{HOST}:{d.port}/post/http", ctx.duration, job)
        used = cpu_per_job("alone", target, d, cpu, w.ok)
    return {"alone_rps": w.ok_per_s, "alone_p50_ms": w.p50_ms, "alone_p99_ms": w.p99_ms, **used}


def measure_load(ctx: Context, target: Target) -> Sample:
    """Delivered/s while wrk keeps the (10 000-job) queue full with batches of LOAD_BATCH jobs;
    refused (503) submits are expected and show that the queue was full."""
    with ctx.daemon(target, LOAD_QUEUE) as d:
        before = ctx.sink.count()
        w = wrk(f"http://{HOST}:{d.port}/post/http", ctx.duration, f"[{','.join([ctx.job()] * LOAD_BATCH)}]")
        delivered = ctx.sink.count() - before
    return {"load_delivered_rps": delivered / w.seconds, "load_accepted_jobs_rps": w.ok_per_s * LOAD_BATCH,
            "load_refused_share": w.non2xx / max(1, w.requests)}


def prefill_paused(ctx: Context, d: Daemon, jobs: int) -> float:
    """Queue `jobs` jobs while the sink is paused (workers stuck on it); returns the seconds taken."""
    with ctx.sink.paused():
        start = time.monotonic()
        submit(d.port, ctx.job(), jobs, BATCH)
        took = time.monotonic() - start
        if took > PREFILL_LIMIT:
            raise BenchError(f"filling {jobs} jobs took {took:.1f}s (> {PREFILL_LIMIT:g}s, requests "
                             "to the paused sink would time out): lower --backlog")
    return took


def wait_delivered(sink: Sink, base: int, jobs: int) -> float:
    """Seconds until the sink has received `jobs` requests more than `base`."""
    start = time.monotonic()
    deadline = start + DRAIN_TIMEOUT
    while sink.count() - base < jobs:
        if time.monotonic() > deadline:
            raise BenchError(f"the sink got only {sink.count() - base} of {jobs} jobs "
                             f"in {DRAIN_TIMEOUT:g}s")
        time.sleep(0.002)
    return time.monotonic() - start


def measure_drain(ctx: Context, target: Target) -> Sample:
    with ctx.daemon(target, ctx.backlog + BATCH) as d:
        base = ctx.sink.count()
        prefill = prefill_paused(ctx, d, ctx.backlog)
        seconds = wait_delivered(ctx.sink, base, ctx.backlog)
    return {"drain_rps": ctx.backlog / seconds, "drain_prefill_s": prefill}


def memory_job(port: int, distinct: bool = False) -> str:
    """A 1 KiB-body POST to the never-answering listener; `distinct`: a URL of its own per job
    (`?order={n}`), as webhooks that carry an id in the query string have."""
    body = bytes(range(256)) * (MEMORY_BODY // 256)
    return json.dumps({"url": f"http://{HOST}:{port}/never" + ("?order={n}" if distinct else ""),
                       "method": "POST", "body": base64.b64encode(body).decode()})


def queued_memory(ctx: Context, target: Target, distinct: bool) -> tuple[int, int, float | None]:
    """RSS idle, RSS with MEMORY_JOBS queued, and the queue length the daemon reports."""
    with Blackhole() as hole, ctx.daemon(target, MEMORY_JOBS, grace=0.5) as d:
        time.sleep(1.0)
        idle = rss_bytes(d.pid)
        submit(d.port, memory_job(hole.port, distinct), MEMORY_JOBS, 100)
        time.sleep(MEMORY_SETTLE)
        return idle, rss_bytes(d.pid), queue_length(d.port)


def measure_memory(ctx: Context, target: Target) -> Sample:
    idle, loaded, queued = queued_memory(ctx, target, distinct=False)
    distinct_idle, distinct_loaded, _ = queued_memory(ctx, target, distinct=True)
    mib = 1024 * 1024
    sample = {"rss_idle_mib": idle / mib, "rss_loaded_mib": loaded / mib,
              "bytes_per_job": (loaded - idle) / MEMORY_JOBS,
              "bytes_per_job_distinct": (distinct_loaded - distinct_idle) / MEMORY_JOBS}
    if queued is not None:
        sample["memory_queued"] = queued
    return sample


def measure_bare_server(ctx: Context) -> Sample:
    port = free_port()
    logfile = ctx.tmp / "bare_server.log"
    with process([ctx.python, str(HERE / "bare_server.py"), HOST, str(port)], logfile) as proc:
        wait_http(port, "/post/http", proc, logfile, "POST", b"{}")
        w = wrk(f"http://{HOST}:{port}/post/http", ctx.duration, ctx.job())
    return {"req_rps": w.ok_per_s, "p50_ms": w.p50_ms, "p99_ms": w.p99_ms}


def measure_bare_client(ctx: Context) -> Sample:
    argv = [ctx.python, str(HERE / "bare_client.py"), ctx.sink.url(), str(POOL_SIZE), f"{ctx.duration:g}"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=ctx.duration + 60)
    if done.returncode != 0:
        raise BenchError(f"bare client failed: {done.stderr}")
    result = json.loads(done.stdout.splitlines()[-1])
    return {"req_rps": result["requests"] / result["seconds"]}


def measure_sink(ctx: Context) -> Sample:
    w = wrk(ctx.sink.url(), ctx.duration, method="GET")
    return {"req_rps": w.ok_per_s}


# --------------------------------------------------------------------------- results


@dataclass
class Results:
    """samples[column][metric] = one value per run."""

    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(self, column: str, sample: Sample) -> None:
        col = self.samples.setdefault(column, {})
        for key, value in sample.items():
            col.setdefault(key, []).append(value)

    def values(self, column: str, metric: str) -> list[float]:
        return self.samples.get(column, {}).get(metric, [])

    def ratios(self, a: str, b: str, metric: str, b_metric: str | None = None) -> list[float]:
        """Per-run ratios of a's metric to b's (b_metric, or the same one): runs pair up, as
        both were measured in the same run."""
        xs, ys = self.values(a, metric), self.values(b, b_metric or metric)
        return [x / y for x, y in zip(xs, ys, strict=False) if y]


@dataclass(frozen=True)
class Row:
    metric: str
    label: str
    unit: str  # "rate", "ms", "mib", "bytes", "share", "us"
    ceiling: str | None = None  # the bare column whose req_rps this row is compared with


ROWS = (
    Row("ingest_rps", "ingest: accepted submits/s", "rate", "bare-server"),
    Row("ingest_p50_ms", "ingest: p50 latency ms", "ms"),
    Row("ingest_p99_ms", "ingest: p99 latency ms", "ms"),
    Row("ingest_delivered_rps", "ingest: delivered/s meanwhile", "rate", "bare-client"),
    Row("ingest_cpu_us", "ingest: daemon CPU µs per job", "us"),
    Row("ingest_broker_cpu_us", "ingest: broker CPU µs per job", "us"),
    Row("alone_rps", "ingest, no dispatch: accepted submits/s", "rate", "bare-server"),
    Row("alone_p50_ms", "ingest, no dispatch: p50 latency ms", "ms"),
    Row("alone_p99_ms", "ingest, no dispatch: p99 latency ms", "ms"),
    Row("alone_cpu_us", "ingest, no dispatch: daemon CPU µs per job", "us"),
    Row("alone_broker_cpu_us", "ingest, no dispatch: broker CPU µs per job", "us"),
    Row("load_delivered_rps", f"dispatch: delivered/s, queue kept full ({LOAD_BATCH}-job POSTs)", "rate",
        "bare-client"),
    Row("load_refused_share", "dispatch: share of those POSTs refused (503)", "share"),
    Row("drain_rps", "dispatch: backlog drain jobs/s", "rate", "bare-client"),
    Row("rss_idle_mib", "memory: RSS idle MiB", "mib"),
    Row("rss_loaded_mib", "memory: RSS, 10k x 1 KiB queued MiB", "mib"),
    Row("bytes_per_job", "memory: bytes per queued job", "bytes"),
    Row("bytes_per_job_distinct", "memory: bytes per queued job, distinct URLs", "bytes"),
)
CEILING_ROWS = (
    ("bare-server", Row("req_rps", "bare aiohttp server (wrk POST): req/s", "rate")),
    ("bare-server", Row("p50_ms", "bare aiohttp server: p50 latency ms", "ms")),
    ("bare-server", Row("p99_ms", "bare aiohttp server: p99 latency ms", "ms")),
    ("bare-client", Row("req_rps", "bare aiohttp client -> sink (50 tasks): req/s", "rate")),
    ("sink", Row("req_rps", "nginx sink (wrk GET): req/s", "rate")),
)


def fmt_value(value: float, unit: str) -> str:
    if unit == "ms":
        return f"{value:.2f}"
    if unit == "mib":
        return f"{value:.1f}"
    if unit == "ratio":
        return f"{value:.2f}"
    if unit == "share":
        return f"{100 * value:.0f}%"
    return f"{value:,.0f}"


def fmt_cell(values: list[float], unit: str) -> str:
    if not values:
        return "—"
    mid = fmt_value(statistics.median(values), unit)
    if len(values) == 1:
        return mid
    return f"{mid} ({fmt_value(min(values), unit)}–{fmt_value(max(values), unit)})"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main_table(results: Results, targets: list[str]) -> str:
    others = targets[1:]
    bare = any(row.ceiling and results.values(row.ceiling, "req_rps") for row in ROWS)
    header = ["measurement", *targets, *(f"{targets[0]}/{o}" for o in others),
              *(f"{t}/bare" for t in targets if bare)]
    rows = []
    for row in ROWS:
        if not any(results.values(t, row.metric) for t in targets):
            continue
        cells = [row.label, *(fmt_cell(results.values(t, row.metric), row.unit) for t in targets)]
        cells += [fmt_cell(results.ratios(targets[0], o, row.metric), "ratio") if row.unit != "share"
                  else "—" for o in others]
        if bare:
            cells += [fmt_cell(results.ratios(t, row.ceiling, row.metric, "req_rps"), "ratio")
                      if row.ceiling else "—" for t in targets]
        rows.append(cells)
    return markdown_table(header, rows)


def ceiling_table(results: Results) -> str:
    rows = [[row.label, fmt_cell(results.values(col, row.metric), row.unit)]
            for col, row in CEILING_ROWS if results.values(col, row.metric)]
    return markdown_table(["ceiling", "value"], rows) if rows else ""


# --------------------------------------------------------------------------- setup


def ensure_tool(tool: str, package: str) -> None:
    if shutil.which(tool):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise BenchError(f"{tool} is missing: install the Debian package {package!r}")
    log(f"installing {package} with apt-get ...")
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", package]):
        subprocess.run(argv, stdout=subprocess.DEVNULL, timeout=600, check=True)
    if not shutil.which(tool):
        raise BenchError(f"{tool} still missing after apt-get install {package}")


def find_bwp() -> str:
    beside = Path(sys.executable).parent / "bwp"
    found = shutil.which("bwp") or (str(beside) if beside.exists() else None)
    if found is None:
        raise BenchError("no `bwp` command found: pass --bwp PATH")
    return found


def helper_python(bwp: str) -> str:
    """An interpreter with aiohttp and uvloop: this one, or the one the bwp script runs with."""
    candidates = [sys.executable]
    with contextlib.suppress(OSError, UnicodeDecodeError):
        first = Path(bwp).read_text().splitlines()[0]
        if first.startswith("#!"):
            candidates.append(first[2:].strip().split()[0])
    for python in candidates:
        check = subprocess.run([python, "-c", "import aiohttp, uvloop"], capture_output=True)
        if check.returncode == 0:
            return python
    raise BenchError("no interpreter with aiohttp and uvloop found: pass --python PATH")


def bwp_revision() -> str:
    """The checkout's commit (with -dirty when bwp/ has uncommitted changes), if it is one."""
    repo = HERE.parent
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "bwp"],
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def machine_info(python: str) -> dict[str, str]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    versions = subprocess.run(
        [python, "-c", "import sys, aiohttp, uvloop; "
         "print(sys.version.split()[0], aiohttp.__version__, uvloop.__version__)"],
        capture_output=True, text=True, check=True).stdout.split()
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0]
    return {"bwp": bwp_revision(), "nproc": str(os.cpu_count()), "cpu": cpu, "kernel": platform.release(),
            "python": versions[0], "aiohttp": versions[1], "uvloop": versions[2],
            "nginx": nginx.removeprefix("nginx version: "), "wrk": wrk_version.split(" Copyright")[0].strip()}


# --------------------------------------------------------------------------- profiling


def profile_bwp(ctx: Context, target: Target, outdir: Path, seconds: int = 10) -> dict[str, str]:
    """py-spy (non-blocking, so bwp is not paused) on bwp during an ingest run, an ingest run
    with no dispatch (jobs stuck on a destination that never answers) and a backlog drain."""
    pyspy = shutil.which("py-spy") or str(Path(ctx.python).parent / "py-spy")
    if not Path(pyspy).exists():
        raise BenchError("--profile needs py-spy: pip install py-spy")
    outdir.mkdir(parents=True, exist_ok=True)
    reports = {}
    with ctx.daemon(target, INGEST_QUEUE) as d:
        reports["ingest"] = record_under_wrk(ctx, pyspy, d, ctx.job(), outdir / "ingest.raw", seconds)
    with Blackhole() as hole, ctx.daemon(target, INGEST_QUEUE, grace=0.5) as d:
        job = ctx.job(base=f"http://{HOST}:{hole.port}")
        reports["ingest, no dispatch"] = record_under_wrk(ctx, pyspy, d, job, outdir / "alone.raw",
                                                          seconds)
    with ctx.daemon(target, ctx.backlog + BATCH) as d:
        prefill_paused(ctx, d, ctx.backlog)  # the drain starts as the sink resumes
        reports["backlog drain"] = record(pyspy, d.pid, outdir / "drain.raw", seconds)
    return reports


def record_under_wrk(ctx: Context, pyspy: str, d: Daemon, job: str, out: Path, seconds: int) -> str:
    env = {**os.environ, "BENCH_METHOD": "POST", "BENCH_BODY": job}
    argv = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds + 3}s", "-s", str(WRK_LUA),
            f"http://{HOST}:{d.port}/post/http"]
    with process(argv, ctx.tmp / "wrk-profile.log", env=env):
        time.sleep(1.0)
        return record(pyspy, d.pid, out, seconds)


def record(pyspy: str, pid: int, out: Path, seconds: int) -> str:
    argv = [pyspy, "record", "--nonblocking", "-d", str(seconds), "-f", "raw", "-o", str(out),
            "-p", str(pid)]
    subprocess.run(argv, capture_output=True, timeout=seconds + 60, check=True)
    return profile_top.load(out).top(20)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="runs of every measurement (default 3)")
    p.add_argument("--duration", type=float, default=10, help="seconds of each wrk run (default 10)")
    p.add_argument("--only", default=",".join(MEASUREMENTS),
                   help="comma-separated subset of ingest,dispatch,memory")
    p.add_argument("--compare", action="append", default=[], type=go_style_target, metavar="NAME=CMD",
                   help="another daemon, started as CMD -listen ADDR -pool-size 50 -pool-queue-size N")
    p.add_argument("--backlog", type=int, default=50_000, help="jobs in the drain run (default 50000)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write every sample here")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="also record py-spy profiles of bwp (ingest and drain) into DIR")
    p.add_argument("--profile-of", default="bwp", metavar="NAME",
                   help="the target --profile records (default bwp; e.g. bwp+rabbitmq)")
    p.add_argument("--bwp", help="the bwp command (default: `bwp` on PATH or beside this python)")
    p.add_argument("--python", help="interpreter with aiohttp+uvloop for the bare ceilings")
    p.add_argument("--processes", type=int, action="append", default=[], metavar="N",
                   help="also run bwp with `processes: N` (repeatable)")
    p.add_argument("--journal", type=Path, metavar="DIR",
                   help="also run bwp with its journal in a fresh directory under DIR (a real disk)")
    p.add_argument("--rabbitmq", metavar="URL|start",
                   help="also run bwp with its queues in RabbitMQ (a fresh prefix each start): "
                        "an amqp:// URL on 127.0.0.1, or `start` for a node of its own (needs "
                        "Debian's rabbitmq-server)")
    args = p.parse_args(argv)
    args.only = {m.strip() for m in args.only.split(",") if m.strip()}
    if not args.only <= set(MEASUREMENTS):
        p.error(f"--only takes {','.join(MEASUREMENTS)}")
    return args


def step(results: Results, label: str, column: str, fn: Callable[[], Sample]) -> None:
    start = time.monotonic()
    sample = fn()
    results.add(column, sample)
    shown = ", ".join(f"{k}={v:,.2f}" for k, v in sample.items())
    log(f"{label} {column} ({time.monotonic() - start:.0f}s): {shown}")


def run_all(args: argparse.Namespace, ctx: Context, targets: list[Target]) -> Results:
    """Every measurement of every target once per run, ceilings first, targets interleaved."""
    results = Results()
    for run in range(1, args.runs + 1):
        label = f"run {run}/{args.runs}"
        if "ingest" in args.only:
            step(results, f"{label} ingest ceiling", "bare-server", partial(measure_bare_server, ctx))
        if "dispatch" in args.only:
            step(results, f"{label} dispatch ceiling", "bare-client", partial(measure_bare_client, ctx))
            step(results, f"{label} sink ceiling", "sink", partial(measure_sink, ctx))
        for t in targets:
            if "ingest" in args.only:
                step(results, f"{label} ingest", t.name, partial(measure_ingest, ctx, t))
                step(results, f"{label} ingest alone", t.name, partial(measure_ingest_alone, ctx, t))
            if "dispatch" in args.only:
                step(results, f"{label} dispatch under load", t.name, partial(measure_load, ctx, t))
                step(results, f"{label} drain", t.name, partial(measure_drain, ctx, t))
            if "memory" in args.only:
                step(results, f"{label} memory", t.name, partial(measure_memory, ctx, t))
    return results


def report(args: argparse.Namespace, info: dict[str, str], results: Results, targets: list[str],
           profiles: dict[str, str]) -> str:
    parts = ["machine: " + ", ".join(f"{k} {v}" for k, v in info.items()),
             f"runs: {args.runs}, wrk: -t1 -c{CONNECTIONS} -d{args.duration:g}s, pool size "
             f"{POOL_SIZE}, drain backlog {args.backlog}; cells: median (min–max); ratios are "
             "medians of per-run ratios; X/bare: submits/s over the bare aiohttp server's req/s, "
             "delivered/s over the bare aiohttp client's req/s", "", main_table(results, targets)]
    ceilings = ceiling_table(results)
    if ceilings:
        parts += ["", ceilings]
    for name, text in profiles.items():
        parts += ["", f"py-spy, bwp during {name}:", text]
    return "\n".join(parts)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # so every finally block runs
    started = time.monotonic()
    try:
        ensure_tool("wrk", "wrk")
        ensure_tool("nginx", "nginx")
        bwp = args.bwp or find_bwp()
        python = args.python or helper_python(bwp)
        targets = [bwp_target(bwp), *args.compare]
        info = machine_info(python)
        with contextlib.ExitStack() as stack:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bwp-bench-"))
            sink = stack.enter_context(nginx_sink(Path(tmp)))
            if args.journal:
                journals = stack.enter_context(tempfile.TemporaryDirectory(
                    prefix="bwp-bench-journal-", dir=args.journal))
                targets.insert(1, configured_target("bwp+journal", bwp, Path(journals), lambda run: {
                    "journal": {"path": str(run / "journal")}}))
            if args.rabbitmq:
                url, node_pid = args.rabbitmq, 0
                if url == "start":
                    node = stack.enter_context(rabbitmq_node())
                    url, node_pid = node.url, node.pid
                targets.insert(1, configured_target("bwp+rabbitmq", bwp, Path(tmp), lambda run: {
                    "rabbitmq": {"url": url, "prefix": "bench-" + run.name.replace("+", "-")}},
                    broker_pid=node_pid))
            for n in args.processes:
                targets.insert(1, configured_target(f"bwp-{n}p", bwp, Path(tmp),
                                                    lambda run, n=n: {"processes": n}, n))
            ctx = Context(Path(tmp), sink, python, args.duration, args.backlog)
            results = run_all(args, ctx, targets)
            profiles = {}
            if args.profile:
                profiled = next((t for t in targets if t.name == args.profile_of), None)
                if profiled is None:
                    raise BenchError(f"--profile-of {args.profile_of}: no such target")
                profiles = profile_bwp(ctx, profiled, args.profile)
    except BenchError as e:
        log(f"bench: {e}")
        return 1
    except KeyboardInterrupt:
        log("bench: interrupted (every process it started has been stopped)")
        return 130
    print(report(args, info, results, [t.name for t in targets], profiles))
    log(f"total time {time.monotonic() - started:.0f}s")
    if args.json:
        data = {"machine": info, "args": {"runs": args.runs, "duration": args.duration,
                                          "backlog": args.backlog, "targets": [t.name for t in targets]},
                "samples": results.samples}
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
