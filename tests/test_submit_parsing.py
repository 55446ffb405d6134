"""The two ways a POST /post/http body is parsed must agree: the plain way (msgspec, for the
common job) may only accept what the general way accepts, and build the very same jobs; on
anything else it steps aside and the general way answers (and words the error).

A pure function of the bytes, so it is compared directly, over generated submissions (valid
and not) and the awkward bytes a hostile client sends."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bwp.config import DEFAULT_QUEUE, parse_config
from bwp.jobs import (
    _URL_CACHE,
    JOB_FIELDS,
    Job,
    JobError,
    Submission,
    _general_submission,
    _plain_submission,
    _values_before_parsing,
    parse_submission,
)

CFG = parse_config({"queues": {"slow": {}},
                    "limits": {"max_headers": 3, "max_header_size": 40, "max_url_length": 60,
                               "max_jobs_per_request": 3}})
QUEUES = frozenset(CFG.all_queues)
LIMITS = CFG.limits


def ids() -> Any:
    counter = itertools.count()
    return lambda: f"gen-{next(counter)}"


def general(raw: bytes, limits: Any = LIMITS) -> Submission | JobError:
    try:
        containers = _values_before_parsing(raw, limits.max_json_values)
        return _general_submission(raw, containers, QUEUES, DEFAULT_QUEUE, ids(), limits)
    except JobError as e:
        return e


def fields(job: Job) -> dict[str, Any]:
    """A job's fields, with their types, and the order of its headers."""
    out = {}
    for name in Job.__slots__:
        value = getattr(job, name)
        if name != "created":
            out[name] = (type(value), list(value.items()) if isinstance(value, dict) else value)
    return out


def assert_agree(raw: bytes, limits: Any = LIMITS) -> None:
    _URL_CACHE.clear()  # each way checks the URL itself, not through the other's cache
    plain = _plain_submission(raw, QUEUES, DEFAULT_QUEUE, ids(), limits)
    if plain is None:
        return  # the general way answers alone
    _URL_CACHE.clear()
    other = general(raw, limits)
    assert isinstance(other, Submission), (raw, other)
    assert plain.wait == other.wait
    assert [fields(j) for j in plain.jobs] == [fields(j) for j in other.jobs], raw


text = st.text(st.sampled_from("aZ09-_ /é\x00\x01\t\n\r\x7f☃"), max_size=8)
scalar = st.one_of(st.none(), st.booleans(), st.integers(-3, 200), st.floats(-1, 5000),
                   text)
string_map = st.one_of(
    st.dictionaries(st.sampled_from(["X-A", "Content-Type", "content-type", "bad name", "x",
                                     "Ünï"]), st.one_of(text, st.integers(0, 9)), max_size=4),
    st.just([]), scalar)
VALUES: dict[str, Any] = {
    "url": st.one_of(st.sampled_from(["http://127.0.0.1:9/x", "https://127.0.0.1/a?b=c",
                                      "http://[::1]:8/p", "HTTP://127.0.0.1/%7e", "", "ftp://x",
                                      "http://", "no url", "http://127.0.0.1/" + "x" * 60,
                                      "http://127.0.0.1/a b"]), scalar),
    "method": st.one_of(st.sampled_from(["GET", "POST", "post", "HEAD", "PUT", "PATCH",
                                         "BAD METHOD", "", "M(x)"]), scalar),
    "headers": string_map,
    "parameters": string_map,
    "queue": st.one_of(st.sampled_from([DEFAULT_QUEUE, "slow", "nope"]), scalar),
    "hostMetrics": scalar,
    "unique": scalar,
    "once": scalar,
    "timeout": st.one_of(st.sampled_from([0, 0.0005, 0.001, 1, 2.5, 3600, 3600.5, "5"]), scalar),
    "retries": st.one_of(st.sampled_from([0, 3, 100, 101, -1, 2.0]), scalar),
    "id": st.one_of(st.sampled_from(["a", "", "a/b", "x" * 129, "x" * 128, "\x01", "é"]), scalar),
    "body": st.one_of(st.just("aGVsbG8="), scalar),
    "json": scalar,
    "delay": st.one_of(st.just("PT1M"), scalar),
    "at": scalar,
    "callback": st.one_of(st.just("http://127.0.0.1:9/cb"), scalar),
    "clones": st.one_of(st.just([{}, {"id": "c"}]), scalar),
    "wait": scalar,
    "extra": scalar,
}
COMMON = ("url", "method", "headers", "parameters", "queue", "id", "timeout", "retries")


