"""Destinations that are down: the breaker trips, holds jobs without spending attempts, probes
and closes; the rate limit spaces requests per destination, not across them."""

from __future__ import annotations

import asyncio
import json
import time

from test_console import cli

BREAKER = {"breaker_failures": 3, "breaker_cool_off": 1.5}
RETRY = {"attempts": 10, "backoff": 0.1, "factor": 1}


async def test_the_breaker_trips_holds_jobs_probes_and_closes(make_daemon, make_sink):
    sink = await make_sink(status=500)
    d = await make_daemon({"client": BREAKER, "pool": {"retry": RETRY}})
    assert (await d.post({"url": sink.url("/a"), "id": "a"}))[0] == 200
    await sink.wait_for(3)
    await asyncio.sleep(0.5)  # a's retries are due every 0.1 s, and held
    assert (await d.post({"url": sink.url("/b"), "id": "b"}))[0] == 200
    await asyncio.sleep(0.3)
    assert len(sink.received) == 3  # nothing sent while open
    doc = (await d.job("a"))[1]
    assert doc["state"] == "retrying" and doc["attempts"] == 3 and "circuit open" in doc["error"]
    assert (await d.job("b"))[1]["attempts"] == 0
    destination = f"http://127.0.0.1:{sink.port}"
    assert await d.metric("bwp_breaker_open", destination=destination) == 1
    assert await d.metric("bwp_breaker_trips_total") == 1
    assert await d.metric("bwp_breaker_held_total") >= 2
    code, out, _ = await cli(d, "status")
    assert code == 0 and f"breakers open: {destination}" in out

    await sink.wait_for(4)  # the cool-off ends: one probe, and it fails (answered already)
    sink.status = 200  # the next probe succeeds, and closes the breaker
    a = await d.wait_state("a", "succeeded", timeout=10)
    b = await d.wait_state("b", "succeeded", timeout=10)
    assert (a["attempts"], b["attempts"]) == (5, 1)  # 3 + the failed probe + 1; held waits free
    assert len(sink.received) == 6
    # open again after the failed probe: the next request came a whole cool-off later (timed
    # by arrival, not by the test's own pace, which a slow `bwp status` above can stretch)
    probe, after = sink.received[3].at, sink.received[4].at
    assert after - probe >= BREAKER["breaker_cool_off"] - 0.1, (probe, after)
    _, text = await d.get("/metrics")
    assert "bwp_breaker_open{" not in text  # closed: no destination listed
    code, out, _ = await cli(d, "status", "--json")
    assert json.loads(out)["breakers_open"] == []


async def test_client_errors_do_not_trip_the_breaker(make_daemon, make_sink):
    sink = await make_sink(status=404)
    d = await make_daemon({"client": BREAKER})
    for i in range(6):
        assert (await d.post({"url": sink.url(f"/{i}")}))[0] == 200
    await sink.wait_for(6)
    assert await d.metric("bwp_breaker_trips_total") == 0


async def test_the_rate_limit_spaces_requests_per_destination(make_daemon, make_sink):
    limited, other = await make_sink(), await make_sink()
    d = await make_daemon({"client": {"rate_per_host": 5, "rate_burst": 1}})
    t0 = time.time()
    jobs = [{"url": limited.url(f"/{i}")} for i in range(8)] + \
        [{"url": other.url(f"/{i}")} for i in range(8)]
    assert (await d.post(jobs))[0] == 200
    for sink in (limited, other):
        times = sorted(r.at for r in await sink.wait_for(8, timeout=10))
        # 5/s, one at once: any k+1 arrivals span k × 0.2 s, less each end's delivery jitter
        # (a request arriving late shortens the gap after it, not the pacing)
        assert all(times[j] - times[i] >= (j - i) * 0.2 - 0.12
                   for i in range(len(times)) for j in range(i + 1, len(times))), times
        assert times[-1] - times[0] >= 1.3, times
    # each destination has its own bucket: 16 requests in the time of 8, not of 16 (3 s)
    assert max(r.at for r in limited.received + other.received) - t0 < 2.3


async def test_breaker_and_rate_keys_are_checked(tmp_path):
    from conftest import run_cli
    for key, value, why in [("breaker_cool_off", 0, "must be >= 0.1"),
                            ("rate_burst", 1.5, "must be an integer"),
                            ("breaker_failures", -1, "must be >= 0")]:
        p = tmp_path / "bwp.yaml"
        p.write_text(json.dumps({"client": {key: value}}))
        code, _, err = run_cli("check", "-c", str(p))
        assert code == 1 and f"client.{key}: {why}" in err, err


def test_a_probe_cut_short_lets_the_next_request_probe():
    """A stop (or a bug) during the probe gives no verdict: the breaker does not wait for one
    for ever."""
    from bwp.breaker import Breakers
    from bwp.jobs import Outcome

    b = Breakers(failures=1, cool_off=0.1)
    key = ("http", "127.0.0.1", 9)
    b.record(key, Outcome(status=503))
    assert b.hold(key) is not None  # open
    time.sleep(0.15)
    assert b.hold(key) is None  # the probe
    assert b.hold(key) is not None  # its verdict first
    b.record(key, Outcome(local=True))  # cut short
    assert b.hold(key) is None  # another probe
    b.record(key, Outcome(status=200))
    assert b.hold(key) is None and b.open() == []
