#!/usr/bin/env python3
"""Soak bwp: mixed load for a long time against a sink that misbehaves; watch for leaks and
lost jobs.

    python scripts/soak.py                                  # 10 minutes, 200 submits/s
    python scripts/soak.py --duration 150 --json soak.json  # a shorter run, samples saved
    python scripts/soak.py --bwp-cmd "/opt/bwp/bin/bwp"     # another build (given `serve -c FILE`)
    python scripts/soak.py --rabbitmq start                 # queues in a RabbitMQ node it starts

The script starts a sink on 127.0.0.1 that answers each request at random (--mix): 200, 500,
200 after 0.5–3 s (the daemon's read timeout is 1.5 s, so some of those time out), or a TCP
reset. It starts bwp with three queues: `default` (no retries), `retrying` (2 retries, short
backoff) and `bulk`, history on. Then it submits at --rate: single jobs, arrays, clones,
delayed jobs, `unique` ids, `wait`, callbacks to the sink, hostMetrics, named queues, a few
invalid submissions (400 expected) and GET /jobs/{id} polls.

Every --sample-every seconds it records the daemon's RSS and open fds (from /proc), its asyncio
task count and job counters (from /metrics). At the end it stops the load, waits for the queues
to drain, closes every connection and prints the samples and these checks (exit 1 if one fails):

  reconciliation  at every sample, accepted + replayed + callbacks = succeeded + failed + pending
                  (pending: queue length + busy workers); after the drain pending = 0 and the
                  accepted count equals the ids the load generator got back (with --rabbitmq
                  at the end only: the broker's queue length leaves out the jobs in its delay
                  levels and those it has handed to workers, so other samples cannot balance)
  rss             RSS after the drain at most --max-rss-growth % over RSS after --warmup s
  fds, tasks      open fds and asyncio tasks with no connection open: the same before and after
  answers         no unexpected status (400 for a valid submission, 200 for an invalid one, ...)
  exit            bwp stops on SIGTERM with exit code 0 and no job abandoned

All traffic stays on 127.0.0.1. The daemon is stopped by its pid (SIGTERM, SIGKILL after 15 s).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import itertools
import json
import os
import random
import re
import shlex
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from bench import (
    HOST,
    BenchError,
    free_port,
    log,
    markdown_table,
    process,
    rabbitmq_node,
    rss_bytes,
    wait_http,
)
from prometheus_client.parser import text_string_to_metric_families

QUEUES = ("default", "retrying", "bulk")
QUEUE_WEIGHTS = (60, 25, 15)
SLOW_SECONDS = (0.5, 3.0)  # a slow answer's delay, uniform: around the 1.5 s read timeout
UNIQUE_IDS = 200  # unique jobs reuse this many ids, so some are skipped as duplicates
WAIT_SECONDS = 3.0  # `wait` submits: a retried or slow job can outlast it (504)
MAX_INFLIGHT = 256  # submits in flight at once; past it the load generator skips a beat
CLIENT_TIMEOUT = 30.0  # per submit: far above WAIT_SECONDS, so every answer is seen
STOP_GRACE = 15.0  # seconds between SIGTERM and SIGKILL (the config's drain_timeout is 10)
MIB = 1024 * 1024

# What each submit is, with its share of the load; every job inside also picks a queue, and
# may be a JSON POST and carry hostMetrics.
SHAPES = {"single": 30, "batch": 10, "clones": 8, "delayed": 8, "unique": 8, "wait": 5,
          "callback": 8, "invalid": 5, "poll": 18}
SINK_ACTIONS = ("ok", "error", "slow", "reset")
DEFAULT_MIX = "ok=70,error=12,slow=10,reset=8"


def daemon_config(port: int, journal: Path | None, rabbitmq: str | None = None) -> dict[str, Any]:
    """Enough workers that 200 submits/s do not fill the queues: refusals are not the point."""
    cfg: dict[str, Any] = {"journal": {"path": str(journal)}} if journal else {}
    if rabbitmq:
        cfg["rabbitmq"] = {"url": rabbitmq, "prefix": f"soak-{os.getpid()}-{int(time.time())}"}
    return cfg | {
        "listen": [f"{HOST}:{port}"],
        "drain_timeout": 10,
        "log_level": "info",  # >= 400 answers, timeouts and resets: some lines per second
        "pool": {"size": 50, "queue_size": 5000},
        "queues": {
            "retrying": {"size": 25, "queue_size": 3000,
                         "retry": {"attempts": 2, "backoff": 0.2, "factor": 2, "max_backoff": 1}},
            "bulk": {"size": 15, "queue_size": 2000},
        },
        "client": {"connect_timeout": 1, "read_timeout": 1.5},
        "history": {"max_jobs": 10000, "max_age": 600},
    }


# --------------------------------------------------------------------------- sink


@dataclasses.dataclass
class SinkStats:
    actions: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    callbacks: int = 0


class SinkProtocol(asyncio.Protocol):
    """HTTP/1.1 with keep-alive, one request at a time (bwp never pipelines). Bodies come with
    Content-Length: bwp sends bytes, never chunked."""

    def __init__(self, sink: Sink):
        self.sink = sink
        self.buf = bytearray()
        self.busy = False  # a slow answer is pending: later bytes wait in buf
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.sink.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.sink.connections.discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._next()

    def _next(self) -> None:
        while not self.busy and self.transport is not None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1")
            size = end + 4 + _content_length(head)
            if len(self.buf) < size:
                return
            del self.buf[:size]
            self._answer(head.split(" ", 2)[1])

    def _answer(self, path: str) -> None:
        action = self.sink.pick(path)
        if action == "reset":
            self.reset()
        elif action == "slow":
            self.busy = True
            delay = self.sink.rng.uniform(*SLOW_SECONDS)
            asyncio.get_running_loop().call_later(delay, self._reply, 200)
        else:
            self._reply(200 if action == "ok" else 500)

    def _reply(self, status: int) -> None:
        self.busy = False
        if self.transport is None:
            return  # the daemon gave up waiting (read timeout) and closed the connection
        reason = "OK" if status == 200 else "Internal Server Error"
        self.transport.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
                             "Content-Length: 2\r\n\r\nok".encode())
        self._next()

    def reset(self) -> None:
        """Close with SO_LINGER 0: the kernel sends RST instead of FIN."""
        assert self.transport is not None
        sock = self.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()


def _content_length(head: str) -> int:
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            return int(value)
    return 0


class Sink:
    def __init__(self, mix: dict[str, float], rng: random.Random):
        self.actions, self.weights = list(mix), list(mix.values())
        self.rng = rng
        self.stats = SinkStats()
        self.connections: set[SinkProtocol] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: SinkProtocol(self), HOST, 0, backlog=1024)
        self.port = self.server.sockets[0].getsockname()[1]

    def url(self, path: str) -> str:
        return f"http://{HOST}:{self.port}{path}"

    def pick(self, path: str) -> str:
        action = self.rng.choices(self.actions, self.weights)[0]
        self.stats.actions[action] += 1
        self.stats.callbacks += path.startswith("/cb")
        return action

    def close_connections(self) -> None:
        """So the daemon's pooled keep-alive connections go away before the idle sample."""
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.close_connections()
            await self.server.wait_closed()


