"""What an operator reads: every answer JSON and self-explaining, metrics that say whose they
are and carry the usual alerting signals."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import time

import aiohttp
import pytest
from conftest import ROOT

PROMTOOL = shutil.which("promtool")


async def raw(d, method: str, path: str, **kw) -> tuple[int, dict, dict]:
    async with aiohttp.ClientSession() as s, s.request(method, d.base + path, **kw) as r:
        assert r.content_type == "application/json", (method, path, r.content_type)
        return r.status, await r.json(), dict(r.headers)


async def test_unknown_paths_and_methods_answer_json(daemon):
    status, doc, _ = await raw(daemon, "GET", "/nope")
    assert status == 404 and doc == {"success": False, "error": "no such endpoint: /nope"}
    status, doc, headers = await raw(daemon, "GET", "/post/http")
    assert status == 405 and "allowed: POST" in doc["error"] and headers["Allow"] == "POST"
    status, doc, headers = await raw(daemon, "DELETE", "/healthz")
    assert status == 405 and headers["Allow"] == "GET,HEAD"
    status, doc, _ = await raw(daemon, "POST", "/jobs/nope/retry")
    assert status == 404 and "unknown job id" in doc["error"]


async def test_a_form_gets_a_hint_and_a_json_body_labelled_as_a_form_is_fine(daemon, sink):
    status, doc, _ = await raw(daemon, "POST", "/post/http", data={"url": sink.url("/")})
    assert status == 400 and "the body must be JSON" in doc["error"], doc
    # what PHP's curl sends for CURLOPT_POSTFIELDS => json_encode(...)
    status, doc, _ = await raw(daemon, "POST", "/post/http", data=json.dumps({"url": sink.url("/")}),
                               headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200, doc


async def test_errors_say_what_failed(make_daemon, make_sink):
    failing = await make_sink(status=503)
    d = await make_daemon({"pool": {"size": 1, "queue_size": 2}})
    status, doc, _ = await d.post({"url": failing.url("/"), "id": "five-oh-three"})
    job = await d.wait_state("five-oh-three", "failed")
    assert job["error"] == "HTTP 503 Service Unavailable" and job["status"] == 503
    status, doc, _ = await d.post({"url": failing.url("/"), "id": "five-oh-three", "delay": 60})
    status, doc, _ = await raw(d, "POST", "/jobs/five-oh-three/retry")
    assert status == 409 and doc["error"] == "job five-oh-three is delayed: only failed jobs can be replayed"
    status, doc, headers = await d.post([{"url": failing.url("/"), "delay": 60}] * 2)
    assert status == 503 and headers["Retry-After"]
    assert doc["error"] == "queue 'default' is full (2 jobs, pool.queue_size)", doc


async def test_metrics_of_the_api_the_queue_wait_and_the_process(make_daemon, make_sink):
    slow = await make_sink(delay=1.0)
    d = await make_daemon({"pool": {"size": 1}})
    status, doc, _ = await d.post([{"url": slow.url(f"/{i}"), "id": f"j{i}", "unique": True}
                                   for i in range(3)] + [{"url": slow.url("/x"), "id": "j0",
                                                          "unique": True}])
    assert status == 200 and doc["duplicates"] == ["j0"]
    await asyncio.sleep(0.6)  # j0 runs; j1 and j2 wait for the one worker
    assert await d.metric("bwp_queue_oldest_due_seconds", queue="default") >= 0.5
    assert await d.metric("bwp_jobs_duplicate_total", queue="default") == 1
    await slow.wait_for(3, timeout=10)
    await d.wait_state("j2", "succeeded")
    assert await d.metric("bwp_queue_oldest_due_seconds", queue="default") == 0
    assert await d.metric("bwp_job_queue_wait_seconds_count", queue="default") == 3
    # j1 waited ~1 s, j2 ~2 s for the worker
    assert await d.metric("bwp_job_queue_wait_seconds_sum", queue="default") >= 2.5
    assert await d.metric("bwp_api_requests_total", code="2xx", endpoint="submit") == 1
    assert await d.metric("bwp_api_request_duration_seconds_count", endpoint="submit") == 1
    assert await d.metric("bwp_api_requests_total", code="2xx", endpoint="metrics") >= 4
    assert await d.metric("bwp_outbound_requests_total", code="2xx") == 3
    assert await d.metric("bwp_build_info", version="0.1.0") == 1
    assert await d.metric("process_resident_memory_bytes") > 10e6
    _, text = await d.get("/metrics")
    assert not re.search(r"^bwp_http_", text, re.M)  # outbound ones say so


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")
async def test_promtool_finds_nothing_to_lint(make_daemon, sink):
    d = await make_daemon({"queues": {"slow": {"size": 1}}})
    await d.post({"url": sink.url("/"), "hostMetrics": True})
    await sink.wait_for(1)
    _, text = await d.get("/metrics")
    p = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True,
                       text=True, timeout=20, cwd=str(ROOT))
    assert p.returncode == 0 and not p.stdout.strip() and not p.stderr.strip(), p.stdout + p.stderr


async def test_logs_say_when_a_job_is_retried_failed_or_refused(make_daemon, make_sink):
    failing = await make_sink(status=503)
    d = await make_daemon({"pool": {"retry": {"attempts": 2, "backoff": 0.2}}})
    await d.post({"url": failing.url("/"), "id": "flaky"})
    await d.wait_state("flaky", "failed")
    out = d.output()
    assert "job flaky: HTTP 503 Service Unavailable; retrying in 0.2s (attempt 2/3)" in out
    assert "job flaky: HTTP 503 Service Unavailable; retrying in 0.4s (attempt 3/3)" in out
    assert out.count("job flaky failed for good after 3 attempts: HTTP 503 Service Unavailable") == 1
    for _ in range(50):  # a flood of bad submits: one line, then one saying how many it held back
        assert (await d.post(None, raw=b"{"))[0] == 400
    await asyncio.sleep(1.1)
    assert (await d.post(None, raw=b"["))[0] == 400
    lines = [line for line in d.output().splitlines() if "refused (invalid)" in line]
    assert len(lines) == 2, lines
    assert "submit from 127.0.0.1 refused (invalid): malformed JSON" in lines[0]
    assert lines[1].endswith("(and 49 more like it since the last line)")


async def test_a_stop_waits_only_for_work_that_can_finish(make_daemon, make_sink):
    sink = await make_sink()
    d = await make_daemon({"drain_timeout": 60})
    await d.post([{"url": sink.url("/far"), "id": "far", "delay": 3600},
                   {"url": sink.url("/soon"), "delay": 1}, {"url": sink.url("/now")}])
    start = time.monotonic()
    os.kill(d.proc.pid, signal.SIGTERM)
    assert await asyncio.wait_for(d.proc.wait(), 10) == 0
    assert time.monotonic() - start < 5  # not the 60 s drain_timeout
    assert sorted(r.path_qs for r in sink.received) == ["/now", "/soon"]
    out = d.output()
    assert "abandoned job far GET" in out and "due after the drain deadline" in out
    assert "stopped (1 jobs abandoned)" in out


async def test_with_the_journal_a_stop_leaves_far_jobs_on_disk_at_once(make_daemon, make_sink,
                                                                      tmp_path):
    sink = await make_sink()
    config = {"drain_timeout": 60, "journal": {"path": str(tmp_path / "journal")}}
    d = await make_daemon(config)
    await d.post({"url": sink.url("/far"), "id": "far", "delay": 3600})
    start = time.monotonic()
    os.kill(d.proc.pid, signal.SIGTERM)
    assert await asyncio.wait_for(d.proc.wait(), 10) == 0
    assert time.monotonic() - start < 5
    assert "1 delayed jobs are due after the drain deadline: they stay in the journal" in d.output()
    again = await make_daemon(config)
    job = await again.wait_state("far", "delayed")
    assert job["attempts"] == 0


async def test_a_stopping_process_keeps_answering_while_it_drains(make_daemon, make_sink):
    slow = await make_sink(delay=2)
    d = await make_daemon({"pool": {"size": 1}, "drain_timeout": 30})
    _, doc, _ = await d.post({"url": slow.url("/"), "id": "slow"})
    await slow.wait_for(1)
    os.kill(d.proc.pid, signal.SIGTERM)
    await asyncio.sleep(0.3)
    # new connections, as a load balancer's health check or a PHP page would open
    status, doc, headers = await raw(d, "GET", "/healthz")
    assert status == 503 and doc["status"] == "draining"
    status, doc, headers = await raw(d, "POST", "/post/http", json={"url": slow.url("/late")})
    assert status == 503 and headers["Retry-After"] and "shutting down" in doc["error"]
    status, doc, _ = await raw(d, "GET", "/jobs/slow")
    assert status == 200 and doc["state"] == "running"
    assert await d.metric("bwp_busy_workers", queue="default") == 1
    assert await asyncio.wait_for(d.proc.wait(), 10) == 0
    assert [r.path_qs for r in slow.received] == ["/"]


async def test_json_logs_with_the_job_fields(make_daemon, make_sink):
    failing = await make_sink(status=500)
    d = await make_daemon({"log_format": "json",
                           "pool": {"retry": {"attempts": 1, "backoff": 0.1}}}, "--log-level",
                          "debug")
    await d.post({"url": failing.url("/x?token=secret"), "id": "j1"})
    await d.wait_state("j1", "failed")
    await asyncio.sleep(0.2)
    lines = [json.loads(line) for line in d.output().splitlines()]  # every line is JSON
    assert lines[0]["message"].startswith("bwp 0.1.0 starting (single process): config ")
    assert "journal off, rabbitmq off, log level debug" in lines[0]["message"]
    assert {"time", "level", "pid", "logger", "message"} <= set(lines[0])
    sent = [e for e in lines if e.get("job") == "j1" and e["logger"] == "bwp.client"]
    assert [e["attempt"] for e in sent] == [1, 2], sent
    assert sent[0]["url"] == failing.url("/x?token=***") and sent[0]["queue"] == "default"
    assert sent[0]["error"] == "HTTP 500 Internal Server Error" and sent[0]["duration"] > 0
    final = [e for e in lines if e["message"].startswith("job j1 failed for good")]
    assert len(final) == 1 and final[0]["level"] == "warning" and final[0]["attempt"] == 2
    assert "secret" not in d.output()


def test_version():
    from conftest import run_cli

    code, out, _ = run_cli("--version")
    assert code == 0 and out.strip() == "bwp 0.1.0"


def test_log_format_is_checked(tmp_path):
    from conftest import run_cli

    p = tmp_path / "bwp.yaml"
    p.write_text("log_level: info\nlog_format: xml\n")
    code, _, err = run_cli("check", "-c", str(p))
    assert code == 1 and f"{p}:2: log_format: must be one of text, json" in err, err
    p.write_text("log_format: json\n")
    code, out, _ = run_cli("check", "-c", str(p))
    assert code == 0 and "log: info, json" in out


async def test_a_wait_for_a_job_handed_over_at_a_reload_ends_at_once(make_daemon, make_sink,
                                                                     tmp_path):
    flaky = await make_sink(status=503)
    d = await make_daemon({"pidfile": str(tmp_path / "bwp.pid"), "drain_timeout": 10,
                           "pool": {"retry": {"attempts": 3, "backoff": 30}}})
    waiting = asyncio.create_task(raw(d, "POST", "/post/http",
                                      json={"url": flaky.url("/"), "id": "w", "wait": 120}))
    await flaky.wait_for(1)
    await d.wait_state("w", "retrying")
    start = time.monotonic()
    os.kill(d.proc.pid, signal.SIGHUP)
    status, doc, _ = await asyncio.wait_for(waiting, 10)
    assert status == 504 and doc["pending"] == ["w"], doc
    assert "handed to the process replacing this one" in doc["error"]
    assert await asyncio.wait_for(d.proc.wait(), 10) == 0
    assert time.monotonic() - start < 8
    await d.wait_state("w", "delayed")  # the new process has it, with its retries left
