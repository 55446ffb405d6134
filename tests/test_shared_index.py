"""SharedIndex's view without a broker: the events of one job, from several hosts, in any
order of arrival, leave every host with the same (newest) state."""

from __future__ import annotations

import itertools
import json
import time

from bwp.index import LocalIndex
from bwp.jobs import Job
from bwp.shared_index import SharedIndex


class _Host(SharedIndex):
    """A SharedIndex whose stream is a list: what it would publish, kept in order."""

    def __init__(self, host: str | None = None) -> None:
        super().__init__(LocalIndex(1000, 3600.0), None, ["default"], 1000, 3600.0, 1 << 20,  # type: ignore[arg-type]
                         host)
        self.sent: list[dict] = []

    def _share(self, event: dict) -> None:
        self._apply(event)
        self.sent.append(event)


def _life_of_a_replayed_job() -> list[dict]:
    """accepted → retrying → failed on one host, replayed and then sent on another."""
    a, t = _Host(), time.time()
    job = Job("j-1", "http://127.0.0.1:9/x", "POST", None, b"", "default", created=t)
    a.add(job)
    job.attempts, job.state, job.not_before = 1, "retrying", t + 2
    a.retrying(job)
    job.attempts, job.state, job.finished = 2, "failed", t + 3
    a.finished(job)
    job.attempts, job.state, job.finished, job.not_before = 0, "queued", None, t + 10
    a.reopen(job)  # what pool.replay does to the job first
    job.attempts, job.state, job.finished = 1, "succeeded", t + 11
    a.finished(job)
    return json.loads(json.dumps(a.sent))  # as the stream carries them


def test_any_order_of_arrival_ends_in_the_newest_state() -> None:
    events = _life_of_a_replayed_job()
    assert [e["e"] for e in events] == ["accepted", "retrying", "finished", "replayed", "finished"]
    for order in itertools.permutations(events):
        b = _Host()
        for event in order:
            b._apply(event)
        doc = b.status("j-1")
        assert doc is not None and (doc["state"], doc["attempts"]) == ("succeeded", 1), order
        assert b.dead_letters == 0


def test_a_late_replay_does_not_undo_what_followed_it() -> None:
    *_, failed, replayed, succeeded = _life_of_a_replayed_job()
    b = _Host()
    for event in (failed, succeeded, replayed):  # the runner's news was here first
        b._apply(event)
    assert b.status("j-1")["state"] == "succeeded"
    b = _Host()
    b._apply(failed)
    assert b.dead_letters == 1
    b._apply(replayed)
    assert b.status("j-1")["state"] == "queued"  # replayed, not yet sent
    assert b.page("failed", None, 0, 10)[1] == 0


async def test_own_batches_are_recognised_and_markers_are_not() -> None:
    a, other = _Host(), _Host("elsewhere:1")
    batch = a._batch([{"e": "dropped", "id": "x", "created": 1.0}])
    assert batch.startswith(a._echo) and json.loads(batch)["events"][0]["id"] == "x"
    marker, _ = a._marker()
    assert not marker.startswith(a._echo)
    assert not other._batch([]).startswith(a._echo)  # another process's


def test_a_cancel_outlasts_a_late_retry_and_a_new_job_with_the_id():
    a, t = _Host(), time.time()
    job = Job("c-1", "http://127.0.0.1:9/x", "POST", None, b"", "default", created=t)
    a.add(job)
    accepted = a.sent[-1]
    job.attempts, job.state, job.not_before = 1, "retrying", t + 5
    a.retrying(job)
    retry = a.sent[-1]
    b = _Host()
    b._apply(accepted)
    doc = dict(b.status("c-1"), state="cancelled")
    b._apply({"e": "finished", "id": "c-1", "created": t, "finished": t + 1, "due": t, "doc": doc})
    b._apply(json.loads(json.dumps(retry)))  # scheduled on another host as it was cancelled
    assert b.status("c-1")["state"] == "cancelled" and b.is_cancelled(job)
    again = Job("c-1", "http://127.0.0.1:9/x", "POST", None, b"", "default", created=t + 2)
    a.add(again)
    b._apply(a.sent[-1])  # the id submitted anew: that job runs, the old message is skipped
    assert b.status("c-1")["state"] == "queued"
    assert b.is_cancelled(job) and not b.is_cancelled(again)


def test_the_history_keeps_the_newest_by_count_and_then_drops_by_age() -> None:
    """Past max_jobs the oldest finished jobs leave as others finish (a failed one takes its
    dead letter along); those left still expire by age afterwards."""
    index, now = LocalIndex(3, 60.0), time.time()
    jobs = [Job(f"h{i}", "http://127.0.0.1:9/x", "GET", None, None, "default") for i in range(6)]
    for i, job in enumerate(jobs[:5]):
        index.add(job)
        job.state, job.finished = ("failed" if i == 1 else "succeeded"), now - 30 + i
        index.finished(job)
    assert [j.id for j in jobs if index.status(j.id)] == ["h2", "h3", "h4"]
    assert index.dead_letters == 0  # h1's went with it
    late = jobs[5]  # finishes once the others are past max_age
    index.add(late)
    late.state, late.finished = "succeeded", now + 40
    index.finished(late)
    assert [j.id for j in jobs if index.status(j.id)] == ["h5"]