# --------------------------------------------------------------------------- load


@dataclasses.dataclass
class LoadStats:
    answers: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    unexpected: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    ids: int = 0  # job ids the daemon answered with (200, and 504 for `wait`)
    duplicates: int = 0
    skipped: int = 0  # beats skipped with MAX_INFLIGHT submits in flight


# status codes each kind of request may get; anything else is a failure
EXPECTED = {"invalid": {400, 503}, "poll": {200, 404}, "wait": {200, 503, 504}}
EXPECTED_SUBMIT = {200, 503}


class Load:
    """Submits at a fixed rate from one task; each submit runs as its own task."""

    def __init__(self, base: str, sink: Sink, rng: random.Random):
        self.base, self.sink, self.rng = base, sink, rng
        self.stats = LoadStats()
        self.recent: collections.deque[str] = collections.deque(maxlen=2000)  # ids to poll
        self.seq = itertools.count()
        self.shapes, self.shape_weights = list(SHAPES), list(SHAPES.values())
        self.invalid = self._invalid_bodies()

    async def run(self, session: aiohttp.ClientSession, rate: float, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        inflight: set[asyncio.Task[None]] = set()
        start = loop.time()
        for beat in itertools.count(1):
            due = start + beat / rate
            if due > start + seconds:
                break
            await asyncio.sleep(due - loop.time())
            if len(inflight) >= MAX_INFLIGHT:
                self.stats.skipped += 1
                continue
            task = loop.create_task(self.one(session))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
        await asyncio.gather(*inflight)

    async def one(self, session: aiohttp.ClientSession) -> None:
        kind = self.rng.choices(self.shapes, self.shape_weights)[0]
        try:
            if kind == "poll":
                status = await self.poll(session)
            else:
                status = await self.submit(session, kind, self.body(kind))
        except (aiohttp.ClientError, TimeoutError) as e:
            self.stats.unexpected[f"{kind}: {type(e).__name__}"] += 1
            return
        self.stats.answers[f"{kind} {status}"] += 1
        if status not in EXPECTED.get(kind, EXPECTED_SUBMIT):
            self.stats.unexpected[f"{kind} {status}"] += 1

    async def submit(self, session: aiohttp.ClientSession, kind: str, body: bytes) -> int:
        async with session.post(self.base + "/post/http", data=body,
                                headers={"Content-Type": "application/json"}) as r:
            answer = await r.json(content_type=None)
        if r.status in (200, 504):  # a 504 of `wait` lists the ids too: they were accepted
            ids = answer["ids"]
            self.stats.ids += len(ids)
            self.stats.duplicates += len(answer.get("duplicates", ()))
            self.recent.extend(ids)
        return r.status

    async def poll(self, session: aiohttp.ClientSession) -> int:
        job_id = self.rng.choice(self.recent) if self.recent else "never-submitted"
        async with session.get(f"{self.base}/jobs/{job_id}") as r:
            await r.read()
        return r.status

    def body(self, kind: str) -> bytes:
        if kind == "invalid":
            return self.rng.choice(self.invalid)
        rng = self.rng
        payload: Any = self.job()
        if kind == "batch":
            payload = [payload, *(self.job() for _ in range(rng.randint(1, 9)))]
        elif kind == "clones":
            payload["clones"] = [{"url": self.job_url(), "parameters": {"clone": str(i)}}
                                 for i in range(rng.randint(2, 5))]
        elif kind == "delayed":
            payload["delay"] = rng.choice([round(rng.uniform(0.1, 3.0), 2), "PT1S", "PT2.5S"])
        elif kind == "unique":
            # a delayed one stays pending for a second: a later one with its id is skipped
            payload |= {"id": f"u-{rng.randrange(UNIQUE_IDS)}", "unique": True,
                        "delay": rng.choice((0, 1))}
        elif kind == "wait":
            payload["wait"] = WAIT_SECONDS
        elif kind == "callback":
            payload["callback"] = self.sink.url("/cb")
        return json.dumps(payload).encode()

    def job(self) -> dict[str, Any]:
        rng = self.rng
        job: dict[str, Any] = {"url": self.job_url()}
        if rng.random() < 0.3:
            job |= {"method": "POST", "json": {"n": rng.randrange(10**6), "pad": "x" * 200}}
        queue = rng.choices(QUEUES, QUEUE_WEIGHTS)[0]
        if queue != "default":
            job["queue"] = queue
        if rng.random() < 0.2:
            job["hostMetrics"] = True
        return job

    def job_url(self) -> str:
        return self.sink.url(f"/job/{next(self.seq)}?shop=soak")

    def _invalid_bodies(self) -> list[bytes]:
        """Each refused as a whole (400): the last one checks a batch is all or nothing."""
        url = self.sink.url("/never")
        docs: list[Any] = [
            {"method": "GET"}, {"url": "ftp://127.0.0.1/x"}, {"url": url, "queue": "nope"},
            {"url": url, "body": "***"}, {"url": url, "headers": {"X-A": "a\r\nb"}},
            [{"url": url}, {"url": url, "retries": -1}],
        ]
        return [b"{not json", *(json.dumps(d).encode() for d in docs)]


# --------------------------------------------------------------------------- samples


@dataclasses.dataclass
class Sample:
    t: float  # seconds since the load started (negative: before it)
    phase: str  # idle, load, drained, idle-end
    rss_mib: float
    fds: int
    tasks: float
    load_ids: int  # ids the load generator has got back so far
    accepted: float
    replayed: float
    callbacks: float
    succeeded: float
    failed: float
    queued: float
    busy: float

    @property
    def pending(self) -> float:
        return self.queued + self.busy

    @property
    def balance(self) -> float:
        """Zero when every job the daemon took in is finished or still pending."""
        return (self.accepted + self.replayed + self.callbacks
                - self.succeeded - self.failed - self.pending)


def metric_totals(text: str) -> dict[str, float]:
    """Each sample name's value summed over its labels (queues)."""
    totals: dict[str, float] = collections.defaultdict(float)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            totals[s.name] += s.value
    return totals


class Sampler:
    def __init__(self, base: str, pid: int, load: Load):
        self.base, self.pid, self.load = base, pid, load
        self.samples: list[Sample] = []
        self.t0 = time.monotonic()

    async def take(self, session: aiohttp.ClientSession, phase: str) -> Sample:
        # /metrics first: the page is rendered in one go, so its counters are one consistent
        # snapshot; /proc is read right after it
        async with session.get(self.base + "/metrics") as r:
            m = metric_totals(await r.text())
        s = Sample(
            t=round(time.monotonic() - self.t0, 1), phase=phase,
            rss_mib=rss_bytes(self.pid) / MIB, fds=len(os.listdir(f"/proc/{self.pid}/fd")),
            tasks=m["bwp_asyncio_tasks"], load_ids=self.load.stats.ids,
            accepted=m["bwp_jobs_accepted_total"], replayed=m["bwp_jobs_replayed_total"],
            callbacks=m["bwp_callbacks_total"], succeeded=m["bwp_jobs_succeeded_total"],
            failed=m["bwp_jobs_failed_total"], queued=m["bwp_queue_length"],
            busy=m["bwp_busy_workers"])
        self.samples.append(s)
        log(f"t={s.t:6.1f}s {phase:8} rss {s.rss_mib:6.1f} MiB  fds {s.fds:4}  tasks "
            f"{s.tasks:4.0f}  accepted {s.accepted:8.0f}  pending {s.pending:5.0f}  "
            f"balance {s.balance:+.0f}")
        return s

    async def every(self, session: aiohttp.ClientSession, seconds: float) -> None:
        """Sample until cancelled."""
        while True:
            await asyncio.sleep(seconds)
            await self.take(session, "load")

    async def drain(self, session: aiohttp.ClientSession, timeout: float) -> Sample:
        """Sample until nothing is pending, or for `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            s = await self.take(session, "drained")
            if s.pending == 0 or time.monotonic() > deadline:
                return s
            await asyncio.sleep(1.0)


# --------------------------------------------------------------------------- run


@dataclasses.dataclass
class SoakResult:
    samples: list[Sample]
    load: LoadStats
    sink: SinkStats
    warm: Sample  # the first sample at or after the warm-up


async def soak(args: argparse.Namespace, port: int, pid: int, sink: Sink) -> SoakResult:
    base = f"http://{HOST}:{port}"
    load = Load(base, sink, random.Random(args.seed))
    sampler = Sampler(base, pid, load)
    # samples on fresh connections: none of ours stays open for the idle fd and task counts
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as probe:
        await sampler.take(probe, "idle")
        timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout,
                                         connector=aiohttp.TCPConnector(limit=MAX_INFLIGHT)) as s:
            sampler.t0 = time.monotonic()
            ticker = asyncio.create_task(sampler.every(probe, args.sample_every))
            try:
                await load.run(s, args.rate, args.duration)
            finally:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
        await sampler.drain(probe, args.drain_timeout)
        sink.close_connections()
        await asyncio.sleep(1.0)  # for the daemon to see the closes and end their tasks
        await sampler.take(probe, "idle-end")
    warmup = min(args.warmup, args.duration / 2)
    warm = next((s for s in sampler.samples if s.phase != "idle" and s.t >= warmup),
                sampler.samples[-1])
    return SoakResult(sampler.samples, load.stats, sink.stats, warm)


async def run_soak(args: argparse.Namespace, port: int, pid: int) -> SoakResult:
    sink = Sink(args.mix, random.Random(-args.seed))  # not the load's sequence
    await sink.start()
    try:
        return await soak(args, port, pid, sink)
    finally:
        await sink.stop()


# --------------------------------------------------------------------------- report


@dataclasses.dataclass
class Check:
    name: str
    ok: bool
    detail: str


def checks(args: argparse.Namespace, out: SoakResult, exit_code: int | None,
           daemon_log: DaemonLog) -> list[Check]:
    samples = out.samples
    first, drained, end = samples[0], samples[-2], samples[-1]
    unbalanced = [s for s in (samples[-1:] if args.rabbitmq else samples) if s.balance != 0]
    recon_ok = not unbalanced and drained.pending == 0 and end.accepted == out.load.ids
    recon = (f"{len(samples) - len(unbalanced)}/{len(samples)} samples balanced; after the drain "
             f"accepted {end.accepted:.0f} + callbacks {end.callbacks:.0f} + replayed "
             f"{end.replayed:.0f} = succeeded {end.succeeded:.0f} + failed {end.failed:.0f} + "
             f"pending {drained.pending:.0f}; ids received by the load generator {out.load.ids}")
    growth = 100 * (drained.rss_mib - out.warm.rss_mib) / out.warm.rss_mib
    unexpected = sum(out.load.unexpected.values())
    return [
        Check("reconciliation", recon_ok, recon),
        Check("rss", growth <= args.max_rss_growth,
              f"{out.warm.rss_mib:.1f} MiB at t={out.warm.t:g}s -> {drained.rss_mib:.1f} MiB after "
              f"the drain ({growth:+.1f} %, limit {args.max_rss_growth:g} %); "
              f"{first.rss_mib:.1f} MiB idle before the load"),
        Check("fds", end.fds - first.fds <= args.max_fd_growth,
              f"{first.fds} idle before -> {end.fds} idle after (limit +{args.max_fd_growth}); "
              f"max {max(s.fds for s in samples)} under load"),
        Check("tasks", end.tasks == first.tasks,
              f"{first.tasks:.0f} idle before -> {end.tasks:.0f} idle after; max "
              f"{max(s.tasks for s in samples):.0f} under load"),
        Check("answers", unexpected == 0,
              f"{unexpected} unexpected" + (f": {dict(out.load.unexpected)}" if unexpected else "")),
        Check("exit", exit_code == 0 and daemon_log.abandoned == 0,
              f"exit code {exit_code}, {daemon_log.abandoned} jobs abandoned"),
    ]


def sample_table(samples: list[Sample]) -> str:
    header = ["t s", "phase", "RSS MiB", "fds", "tasks", "ids got", "accepted", "callbacks",
              "succeeded", "failed", "pending", "queued", "balance"]
    rows = [[f"{s.t:g}", s.phase, f"{s.rss_mib:.1f}", str(s.fds), f"{s.tasks:.0f}", str(s.load_ids),
             *(f"{v:.0f}" for v in (s.accepted, s.callbacks, s.succeeded, s.failed, s.pending,
                                    s.queued)), f"{s.balance:+.0f}"] for s in samples]
    return markdown_table(header, rows)


def counter_table(title: str, counts: collections.Counter[str]) -> str:
    return markdown_table([title, "count"], [[k, str(v)] for k, v in sorted(counts.items())])


_LEVEL = re.compile(r" bwp\[\d+\] ([A-Z]+) ")
_STOPPED = re.compile(r"stopped \((\d+) jobs abandoned\)")


@dataclasses.dataclass
class DaemonLog:
    levels: collections.Counter[str]  # lines per level, and tracebacks
    errors: list[str]  # the first distinct error lines, numbers masked so repeats show once
    abandoned: int | None  # from the last line of a clean stop


def read_log(path: Path, shown: int = 10) -> DaemonLog:
    levels: collections.Counter[str] = collections.Counter()
    errors: dict[str, None] = {}
    abandoned = None
    for line in path.read_text(errors="replace").splitlines():
        if stopped := _STOPPED.search(line):
            abandoned = int(stopped.group(1))
        m = _LEVEL.search(line)
        level = "TRACEBACK" if line.startswith("Traceback") else m.group(1) if m else None
        if level is None:
            continue
        levels[level] += 1
        if level in ("ERROR", "CRITICAL", "TRACEBACK") and len(errors) < shown:
            errors[re.sub(r"\d+", "N", line.split(": ", 1)[-1])] = None
    return DaemonLog(levels, list(errors), abandoned)


def report(args: argparse.Namespace, out: SoakResult, results: list[Check],
           daemon_log: DaemonLog) -> str:
    parts = [f"soak: {args.duration:g}s at {args.rate:g} submits/s, mix {args.mix}, seed {args.seed}",
             "", sample_table(out.samples), "",
             counter_table("load: request and answer", out.load.answers), "",
             f"load: {out.load.ids} ids received, {out.load.duplicates} duplicates skipped by "
             f"`unique`, {out.load.skipped} beats skipped (too many in flight)",
             f"sink: {dict(out.sink.actions)}, {out.sink.callbacks} of them callbacks",
             f"daemon log: {dict(daemon_log.levels) or 'empty'}"]
    parts += [f"  {line}" for line in daemon_log.errors]
    parts += [""] + [f"{'PASS' if c.ok else 'FAIL'} {c.name}: {c.detail}" for c in results]
    return "\n".join(parts)


def _fields(obj: Any) -> dict[str, Any]:
    """asdict() would rebuild each Counter from its items, making (key, count) pairs keys."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def save_json(path: Path, args: argparse.Namespace, out: SoakResult, results: list[Check]) -> None:
    data = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "samples": [dataclasses.asdict(s) | {"pending": s.pending, "balance": s.balance}
                    for s in out.samples],
        "load": _fields(out.load), "sink": _fields(out.sink),
        "checks": [dataclasses.asdict(c) for c in results],
    }
    path.write_text(json.dumps(data, indent=2) + "\n")