@st.composite
def job(draw: Any) -> dict[str, Any]:
    """Mostly the keys of a plain job, now and then any other, each maybe of the wrong type."""
    keys = draw(st.lists(st.sampled_from(COMMON), unique=True, max_size=len(COMMON)))
    if draw(st.integers(0, 3)) == 0:
        keys += draw(st.lists(st.sampled_from(sorted(VALUES)), unique=True, max_size=3))
    if "url" not in keys and draw(st.booleans()):
        keys.append("url")
    return {k: draw(VALUES[k]) for k in dict.fromkeys(keys)}


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(root=st.one_of(job(), st.lists(job(), max_size=4)), ascii_only=st.booleans())
def test_the_plain_way_builds_what_the_general_way_builds(root: Any, ascii_only: bool) -> None:
    assert_agree(json.dumps(root, ensure_ascii=ascii_only).encode())


def test_every_key_a_job_may_have_is_read_by_the_plain_way() -> None:
    from bwp.jobs import _ROOT_ONLY, _Plain

    assert set(_Plain.__struct_fields__) == {*JOB_FIELDS, *_ROOT_ONLY}


OK = b'"url":"http://127.0.0.1:9/x"'
AWKWARD = [
    b"{" + OK + b',"extra":' + b"1" * 101 + b"}",  # an integer json.loads refuses (_int)
    b"{" + OK + b',"extra":"\\ud800"}',  # a lone surrogate, escaped
    b'{"url":"http://127.0.0.1:9/\\ud800"}',  # ... in a key the plain way reads
    b"{" + OK + b',"headers":{"X-A":"\\udc00"}}',
    b"{" + OK + b',"method":"POST","parameters":{"a":"\\ud800x"}}',
    b"{" + OK + b',"method":"POST","parameters":{"a":"\\ud83d\\ude00"}}',  # a pair: an emoji
    b"{" + OK + b',"extra":"\xed\xa0\x80"}',  # the same in (invalid) UTF-8
    b"{" + OK + b',"extra":"\xff"}',  # not UTF-8 at all, in a key msgspec skips
    b"{" + OK + b',"extra":NaN}',
    b"{" + OK + b',"extra":Infinity}',
    b"{" + OK + b',"extra":1e999}',
    b"\xef\xbb\xbf{" + OK + b"}",  # a UTF-8 byte order mark
    "{\"url\":\"http://127.0.0.1:9/x\"}".encode("utf-16"),
    b"{" + OK + b',"url":"http://127.0.0.1:9/y"}',  # a key twice: the last counts
    b"{" + OK + b',"method":"GET","method":"POST"}',
    b"{" + OK + b',"retries":2.0}',
    b"{" + OK + b',"retries":true}',
    b"{" + OK + b',"timeout":true}',
    b"{" + OK + b',"hostMetrics":1}',
    b"{" + OK + b',"id":null,"unique":true}',  # `id` given (as null): unique is allowed
    b"{" + OK + b',"unique":true}',
    b"{" + OK + b',"headers":[]}',  # PHP's empty array
    b"{" + OK + b',"parameters":[],"method":"POST"}',
    b"{" + OK + b',"parameters":{"a":"1"},"method":"GET"}',
    b"{" + OK + b',"parameters":{"a b":"\xc3\xa9"},"method":"POST"}',
    b"{" + OK + b"} x",
    b"[]",
    b"[{" + OK + b"}," * 3 + b"{" + OK + b"}]",  # one job over max_jobs_per_request
    b"[{" + OK + b"},1]",
    b"{" + OK + b',"x":[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}',
    b'{"url":"http://127.0.0.1:9/\\u0000"}',
    b" \n{" + OK + b"}\t",
    b"{" + OK + b',"json":null}',
    b"{" + OK + b',"body":null}',
]


