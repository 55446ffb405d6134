"""Named queues, delays, retries with backoff, dedup, status, dead letters, wait, callbacks."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta

import aiohttp

RETRY_FAST = {"attempts": 3, "backoff": 0.2, "factor": 2, "max_backoff": 5}


async def test_slow_queue_does_not_delay_the_default_one(make_daemon, make_sink):
    slow, fast = await make_sink(delay=3), await make_sink()
    d = await make_daemon({"queues": {"slow": {"size": 2, "queue_size": 10}}})
    status, _, _ = await d.post([{"url": slow.url(f"/s{i}"), "queue": "slow"} for i in range(6)])
    assert status == 200
    await slow.wait_for(2)  # both slow workers are stuck for 3 s
    t0 = time.time()
    status, resp, _ = await d.post({"url": fast.url("/fast")})
    assert status == 200
    (r,) = await fast.wait_for(1, timeout=2)
    assert r.at - t0 < 1.0
    assert (await d.job(resp["ids"][0]))[1]["queue"] == "default"
    assert await d.metric("bwp_busy_workers", queue="slow") == 2
    assert await d.metric("bwp_queue_length", queue="slow") == 4


async def test_delay_iso_duration_and_at(daemon, sink):
    t0 = time.time()
    at = (datetime.now(UTC) + timedelta(seconds=1.2)).isoformat().replace("+00:00", "Z")
    status, resp, _ = await daemon.post([
        {"url": sink.url("/now")},
        {"url": sink.url("/delay"), "delay": 1},
        {"url": sink.url("/iso"), "delay": "PT0.8S"},
        {"url": sink.url("/at"), "at": at},
    ])
    assert status == 200
    ids = resp["ids"]
    doc = await daemon.wait_state(ids[1], "delayed")
    assert doc["next_attempt"] is not None
    assert await daemon.metric("bwp_queue_delayed", queue="default") == 3
    got = {r.path_qs: r.at - t0 for r in await sink.wait_for(4, timeout=5)}
    assert got["/now"] < 0.5
    assert got["/delay"] >= 1.0
    assert got["/iso"] >= 0.8
    assert got["/at"] >= 1.15


async def test_flaky_sink_retry_after_then_success(make_daemon, make_sink):
    flaky = await make_sink(script=[(503, {"Retry-After": "1"}), (503, {"Retry-After": "1"})])
    d = await make_daemon({"pool": {"retry": RETRY_FAST}})
    status, _, _ = await d.post({"url": flaky.url("/f"), "id": "flaky-1"})
    assert status == 200
    doc = await d.wait_state("flaky-1", "succeeded", timeout=10)
    assert doc["attempts"] == 3 and doc["status"] == 200 and doc["result"]["body"] == "ok"
    times = [r.at for r in flaky.received]
    assert len(times) == 3
    # Retry-After: 1 beats the 0.2 s / 0.4 s backoff
    assert times[1] - times[0] >= 0.95 and times[2] - times[1] >= 0.95
    assert await d.metric("bwp_job_retries_total", queue="default") == 2


async def test_backoff_spacing_and_exhaustion_to_dead_letter_then_replay(make_daemon, make_sink):
    bad = await make_sink(status=500)
    d = await make_daemon({"pool": {"retry": {"attempts": 2, "backoff": 0.3, "factor": 2}}})
    status, _, _ = await d.post({"url": bad.url("/dead"), "id": "dead-1", "method": "POST",
                                 "json": {"n": 1}})
    assert status == 200
    doc = await d.wait_state("dead-1", "failed", timeout=10)
    assert doc["attempts"] == 3 and doc["status"] == 500
    t = [r.at for r in bad.received]
    assert len(t) == 3
    assert 0.3 <= t[1] - t[0] < 1.0 and 0.6 <= t[2] - t[1] < 1.5
    assert await d.metric("bwp_jobs_failed_total", queue="default") == 1
    assert await d.metric("bwp_dead_letters") == 1

    status, text = await d.get("/jobs?state=failed")
    listing = json.loads(text)
    assert status == 200 and listing["total"] == 1 and listing["jobs"][0]["id"] == "dead-1"

    bad.status = 200
    async with aiohttp.ClientSession() as s, s.post(d.base + "/jobs/dead-1/retry") as r:
        assert r.status == 200 and (await r.json())["ids"] == ["dead-1"]
    doc = await d.wait_state("dead-1", "succeeded")
    assert doc["attempts"] == 1
    assert bad.received[-1].body == b'{"n":1}'  # the replay sends the same request
    assert await d.metric("bwp_dead_letters") == 0
    async with aiohttp.ClientSession() as s, s.post(d.base + "/jobs/dead-1/retry") as r:
        assert r.status == 409  # only failed jobs replay
    async with aiohttp.ClientSession() as s, s.post(d.base + "/jobs/nope/retry") as r:
        assert r.status == 404


async def test_4xx_and_per_job_retries_override(make_daemon, make_sink):
    gone, bad = await make_sink(status=404), await make_sink(status=500)
    d = await make_daemon({"pool": {"retry": RETRY_FAST}})
    await d.post([{"url": gone.url("/g"), "id": "g"}, {"url": bad.url("/b"), "id": "b",
                                                        "retries": 0}])
    assert (await d.wait_state("g", "failed"))["attempts"] == 1  # 4xx is not retried
    assert (await d.wait_state("b", "failed"))["attempts"] == 1  # retries: 0 wins
    await gone.settle(0.5)
    assert len(gone.received) == 1 and len(bad.received) == 1


async def test_backoff_never_holds_a_worker(make_daemon, make_sink):
    bad, good = await make_sink(status=500), await make_sink()
    d = await make_daemon({"pool": {"size": 1, "retry": {"attempts": 1, "backoff": 30}}})
    await d.post({"url": bad.url("/retry-later"), "id": "r"})
    await bad.wait_for(1)
    await d.wait_state("r", "retrying")
    status, _, _ = await d.post([{"url": good.url(f"/{i}")} for i in range(5)])
    assert status == 200
    await good.wait_for(5, timeout=3)  # the only worker is free while "r" waits 30 s


async def test_unique_and_once(make_daemon, make_sink):
    slow = await make_sink(delay=0.5)
    d = await make_daemon()
    status, resp, _ = await d.post({"url": slow.url("/u"), "id": "u1", "unique": True})
    assert status == 200 and resp["ids"] == ["u1"]
    status, resp, _ = await d.post([{"url": slow.url("/u"), "id": "u1", "unique": True},
                                    {"url": slow.url("/v"), "id": "v1", "unique": True},
                                    {"url": slow.url("/v"), "id": "v1", "unique": True}])
    assert status == 200 and resp["ids"] == ["v1"] and resp["duplicates"] == ["u1", "v1"]
    await d.wait_state("u1", "succeeded")
    # finished: `unique` lets it run again, `once` does not while history remembers it
    status, resp, _ = await d.post({"url": slow.url("/u"), "id": "u1", "unique": True})
    assert resp["ids"] == ["u1"]
    status, resp, _ = await d.post({"url": slow.url("/o"), "id": "o1", "once": True})
    assert resp["ids"] == ["o1"]
    await d.wait_state("o1", "succeeded")
    status, resp, _ = await d.post({"url": slow.url("/o"), "id": "o1", "once": True})
    assert status == 200 and resp["ids"] == [] and resp["duplicates"] == ["o1"]
    await slow.settle(0.7)
    paths = sorted(r.path_qs for r in slow.received)
    assert paths == ["/o", "/u", "/u", "/v"]
    assert await d.metric("bwp_jobs_duplicate_total", queue="default") == 3


async def test_wait_returns_outcomes_or_504(make_daemon, make_sink):
    sink, slow = await make_sink(response_body=b"hello"), await make_sink(delay=2)
    d = await make_daemon()
    status, resp, _ = await d.post({"url": sink.url("/w"), "wait": 5,
                                    "clones": [{}, {"url": sink.url("/w2")}]})
    assert status == 200 and len(resp["results"]) == 2
    assert all(r["state"] == "succeeded" and r["result"]["body"] == "hello"
               for r in resp["results"])
    t0 = time.monotonic()
    status, resp, _ = await d.post({"url": slow.url("/late"), "id": "late", "wait": 0.5})
    assert status == 504 and resp["ids"] == ["late"] and resp["pending"] == ["late"]
    assert time.monotonic() - t0 < 1.5
    await d.wait_state("late", "succeeded")  # the job itself goes on


async def test_callback_receives_the_outcome(make_daemon, make_sink):
    target, hook = await make_sink(status=201), await make_sink()
    d = await make_daemon({"routes": {"127.0.0.0/8": "127.0.0.8"}})
    await d.post({"url": target.url("/t"), "id": "cb-1", "callback": hook.url("/hook")})
    (r,) = await hook.wait_for(1)
    doc = json.loads(r.body)
    assert r.method == "POST" and r.headers["Content-Type"] == "application/json"
    assert doc["id"] == "cb-1" and doc["state"] == "succeeded" and doc["status"] == 201
    assert r.peer == "127.0.0.8"  # through the same router
    # the callback is a job of its own: counted apart from the accepted ones
    assert await d.metric("bwp_jobs_accepted_total", queue="default") == 1
    assert await d.metric("bwp_callbacks_total", queue="default") == 1


async def test_job_status_document_and_history_bound(make_daemon, sink):
    d = await make_daemon({"history": {"max_jobs": 5, "max_age": 3600}})
    status, _, _ = await d.post([{"url": sink.url(f"/{i}"), "id": f"h{i}"} for i in range(10)])
    assert status == 200
    await sink.wait_for(10)
    doc = await d.wait_state("h9", "succeeded")
    assert set(doc) >= {"id", "state", "attempts", "status", "error", "queue", "created",
                        "finished", "result"}
    assert doc["result"]["status"] == 200 and doc["created"].endswith("Z")
    await asyncio.sleep(0.2)
    assert (await d.job("h0"))[0] == 404
    assert (await d.job("h9"))[0] == 200
    assert (await d.job("never"))[0] == 404
