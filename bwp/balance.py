"""Accepting by load between sibling worker processes (`processes` > 1).

The workers share the master's listening sockets, and a connection goes to whichever of them
accepts it first: not the one with the least to do.  A backlog submitted in a few large POSTs
can land mostly on one worker, which then drains it alone while its siblings idle (measured: a
78/22 split of a 50,000-job backlog).  So each worker posts how many jobs it holds (queued and
running; not those waiting for a delay or a retry) on a board shared with its siblings, a
small file in the master's private runtime directory, and one that holds far more than the
lightest sibling stops accepting until the others have caught up.  Only new connections are
steered: a kept-alive client stays where it is.  Nothing is refused meanwhile: the sockets
stay open in the master and the siblings, and the lightest never stops.  A sibling whose
figure is old (dead, stalled) or withdrawn (stopping) does not count.

The board also says which queues of each worker are full (a bit per queue, in the config's
order, which every sibling shares), so a submit a worker has no room for goes to the lightest
sibling with room in its queues (peers.py).  Fullness is not load: a full worker keeps
accepting connections, and relays what it cannot queue.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import time
from collections.abc import Callable, Iterator

# per worker, 8-byte aligned (written whole): jobs held, monotonic ns it was posted, full queues
CELLS = 3
TICK = 0.025  # seconds between looks at the board
# a figure older than this is a sibling that is not serving (dead, stopped, stalled): while it
# counts, a worker paused for it accepts nothing, so it is kept to a few ticks
FRESH = 0.15
CROWDED_LOAD = 1 << 40  # added by a worker near its connection cap: its siblings take the new


class LoadBoard:
    """The jobs each sibling holds, one slot per worker, in a file all of them map."""

    def __init__(self, path: str, index: int, count: int):
        self.index, self.count = index, count
        size = 8 * CELLS * count
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)  # zeros: no figure posted yet
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._cells = memoryview(self._map).cast("q")
        self.closed = False

    def post(self, held: int, full: int) -> None:
        at = CELLS * self.index
        self._cells[at] = held
        self._cells[at + 2] = full
        self._cells[at + 1] = time.monotonic_ns()

    def withdraw(self) -> None:
        """This worker stops serving: its figure no longer counts, at once."""
        self._cells[CELLS * self.index + 1] = 0

    def _serving(self) -> Iterator[tuple[int, int, int]]:
        """(index, jobs held, full queues) of each sibling that has posted lately."""
        if self.closed:
            return
        cells, oldest = self._cells, time.monotonic_ns() - int(FRESH * 1e9)
        for i in range(self.count):
            at = CELLS * i
            if i != self.index and cells[at + 1] > oldest:
                yield i, cells[at], cells[at + 2]

    def lightest_sibling(self, queues: int = 0) -> tuple[int, int] | None:
        """The serving sibling that holds least, and what it holds, among those with none of
        the `queues` (bits) full; None when there is none (or none has posted lately)."""
        return min(((i, held) for i, held, full in self._serving() if not full & queues),
                   key=lambda sibling: sibling[1], default=None)

    def sibling_with_room(self, queues: int) -> int | None:
        """The lightest serving sibling whose `queues` (bits) all have room."""
        lightest = self.lightest_sibling(queues)
        return None if lightest is None else lightest[0]

    def room_anywhere(self, queues: int) -> bool:
        """Some serving sibling has room in one of the `queues` (bits) at least."""
        return any(full & queues != queues for _, _, full in self._serving())

    def close(self) -> None:
        self.closed = True
        self._cells.release()
        self._map.close()


class AcceptBalancer:
    """Stops accepting (`pause`) while this worker holds over `margin` jobs more than its
    lightest sibling, and starts again (`resume`) once within half of that."""

    def __init__(self, board: LoadBoard, held: Callable[[], int], full: Callable[[], int],
                 margin: int,
                 pause: Callable[[], None], resume: Callable[[], None]):
        self.board, self.held, self.full, self.margin = board, held, full, margin
        self._pause, self._resume = pause, resume
        self.paused = False
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._tick()

    def stop(self) -> None:
        """No more looks; the caller closes or keeps the listeners as they are.  Siblings
        paused for us accept again at their next look."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.board.withdraw()
        self.board.close()

    def _tick(self) -> None:
        held = self.held()
        self.board.post(held, self.full())
        lightest = self.board.lightest_sibling()
        ahead = 0 if lightest is None else held - lightest[1]
        if not self.paused and ahead > self.margin:
            self.paused = True
            self._pause()
        elif self.paused and ahead <= self.margin // 2:
            self.paused = False
            self._resume()
        self._timer = asyncio.get_running_loop().call_later(TICK, self._tick)
