"""The on-disk journal: accepted jobs survive kill -9 and a drain deadline (at-least-once)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import json
import os
import resource
import signal
import time
from collections import Counter

import pytest
from conftest import Sink

from bwp.config import QueueConfig
from bwp.jobs import Job
from bwp.journal import SUFFIX, Journal, claim_orphans
from bwp.metrics import Metrics
from bwp.store import MemoryStore


def journal_files(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(SUFFIX))


def paths(received) -> Counter[str]:
    return Counter(r.path_qs for r in received)


async def test_kill_9_loses_no_accepted_job(make_daemon, make_sink, tmp_path):
    hanging = await make_sink(delay=60)  # holds both workers' requests until the crash
    journal = tmp_path / "journal"
    cfg = {"journal": {"path": str(journal)}, "pool": {"size": 2},
           "client": {"read_timeout": 120}}
    d = await make_daemon(cfg)
    t0 = time.time()
    expected = [f"/single/{i}" for i in range(20)]
    for i in range(20):
        status, body, _ = await d.post({"url": hanging.url(f"/single/{i}"), "id": f"single-{i}",
                                        "method": "POST", "json": {"n": i}})
        assert status == 200, body
    status, body, _ = await d.post({"url": hanging.url("/clone/root"), "clones": [
        {"url": hanging.url(f"/clone/{i}")} for i in range(5)]})
    assert status == 200 and len(body["ids"]) == 5
    expected += [f"/clone/{i}" for i in range(5)]
    status, _, _ = await d.post({"url": hanging.url("/delayed"), "id": "delayed", "delay": 3})
    assert status == 200
    expected.append("/delayed")
    await hanging.wait_for(2)  # both workers are stuck inside a request
    await d.stop(signal.SIGKILL)
    assert journal_files(journal)  # the dead process's file is left behind

    before = len(hanging.received)
    hanging.delay = 0
    d2 = await make_daemon(cfg)
    await hanging.wait_for(before + len(expected), timeout=20)
    await hanging.settle(0.5)
    after = paths(hanging.received[before:])
    # Every accepted job arrives, once: the two cut off mid-request are sent again.
    assert after == Counter(expected)
    assert await d2.metric("bwp_jobs_recovered_total", queue="default") == len(expected)
    delayed = next(r for r in hanging.received if r.path_qs == "/delayed")
    assert delayed.at - t0 >= 3  # its delay was kept
    body = next(r for r in hanging.received[before:] if r.path_qs == "/single/7").body
    assert body == b'{"n": 7}' or body == b'{"n":7}'
    doc = await d2.wait_state("single-7", "succeeded")
    assert doc["attempts"] == 1
    # The old file was taken over and removed; a clean stop leaves nothing behind.
    assert len(journal_files(journal)) == 1
    assert await d2.stop() == 0
    assert journal_files(journal) == []


async def test_reload_past_the_drain_deadline_leaves_jobs_to_the_successor(
        make_daemon, make_sink, tmp_path):
    # 12 in a row take 6 s: some are left at the 0.5 s deadline even if the new process
    # takes 5 s to serve (a busy machine took up to 4.5 s)
    slow: Sink = await make_sink(delay=0.5)
    journal = tmp_path / "journal"
    d = await make_daemon({"journal": {"path": str(journal)}, "pool": {"size": 1},
                           "drain_timeout": 0.5, "pidfile": str(tmp_path / "bwp.pid")})
    old = d.proc.pid
    status, body, _ = await d.post([{"url": slow.url(f"/{i}"), "id": f"job-{i}"}
                                    for i in range(12)])
    assert status == 200, body
    await slow.wait_for(1)
    os.kill(old, signal.SIGHUP)
    assert await asyncio.wait_for(d.proc.wait(), 15) == 0
    assert "unfinished jobs stay in the journal" in d.output()
    assert "abandoned job" not in d.output()
    new = d.pidfile_pid()
    assert new != old
    # The successor takes the old file over once its process is gone.
    await slow.wait_for(12, timeout=20)
    await d.wait_state("job-11", "succeeded", timeout=20)  # the new process knows it
    await slow.settle(0.5)
    got = paths(slow.received)
    assert set(got) == {f"/{i}" for i in range(12)}
    # At most the one request cut off at the deadline went twice (pool size 1).
    assert sum(got.values()) - 12 <= 1, got
    assert await d.metric("bwp_jobs_abandoned_total", queue="default") == 0


async def test_retrying_job_keeps_its_attempts_across_a_crash(make_daemon, make_sink, tmp_path):
    flaky = await make_sink(status=503)
    journal = tmp_path / "journal"
    cfg = {"journal": {"path": str(journal)},
           "pool": {"retry": {"attempts": 3, "backoff": 1.5, "factor": 1}}}
    d = await make_daemon(cfg)
    status, _, _ = await d.post({"url": flaky.url("/x"), "id": "flaky"})
    assert status == 200
    await flaky.wait_for(2, timeout=10)  # attempts 1 and 2 failed
    doc = await d.wait_state("flaky", "retrying")
    attempts = doc["attempts"]
    await d.stop(signal.SIGKILL)
    d2 = await make_daemon(cfg)
    doc = await d2.wait_state("flaky", "failed", timeout=15)
    assert doc["attempts"] == 4  # 1 + 3 retries in all: the count survived the crash
    assert attempts >= 2


async def test_compaction_keeps_live_jobs_only(make_daemon, make_sink, tmp_path):
    sink = await make_sink()
    hanging = await make_sink(delay=60)
    journal = tmp_path / "journal"
    cfg = {"journal": {"path": str(journal), "compact_size": 4096}, "pool": {"size": 1},
           "queues": {"stuck": {"size": 1}}, "client": {"read_timeout": 120}}
    d = await make_daemon(cfg)
    # One job stays live (its worker hangs, a second waits behind it) while many finish.
    await d.post({"url": hanging.url("/stuck/0"), "queue": "stuck"})
    await d.post({"url": hanging.url("/stuck/1"), "queue": "stuck"})
    for i in range(0, 300, 20):  # ~450 bytes per job: 135 KB written in all
        status, _, _ = await d.post([{"url": sink.url(f"/{j}"), "body": "eHh4" * 50}
                                     for j in range(i, i + 20)])
        assert status == 200
        await sink.wait_for(i + 20)
    await asyncio.sleep(0.3)  # the last done records written
    assert "journal compacted" in d.output()
    (name,) = journal_files(journal)
    # bounded by twice the most ever live (one round of 20) plus one round
    assert os.path.getsize(journal / name) < 32 * 1024, os.path.getsize(journal / name)
    await d.stop(signal.SIGKILL)
    hanging.delay = 0
    before = len(hanging.received)
    d2 = await make_daemon(cfg)
    await hanging.wait_for(before + 2)
    await sink.settle(0.5)
    assert paths(hanging.received[before:]) == Counter(["/stuck/0", "/stuck/1"])
    assert len(sink.received) == 300  # nothing finished came back
    await d2.stop()


async def test_unwritable_journal_refuses_to_start(make_daemon, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    d = await make_daemon({"journal": {"path": str(blocker / "journal")}}, wait=False)
    assert await asyncio.wait_for(d.proc.wait(), 10) == 1
    assert f"journal {blocker / 'journal'}" in d.output()


async def test_journal_write_failure_answers_503_and_is_repaired(make_daemon, make_sink,
                                                                  tmp_path):
    """A full disk, made real with RLIMIT_FSIZE (writes past 64 KiB fail with EFBIG): the
    submit that cannot be made durable gets a 503 naming the journal, the daemon serves on,
    and once the disk has room again the file is rewritten from memory: after a kill -9
    every job comes back, the refused-but-queued one included."""
    hanging = await make_sink(delay=60)
    settings = {"pool": {"size": 1}, "client": {"read_timeout": 120}, "log_level": "warning",
                "journal": {"path": str(tmp_path / "journal")}}
    limit = 64 * 1024

    def small_disk() -> None:  # a soft limit: the test may lift it again
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    d = await make_daemon(settings, preexec=small_disk)
    paths = []

    async def submit(path: str) -> tuple[int, dict]:
        paths.append(path)
        status, body, _ = await d.post({"url": hanging.url(path), "body": "eHh4" * 256})
        return status, body

    for i in range(200):  # ~1.4 KiB per journal record: the limit comes within 50
        status, body = await submit(f"/{i}")
        if status != 200:
            break
    assert status == 503 and "journal write failed" in body["error"], body
    assert len(body["ids"]) == 1
    assert (await d.get("/healthz"))[0] == 200
    # Room again (a real, if small, disk): the next write rewrites the whole file.
    resource.prlimit(d.proc.pid, resource.RLIMIT_FSIZE,
                     (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    status, body = await submit("/after")
    assert status == 200, body
    await d.stop(signal.SIGKILL)
    hanging.delay = 0
    before = len(hanging.received)
    d2 = await make_daemon(settings)
    await hanging.wait_for(before + len(paths), timeout=20)
    await hanging.settle(0.5)
    assert sorted(r.path_qs for r in hanging.received[before:]) == sorted(paths)
    await d2.stop()


# -- a body shared by many jobs (the clones of one root) is journaled once ------------------

def _store(directory, compact_size: int = 64 << 20) -> tuple[MemoryStore, Journal]:
    journal = Journal(str(directory), compact_size, Metrics(["default"]))
    return MemoryStore([QueueConfig("default", queue_size=100_000)], 1 << 40, journal), journal


def _records(path) -> list[list]:
    with open(path, "rb") as f:
        return [json.loads(line) for line in f]


def _job(n: int, body: bytes | None, url: str = "http://127.0.0.1:9/") -> Job:
    return Job(f"job-{n}", url, "POST", {"X-N": str(n)}, body, "default")


async def test_a_shared_body_is_written_once_and_recovered_as_one_object(tmp_path):
    body, own, small = os.urandom(64 * 1024), os.urandom(1024), b"tiny"
    clones = [_job(i, body) for i in range(500)]
    others = [_job(500, own), _job(501, small), _job(502, small), _job(503, None)]
    store, journal = _store(tmp_path)
    await store.start(lambda jobs: None)
    await store.admit([*clones[:250], *others, *clones[250:]])
    records = _records(journal.path)
    # One copy of the shared body, before every record naming it; the rest inline as before.
    assert [r[0] for r in records].count("b") == 1 and records[0][0] == "b"
    assert base64.b64decode(records[0][2]) == body
    named = [r[2] for r in records if r[0] == "a" and "body_ref" in r[2]]
    assert len(named) == 500 and {r["body_ref"] for r in named} == {records[0][1]}
    inline = {r[2]["id"]: r[2]["body"] for r in records if r[0] == "a" and "body" in r[2]}
    assert inline == {"job-500": base64.b64encode(own).decode(),  # used by one job
                      "job-501": "dGlueQ==", "job-502": "dGlueQ==",  # too short to share
                      "job-503": None}
    assert os.path.getsize(journal.path) < 4 * 64 * 1024  # 500 inline copies: 44 MB
    # A later request using the same (still live) body names it too.
    await store.admit([_job(600, body)])
    assert _records(journal.path)[-1][2]["body_ref"] == records[0][1]

    # The process stops with the jobs unfinished: the next one takes the file over.
    await store.close()
    recovered: list[Job] = []
    successor, successor_journal = _store(tmp_path)
    await successor.start(recovered.extend)
    shared = [j for j in recovered if j.body == body]
    assert len(shared) == 501 and all(j.body is shared[0].body for j in shared)
    assert sorted(j.id for j in recovered) == sorted(j.id for j in [*clones, *others, _job(600, b"")])
    assert next(j for j in recovered if j.id == "job-500").body == own
    assert next(j for j in recovered if j.id == "job-7").headers == {"X-N": "7"}
    # ... and journals them as its own, the shared body again once.
    assert [r[0] for r in _records(successor_journal.path)].count("b") == 1
    for job in recovered:
        successor.done(job)
    assert not successor_journal._bodies and not successor_journal._sharing  # released with its last job
    await successor.close()
    assert journal_files(tmp_path) == []


async def test_compaction_writes_each_shared_body_once(tmp_path):
    body, other = os.urandom(64 * 1024), os.urandom(64 * 1024)
    first = [_job(i, body) for i in range(300)]
    second = [_job(1000 + i, other) for i in range(300)]
    store, journal = _store(tmp_path, compact_size=4096)  # the first write, past 4 KiB, is a rewrite
    await store.start(lambda jobs: None)
    await store.admit(first)
    await store.admit(second)
    await store.admit([_job(2000, os.urandom(100))])
    for job in first[:-1]:
        store.done(job)
    await store.admit([_job(2001, None)])
    journal._compact_at = 0  # the next write rewrites the file (as after a failed write)
    await journal._flushed()
    records = _records(journal.path)
    bodies = {r[1]: base64.b64decode(r[2]) for r in records if r[0] == "b"}
    assert sorted(bodies.values()) == sorted([body, other])  # once each, still both in use
    jobs = {r[2]["id"]: r for r in records if r[0] == "a"}
    assert len(jobs) == 1 + 300 + 2
    assert bodies[jobs["job-299"][2]["body_ref"]] == body
    assert all(bodies[jobs[f"job-{1000 + i}"][2]["body_ref"]] == other for i in range(300))
    for job in [first[-1], *second]:
        store.done(job)
    journal._compact_at = 0
    await journal._flushed()
    assert [r[0] for r in _records(journal.path)] == ["a", "a"]  # no body of a finished job
    await store.close()


async def test_clones_of_one_body_grow_the_journal_by_one_copy(make_daemon, make_sink, tmp_path):
    """End to end: the parser gives the clones one body object, the journal writes it once,
    and a successor after kill -9 delivers every clone with it."""
    hanging = await make_sink(delay=60)  # keeps every job live (unfinished) meanwhile
    journal = tmp_path / "journal"
    cfg = {"journal": {"path": str(journal)}, "pool": {"size": 1},
           "client": {"read_timeout": 120}}
    d = await make_daemon(cfg)
    (name,) = journal_files(journal)
    body = os.urandom(64 * 1024)

    async def grows_by(root: dict) -> int:
        before = os.path.getsize(journal / name)
        status, answer, _ = await d.post({**root, "url": hanging.url("/clone"), "method": "POST",
                                          "clones": [{}] * 500})
        assert status == 200 and len(answer["ids"]) == 500, answer
        return os.path.getsize(journal / name) - before

    without = await grows_by({})
    with_body = await grows_by({"body": base64.b64encode(body).decode()})
    # The body's share of the growth: one base64 copy (87 KiB), not 500 (43 MB).
    assert with_body - without < 2 * 64 * 1024, (with_body, without)
    assert with_body < 500 * 1024
    await hanging.wait_for(1)
    await d.stop(signal.SIGKILL)

    hanging.delay = 0
    before = len(hanging.received)
    d2 = await make_daemon(cfg)
    await hanging.wait_for(before + 1000, timeout=30)  # the one under way comes again
    await hanging.settle(0.5)
    got = Counter(r.body for r in hanging.received[before:])
    assert got == {b"": 500, body: 500}
    (name,) = journal_files(journal)
    assert [r[0] for r in _records(journal / name)].count("b") == 1  # journaled once again
    await d2.stop()


# -- a damaged journal: every damaged line or job skipped and logged, every intact job kept ----

def _damaged_journal(sink: Sink, tag: str) -> tuple[bytes, dict[str, bytes], int, int]:
    """A journal file of intact jobs interleaved with damage of every kind: its content, the
    intact jobs' paths with their bodies, and how many lines and job records are damaged."""
    def a(seq: int, name: str, **fields) -> list:
        record = Job(f"{tag}-{seq}", sink.url(f"/{tag}/{name}"), "POST", {"X-Seq": str(seq)},
                     f"body of {seq}".encode(), "default").to_record()
        if "body_ref" in fields:
            del record["body"]
        return ["a", seq, {**record, **fields}]

    shared = os.urandom(300)

    def line(record: list) -> bytes:
        return json.dumps(record).encode()

    lines = [
        line(a(1, "ok-1")),
        b"[" * 100_000,  # RecursionError in json.loads
        line(a(2, "headers-list", headers=[1, 2])),
        line(a(3, "ok-3")),
        line(["r", 3, "garbage", {}]),  # a retry record of garbage: job 3 keeps its state
        line(a(4, "body-number", body=12)),
        line(a(5, "method-number", method=5)),
        line(a(6, "url-list", url=["http://127.0.0.1:9/"])),
        line(a(7, "attempts-string", attempts="1")),
        line(a(8, "not-before-string", not_before="soon")),
        line(a(9, "timeout-object", timeout={})),
        line(a(10, "id-null", id=None)),
        line(a(11, "queue-number", queue=7)),
        line(a(12, "header-value-number", headers={"X-A": 5})),
        line(a(13, "created-huge", created=1e300)),
        line(["b", 20, base64.b64encode(shared).decode()]),
        line(a(21, "shared-1", body_ref=20)),
        line(a(22, "shared-2", body_ref=20)),
        line(a(23, "missing-body", body_ref=99)),
        line(["b", 30, "not base64!"]),
        line(a(31, "bad-shared-body", body_ref=30)),
        line(a(24, "torn"))[:70],  # cut short
        b"\xff\xfe not UTF-8",
        line(["x", 1]),
        b'{"a": 1}',
        line(["a", "seq", {}]),
        line(["a", 40, "not an object"]),
        line(a(25, "ok-25")),
    ]
    intact = {f"/{tag}/ok-1": b"body of 1", f"/{tag}/ok-3": b"body of 3",
              f"/{tag}/shared-1": shared, f"/{tag}/shared-2": shared,
              f"/{tag}/ok-25": b"body of 25"}
    # damaged lines: [[[..., the r, b 30, torn, not UTF-8, x, {}, a "seq", a str; jobs: 2, 4-13, 23, 31
    return b"\n".join(lines) + b"\n", intact, 9, 13


