"""`bwp status | jobs | job | retry | cancel` against a running daemon, over its unix socket
(or TCP) with the config's token."""

from __future__ import annotations

import asyncio
import json
import sys

import yaml
from conftest import ROOT

TOKEN = "console-test-token-0123456789"


async def cli(d, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """`bwp ARGS -c <the daemon's config>`, without blocking the test's event loop."""
    config = d.tmp / f"cli-{d.port}.yaml"
    config.write_text(yaml.safe_dump(d.config))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bwp", *args, "-c", str(config), cwd=str(ROOT),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, out.decode(), err.decode()


async def daemon_with_socket(make_daemon, tmp_path, token: bool = True, **config):
    d = await make_daemon({"auth": {"tokens": [TOKEN] if token else []}, **config})
    d.config["listen"] = [str(tmp_path / "bwp.sock"), *d.config["listen"]]
    await d.stop()
    return await make_daemon(d.config)


async def test_status_over_the_unix_socket_with_the_token(make_daemon, make_sink, tmp_path):
    sink = await make_sink()
    d = await daemon_with_socket(make_daemon, tmp_path, queues={"slow": {"size": 3}})
    headers = {"Authorization": f"Bearer {TOKEN}"}
    for i in range(3):
        assert (await d.post({"url": sink.url(f"/{i}")}, headers=headers))[0] == 200
    assert (await d.post({"url": sink.url("/later"), "queue": "slow", "delay": 60},
                         headers=headers))[0] == 200
    await sink.wait_for(3)
    code, out, err = await cli(d, "status")
    assert code == 0, err
    assert f"at {tmp_path / 'bwp.sock'}: ok" in out and "1 process(es)" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert lines["QUEUE"][:4] == ["QUEUE", "LENGTH", "DELAYED", "BUSY"]
    assert lines["default"][1:4] == ["0", "0", "0/50"] and lines["default"][6:8] == ["3", "3"]
    assert lines["slow"][1:4] == ["1", "1", "0/3"]
    code, out, _ = await cli(d, "status", "--json")
    doc = json.loads(out)
    assert doc["state"] == "ok" and doc["processes"] == 1 and doc["uptime_seconds"] >= 0
    assert doc["queues"]["slow"]["delayed"] == 1 and doc["queues"]["default"]["succeeded"] == 3
    assert doc["version"] and "broker_up" not in doc
    code, out, _ = await cli(d, "status", "--listen", f"127.0.0.1:{d.port}")  # TCP as well
    assert code == 0 and f"at 127.0.0.1:{d.port}: ok" in out


async def test_jobs_job_retry_and_cancel(make_daemon, make_sink, tmp_path):
    sink = await make_sink(status=500)
    d = await daemon_with_socket(make_daemon, tmp_path, token=False, queues={"slow": {"size": 1}})
    headers: dict[str, str] = {}
    jobs = [{"url": sink.url(f"/dead/{i}"), "id": f"dead-{i}"} for i in range(25)]
    assert (await d.post(jobs, headers=headers))[0] == 200
    assert (await d.post([{"url": sink.url("/p1"), "id": "pending-1", "delay": 60},
                          {"url": sink.url("/p2"), "id": "pending-2", "delay": 60,
                           "queue": "slow"}], headers=headers))[0] == 200
    for i in range(25):
        await d.wait_state(f"dead-{i}", "failed")

    code, out, err = await cli(d, "jobs")
    assert code == 0, err
    rows = out.splitlines()
    assert rows[0].split()[:3] == ["ID", "STATE", "QUEUE"] and len(rows) == 26
    assert all(" failed " in r and "500" in r for r in rows[1:])
    code, out, _ = await cli(d, "jobs", "--state", "pending", "--queue", "slow", "--json")
    assert [j["id"] for j in json.loads(out)] == ["pending-2"]
    code, out, _ = await cli(d, "jobs", "--limit", "3", "--json")
    assert len(json.loads(out)) == 3

    code, out, _ = await cli(d, "job", "dead-7")
    assert code == 0 and "state:        failed" in out and "result:       500" in out
    code, _, err = await cli(d, "job", "no-such-job")
    assert code == 1 and "404" in err

    code, out, err = await cli(d, "cancel", "pending-1", "pending-2", "dead-1")
    assert code == 1  # dead-1 has finished
    assert "pending-1: cancelled" in out and "pending-2: cancelled" in out
    assert "dead-1" in err and "409" in err
    assert (await d.job("pending-2"))[1]["state"] == "cancelled"

    sink.status = 200
    code, out, err = await cli(d, "retry", "dead-0")
    assert code == 0 and out.strip() == "dead-0: replayed", err
    await d.wait_state("dead-0", "succeeded")
    code, out, err = await cli(d, "retry", "--all-failed")
    assert code == 0, err
    assert out.strip() == "24 replayed, 0 failed"
    assert "24/24 (0 failed" in err  # progress on stderr
    for i in range(25):
        await d.wait_state(f"dead-{i}", "succeeded")
    code, out, _ = await cli(d, "retry", "--all-failed")
    assert code == 0 and out.strip() == "no dead letters"
    code, _, err = await cli(d, "retry")
    assert code == 2 and "--all-failed" in err


async def test_a_wrong_token_or_a_stopped_daemon_is_a_clear_error(make_daemon, tmp_path):
    d = await daemon_with_socket(make_daemon, tmp_path)
    code, _, err = await cli(d, "jobs", env={"PATH": "", "BWP_TOKEN": "not-the-token"})
    assert code == 1 and "401" in err
    await d.stop()
    code, _, err = await cli(d, "status")
    assert code == 1 and "does not answer" in err and "Traceback" not in err
