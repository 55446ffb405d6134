"""A real PHP client (curl_* + json_encode() with default flags) against the daemon.

tests/php/submit.php posts the kinds of requests PHP sites send to the Go daemon; this test checks
every answer and then that the sink received exactly the requests that were meant. Skipped, with
the reason, only when `php` with its curl extension is not installed (.ci/run installs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

SCRIPT = Path(__file__).resolve().parent / "php" / "submit.php"
FORM = "application/x-www-form-urlencoded"
ALL_BYTES = bytes(range(256))
ROOT_BODY = b'root body \x00\x01\xfe\xff /slashes/ "quoted" end\r\n'
# ids the daemon must hand back per case: clones expanded
EXPECTED_IDS = {"a": 2, "b": 1, "c1": 3, "c2": 3, "d": 1}


def _php_with_curl() -> str:
    php = shutil.which("php")
    if php is None:
        pytest.skip("`php` is not installed (Debian: apt-get install php-cli php-curl; .ci/run does this)")
    try:
        modules = subprocess.run([php, "-m"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"`php -m` failed: {e}")
    if "curl" not in {m.strip().lower() for m in modules.splitlines()}:
        pytest.skip(f"{php} has no curl extension (Debian: apt-get install php-curl; .ci/run does this)")
    return php


def _query(text: str) -> dict[str, str]:
    pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text), errors="strict")
    d = dict(pairs)
    assert len(d) == len(pairs), f"repeated keys in {text!r}"
    return d


def _headers(r: Any) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in r.raw_headers:
        out.setdefault(k.decode("latin-1").lower(), []).append(v.decode("latin-1"))
    return out


def _check_headers(r: Any, want: dict[str, str], absent: tuple[str, ...] = ()) -> None:
    got = _headers(r)
    for name, value in want.items():
        assert got.get(name.lower()) == [value], f"{r.path_qs}: header {name}: {got.get(name.lower())}"
    for name in absent:
        assert name.lower() not in got, f"{r.path_qs}: unexpected header {name}: {got[name.lower()]}"


def _form(r: Any) -> dict[str, str]:
    _check_headers(r, {"Content-Type": FORM})
    return _query(r.body.decode("ascii"))  # a form body is percent-encoded ASCII


async def _run_php(php: str, daemon_base: str, sink_base: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    proc = await asyncio.create_subprocess_exec(
        php, "-d", "display_errors=stderr", str(SCRIPT), daemon_base, sink_base,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise AssertionError("php submit.php did not finish within 30 s") from None
    assert proc.returncode == 0, f"php exited {proc.returncode}: {err.decode(errors='replace')}"
    return json.loads(out)


async def test_php_client_compatibility(daemon, sink):
    php = _php_with_curl()
    results = await _run_php(php, daemon.base, sink.base)

    cases = {r["case"]: r for r in results}
    assert set(cases) in ({"a", "b", "c1", "c2"}, {"a", "b", "c1", "c2", "d"}), list(cases)
    # the payloads really are PHP's default encoding: escaped slashes and \u escapes
    assert all("\\/" in r["sent"] for r in results)
    assert "\\u00e9" in cases["a"]["sent"] and "\\u0418" in cases["a"]["sent"]

    all_ids: list[str] = []
    for name, r in cases.items():
        assert r["status"] == 200, f"case {name}: {r['status']} {r['response']}\n{daemon.output()}"
        answer = json.loads(r["response"])
        assert answer["success"] is True, (name, answer)
        ids = answer["ids"]
        assert len(ids) == EXPECTED_IDS[name], (name, answer)
        assert all(isinstance(i, str) and i for i in ids), (name, answer)
        all_ids += ids
    assert len(set(all_ids)) == len(all_ids), f"ids not distinct: {all_ids}"

    expected = sum(EXPECTED_IDS[n] for n in cases)
    await sink.wait_for(expected, timeout=15)
    await sink.settle()
    assert len(sink.received) == expected, [r.path_qs for r in sink.received]
    got = {urlsplit(r.path_qs).path: r for r in sink.received}
    assert len(got) == expected, [r.path_qs for r in sink.received]

    # (a) GET: parameters joined to the url's own query string, decoded back to what PHP meant
    r = got["/a/get"]
    assert r.method == "GET"
    assert _query(urlsplit(r.path_qs).query) == {
        "fixed": "1", "q": "a b/c", "lang": "héllo wörld", "empty": ""}
    assert r.body == b""
    # (a) POST: parameters as a form body, nothing in the query string
    r = got["/a/post"]
    assert (r.method, r.path_qs) == ("POST", "/a/post")
    assert _form(r) == {"name": "Иван", "redirect": "https://example.com/back?x=1&y=2", "sum": "1+1=2"}

    # (b) byte-exact binary body, headers as given (escaped slashes arrive as "/")
    r = got["/b/binary"]
    assert (r.method, r.path_qs) == ("PUT", "/b/binary")
    assert r.body == ALL_BYTES
    _check_headers(r, {
        "Content-Type": "application/octet-stream",
        "Content-Length": "256",
        "X-Callback": "https://example.com/hooks/bwp?id=1/2",
        "X-Trace-Id": "abc/def/123",
        "Authorization": "Bearer a/b+c==",
    })

    # (c1) clones inherit method, headers and body; a clone's headers win
    root_headers = {"Content-Type": "application/octet-stream", "X-Sender": "php/test",
                    "X-Override": "root"}
    for path, path_qs, extra, absent in (
        ("/c1/0", "/c1/0", {"X-Secret": "puppies"}, ()),
        ("/c1/1", "/c1/1?k=v/w", {"X-Secret": "kittens", "X-Override": "clone1"}, ()),
        ("/c1/2", "/c1/2", {"X-Override": "clone2", "Content-Type": "text/plain"}, ("X-Secret",)),
    ):
        r = got[path]
        assert (r.method, r.path_qs) == ("POST", path_qs)
        assert r.body == ROOT_BODY, path  # with a body, parameters are not sent as a form
        _check_headers(r, {**root_headers, **extra}, absent)

    # (c2) clones inherit method and headers; parameters merged (clone winning) into form bodies
    for path, params, extra, absent in (
        ("/c2/0", {"shared": "root", "site": "clone0/override"}, {}, ("X-Clone",)),
        ("/c2/1", {"shared": "root", "site": "https://example.com/", "extra": "1"},
         {"X-Override": "clone1"}, ("X-Clone",)),
        ("/c2/2", {"shared": "root", "site": "https://example.com/"}, {"X-Clone": "2"}, ()),
    ):
        r = got[path]
        assert (r.method, r.path_qs) == ("POST", path)
        assert _form(r) == params, path
        _check_headers(r, {"X-Sender": "php/test", "X-Override": "root", **extra}, absent)

    # (d) a gzip-compressed submission
    if "d" in cases:
        r = got["/d/gzip"]
        assert (r.method, r.path_qs) == ("DELETE", "/d/gzip?x=1")
