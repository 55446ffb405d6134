"""The queue backend contract (bwp/store.py), one suite for every backend.

Each backend is built the way the daemon builds it (store.make_store from a config) and driven
in-process: admit, take, settle each delivery (ack, retry_at, dead), bounds, delays, stats, and
what a durable backend keeps for the next process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from broker import remove_prefix

from bwp.config import parse_config
from bwp.jobs import Job
from bwp.metrics import Metrics
from bwp.store import JobStore, QueueFull, make_store

# one xdist worker runs these, against one node (tests/broker.py starts one per worker)
pytestmark = pytest.mark.xdist_group("rabbitmq")

Factory = Callable[..., Awaitable[JobStore]]


# the shortest delay each backend keeps exactly (the broker's delay levels are whole seconds)
RESOLUTION = {"memory": 0.1, "journal": 0.1, "rabbitmq": 1.0}


def _config(kind: str, tmp_path: Any, queue_size: int, broker: dict[str, str]) -> Any:
    raw: dict[str, Any] = {"pool": {"size": 1, "queue_size": queue_size},
                           "queues": {"other": {"size": 1, "queue_size": queue_size}}}
    if kind == "journal":
        raw["journal"] = {"path": str(tmp_path / "journal")}
    if kind == "rabbitmq":
        raw["rabbitmq"] = broker
    return parse_config(raw)


@pytest.fixture(params=["memory", "journal", "rabbitmq"])
async def backend(request, tmp_path) -> AsyncIterator[tuple[str, Factory]]:
    """(name, factory): each call of the factory is a new process's backend, started."""
    made: list[JobStore] = []
    broker = {}
    if request.param == "rabbitmq":  # a real node (skips when rabbitmq-server is missing)
        broker = {"url": request.getfixturevalue("rabbitmq_url"),
                  "prefix": request.getfixturevalue("amqp_prefix")}

    async def factory(queue_size: int = 5, restored: list[Job] | None = None) -> JobStore:
        cfg = _config(request.param, tmp_path, queue_size, broker)
        store = make_store(cfg, list(cfg.all_queues.values()), Metrics(cfg.all_queues))
        await store.start((restored if restored is not None else []).extend)
        made.append(store)
        return store

    yield request.param, factory
    for store in made:
        await store.close()
    if broker:
        await remove_prefix(request.getfixturevalue("rabbitmq_node"), broker["prefix"],
                            ("default", "other"))


def _job(n: int, queue: str = "default", delay: float = 0.0) -> Job:
    return Job(f"job-{n}", f"http://127.0.0.1:9/{n}", "POST", {"X-N": str(n)}, b"body-%d" % n,
               queue, not_before=time.time() + delay if delay else None)


async def _admit(store: JobStore, jobs: list[Job]) -> None:
    durable = store.admit(jobs)
    if durable is not None:
        await durable


async def _take(store: JobStore, queue: str = "default", timeout: float = 5.0):
    return await asyncio.wait_for(store.take(queue), timeout)


async def test_jobs_come_out_in_order_per_queue(backend):
    _, make = backend
    store = await make()
    await _admit(store, [_job(1), _job(2, "other"), _job(3)])
    assert (store.length("default"), store.length("other")) == (2, 1)
    taken = []
    for queue in ("default", "default", "other"):  # settled one by one: a broker's prefetch
        d = await _take(store, queue)                # is the queue's workers (here 1)
        taken.append(d.job)
        await d.ack()
    assert [j.id for j in taken] == ["job-1", "job-3", "job-2"]
    assert taken[0].body == b"body-1" and taken[0].headers == {"X-N": "1"}
    assert (store.length("default"), store.length("other")) == (0, 0)


async def test_a_batch_over_the_bound_admits_nothing(backend):
    _, make = backend
    store = await make(queue_size=3)
    await _admit(store, [_job(1), _job(2)])
    with pytest.raises(QueueFull, match=r"pool\.queue_size"):
        await _admit(store, [_job(3, "other"), _job(4), _job(5)])  # default would hold 4
    assert (store.length("default"), store.length("other")) == (2, 0)
    await _admit(store, [_job(6)])  # the last slot is still there
    assert store.length("default") == 3