# --------------------------------------------------------------------------- main


def parse_mix(text: str) -> dict[str, float]:
    mix: dict[str, float] = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        if name.strip() not in SINK_ACTIONS:
            raise argparse.ArgumentTypeError(f"--mix: {name.strip()!r} is not one of {SINK_ACTIONS}")
        try:
            mix[name.strip()] = float(weight)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--mix: {part!r} wants NAME=WEIGHT") from None
    if sum(mix.values()) <= 0:
        raise argparse.ArgumentTypeError("--mix: the weights add up to nothing")
    return mix


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=600, help="seconds of load (default 600)")
    p.add_argument("--rate", type=float, default=200, help="submits per second (default 200)")
    p.add_argument("--sample-every", type=float, default=10, help="seconds between samples (10)")
    p.add_argument("--warmup", type=float, default=60,
                   help="RSS growth is measured from the first sample after this (default 60 s, "
                        "at most half the duration)")
    p.add_argument("--mix", type=parse_mix, default=parse_mix(DEFAULT_MIX),
                   help=f"the sink's answers, NAME=WEIGHT of {','.join(SINK_ACTIONS)} "
                        f"(default {DEFAULT_MIX})")
    p.add_argument("--bwp-cmd", default=f"{shlex.quote(sys.executable)} -m bwp",
                   help="command that runs bwp, given `serve -c FILE` (default: this python -m bwp)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the samples and counts here")
    p.add_argument("--journal", action="store_true",
                   help="run bwp with its journal on (in the temporary directory)")
    p.add_argument("--rabbitmq", metavar="URL|start",
                   help="run bwp with its queues in RabbitMQ: an amqp:// URL on 127.0.0.1, or "
                        "`start` for a node of its own (needs Debian's rabbitmq-server)")
    p.add_argument("--log", type=Path, metavar="FILE", help="keep the daemon's log here")
    p.add_argument("--seed", type=int, default=1, help="random seed of the load and the sink")
    p.add_argument("--drain-timeout", type=float, default=60,
                   help="seconds to wait for the queues to empty after the load (default 60)")
    p.add_argument("--max-rss-growth", type=float, default=10, help="percent (default 10)")
    p.add_argument("--max-fd-growth", type=int, default=3, help="fds (default 3)")
    return p.parse_args(argv)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace, tmp: Path) -> tuple[SoakResult, int | None, Path]:
    """Start bwp, soak it, stop it by pid; the outcome, its exit code and its log."""
    port = free_port()
    config = tmp / "bwp.yaml"
    journal = tmp / "journal" if args.journal else None
    logfile = args.log or tmp / "bwp.log"
    argv = [*shlex.split(args.bwp_cmd), "serve", "-c", str(config)]
    proc: subprocess.Popen[bytes]
    with contextlib.ExitStack() as stack:
        url = args.rabbitmq
        if url == "start":
            url = stack.enter_context(rabbitmq_node()).url
        config.write_text(json.dumps(daemon_config(port, journal, url), indent=2))  # JSON is YAML
        proc = stack.enter_context(process(argv, logfile, grace=STOP_GRACE))
        wait_http(port, "/healthz", proc, logfile)
        outcome = asyncio.run(run_soak(args, port, proc.pid))
    return outcome, proc.returncode, logfile


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # so every finally block runs
    try:
        with tempfile.TemporaryDirectory(prefix="bwp-soak-") as tmp:
            outcome, exit_code, logfile = run(args, Path(tmp))
            daemon_log = read_log(logfile)
        results = checks(args, outcome, exit_code, daemon_log)
        print(report(args, outcome, results, daemon_log))
    except BenchError as e:
        log(f"soak: {e}")
        return 2
    except KeyboardInterrupt:
        log("soak: interrupted (bwp has been stopped)")
        return 130
    if args.json:
        save_json(args.json, args, outcome, results)
    return 0 if all(c.ok for c in results) else 1


if __name__ == "__main__":
    sys.exit(main())
