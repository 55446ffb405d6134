"""The optional on-disk journal: accepted jobs survive kill -9, a crash or a drain deadline.

Each process appends to its own file in the journal directory and holds an exclusive flock on
it while it lives.  Records are JSON lines, numbered by one counter per file (`seq`):

    ["a", seq, job]                    a job admitted: Job.to_record(), its body inline in
                                       base64 ("body": "...", or null for none) ...
    ["b", seq, base64]                 ... or, for a body object several live jobs share (the
                                       clones of one root), written once before the first job
                                       record naming it, which then carries "body_ref": seq
    ["r", seq, attempts, not_before]   a job rescheduled (a retry)
    ["d", seq]                         a job finished or handed over

A body used by one job stays inline; a shared one is journaled again only by a compaction
while a job using it is live.  Group commit: one flusher writes and fdatasyncs everything
buffered while the previous write ran, and a submit is confirmed once the write holding its
records is durable.

Replay skips what is damaged, with one log line each, and recovers everything else: a line
that is no JSON (torn by a crash, or garbage of any depth) or not a record of the shapes
above; a job record with a field of the wrong type or range, or naming a body that is not in
the file; a shared body that is not base64.  The jobs naming one body get one bytes object.

A file whose lock is free belongs to a process that exited or died: the live jobs in it
(added, not done) are copied into our own file, made durable, and the orphan is removed —
at start and every few seconds after, so a predecessor's leftovers after a reload are taken
over as soon as it exits.  Delivery is at-least-once: a job whose attempt was under way, or
whose done record was not yet durable, when its process died is sent again.

The file is rewritten with only the live jobs whenever it has grown past `compact_size` and
twice its size after the last rewrite.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import fcntl
import functools
import itertools
import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from .config import DEFAULT_QUEUE, QueueConfig
from .jobs import Job
from .metrics import Metrics
from .store import JobStore, MemoryStore, Restore, StoreError

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger("bwp.journal")
SUFFIX = ".journal"
TMP = SUFFIX + ".tmp"  # being written, locked only after creation: never adopted
STALE_TMP = 60.0  # seconds after which an unlocked .tmp file is a crash's leftover
ADOPT_INTERVAL = 1.0  # seconds between looks for journals of processes that are gone
SHARE_MIN = 64  # bytes: a shorter body shared by several jobs is not worth a reference


def _line(record: list[Any]) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def read_live(path: str) -> tuple[list[tuple[int, dict[str, Any]]], dict[int, bytes]]:
    """Replay one journal file: the records of jobs admitted and not done (with their line
    numbers), retries applied, and the shared bodies they name, decoded once each.  A damaged
    line is skipped."""
    live: dict[int, tuple[int, dict[str, Any]]] = {}  # seq -> (line number, job)
    shared: dict[int, tuple[int, str]] = {}  # seq -> (line number, base64)
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                _replay(json.loads(line), live, shared, number)
            except Exception as e:  # RecursionError from `[[[[...` too: this line only
                # a torn last line after a crash; anything else is damage worth a look
                log.warning("%s:%d: unreadable journal record skipped (%s)", path, number,
                            _why(e))
    bodies: dict[int, bytes] = {}
    for _, record in live.values():
        ref = record.get("body_ref")
        if type(ref) is int and ref in shared and ref not in bodies:
            number, text = shared.pop(ref)
            try:
                bodies[ref] = base64.b64decode(text, validate=True)
            except ValueError:  # its jobs are skipped as naming a missing body
                log.warning("%s:%d: shared body %d is not base64: skipped", path, number, ref)
    return list(live.values()), bodies


def _replay(record: Any, live: dict[int, tuple[int, dict[str, Any]]],
            shared: dict[int, tuple[int, str]], number: int) -> None:
    """Apply one record (raises ValueError for one that is not of a known shape)."""
    if type(record) is not list or len(record) < 2 or type(record[1]) is not int:
        raise ValueError("not a record")
    kind, seq = record[0], record[1]
    if kind == "a" and len(record) >= 3 and type(record[2]) is dict:
        live[seq] = (number, record[2])
    elif kind == "r" and len(record) >= 4 and _retry(record[2], record[3]):
        entry = live.get(seq)
        if entry is not None:
            entry[1]["attempts"], entry[1]["not_before"] = record[2], record[3]
    elif kind == "d":
        live.pop(seq, None)
    elif kind == "b" and len(record) >= 3 and type(record[2]) is str:
        shared[seq] = (number, record[2])
    else:
        shown = kind[:10] if type(kind) is str else type(kind).__name__
        raise ValueError(f"not a valid {shown!r} record")


def _retry(attempts: Any, not_before: Any) -> bool:
    """Whether these are an attempt count and a time (or none) as Job.from_record takes them:
    an `r` record damaged otherwise is skipped, not its job."""
    return type(attempts) is int and attempts >= 0 and (
        not_before is None or (type(not_before) in (int, float) and 0 <= not_before < 253402300800))


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:200]}"


def _retrieved(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


def _lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Orphan:
    """A journal file of a process that is gone, locked by us until it is taken over."""

    def __init__(self, path: str, fd: int):
        self.path, self.fd = path, fd
        self.records, self.bodies = read_live(path)

    def release(self) -> None:
        """Unlocked again, left in place: the next look takes it."""
        os.close(self.fd)

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.fd)


def claim_orphans(directory: str, own: str) -> list[_Orphan]:
    """Lock and read every journal file in `directory` whose process is gone."""
    orphans: list[_Orphan] = []
    try:
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            if name.endswith(TMP):  # a creation or compaction cut short by a crash?
                _remove_if_stale(path)
            elif name.endswith(SUFFIX) and path != own:
                orphan = _claim(path)
                if orphan is not None:
                    orphans.append(orphan)
    except BaseException:
        for orphan in orphans:
            orphan.release()
        raise
    return orphans


def _claim(path: str) -> _Orphan | None:
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None  # another process took it over meanwhile
    orphan = None
    try:
        # Locked: its process lives.  Unlinked after we opened it: already taken over.
        if _lock(fd) and os.fstat(fd).st_nlink > 0:
            orphan = _Orphan(path, fd)
    except OSError as e:
        log.error("cannot read journal %s: %s", path, e)
    except Exception:  # read_live skips damaged lines: a bug, or no memory for a huge line
        log.exception("cannot read journal %s: left for the next look", path)
    finally:
        if orphan is None:  # whatever went wrong: neither the fd nor the lock stays behind
            os.close(fd)
    return orphan


def _remove_if_stale(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return
    try:
        if time.time() - os.fstat(fd).st_mtime > STALE_TMP and _lock(fd):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    finally:
        os.close(fd)


def _create_locked(path: str, data: bytes = b"") -> int:
    """A new file at `path` holding `data`, durable and locked by us before it appears
    under that name (so no other process can take it for an orphan)."""
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
    try:
        if not _lock(fd):
            raise BlockingIOError(errno.EWOULDBLOCK, f"{path}.tmp is locked by another process")
        _write_all(fd, data)
        os.fdatasync(fd)
        os.rename(path + ".tmp", path)
    except OSError:
        os.close(fd)
        raise
    return fd


class _Shared:
    """A body journaled once (record `seq`) for the live jobs using it."""

    __slots__ = ("data", "seq", "users")

    def __init__(self, seq: int, data: bytes):
        self.seq, self.data, self.users = seq, data, 0


def journaled_store(cfg: Config, queues: Sequence[QueueConfig], metrics: Metrics) -> JobStore:
    """The memory store, every change recorded in this process's journal file."""
    journal = Journal(cfg.journal.path or "", cfg.journal.compact_size, metrics)
    return MemoryStore(queues, cfg.limits.max_queued_bytes, recorder=journal)


