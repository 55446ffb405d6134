"""`processes: 2`: two worker processes on the same listeners, one view of jobs and metrics."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import aiohttp
from conftest import free_port, run_cli
from test_lifecycle import UNDER_LOAD, alive, load, wait_until


async def fresh(d, method: str, path: str, payload=None) -> tuple[int, dict]:
    """One request over a new connection, as PHP makes them: any worker may take it."""
    conn = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=conn) as s, s.request(
            method, d.base + path, json=payload) as r:
        return r.status, json.loads(await r.text())


async def worker_pids(d, expected: int = 2, timeout: float = 10.0) -> set[int]:
    """The pids that answer on the shared listener, asked over fresh connections until
    `expected` have answered (or the time is up).  Batches of concurrent connections: with
    one at a time, whichever process wakes first can take every one of them."""
    pids: set[int] = set()
    deadline = asyncio.get_running_loop().time() + timeout
    while len(pids) < expected and asyncio.get_running_loop().time() < deadline:
        answers = await asyncio.gather(*(fresh(d, "GET", "/healthz") for _ in range(10)))
        pids.update(body["pid"] for _, body in answers)
    return pids


async def test_two_processes_share_the_listener_and_answer_for_each_other(
        make_daemon, make_sink, tmp_path):
    sink = await make_sink()
    hanging = await make_sink(delay=30)
    refused = free_port()  # nothing listens: those jobs fail
    d = await make_daemon({"processes": 2, "pool": {"size": 4, "queue_size": 1000},
                           "client": {"read_timeout": 3},
                           "pidfile": str(tmp_path / "bwp.pid")})
    await wait_until(lambda: d.pidfile_pid() == d.proc.pid, what="PID file")
    pids = await worker_pids(d)
    d.pids.update(pids)
    assert len(pids) == 2 and d.proc.pid not in pids  # the master only supervises

    ids = []
    for i in range(60):
        status, body = await fresh(d, "POST", "/post/http", {"url": sink.url(f"/{i}")})
        assert status == 200
        ids += body["ids"]
    await sink.wait_for(60)
    # Every id is known whichever process takes the lookup.
    for job_id in ids:
        status, doc = await fresh(d, "GET", f"/jobs/{job_id}")
        assert status == 200 and doc["state"] == "succeeded", doc
    status, _ = await fresh(d, "GET", "/jobs/no-such-id")
    assert status == 404

    # `unique` holds across processes: the id's owner decides every time.
    for _ in range(12):
        status, body = await fresh(d, "POST", "/post/http", {"url": hanging.url("/u"), "id": "u-1",
                                                             "unique": True})
        assert status == 200, body
    await hanging.wait_for(1)
    await hanging.settle(0.5)
    assert len(hanging.received) == 1

    # Dead letters of both processes in one list; a replay reaches the owner.
    for i in range(10):
        status, _ = await fresh(d, "POST", "/post/http",
                                {"url": f"http://127.0.0.1:{refused}/{i}", "id": f"dead-{i}"})
        assert status == 200
    for i in range(10):
        await d.wait_state(f"dead-{i}", "failed")
    status, page = await fresh(d, "GET", "/jobs?state=failed&limit=4&offset=2")
    assert status == 200 and page["total"] == 10 and len(page["jobs"]) == 4
    status, full = await fresh(d, "GET", "/jobs?state=failed")
    assert [j["id"] for j in full["jobs"]][2:6] == [j["id"] for j in page["jobs"]]
    assert sorted(j["id"] for j in full["jobs"]) == sorted(f"dead-{i}" for i in range(10))
    for i in range(10):
        status, body = await fresh(d, "POST", f"/jobs/dead-{i}/retry")
        assert status == 200 and body["ids"] == [f"dead-{i}"], body

    # A cancel reaches the process that holds the job, whichever takes the request.
    for i in range(6):
        status, _ = await fresh(d, "POST", "/post/http", {"url": sink.url(f"/c{i}"),
                                                          "id": f"cancel-{i}", "delay": 30})
        assert status == 200
    for i in range(6):
        status, doc = await fresh(d, "DELETE", f"/jobs/cancel-{i}")
        assert status == 200 and doc["state"] == "cancelled", doc
    status, _ = await fresh(d, "DELETE", "/jobs/no-such-id")
    assert status == 404

    # One /metrics for the whole daemon: samples of both processes summed.
    assert await d.metric("bwp_jobs_accepted_total", queue="default") == 60 + 1 + 10 + 6
    assert await d.metric("bwp_jobs_duplicate_total", queue="default") == 11
    assert await d.metric("bwp_workers", queue="default") == 4  # 2 + 2
    assert await d.metric("bwp_queue_capacity", queue="default") == 1000
    assert await d.metric("bwp_jobs_replayed_total", queue="default") == 10
    assert await d.metric("bwp_jobs_cancelled_total", queue="default") == 6
    # `bwp status` shows the daemon, not the process that happened to answer
    code, out, err = run_cli("status", "--json", "-c", str(tmp_path / f"bwp-{d.port}.yaml"))
    assert code == 0, err
    doc = json.loads(out)
    assert doc["processes"] == 2 and doc["queues"]["default"]["workers"] == 4
    assert doc["queues"]["default"]["cancelled"] == 6

    assert await d.stop() == 0
    for pid in pids:
        await wait_until(lambda p=pid: not alive(p), what="worker exit")


@UNDER_LOAD
async def test_two_processes_reload_and_restart(make_daemon, sink, tmp_path):
    temp = tmp_path / "temp"  # where the master makes its runtime directory
    temp.mkdir()
    d = await make_daemon({"processes": 2, "pidfile": str(tmp_path / "bwp.pid")},
                          env={"TMPDIR": str(temp)})
    master = d.proc.pid
    await wait_until(lambda: d.pidfile_pid() == master, what="PID file")
    first = await worker_pids(d)
    d.pids.update(first)
    statuses: list[int] = []
    task = asyncio.create_task(load(d.base, sink.base, 200, 3.0, statuses))
    await asyncio.sleep(1.0)
    os.kill(master, signal.SIGHUP)
    n = await task
    assert statuses.count(200) == n  # nobody saw a refusal during the reload
    await sink.wait_for(n, timeout=15)
    for pid in first:
        await wait_until(lambda p=pid: not alive(p), what="old worker exit")
    second = await worker_pids(d)
    d.pids.update(second)
    assert len(second) == 2 and not second & first and d.pidfile_pid() == master
    # the old generation's private sockets and load board went with it
    (runtime,) = temp.iterdir()
    await wait_until(lambda: sorted(p.name for p in runtime.iterdir() if p.name[0].isdigit())
                     == ["2.0.sock", "2.1.sock", "2.load"], what="old generation's files removed")

    # A worker that dies is started again in its slot; its siblings find it there.
    victim = min(second)
    os.kill(victim, signal.SIGKILL)
    await wait_until(lambda: "exited with status -9; starting another" in d.output(),
                     what="restart")
    await wait_until(lambda: len(d.output().split("serving on")) >= 6, what="new worker serving")
    third = await worker_pids(d)
    d.pids.update(third)
    assert len(third) == 2 and victim not in third
    ids = []
    for i in range(20):
        status, body = await fresh(d, "POST", "/post/http", {"url": sink.url(f"/after/{i}")})
        ids += body["ids"]
    for job_id in ids:
        status, _ = await fresh(d, "GET", f"/jobs/{job_id}")
        assert status == 200
    assert await d.stop() == 0
    assert not runtime.exists()


async def one_worker_ahead(make_daemon, make_sink, job_extra: dict
                           ) -> tuple[Any, int, int, dict]:
    """A daemon of two workers, 600 jobs (with `job_extra`) sent to one of them over a kept-alive
    connection: (daemon, that worker's pid, the other's, a job that stays due: its destination
    never answers)."""
    hanging = await make_sink(delay=30)
    d = await make_daemon({"processes": 2, "pool": {"size": 2, "queue_size": 6000},
                           "client": {"read_timeout": 30}})
    d.pids.update(await worker_pids(d))
    async with aiohttp.ClientSession() as kept:
        async with kept.get(d.base + "/healthz") as r:
            heavy = (await r.json())["pid"]
        for _ in range(3):
            async with kept.post(d.base + "/post/http",
                                 json=[{"url": hanging.url("/h"), **job_extra}] * 200) as r:
                assert r.status == 200
    (light,) = d.pids - {heavy, d.proc.pid}
    await asyncio.sleep(0.3)  # the board is read every 25 ms
    return d, heavy, light, {"url": hanging.url("/h")}


async def worker_metric(pid: int, sample: str) -> float:
    """One sample of one worker's metrics, asked on its private socket (it answers for
    itself); 0 when it has none yet."""
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    slot = json.loads(next(v for v in env if v.startswith(b"BWP_WORKER=")).split(b"=", 1)[1])
    conn = aiohttp.UnixConnector(path=slot["peers"][slot["index"]])
    async with aiohttp.ClientSession(connector=conn) as s, s.get("http://peer/metrics") as r:
        text = await r.text()
    return next((float(x.split()[-1]) for x in text.splitlines() if x.startswith(sample + " ")),
                0.0)


async def accepted_by(pid: int, queue: str = "default") -> float:
    return await worker_metric(pid, f'bwp_jobs_accepted_total{{queue="{queue}"}}')


async def test_a_worker_far_ahead_of_its_sibling_stops_accepting(make_daemon, make_sink):
    """Connections go to whichever worker accepts first; one that holds over 200 jobs more than
    its sibling stops accepting until the sibling has caught up: nothing refused meanwhile."""
    d, heavy, light, job = await one_worker_ahead(make_daemon, make_sink, {})
    for _ in range(30):
        status, _ = await fresh(d, "POST", "/post/http", [job] * 10)
        assert status == 200
    assert (await accepted_by(heavy), await accepted_by(light)) == (600, 300)
    # once the light one holds 100 fewer or less, both accept; 200 more, and only it waits
    for _ in range(100):
        status, _ = await fresh(d, "POST", "/post/http", [job] * 10)
        assert status == 200
        if await accepted_by(heavy) > 600:
            break
    assert await accepted_by(heavy) > 600
    assert await accepted_by(light) - await accepted_by(heavy) <= 200 + 100  # margin, a tick's lag


async def test_a_stalled_sibling_stops_counting_within_a_few_ticks(make_daemon, make_sink):
    d, heavy, light, job = await one_worker_ahead(make_daemon, make_sink, {})
    os.kill(light, signal.SIGSTOP)  # it accepts nothing now: the paused one must, soon
    try:
        start = asyncio.get_running_loop().time()
        status, _ = await fresh(d, "POST", "/post/http", [job])
        waited = asyncio.get_running_loop().time() - start
    finally:
        os.kill(light, signal.SIGCONT)
    assert status == 200 and waited < 0.6, waited
    assert await accepted_by(heavy) == 601


async def test_delayed_jobs_are_not_a_backlog_to_balance(make_daemon, make_sink):
    """600 jobs due in an hour: that worker is idle, and keeps accepting."""
    d, heavy, _, job = await one_worker_ahead(make_daemon, make_sink, {"delay": 3600})
    for _ in range(20):
        status, _ = await fresh(d, "POST", "/post/http", [job])
        assert status == 200
    assert await accepted_by(heavy) > 600


async def test_a_full_worker_hands_a_submit_to_a_sibling_with_room(make_daemon, make_sink):
    """The queue bound is divided between the processes (here 100 each): a submit one worker
    has no room for is taken by a sibling that has (over the private socket, all or none), and
    only when every worker is full is it refused (503, Retry-After)."""
    hanging = await make_sink(delay=30)
    d = await make_daemon({"processes": 2, "pool": {"size": 4, "queue_size": 200},
                           "client": {"read_timeout": 30}})
    d.pids.update(await worker_pids(d))
    job = {"url": hanging.url("/h")}
    async with aiohttp.ClientSession() as kept:  # one connection: always the same worker
        async def post(jobs: int) -> tuple[int, dict, aiohttp.typedefs.LooseHeaders]:
            async with kept.post(d.base + "/post/http", json=[job] * jobs) as r:
                return r.status, await r.json(), r.headers

        async with kept.get(d.base + "/healthz") as r:
            full = (await r.json())["pid"]
        (sibling,) = d.pids - {full, d.proc.pid}
        status, _, _ = await post(100)
        assert status == 200
        await asyncio.sleep(0.2)  # the board is read every 25 ms
        status, body, _ = await post(30)
        assert status == 200 and len(body["ids"]) == 30
        assert (await accepted_by(full), await accepted_by(sibling)) == (100, 30)
        for job_id in body["ids"]:  # the ids are the sibling's: status found from anywhere
            status, doc = await fresh(d, "GET", f"/jobs/{job_id}")
            assert status == 200 and doc["state"] in ("queued", "running")
        # a batch that fits neither: refused whole, by the sibling
        status, body, headers = await post(80)
        assert status == 503 and headers["Retry-After"] == "1" and "full" in body["error"]
        assert await accepted_by(sibling) == 30
        status, _, _ = await post(70)  # the sibling's last room
        assert status == 200 and await accepted_by(sibling) == 100
        await asyncio.sleep(0.2)
        # each has 98 queued and 2 sending (the bound counts the queued): room for 2 each
        status, body, headers = await post(3)
        assert status == 503 and headers["Retry-After"] == "1"
    assert (await accepted_by(full), await accepted_by(sibling)) == (100, 100)


async def test_a_sibling_that_stalls_with_a_relayed_submit_does_not_take_it_late(make_daemon,
                                                                                   make_sink):
    """A submit relayed for room (no `wait`) is waited for 5 s.  A sibling stopped just after
    its last post (so it still looked well) does not take it when it wakes: the client was
    told 503, and would otherwise have its jobs twice once it submits them again."""
    hanging = await make_sink(delay=30)
    d = await make_daemon({"processes": 2, "pool": {"size": 4, "queue_size": 200},
                           "client": {"read_timeout": 30}})
    d.pids.update(await worker_pids(d))
    job = {"url": hanging.url("/h")}
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as kept:  # one connection: always the same worker
        async with kept.get(d.base + "/healthz") as r:
            full = (await r.json())["pid"]
        (sibling,) = d.pids - {full, d.proc.pid}
        async with kept.post(d.base + "/post/http", json=[job] * 100) as r:
            assert r.status == 200
        refused = 'bwp_api_requests_total{code="5xx",endpoint="submit"}'
        asked = await worker_metric(sibling, refused)
        waited = 0.0
        for _ in range(3):  # the stop must come before the board shows the sibling stale
            await asyncio.sleep(0.2)
            os.kill(sibling, signal.SIGSTOP)
            try:
                start = loop.time()
                async with kept.post(d.base + "/post/http", json=[job] * 30) as r:
                    status, body, waited = r.status, await r.json(), loop.time() - start
            finally:
                os.kill(sibling, signal.SIGCONT)
            assert status == 503 and "full" in body["error"], body
            if waited > 1:
                break  # relayed, and given up on
        assert 4.5 < waited < 8, waited
        for _ in range(100):  # it reads the relayed submit as it wakes, and refuses it
            if await worker_metric(sibling, refused) > asked:
                break
            await asyncio.sleep(0.05)
        assert await worker_metric(sibling, refused) == asked + 1
        assert (await accepted_by(full), await accepted_by(sibling)) == (100, 0)
        # the jobs are counted refused once, where the client was answered
        rejected = 'bwp_jobs_rejected_total{reason="%s"}'
        assert await worker_metric(full, rejected % "queue_full") == 30
        assert await worker_metric(sibling, rejected % "unavailable") == 0
        await asyncio.sleep(0.3)  # its figure on the board is fresh again
        async with kept.post(d.base + "/post/http", json=[job] * 30) as r:  # awake: room again
            assert r.status == 200
        assert await accepted_by(sibling) == 30


async def test_a_submit_goes_only_to_a_sibling_with_room_in_its_queue(make_daemon, make_sink):
    """Fullness is per queue: a submit to a queue full here goes to a sibling whose same queue
    has room, and to none (refused here, without asking) once that queue is full everywhere;
    the other queues are not touched, and a full worker keeps accepting connections."""
    hanging = await make_sink(delay=30)
    d = await make_daemon({"processes": 2, "pool": {"size": 2, "queue_size": 2000},
                           "queues": {"slow": {"size": 2, "queue_size": 40}},
                           "client": {"read_timeout": 30}})
    d.pids.update(await worker_pids(d))
    slow = {"url": hanging.url("/s"), "queue": "slow"}
    refused = 'bwp_api_requests_total{code="5xx",endpoint="submit"}'
    async with aiohttp.ClientSession() as kept:  # one connection: always the same worker
        async def post(body: Any) -> int:
            async with kept.post(d.base + "/post/http", json=body) as r:
                return r.status

        async with kept.get(d.base + "/healthz") as r:
            here = (await r.json())["pid"]
        (sibling,) = d.pids - {here, d.proc.pid}
        # `slow` holds 20 queued in each (its bound divided); one job of each is sending
        assert await post([slow] * 20) == 200  # here: 19 queued
        await asyncio.sleep(0.2)  # the board is posted every 25 ms
        assert await post([slow] * 10) == 200
        assert (await accepted_by(here, "slow"), await accepted_by(sibling, "slow")) == (20, 10)
        assert await post([slow] * 10) == 200  # 19 queued in the sibling too
        assert await post(slow) == 200  # the last here
        await asyncio.sleep(0.2)
        assert await post(slow) == 200  # the sibling's last
        assert (await accepted_by(here, "slow"), await accepted_by(sibling, "slow")) == (21, 21)
        await asyncio.sleep(0.2)
        asked = await worker_metric(sibling, refused)
        for _ in range(20):
            assert await post(slow) == 503
        assert await worker_metric(sibling, refused) == asked  # none of them was relayed
        assert await post([{"url": hanging.url("/d")}] * 5) == 200  # the default queue: here
        assert await accepted_by(here) == 5
    statuses = [(await fresh(d, "POST", "/post/http", {"url": hanging.url("/d")}))[0]
                for _ in range(10)]
    assert statuses == [200] * 10  # new connections: both workers take them