AWKWARD += [  # spellings json.dumps never writes
    b'{"u\\u0072l":"http://127.0.0.1:9/x"}',  # an escaped key
    b"{" + OK + b',"i\\u0064":"a","unique":true}',
    *(b"{" + OK + b',"retries":' + n + b"}" for n in (b"2e0", b"1e2", b"-0", b"1E1")),
    *(b"{" + OK + b',"timeout":' + n + b"}" for n in (
        b"1e0", b"36e2", b"3.6E+3", b"1e-3", b"-0", b"0.0009999999999999999999",
        b"3600.0000000000001", b"1" + b"0" * 100 + b"e-98")),
    b"{" + OK + b',"headers":{"X-A":"a\\tb"}}',  # an escaped TAB: allowed in a value
    b"{" + OK + b',"headers":{"X-A":"a\\nb"}}',
    b"{" + OK + b',"headers":{"X-A":"a	b"}}',  # a raw TAB: not JSON
    b"{" + OK + b',"headers":{"A":"1","B":"2","C":"3","A":"4"}}',  # 3 headers, A twice
    b"{" + OK + b',"headers":{"A":"1","B":"2","C":"3","D":"4"}}',
    b"{" + OK + b',"method":"POST","parameters":{"b":"1","a":"2","b":"3"}}',
    b'{"url":"http://127.0.0.1:9/\xc0\xaf"}',  # overlong UTF-8
    b"{" + OK + b',"id":"\xf4\x90\x80\x80"}',  # past U+10FFFF
    b"{" + OK + b',"method":"POST","parameters":{"\xc0\xaf":"1"}}',
    b"[{" + OK + b"},{" + OK + b',"delay":"PT1M"}]',  # a later job only the general way takes
    b'{"url":"http://xn--ab-/"}', b'{"url":"-HTTP://[]@"}',  # yarl raises, JobError here
]
TIGHT = parse_config({"limits": {"max_headers": 0, "max_url_length": 8,
                                 "max_jobs_per_request": 1}}).limits


def test_awkward_bytes_are_answered_alike() -> None:
    for raw in AWKWARD:
        for limits in (LIMITS, TIGHT):
            assert_agree(raw, limits)


def test_a_batch_the_plain_way_leaves_draws_its_ids_the_general_way() -> None:
    """No id is drawn for a batch the plain way gives up on: the ids run on unbroken."""
    raw = b"[{" + OK + b"},{" + OK + b"},{" + OK + b',"delay":5}]'
    sub = parse_submission(raw, QUEUES, DEFAULT_QUEUE, ids(), LIMITS)
    assert [j.id for j in sub.jobs] == ["gen-0", "gen-1", "gen-2"]


def test_batches_of_any_size_take_the_plain_way_within_the_depth_limit() -> None:
    """A plain batch nests 3 levels whatever its length; under a tighter max_json_depth the
    general way answers (and refuses)."""
    job = {"url": "http://127.0.0.1:9/x", "headers": {"X-A": "1"}}
    raw = json.dumps([job] * 300).encode()
    many = parse_config({"limits": {"max_jobs_per_request": 1000}}).limits
    assert _plain_submission(raw, QUEUES, DEFAULT_QUEUE, ids(), many) is not None
    assert_agree(raw, many)
    assert len(parse_submission(raw, QUEUES, DEFAULT_QUEUE, ids(), many).jobs) == 300
    shallow = parse_config({"limits": {"max_json_depth": 2}}).limits
    with pytest.raises(JobError, match="max_json_depth"):
        parse_submission(json.dumps([job]).encode(), QUEUES, DEFAULT_QUEUE, ids(), shallow)
    deep = b'{"url":"http://127.0.0.1:9/x","json":' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert _plain_submission(deep, QUEUES, DEFAULT_QUEUE, ids(), many) is None  # msgspec's
    # RecursionError, not a crash; the general way refuses it by max_json_depth
    with pytest.raises(JobError, match="max_json_depth"):
        parse_submission(deep, QUEUES, DEFAULT_QUEUE, ids(), many)


def test_the_plain_way_takes_the_common_job() -> None:
    """Else the comparison above would hold by never taking any."""
    raw = json.dumps({"url": "http://127.0.0.1:9/x", "method": "POST",
                      "headers": {"X-Request-Id": "r-1"},
                      "parameters": {"order": "1", "status": "paid"}}).encode()
    plain = _plain_submission(raw, QUEUES, DEFAULT_QUEUE, ids(), LIMITS)
    assert plain is not None
    (job,) = plain.jobs
    assert (job.url, job.method, job.body) == ("http://127.0.0.1:9/x", "POST",
                                               b"order=1&status=paid")
    assert job.headers == {"X-Request-Id": "r-1",
                           "Content-Type": "application/x-www-form-urlencoded"}
    assert_agree(raw)