async def _check_recovered(d, sink: Sink, tag: str, orphan, intact: dict[str, bytes],
                           damaged_lines: int, damaged_jobs: int) -> None:
    await sink.wait_for(len(intact), timeout=15)
    await sink.settle(0.5)
    got = [r for r in sink.received if r.path_qs.startswith(f"/{tag}/")]
    assert paths(got) == Counter(list(intact))  # every intact job, once; nothing damaged
    for r in got:
        assert r.body == intact[r.path_qs], r.path_qs
    assert next(r for r in got if r.path_qs.endswith("/ok-3")).headers["X-Seq"] == "3"
    out = d.output()
    assert out.count(f"{orphan}:") == damaged_lines + damaged_jobs, out  # one line each
    assert out.count("unreadable journal record skipped") == damaged_lines - 1, out
    assert out.count("is not base64: skipped") == 1, out
    assert out.count("damaged job record skipped") == damaged_jobs, out
    assert "RecursionError" in out and "Traceback" not in out
    assert await d.metric("bwp_jobs_recovered_total", queue="default") == len(intact)


async def test_damaged_journal_at_start_recovers_every_intact_job(make_daemon, make_sink,
                                                                  tmp_path):
    sink = await make_sink()
    journal = tmp_path / "journal"
    journal.mkdir()
    orphan = journal / f"99999-0badf11e{SUFFIX}"
    content, intact, damaged_lines, damaged_jobs = _damaged_journal(sink, "start")
    orphan.write_bytes(content)
    d = await make_daemon({"journal": {"path": str(journal)}})  # starts: no restart loop
    await _check_recovered(d, sink, "start", orphan, intact, damaged_lines, damaged_jobs)
    assert not orphan.exists()
    assert len(journal_files(journal)) == 1
    assert await d.stop() == 0