async def test_delays_come_due_in_time_order_whatever_the_order_of_admission(backend):
    name, make = backend
    store = await make()
    r = RESOLUTION[name]
    start = time.monotonic()
    await _admit(store, [_job(1, delay=2 * r), _job(2, delay=r), _job(3)])
    if name != "rabbitmq":  # delayed jobs wait in the broker's levels, shared by every queue
        assert store.delayed("default") == 2 and store.length("default") == 3
    arrivals = []
    for _ in range(3):
        d = await _take(store)
        arrivals.append((d.job.id, round(time.monotonic() - start, 2)))
        await d.ack()
    assert [a[0] for a in arrivals] == ["job-3", "job-2", "job-1"], arrivals
    assert arrivals[1][1] >= r - 0.05 and arrivals[2][1] >= 2 * r - 0.05, arrivals
    assert arrivals[2][1] < 2 * r + 0.5, arrivals


async def test_retry_at_brings_the_job_back_at_its_time_with_its_attempts(backend):
    name, make = backend
    store = await make()
    await _admit(store, [_job(1)])
    d = await _take(store)
    d.job.attempts = 1
    d.job.not_before = time.time() + RESOLUTION[name]
    start = time.monotonic()
    await d.retry_at(d.job.not_before)
    if name != "rabbitmq":
        assert store.delayed("default") == 1
    again = await _take(store)
    assert again.job.id == "job-1" and again.job.attempts == 1
    assert time.monotonic() - start >= RESOLUTION[name] - 0.05
    await again.dead()
    assert store.length("default") == 0


async def test_a_cancelled_take_loses_nothing(backend):
    _, make = backend
    store = await make()
    waiting = asyncio.ensure_future(store.take("default"))
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await _admit(store, [_job(1)])
    assert (await _take(store)).job.id == "job-1"


async def test_what_a_durable_backend_keeps_for_the_next_process(backend):
    name, make = backend
    store = await make()
    await _admit(store, [_job(1), _job(2), _job(3, delay=60)])
    acked = await _take(store)
    await acked.ack()
    taken = await _take(store)  # taken, never settled: the process died mid-attempt
    assert taken.job.id == "job-2"
    await store.close()
    restored: list[Job] = []
    successor = await make(restored=restored)
    if not store.durable:
        assert restored == [] and successor.length("default") == 0
        return
    # at-least-once: the unsettled job comes back (the delayed one keeps its time)
    again = await _take(successor)
    assert again.job.id == "job-2" and again.job.body == b"body-2"
    if name == "journal":  # a journal is taken over by the next process; a broker just keeps it
        assert sorted(j.id for j in restored) == ["job-2", "job-3"]
        assert successor.length("default") == 1 and successor.delayed("default") == 1


async def test_a_cancelled_job_leaves_a_store_that_can_take_it_out(backend):
    """Memory and journal take a waiting job out at once (its slot is free); a broker's
    queue cannot, but promises it: the index's mark makes the worker skip it (test_cancel.py)."""
    name, make = backend
    store = await make()
    ready, delayed, kept = _job(1), _job(2, delay=30), _job(3)
    await _admit(store, [ready, delayed, kept])
    removed = [store.cancel(ready), store.cancel(delayed)]
    if name == "rabbitmq":
        assert removed == [True, True]
        return
    assert removed == [True, True]
    assert (store.length("default"), store.delayed("default")) == (1, 0)
    assert store.cancel(ready) is False  # not there any more
    d = await _take(store)
    assert d.job is kept
    await d.ack()
    if name == "journal":  # what the next process finds: nothing, the cancelled ones included
        await store.close()
        restored: list[Job] = []
        await make(restored=restored)
        assert restored == []
