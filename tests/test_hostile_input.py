"""Property-based: arbitrary JSON and bytes at POST /post/http never crash the daemon.

Every answer is 200 or a 4xx with a JSON message, and a refused request enqueues nothing.
Generated URLs only ever point at 127.0.0.1 (or are not URLs at all), so no name is resolved
and no packet leaves the host.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from conftest import SyncDaemon, sync_daemon
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


@pytest.fixture(scope="module")
def daemon(tmp_path_factory) -> Iterator[SyncDaemon]:
    # A tiny queue: batches often do not fit, which exercises all-or-nothing admission;
    # small limits, which generated payloads often exceed.
    with sync_daemon(tmp_path_factory.mktemp("hostile"), {
        "pool": {"size": 1, "queue_size": 5},
        "limits": {"max_body_size": 20000, "max_jobs_per_request": 6, "max_clones": 2,
                   "max_headers": 2, "max_json_depth": 6},
        "client": {"connect_timeout": 0.2, "read_timeout": 0.2},
    }) as d:
        yield d


# Port 9 on 127.0.0.1: nothing listens, connections are refused at once.
URLS = st.sampled_from(["http://127.0.0.1:9/a", "https://127.0.0.1:9/b?x=1", "", "no url",
                        "ftp://127.0.0.1/", "http://127.0.0.1:9/ sp", "/rel", *(BAD_HOSTS := [
                            "http://xn--ab-/", "HTTP://xn--xn---%zz%zz#", "-HTTP://[]@"])])
SCALARS = st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats(allow_nan=False) \
    | st.text(max_size=20)
ANY_JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
FIELDS = {
    "url": URLS, "callback": URLS,
    "method": st.sampled_from(["GET", "post", "PUT", "", "G T", 5]),
    "body": st.sampled_from(["aGk=", "***", "", 7]) | ANY_JSON,
    "json": ANY_JSON,
    "parameters": st.dictionaries(st.text(max_size=6), SCALARS, max_size=3) | ANY_JSON,
    "headers": st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3) | ANY_JSON,
    "hostMetrics": SCALARS, "queue": st.sampled_from(["default", "nope", 3]),
    "delay": SCALARS | st.sampled_from(["PT1S", "P1D", "PT", "soon"]),
    "at": SCALARS | st.sampled_from(["2030-01-01T00:00:00Z", "2030-01-01T00:00:00"]),
    "retries": SCALARS, "timeout": SCALARS, "id": SCALARS, "unique": SCALARS,
    "once": SCALARS, "wait": st.sampled_from([0, 0.01, -1, "x"]),
}
JOB = st.fixed_dictionaries({}, optional=FIELDS)
ROOT_JOB = st.fixed_dictionaries({}, optional={**FIELDS, "clones": st.lists(JOB, max_size=3)
                                              | ANY_JSON})
PAYLOAD = ROOT_JOB | st.lists(ROOT_JOB, max_size=4) | ANY_JSON


def check_answer(d: SyncDaemon, status: int, body: bytes, before: float) -> None:
    assert status in (200, 400, 413, 503, 504), (status, body)
    doc = json.loads(body)
    assert isinstance(doc, dict) and isinstance(doc.get("success"), bool)
    if status != 200:
        assert isinstance(doc["error"], str) and doc["error"]
        if status in (400, 413):
            assert d.accepted() == before  # nothing of a refused request was enqueued
    assert d.proc.poll() is None


def test_urls_yarl_cannot_take_apart_are_refused(daemon):
    """A malformed IDNA label (UnicodeError from yarl) or authority (IndexError): a 400."""
    for url in BAD_HOSTS:
        before = daemon.accepted()
        status, body = daemon.request("POST", "/post/http", json.dumps({"url": url}).encode())
        assert status == 400 and b"invalid URL" in body, (url, status, body)
        check_answer(daemon, status, body, before)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(PAYLOAD)
def test_arbitrary_json(daemon, payload):
    before = daemon.accepted()
    status, body = daemon.request("POST", "/post/http", json.dumps(payload).encode())
    check_answer(daemon, status, body, before)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=300), st.sampled_from(["", "gzip", "deflate", "br", "identity"]))
def test_arbitrary_bytes(daemon, raw, encoding):
    before = daemon.accepted()
    headers = {"Content-Encoding": encoding} if encoding else {}
    status, body = daemon.request("POST", "/post/http", raw, headers)
    check_answer(daemon, status, body, before)


# Deeper than Python's recursion limit (~1000) on purpose: json.loads must not turn a
# RecursionError into a 500. (The 20000-byte body limit bounds the depth tried here;
# test_limits.py sends 100000 levels.)
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.integers(1, 3300), st.sampled_from([("[", "]"), ('{"a":', "}")]), st.booleans(),
       st.booleans())
def test_deep_json(daemon, depth, brackets, closed, in_job):
    opener, closer = brackets
    nested = opener * depth + "1" + closer * (depth if closed else depth // 2)
    raw = '{"url": "http://127.0.0.1:9/deep", "json": ' + nested + "}" if in_job else nested
    before = daemon.accepted()
    status, body = daemon.request("POST", "/post/http", raw.encode())
    check_answer(daemon, status, body, before)


@given(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=5)
       | st.dictionaries(st.from_regex(r"[A-Za-z0-9_.~-]{0,6}", fullmatch=True),
                         st.from_regex(r"[A-Za-z0-9_.~ -]{0,6}", fullmatch=True), max_size=5))
def test_form_parameters_encode_as_urlencode_does(params):
    """The form body of `parameters`: the unquoted fast path and urlencode agree byte for byte."""
    from urllib.parse import urlencode

    from bwp.jobs import JobError, _urlencode

    try:
        expected = urlencode(params).encode()
    except UnicodeEncodeError:
        with pytest.raises(JobError):
            _urlencode(params)
        return
    assert _urlencode(params) == expected
