"""POST /post/http end to end: what the sink receives, byte for byte, from which address."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import zlib

import aiohttp


async def test_fields_arrive_exactly(daemon, sink):
    body = bytes(range(256))
    status, resp, _ = await daemon.post([
        {"url": sink.url("/get?keep=1"), "parameters": {"a b": "c&d", "keep": "2"}},
        {"url": sink.url("/post"), "method": "post", "parameters": {"x": "1/2", "y": "é"}},
        {"url": sink.url("/raw"), "method": "PUT", "body": base64.b64encode(body).decode(),
         "headers": {"X-Token": "abc", "Content-Type": "application/x-thing"}},
        {"url": sink.url("/json"), "method": "POST", "json": {"a": [1, "/"], "b": None}},
        {"url": sink.url("/head"), "method": "HEAD", "parameters": {"q": "1"}},
        {"url": sink.url("/del"), "method": "DELETE", "body": "aGk=", "parameters": {"ignored": "1"}},
    ])
    assert status == 200 and resp["success"] is True
    assert len(resp["ids"]) == 6 and len(set(resp["ids"])) == 6
    got = {r.path_qs.split("?")[0]: r for r in await sink.wait_for(6)}

    g = got["/get"]
    assert g.method == "GET" and g.path_qs == "/get?keep=1&a+b=c%26d&keep=2" and g.body == b""
    assert g.headers["User-Agent"].startswith("bwp/")
    assert "Accept-Encoding" not in g.headers and "Accept" not in g.headers

    p = got["/post"]
    assert p.method == "POST" and p.body == b"x=1%2F2&y=%C3%A9"
    assert p.headers["Content-Type"] == "application/x-www-form-urlencoded"

    r = got["/raw"]
    assert r.method == "PUT" and r.body == body
    assert r.headers["X-Token"] == "abc" and r.headers["Content-Type"] == "application/x-thing"

    j = got["/json"]
    assert json.loads(j.body) == {"a": [1, "/"], "b": None}
    assert j.headers["Content-Type"] == "application/json"

    h = got["/head"]
    assert h.method == "HEAD" and h.path_qs == "/head?q=1"

    d = got["/del"]
    assert d.method == "DELETE" and d.body == b"hi" and d.path_qs == "/del"


async def test_json_respects_callers_content_type(daemon, sink):
    status, _, _ = await daemon.post({"url": sink.url("/j"), "method": "POST", "json": [1],
                                      "headers": {"content-type": "application/vnd.x+json"}})
    assert status == 200
    (r,) = await sink.wait_for(1)
    assert r.headers["Content-Type"] == "application/vnd.x+json" and r.body == b"[1]"


async def test_clones_inherit_and_merge(daemon, sink):
    status, resp, _ = await daemon.post({
        "url": sink.url("/root"), "method": "POST", "body": base64.b64encode(b"B").decode(),
        "headers": {"X-A": "root", "X-B": "root"}, "parameters": {"p": "root"},
        "clones": [
            {},
            {"url": sink.url("/c1"), "headers": {"X-B": "clone"}},
            {"url": sink.url("/c2"), "method": "GET", "parameters": {"q": "c"}},
        ],
    })
    assert status == 200 and len(resp["ids"]) == 3
    got = {r.path_qs.split("?")[0]: r for r in await sink.wait_for(3)}
    assert got["/root"].method == "POST" and got["/root"].body == b"B"
    assert got["/c1"].headers["X-A"] == "root" and got["/c1"].headers["X-B"] == "clone"
    assert got["/c1"].body == b"B"
    c2 = got["/c2"]
    assert c2.method == "GET" and c2.path_qs == "/c2?p=root&q=c"


async def test_caller_ids_and_clone_ids(daemon, sink):
    status, resp, _ = await daemon.post([
        {"url": sink.url("/a"), "id": "order-1"},
        {"url": sink.url("/b"), "id": "fan", "clones": [{}, {"id": "own"}]},
    ])
    assert status == 200
    assert resp["ids"] == ["order-1", "fan.0", "own"]
    await sink.wait_for(3)


async def test_compressed_bodies(daemon, sink):
    payload = json.dumps({"url": sink.url("/gz")}).encode()
    raw_deflate = zlib.compressobj(wbits=-15)
    raw = raw_deflate.compress(payload) + raw_deflate.flush()
    for enc, data in (("gzip", gzip.compress(payload)), ("deflate", zlib.compress(payload)),
                      ("deflate", raw)):
        status, resp, _ = await daemon.post(None, raw=data, headers={"Content-Encoding": enc})
        assert status == 200, (enc, resp)
    await sink.wait_for(3)
    status, resp, _ = await daemon.post(None, raw=b"not gzip",
                                        headers={"Content-Encoding": "gzip"})
    assert status == 400 and "gzip" in resp["error"]


BAD_INPUTS = [
    (b"", "malformed JSON"),
    (b"{", "malformed JSON"),
    (b'"str"', "object or an array"),
    (b"[1]", "must be a JSON object"),
    (b'{"method": "GET"}', "url: is required"),
    (b'{"url": 5}', "url: must be a string"),
    (b'{"url": "ftp://127.0.0.1/x"}', "http"),
    (b'{"url": "/relative"}', "http"),
    (b'{"url": "http://127.0.0.1/a b"}', "whitespace"),
    (b'{"url": "http://127.0.0.1/", "body": "***"}', "base64"),
    (b'{"url": "http://127.0.0.1/", "body": 5}', "base64"),
    (b'{"url": "http://127.0.0.1/", "headers": {"X": 1}}', "headers.X: must be a string"),
    (b'{"url": "http://127.0.0.1/", "headers": {"X": "a\\r\\nB: c"}}', "CR, LF"),
    (b'{"url": "http://127.0.0.1/", "headers": {"X\\nY": "a"}}', "header name"),
    (b'{"url": "http://127.0.0.1/", "headers": ["a"]}', "object of strings"),
    (b'{"url": "http://127.0.0.1/", "parameters": {"a": 1}}', "parameters.a: must be a string"),
    (b'{"url": "http://127.0.0.1/", "method": "GE T"}', "method"),
    (b'{"url": "http://127.0.0.1/", "queue": "nope"}', "unknown queue"),
    (b'{"url": "http://127.0.0.1/", "hostMetrics": "yes"}', "hostMetrics"),
    (b'{"url": "http://127.0.0.1/", "body": "aGk=", "json": 1}', "mutually exclusive"),
    (b'{"url": "http://127.0.0.1/", "delay": -1}', "delay"),
    (b'{"url": "http://127.0.0.1/", "delay": "soon"}', "ISO 8601"),
    (b'{"url": "http://127.0.0.1/", "delay": 1, "at": "2030-01-01T00:00:00Z"}', "exclusive"),
    (b'{"url": "http://127.0.0.1/", "at": "2030-01-01T00:00:00"}', "UTC offset"),
    (b'{"url": "http://127.0.0.1/", "retries": 1.5}', "retries"),
    (b'{"url": "http://127.0.0.1/", "timeout": 0}', "timeout"),
    (b'{"url": "http://127.0.0.1/", "id": ""}', "id"),
    (b'{"url": "http://127.0.0.1/", "id": "' + b"x" * 129 + b'"}', "id"),
    (b'{"url": "http://127.0.0.1/", "unique": true}', "needs an `id`"),
    (b'{"url": "http://127.0.0.1/", "callback": "nope"}', "callback"),
    (b'{"url": "http://127.0.0.1/", "clones": [{"clones": []}]}', "only on the root"),
    (b'{"url": "http://127.0.0.1/", "clones": [5]}', "clones[0]"),
    (b'{"clones": [{"url": "http://127.0.0.1/"}, {}]}', "clones[1].url"),
]


async def test_bad_input_is_400_json_and_nothing_enqueued(daemon, sink):
    # a valid job first in each batch: it must not be enqueued either
    good = json.dumps({"url": sink.url("/must-not-arrive")}).encode()
    for raw, message in BAD_INPUTS:
        batch = b"[" + good + b"," + raw + b"]" if raw.startswith(b"{") else raw
        status, resp, headers = await daemon.post(None, raw=batch)
        assert status == 400, (raw, resp)
        assert headers["Content-Type"].startswith("application/json")
        assert resp["success"] is False and message in resp["error"], (raw, resp["error"])
    await sink.settle(0.3)
    assert sink.received == []
    assert await daemon.metric("bwp_jobs_accepted_total", queue="default") == 0
    assert await daemon.metric("bwp_jobs_rejected_total", reason="invalid") == len(BAD_INPUTS)


async def test_empty_array_is_accepted_like_the_go_daemon(daemon):
    status, resp, _ = await daemon.post([])
    assert status == 200 and resp == {"success": True, "ids": []}


async def test_body_limit_413(make_daemon, sink):
    d = await make_daemon({"limits": {"max_body_size": 1000}})
    status, resp, _ = await d.post({"url": sink.url("/x"), "body": "A" * 2000})
    assert status == 413 and resp["success"] is False
    # a gzip bomb is stopped at the same limit, after decompression
    bomb = gzip.compress(b"[" + b" " * 100_000 + b"]")
    status, resp, _ = await d.post(None, raw=bomb, headers={"Content-Encoding": "gzip"})
    assert status == 413
    assert await d.metric("bwp_jobs_rejected_total", reason="too_large") == 2


async def test_queue_full_is_503_and_batches_are_all_or_nothing(make_daemon, make_sink):
    slow = await make_sink(delay=1.0)  # the worker stays busy while the batches below are tried
    d = await make_daemon({"pool": {"size": 1, "queue_size": 3}})
    status, _, _ = await d.post({"url": slow.url("/running")})
    assert status == 200
    await slow.wait_for(1)  # the only worker is now busy
    status, _, _ = await d.post([{"url": slow.url(f"/q{i}")} for i in range(2)])
    assert status == 200
    # one slot left: a batch of two must be refused whole
    status, resp, headers = await d.post([{"url": slow.url("/b1")}, {"url": slow.url("/b2")}])
    assert status == 503 and resp["success"] is False and "full" in resp["error"]
    assert int(headers["Retry-After"]) >= 1
    status, resp, _ = await d.post({"url": slow.url("/c0"), "clones": [{}, {}]})
    assert status == 503
    status, _, _ = await d.post({"url": slow.url("/last")})
    assert status == 200
    # now every queue is full: refused before the body is even parsed
    status, resp, headers = await d.post(None, raw=b"not even json")
    assert status == 503 and "Retry-After" in headers
    assert resp["error"] == "queue 'default' is full (3 jobs, pool.queue_size)"
    await slow.wait_for(4, timeout=15)
    await slow.settle(0.5)
    paths = sorted(r.path_qs for r in slow.received)
    assert paths == ["/last", "/q0", "/q1", "/running"]
    assert await d.metric("bwp_jobs_rejected_total", reason="queue_full") == 5


async def test_routing_by_longest_prefix(make_daemon, make_sink):
    sinks = [await make_sink(host=h) for h in ("127.0.0.1", "127.0.0.9", "127.0.0.200")]
    d = await make_daemon({"routes": {
        "127.0.0.128/25": "127.0.0.3",  # order in the file does not matter
        "127.0.0.0/8": "127.0.0.2",
        "127.0.0.9/32": "auto",
    }})
    status, _, _ = await d.post([{"url": s.url("/r")} for s in sinks])
    assert status == 200
    peers = [(await s.wait_for(1))[0].peer for s in sinks]
    assert peers[0] == "127.0.0.2"   # /8
    assert peers[1] == "127.0.0.1"   # /32 -> auto: the OS picks 127.0.0.1
    assert peers[2] == "127.0.0.3"   # /25 beats /8


async def test_routing_ipv6_destination(make_daemon, make_sink):
    v6 = await make_sink(host="::1")
    v4 = await make_sink()
    d = await make_daemon({"routes": {"::/0": "::1", "0.0.0.0/0": "127.0.0.4"}})
    status, _, _ = await d.post([{"url": v6.url("/six")}, {"url": v4.url("/four")}])
    assert status == 200
    assert (await v6.wait_for(1))[0].peer == "::1"
    assert (await v4.wait_for(1))[0].peer == "127.0.0.4"


async def test_keep_alive_connections_are_reused(make_daemon, sink):
    d = await make_daemon({"pool": {"size": 1}, "routes": {"127.0.0.0/8": "127.0.0.6"}})
    for i in range(5):
        assert (await d.post({"url": sink.url(f"/{i}")}))[0] == 200
        await sink.wait_for(i + 1)
    # the sink is aiohttp with keep-alive: one worker, sequential jobs -> one connection
    assert {r.peer for r in sink.received} == {"127.0.0.6"}


async def test_unix_and_ipv6_listeners(make_daemon, sink, tmp_path):
    from conftest import free_port

    sock_path = str(tmp_path / "run" / "bwp.sock")
    port6 = free_port("::1")
    d = await make_daemon()
    await d.stop()
    d2 = await make_daemon({"listen": [f"127.0.0.1:{free_port()}", sock_path, f"[::1]:{port6}"]})
    job = json.dumps({"url": sink.url("/via")}).encode()
    conn = aiohttp.UnixConnector(path=sock_path)
    async with aiohttp.ClientSession(connector=conn) as s, \
            s.post("http://bwp/post/http", data=job) as r:
        assert r.status == 200
    async with aiohttp.ClientSession() as s, \
            s.post(f"http://[::1]:{port6}/post/http", data=job) as r:
        assert r.status == 200
    await sink.wait_for(2)
    assert d2.proc.returncode is None


async def test_errors_timeouts_and_host_metrics(make_daemon, make_sink):
    bad = await make_sink(status=500)
    slow = await make_sink(delay=3)
    d = await make_daemon({"client": {"read_timeout": 0.5}})
    status, _, _ = await d.post([
        {"url": bad.url("/e"), "hostMetrics": True},
        {"url": slow.url("/t"), "hostMetrics": True},
        {"url": slow.url("/t2"), "timeout": 0.2},
        {"url": "http://127.0.0.1:1/refused"},
    ])
    assert status == 200
    await bad.wait_for(1)
    await slow.wait_for(2)
    for _ in range(50):
        if await d.metric("bwp_outbound_timeouts_total") == 2 and \
                await d.metric("bwp_outbound_errors_total") == 1:
            break
        await asyncio.sleep(0.1)
    assert await d.metric("bwp_outbound_timeouts_total") == 2
    assert await d.metric("bwp_outbound_errors_total") == 1
    assert await d.metric("bwp_outbound_requests_total", code="5xx") == 1
    assert await d.metric("bwp_host_errors_total", host="127.0.0.1") == 1
    assert await d.metric("bwp_host_timeouts_total", host="127.0.0.1") == 1
    assert await d.metric("bwp_jobs_failed_total", queue="default") == 4


async def test_destination_guard_denies_before_connecting(make_daemon, make_sink):
    guarded = await make_sink(host="127.0.0.7")
    d = await make_daemon({"destinations": {"deny": ["127.0.0.7/32"]}})
    status, _, _ = await d.post([{"url": guarded.url("/x")},
                                 {"url": f"http://127.0.0.1:{d.port}/post/http"}])
    assert status == 200
    for _ in range(50):
        if await d.metric("bwp_outbound_errors_total") == 2:
            break
        await asyncio.sleep(0.1)
    assert await d.metric("bwp_outbound_errors_total") == 2
    assert guarded.received == []
    assert "denied network 127.0.0.7/32" in d.output()
    assert "bwp's own listeners" in d.output()


async def test_bearer_tokens(make_daemon, sink):
    token = "s3cret-token-0123456789"
    d = await make_daemon({"auth": {"tokens": [token]}})
    job = {"url": sink.url("/auth")}
    assert (await d.post(job))[0] == 401
    assert (await d.post(job, headers={"Authorization": "Bearer wrong-token-000000000"}))[0] == 401
    assert (await d.post(job, headers={"Authorization": f"Bearer {token}"}))[0] == 200
    assert (await d.get("/healthz"))[0] == 200  # health and metrics stay open
    await sink.wait_for(1)


async def test_healthz_and_metrics_names(daemon):
    status, text = await daemon.get("/healthz")
    assert status == 200 and json.loads(text)["status"] == "ok"
    _, text = await daemon.get("/metrics")
    for name in ("bwp_jobs_accepted_total", "bwp_jobs_rejected_total", "bwp_queue_length",
                 "bwp_queue_capacity", "bwp_busy_workers", "bwp_outbound_requests_total",
                 "bwp_outbound_errors_total", "bwp_outbound_timeouts_total", "bwp_jobs_failed_total",
                 "bwp_outbound_request_duration_seconds_bucket"):
        assert name in text, name
    assert await daemon.metric("bwp_queue_capacity", queue="default") == 10000
    assert await daemon.metric("bwp_workers", queue="default") == 50
    # one task per worker, plus the handler answering this scrape
    assert await daemon.metric("bwp_asyncio_tasks") >= 51


async def test_sigterm_drains_queued_jobs(make_daemon, make_sink):
    slow = await make_sink(delay=0.3)
    d = await make_daemon({"pool": {"size": 2}})
    status, _, _ = await d.post([{"url": slow.url(f"/{i}")} for i in range(8)])
    assert status == 200
    code = await d.stop()
    assert code == 0
    assert len(slow.received) == 8
    assert "stopped (0 jobs abandoned)" in d.output()


async def test_drain_deadline_logs_abandoned_jobs(make_daemon, make_sink):
    hang = await make_sink(delay=30)
    d = await make_daemon({"pool": {"size": 1}, "drain_timeout": 0.5})
    status, _, _ = await d.post([{"url": hang.url(f"/{i}"), "id": f"job-{i}"}
                                    for i in range(3)])
    assert status == 200
    await hang.wait_for(1)
    assert await d.stop() == 0
    out = d.output()
    for i in range(3):
        assert f"abandoned job job-{i} GET {hang.url(f'/{i}')}" in out
    assert "stopped (3 jobs abandoned)" in out
