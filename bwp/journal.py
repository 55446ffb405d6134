"""The optional on-disk journal: accepted jobs survive kill -9, a crash or a drain deadline.

Each process appends to its own file in the journal directory and holds an exclusive flock on
it while it lives.  Records are JSON lines: `["a", seq, job]` when a job is admitted,
`["r", seq, attempts, not_before]` when it is rescheduled, `["d", seq]` when it is finished or
handed over.  Group commit: one flusher writes and fdatasyncs everything buffered while the
previous write ran, and a submit is confirmed once the write holding its records is durable.

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
import contextlib
import errno
import fcntl
import functools
import itertools
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .config import DEFAULT_QUEUE, QueueConfig
from .jobs import Job
from .metrics import Metrics
from .pool import MemoryStore, Restore, StoreError

log = logging.getLogger("bwp.journal")
SUFFIX = ".journal"
TMP = SUFFIX + ".tmp"  # being written, locked only after creation: never adopted
STALE_TMP = 60.0  # seconds after which an unlocked .tmp file is a crash's leftover
ADOPT_INTERVAL = 1.0  # seconds between looks for journals of processes that are gone


def _line(record: list[Any]) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def read_live(path: str) -> list[dict[str, Any]]:
    """Replay one journal file: the records of jobs admitted and not done, retries applied."""
    live: dict[int, dict[str, Any]] = {}
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
                kind, seq = record[0], record[1]
                if kind == "a":
                    live[seq] = record[2]
                elif kind == "r":
                    if seq in live:
                        live[seq]["attempts"], live[seq]["not_before"] = record[2], record[3]
                elif kind == "d":
                    live.pop(seq, None)
                else:
                    raise ValueError(kind)
            except (ValueError, IndexError, TypeError, KeyError):
                # a torn last line after a crash; anything else is damage worth a look
                log.warning("%s:%d: unreadable journal record skipped", path, number)
    return list(live.values())


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
        self.records = read_live(path)

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
        for orphan in orphans:  # unlocked again: the next look takes them
            os.close(orphan.fd)
        raise
    return orphans


def _claim(path: str) -> _Orphan | None:
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None  # another process took it over meanwhile
    # Locked: its process lives.  Unlinked after we opened it: already taken over.
    if not _lock(fd) or os.fstat(fd).st_nlink == 0:
        os.close(fd)
        return None
    try:
        return _Orphan(path, fd)
    except OSError as e:
        log.error("cannot read journal %s: %s", path, e)
        os.close(fd)
        return None


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


class JournaledStore(MemoryStore):
    """The memory store, with every change recorded in this process's journal file."""

    durable = True

    def __init__(self, queues: Iterable[QueueConfig], directory: str, compact_size: int,
                 metrics: Metrics):
        super().__init__(queues)
        self.directory, self.compact_size, self.metrics = directory, compact_size, metrics
        self.path = os.path.join(directory, f"{os.getpid()}-{os.urandom(4).hex()}{SUFFIX}")
        self._fd = -1
        self._size = 0
        self._compact_at = compact_size
        self._live: dict[Job, int] = {}  # admitted and not done -> its record's sequence number
        self._seqs = itertools.count(1)
        self._buffer = bytearray()
        self._commit: asyncio.Future[None] | None = None  # resolved when `_buffer` is durable
        self._flusher: asyncio.Task[None] | None = None
        self._adopter: asyncio.Task[None] | None = None
        # one writer thread of our own: a sync never queues behind the default executor's work
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="bwp-journal")

    def start(self, restore: Restore) -> None:
        """Create and lock our file and take over what dead or exited processes left,
        synchronously: the process is starting, not yet serving."""
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
            for record in orphan.records:
                try:
                    job = Job.from_record(record)
                except (KeyError, TypeError, ValueError) as e:
                    log.error("%s: damaged job record skipped (%s): %.200r", orphan.path, e, record)
                    continue
                if job.queue not in self.lanes:
                    log.warning("job %s: queue %r is not configured any more: using %r", job.id,
                                job.queue, DEFAULT_QUEUE)
                    job.queue = DEFAULT_QUEUE
                jobs.append(job)
        return jobs

    def _take_over(self, jobs: list[Job], restore: Restore) -> None:
        """Place adopted jobs in this store and journal them as ours."""
        for job in jobs:
            self._add(job)
            self._place(job)  # over the bound if need be: these were accepted long ago
        if jobs:
            restore(jobs)

    async def _adopt(self, restore: Restore) -> None:
        taken: list[_Orphan] = []  # placed here, removed once our copies are durable
        while True:
            await asyncio.sleep(ADOPT_INTERVAL)
            try:
                if not taken:
                    taken = await asyncio.to_thread(claim_orphans, self.directory, self.path)
                    if not taken:
                        continue
                    # decoding 10 000 jobs takes ~0.2 s: in a thread the loop gets its turns
                    # (the GIL switches every 5 ms) instead of stalling for all of it
                    self._take_over(await asyncio.to_thread(self._decode, taken), restore)
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

    def admit(self, jobs: Sequence[Job]) -> asyncio.Future[None] | None:
        super().admit(jobs)  # QueueFull before anything is written
        if not jobs:
            return None
        for job in jobs:
            self._add(job)
        return self._flushed()

    def _add(self, job: Job) -> None:
        seq = next(self._seqs)
        self._live[job] = seq
        self._append(_line(["a", seq, job.to_record()]))

    def defer(self, job: Job) -> None:
        super().defer(job)
        seq = self._live.get(job)
        if seq is not None:
            self._append(_line(["r", seq, job.attempts, job.not_before]))

    def done(self, job: Job) -> None:
        seq = self._live.pop(job, None)
        if seq is not None:
            self._append(_line(["d", seq]))

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
                    write = functools.partial(self._rewrite, list(self._live.items()))
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

    def _rewrite(self, live: list[tuple[Job, int]]) -> None:
        """Replace our file by one holding only the `live` jobs (runs in a thread)."""
        started = time.monotonic()
        data = b"".join(_line(["a", seq, job.to_record()]) for job, seq in live)
        fd = _create_locked(self.path, data)
        os.close(self._fd)  # the old inode, unlinked by the rename
        self._fd = fd
        before, self._size = self._size, len(data)
        self._compact_at = max(self.compact_size, 2 * self._size)
        self.metrics.journal_size.set(self._size)
        _fsync_dir(self.directory)
        log.info("journal compacted: %d -> %d bytes, %d live jobs, %.0f ms", before, self._size,
                 len(live), 1000 * (time.monotonic() - started))

    async def close(self) -> None:
        """Write what is buffered; remove our file when nothing in it is unfinished, else
        leave it (unlocked) for the next process."""
        await super().close()
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
