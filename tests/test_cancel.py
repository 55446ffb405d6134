"""DELETE /jobs/{id}: a job that has not started is never sent; one that has is left alone."""

from __future__ import annotations

import asyncio
import json
import signal

RETRY_SLOW = {"attempts": 3, "backoff": 30}


async def test_a_delayed_job_is_cancelled_and_never_sent(daemon, sink):
    status, body, _ = await daemon.post([{"url": sink.url("/later"), "id": "later", "delay": 2},
                                         {"url": sink.url("/kept"), "id": "kept", "delay": 2}])
    assert status == 200, body
    status, doc = await daemon.delete("/jobs/later")
    assert status == 200 and doc["id"] == "later" and doc["state"] == "cancelled"
    assert doc["finished"] is not None and doc["next_attempt"] is None
    assert (await daemon.job("later"))[1]["state"] == "cancelled"
    assert await daemon.metric("bwp_queue_length", queue="default") == 1  # its slot is free
    assert await daemon.metric("bwp_jobs_cancelled_total", queue="default") == 1
    got = await sink.wait_for(1, timeout=5)
    await sink.settle(0.5)
    assert [r.path_qs for r in got] == ["/kept"]
    status, doc = await daemon.delete("/jobs/later")  # cancelled already: finished
    assert status == 409 and "cancelled" in doc["error"] and doc["success"] is False
    status, doc = await daemon.delete("/jobs/no-such-job")
    assert status == 404 and doc["success"] is False


async def test_running_and_finished_jobs_are_not_cancelled_but_a_queued_one_is(make_daemon,
                                                                               make_sink):
    sink = await make_sink(delay=1.0)
    d = await make_daemon({"pool": {"size": 1}})
    status, body, _ = await d.post([{"url": sink.url("/1"), "id": "first"},
                                    {"url": sink.url("/2"), "id": "second"}])
    assert status == 200, body
    await sink.wait_for(1)  # the only worker is sending the first
    assert (await d.delete("/jobs/first"))[0] == 409
    status, doc = await d.delete("/jobs/second")
    assert status == 200 and doc["state"] == "cancelled" and doc["attempts"] == 0
    assert (await d.wait_state("first", "succeeded"))["attempts"] == 1
    status, doc = await d.delete("/jobs/first")
    assert status == 409 and "succeeded" in doc["error"]
    await sink.settle(0.5)
    assert [r.path_qs for r in sink.received] == ["/1"]


async def test_a_retrying_job_is_cancelled_between_attempts(make_daemon, make_sink):
    sink = await make_sink(status=500)
    d = await make_daemon({"pool": {"retry": RETRY_SLOW}})
    assert (await d.post({"url": sink.url("/flaky"), "id": "flaky"}))[0] == 200
    await d.wait_state("flaky", "retrying")
    status, doc = await d.delete("/jobs/flaky")
    assert status == 200 and doc["state"] == "cancelled" and doc["attempts"] == 1
    assert doc["status"] == 500  # the last attempt's outcome stays on record
    assert await d.metric("bwp_queue_delayed", queue="default") == 0
    status, text = await d.get("/jobs?state=failed")
    assert status == 200 and '"total": 0' in text  # not a dead letter


async def test_a_wait_ends_when_its_job_is_cancelled(daemon, sink):
    async def submit_and_wait():
        return await daemon.post({"url": sink.url("/w"), "id": "waited", "delay": 30, "wait": 10})

    waiting = asyncio.ensure_future(submit_and_wait())
    await daemon.wait_state("waited", "delayed")
    assert (await daemon.delete("/jobs/waited"))[0] == 200
    status, body, _ = await asyncio.wait_for(waiting, 5)
    assert status == 200 and body["results"][0]["state"] == "cancelled", body


async def test_a_cancelled_job_stays_cancelled_after_kill_9_with_the_journal(make_daemon,
                                                                             make_sink, tmp_path):
    sink = await make_sink()
    cfg = {"journal": {"path": str(tmp_path / "journal")}}
    d = await make_daemon(cfg)
    status, _, _ = await d.post([{"url": sink.url("/gone"), "id": "gone", "delay": 1.5},
                                 {"url": sink.url("/stays"), "id": "stays", "delay": 1.5}])
    assert status == 200
    assert (await d.delete("/jobs/gone"))[0] == 200
    await asyncio.sleep(0.3)  # the journal's batch reaches the disk
    await d.stop(signal.SIGKILL)
    d2 = await make_daemon(cfg)
    await sink.wait_for(1, timeout=10)
    await sink.settle(1.0)
    assert [r.path_qs for r in sink.received] == ["/stays"]
    assert (await d2.job("stays"))[1]["state"] == "succeeded"


async def test_cancel_needs_the_token(make_daemon, sink):
    d = await make_daemon({"auth": {"tokens": ["s3cret-token-for-tests"]}})
    headers = {"Authorization": "Bearer s3cret-token-for-tests"}
    status, _, _ = await d.post({"url": sink.url("/t"), "id": "t", "delay": 5}, headers=headers)
    assert status == 200
    assert (await d.delete("/jobs/t"))[0] == 401
    assert (await d.delete("/jobs/t", headers=headers))[0] == 200


async def test_pending_jobs_are_listed_by_state_and_queue_then_cancelled(make_daemon, make_sink):
    sink = await make_sink()
    d = await make_daemon({"queues": {"slow": {"size": 1}}})
    jobs = [{"url": sink.url(f"/{i}"), "id": f"p-{i}", "delay": 30,
             **({"queue": "slow"} if i % 2 else {})} for i in range(6)]
    assert (await d.post(jobs))[0] == 200
    status, text = await d.get("/jobs?state=pending")
    page = json.loads(text)
    assert status == 200 and page["total"] == 6
    assert [j["id"] for j in page["jobs"]] == [f"p-{i}" for i in range(6)]  # oldest first
    status, text = await d.get("/jobs?state=delayed&queue=slow&limit=2&offset=1")
    page = json.loads(text)
    assert [j["id"] for j in page["jobs"]] == ["p-3", "p-5"] and page["total"] == 3
    for job in page["jobs"]:
        assert (await d.delete(f"/jobs/{job['id']}"))[0] == 200
    status, text = await d.get("/jobs?state=pending&queue=slow")
    assert [j["id"] for j in json.loads(text)["jobs"]] == ["p-1"]
    assert (await d.get("/jobs?state=cancelled"))[0] == 400
    assert (await d.get("/jobs?state=pending&queue=nope"))[0] == 400
