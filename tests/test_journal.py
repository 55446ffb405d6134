"""The on-disk journal: accepted jobs survive kill -9 and a drain deadline (at-least-once)."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import time
from collections import Counter

from conftest import Sink

from bwp.journal import SUFFIX


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
    slow: Sink = await make_sink(delay=0.4)
    journal = tmp_path / "journal"
    d = await make_daemon({"journal": {"path": str(journal)}, "pool": {"size": 1},
                           "drain_timeout": 1, "pidfile": str(tmp_path / "bwp.pid")})
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
