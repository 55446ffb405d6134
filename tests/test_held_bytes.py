"""jobs.HeldBytes: the bytes the queued jobs hold, by which limits.max_queued_bytes refuses.

A pure data structure, so tested directly: whatever mix of single jobs and batches sharing a
body or headers object is held and released, what weigh() says is what hold() adds (told it,
or working it out again), the total is the size of what is held, and it returns to zero."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from bwp.jobs import JOB_OVERHEAD, HeldBytes, Job


def _job(url: str, body: bytes | None, headers: dict[str, str] | None) -> Job:
    return Job("id", url, "POST", headers, body, "default")


def _size(job: Job) -> int:
    headers = sum(len(k) + len(v) for k, v in (job.headers or {}).items())
    return JOB_OVERHEAD + len(job.url) + len(job.body or b"") + headers


bodies = st.one_of(st.none(), st.binary(max_size=40))
header_maps = st.one_of(st.none(), st.dictionaries(st.text(max_size=8), st.text(max_size=8),
                                                   max_size=3))
# a request: its clones share one body and one headers object (as the parser makes them)
requests = st.tuples(st.integers(1, 4), st.text(max_size=20), bodies, header_maps)


@given(st.lists(requests, max_size=12), st.randoms())
def test_what_weigh_says_is_what_hold_adds_and_release_returns_to_zero(batches, rnd):
    held, reference = HeldBytes(1 << 40), HeldBytes(1 << 40)  # the latter works it out again
    alive: list[Job] = []
    for clones, url, body, headers in batches:
        jobs = [_job(url, body, headers) for _ in range(clones)]
        weight = held.weigh(jobs)
        before = held.total
        held.hold(jobs, weight)
        reference.hold(jobs)
        assert held.total - before == weight and held.total == reference.total
        alive += jobs
        # an object shared by a batch counts once; a single job's own is counted as its own
        # even where CPython shares it (b"x"): never less than what is held, never more
        # than each job alone
        objects = {id(o): o for j in alive for o in (j.body, j.headers) if o is not None}
        assert sum(_size(j) for j in alive) >= held.total >= sum(
            JOB_OVERHEAD + len(j.url) for j in alive) + sum(
            len(o) if isinstance(o, bytes) else sum(len(k) + len(v) for k, v in o.items())
            for o in objects.values())
    rnd.shuffle(alive)
    for job in alive:
        held.release(job)
    assert held.total == 0


def test_a_single_job_weighs_its_bytes_and_a_batch_shares_them():
    held = HeldBytes(1 << 40)
    one = _job("http://127.0.0.1/a", b"x" * 100, {"A": "b"})
    assert held.weigh([one]) == _size(one)
    body, headers = b"y" * 100, {"C": "d"}
    batch = [_job("http://127.0.0.1/b", body, headers) for _ in range(3)]
    assert held.weigh(batch) == 3 * (JOB_OVERHEAD + len(batch[0].url)) + 100 + 2
    held.hold(batch, held.weigh(batch))
    clone = _job("http://127.0.0.1/b", body, headers)  # its objects already held: free
    assert held.weigh([clone]) == JOB_OVERHEAD + len(clone.url)