class Journal:
    """Records a MemoryStore's jobs in this process's journal file (store.Recorder)."""

    durable = True

    def __init__(self, directory: str, compact_size: int, metrics: Metrics):
        self.directory, self.compact_size, self.metrics = directory, compact_size, metrics
        self.path = os.path.join(directory, f"{os.getpid()}-{os.urandom(4).hex()}{SUFFIX}")
        self._fd = -1
        self._size = 0
        self._compact_at = compact_size
        self._live: dict[Job, int] = {}  # admitted and not done -> its record's sequence number
        # Bodies journaled once for several jobs: id(bytes) -> the body, while a live job uses
        # it (held, so that id stays its own), and the live jobs whose record names one.
        self._bodies: dict[int, _Shared] = {}
        self._sharing: dict[Job, _Shared] = {}
        self._seqs = itertools.count(1)
        self._buffer = bytearray()
        self._commit: asyncio.Future[None] | None = None  # resolved when `_buffer` is durable
        self._flusher: asyncio.Task[None] | None = None
        self._adopter: asyncio.Task[None] | None = None
        # one writer thread of our own: a sync never queues behind the default executor's work
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="bwp-journal")
        self._store: MemoryStore | None = None

    def start(self, store: MemoryStore, restore: Restore) -> None:
        """Create and lock our file and take over what dead or exited processes left,
        synchronously: the process is starting, not yet serving."""
        self._store = store
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            self._fd = _create_locked(self.path)
            _fsync_dir(self.directory)
            orphans = claim_orphans(self.directory, self.path)
        except OSError as e:
            raise OSError(e.errno, f"journal {self.directory}: {e.strerror}") from None
        self._take_over(self._decode(orphans), restore)
        if self._buffer:
            data, self._buffer = bytes(self._buffer), bytearray()
            self._write(data)
        for orphan in orphans:
            orphan.remove()
        self._adopter = asyncio.get_running_loop().create_task(self._adopt(restore))

    def _decode(self, orphans: list[_Orphan]) -> list[Job]:
        """The orphans' live jobs (pure: runs in a thread for orphans found while serving)."""
        jobs = []
        for orphan in orphans:
            for number, record in orphan.records:
                try:
                    job = Job.from_record(record, orphan.bodies)
                except Exception as e:  # whatever it holds, this job only
                    log.error("%s:%d: damaged job record skipped (%s)", orphan.path, number,
                              _why(e))
                    continue
                assert self._store is not None
                if job.queue not in self._store.lanes:
                    log.warning("job %s: queue %r is not configured any more: using %r", job.id,
                                job.queue, DEFAULT_QUEUE)
                    job.queue = DEFAULT_QUEUE
                jobs.append(job)
        return jobs

    def _take_over(self, jobs: list[Job], restore: Restore) -> None:
        """Place adopted jobs in this store and journal them as ours."""
        assert self._store is not None
        self._add_all(jobs)
        self._store.place(jobs)  # over the bound if need be: these were accepted long ago
        if jobs:
            restore(jobs)

    async def _adopt(self, restore: Restore) -> None:
        taken: list[_Orphan] = []  # placed here, removed once our copies are durable
        while True:
            await asyncio.sleep(ADOPT_INTERVAL)
            try:
                if not taken:
                    claimed = await asyncio.to_thread(claim_orphans, self.directory, self.path)
                    if not claimed:
                        continue
                    # decoding 10 000 jobs takes ~0.2 s: in a thread the loop gets its turns
                    # (the GIL switches every 5 ms) instead of stalling for all of it
                    try:
                        jobs = await asyncio.to_thread(self._decode, claimed)
                    except BaseException:  # none taken over: they must not be removed
                        for orphan in claimed:
                            orphan.release()
                        raise
                    taken = claimed
                    self._take_over(jobs, restore)
                await self._flushed()  # after a failed write, the retry rewrites the whole file
            except StoreError:
                continue  # theirs stay locked by us: taking them again would duplicate jobs
            except Exception:
                log.exception("taking over orphaned journals in %s failed", self.directory)
                continue
            for orphan in taken:
                orphan.remove()
            taken = []

    # -- recording -----------------------------------------------------------------------

    def admitted(self, jobs: Sequence[Job]) -> asyncio.Future[None]:
        self._add_all(jobs)
        return self._flushed()

    def _add_all(self, jobs: Sequence[Job]) -> None:
        shared = self._shared_bodies(jobs) if len(jobs) > 1 or self._bodies else None
        if not shared:  # the common case: every body inline
            for job in jobs:
                self._add(job)
            return
        for job in jobs:
            entry = shared.get(id(job.body))
            if entry is None:
                self._add(job)
            else:
                seq = next(self._seqs)
                self._live[job] = seq
                self._sharing[job] = entry
                entry.users += 1
                self._append(_line(["a", seq, job.to_record(body_ref=entry.seq)]))

    def _shared_bodies(self, jobs: Sequence[Job]) -> dict[int, _Shared]:
        """The bodies of `jobs` to journal by reference: those shared with a live job, and
        those two or more of `jobs` use (appended here, before the first job naming them)."""
        known, seen, shared = self._bodies, set(), {}
        if not known:  # at C speed for most batches: every job a body of its own
            ids = [id(job.body) for job in jobs]
            if len(set(ids)) == len(ids):
                return shared
        for job in jobs:
            body = job.body
            if body is None or len(body) < SHARE_MIN:
                continue
            key = id(body)
            if key in shared:
                continue
            entry = known.get(key)
            if entry is not None and entry.data is body:
                shared[key] = entry
            elif key in seen:
                seq = next(self._seqs)
                shared[key] = known[key] = _Shared(seq, body)
                self._append(_line(["b", seq, base64.b64encode(body).decode()]))
            else:
                seen.add(key)
        return shared

    def _add(self, job: Job) -> None:
        seq = next(self._seqs)
        self._live[job] = seq
        self._append(_line(["a", seq, job.to_record()]))

    def deferred(self, job: Job) -> None:
        seq = self._live.get(job)
        if seq is not None:
            self._append(_line(["r", seq, job.attempts, job.not_before]))

    def done(self, job: Job) -> None:
        seq = self._live.pop(job, None)
        if seq is not None:
            self._append(_line(["d", seq]))
            if self._sharing:
                entry = self._sharing.pop(job, None)
                if entry is not None:
                    entry.users -= 1
                    if not entry.users:  # its last job: the next compaction drops it
                        del self._bodies[id(entry.data)]

    def _append(self, line: bytes) -> None:
        self._buffer += line
        self._start_flusher()

    def _flushed(self) -> asyncio.Future[None]:
        """Resolves once everything appended so far is durable (shielded: a client that
        goes away must not cancel the commit other requests wait for)."""
        if self._commit is None:
            self._commit = asyncio.get_running_loop().create_future()
        self._start_flusher()
        waiter = asyncio.shield(self._commit)
        # Who confirms nothing to a client may drop it (a callback job's admission): a failure
        # is logged by the flusher, not again as an exception "never retrieved".
        waiter.add_done_callback(_retrieved)
        return waiter

    def _start_flusher(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._buffer or self._commit is not None:
                commit, self._commit = self._commit, None
                if self._size + len(self._buffer) >= self._compact_at:
                    # The live set as of now covers the buffer; serialising it (~0.1 s for
                    # 10 000 jobs) happens in the writer thread.  Whatever changes meanwhile
                    # is appended after the snapshot, so replaying both gives the right state.
                    write = functools.partial(self._rewrite, list(self._live.items()),
                                              dict(self._sharing))
                else:
                    write = functools.partial(self._write, bytes(self._buffer))
                self._buffer = bytearray()
                try:
                    await loop.run_in_executor(self._thread, write)
                except OSError as e:
                    log.error("journal %s: write failed: %s", self.path, e)
                    # What was lost (and a torn line) is repaired by rewriting from memory.
                    self._compact_at = 0
                    if commit is not None:
                        commit.set_exception(StoreError(f"journal write failed: {e.strerror}"))
                        commit.exception()  # retrieved here: a request may not be waiting
                    continue
                self.metrics.journal_syncs.inc()
                if commit is not None:
                    commit.set_result(None)
        finally:
            self._flusher = None

    def _write(self, data: bytes) -> None:
        """Append and make durable (runs in a thread)."""
        _write_all(self._fd, data)
        os.fdatasync(self._fd)
        self._size += len(data)
        self.metrics.journal_size.set(self._size)

    def _rewrite(self, live: list[tuple[Job, int]], sharing: dict[Job, _Shared]) -> None:
        """Replace our file by one holding only the `live` jobs, each shared body once before
        them (runs in a thread)."""
        started = time.monotonic()
        bodies = {entry.seq: entry.data for entry in sharing.values()}
        records = [_line(["b", seq, base64.b64encode(body).decode()])
                   for seq, body in bodies.items()]
        if sharing:
            for job, seq in live:
                entry = sharing.get(job)
                records.append(_line(["a", seq, job.to_record()] if entry is None
                                     else ["a", seq, job.to_record(body_ref=entry.seq)]))
        else:
            records += [_line(["a", seq, job.to_record()]) for job, seq in live]
        data = b"".join(records)
        fd = _create_locked(self.path, data)
        os.close(self._fd)  # the old inode, unlinked by the rename
        self._fd = fd
        before, self._size = self._size, len(data)
        self._compact_at = max(self.compact_size, 2 * self._size)
        self.metrics.journal_size.set(self._size)
        _fsync_dir(self.directory)
        log.info("journal compacted: %d -> %d bytes, %d live jobs, %d shared bodies, %.0f ms",
                 before, self._size, len(live), len(bodies), 1000 * (time.monotonic() - started))

    async def close(self) -> None:
        """Write what is buffered; remove our file when nothing in it is unfinished, else
        leave it (unlocked) for the next process."""
        if self._adopter is not None:
            self._adopter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._adopter
        if self._fd < 0:  # never started
            return
        with contextlib.suppress(StoreError):
            await self._flushed()
        if self._live:
            log.warning("%d unfinished jobs stay in the journal %s for the next process",
                        len(self._live), self.path)
        else:
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = -1
        self._thread.shutdown()