def _open_files(pid: int) -> list[str]:
    """What the process's fds point at; one closed between listing and reading (a socket the
    daemon just let go) holds nothing."""
    fds, held = f"/proc/{pid}/fd", []
    for n in os.listdir(fds):
        with contextlib.suppress(FileNotFoundError):
            held.append(os.readlink(f"{fds}/{n}"))
    return held


async def test_damaged_journal_adopted_while_running(make_daemon, make_sink, tmp_path):
    sink = await make_sink()
    journal = tmp_path / "journal"
    d = await make_daemon({"journal": {"path": str(journal)}})
    content, intact, damaged_lines, damaged_jobs = _damaged_journal(sink, "running")
    orphan = journal / f"99998-0badf11e{SUFFIX}"
    partial = journal / "being-written"
    partial.write_bytes(content)
    partial.rename(orphan)  # appears whole: a journal left by a process that is gone
    await _check_recovered(d, sink, "running", orphan, intact, damaged_lines, damaged_jobs)
    deadline = time.monotonic() + 5
    while orphan.exists():
        assert time.monotonic() < deadline, "the orphan was not removed"
        await asyncio.sleep(0.05)
    # Neither its fd nor its lock stays behind in the daemon.
    held = _open_files(d.proc.pid)
    assert not [p for p in held if orphan.name in p], held
    # and the daemon serves on
    status, _, _ = await d.post({"url": sink.url("/running/after")})
    assert status == 200
    await sink.wait_for(len(intact) + 1)
    assert await d.stop() == 0
    assert journal_files(journal) == []


@pytest.mark.parametrize("error", [MemoryError, RecursionError, KeyboardInterrupt])
def test_claiming_an_orphan_leaks_neither_fd_nor_lock(tmp_path, monkeypatch, error):
    """Whatever reading an orphan raises, its fd is closed and its lock released (the next
    look takes it); an error is logged and the file left, an interrupt goes on up."""
    orphan = tmp_path / f"1-dead{SUFFIX}"
    orphan.write_bytes(b"")

    def fails(path):
        raise error("reading failed")

    monkeypatch.setattr("bwp.journal.read_live", fails)
    fds = len(os.listdir("/proc/self/fd"))
    if error is KeyboardInterrupt:
        with pytest.raises(KeyboardInterrupt):
            claim_orphans(str(tmp_path), "")
    else:
        assert claim_orphans(str(tmp_path), "") == []
    assert len(os.listdir("/proc/self/fd")) == fds
    fd = os.open(orphan, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again
    finally:
        os.close(fd)
    assert orphan.exists()
