"""Accepting by load between sibling worker processes (`processes` > 1).

The workers share the master's listening sockets, and a connection goes to whichever of them
accepts it first: not the one with the least to do.  A backlog submitted in a few large POSTs
can land mostly on one worker, which then drains it alone while its siblings idle (measured: a
78/22 split of a 50,000-job backlog).  So each worker posts how many jobs it holds (queued and
running) on a board shared with its siblings, a small file in the master's private runtime
directory, and one that holds far more than the lightest sibling stops accepting until the
others have caught up.  Nothing is refused meanwhile: the sockets stay open in the master and
the siblings, and the lightest never stops.  A sibling whose figure is old (dead, restarting,
stuck) does not count.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import struct
import time
from collections.abc import Callable

SLOT = struct.Struct("<qd")  # jobs held, monotonic time it was posted
TICK = 0.025  # seconds between looks at the board
FRESH = 1.0  # a figure older than this is a sibling that is not serving


class LoadBoard:
    """The jobs each sibling holds, one slot per worker, in a file all of them map."""

    def __init__(self, path: str, index: int, count: int):
        self.index, self.count = index, count
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < SLOT.size * count:
                os.ftruncate(fd, SLOT.size * count)  # zeros: no figure posted yet
            self._map = mmap.mmap(fd, SLOT.size * count)
        finally:
            os.close(fd)

    def post(self, held: int) -> None:
        SLOT.pack_into(self._map, SLOT.size * self.index, held, time.monotonic())

    def lightest_sibling(self) -> int | None:
        """The least any serving sibling holds; None when none has posted lately."""
        now, least = time.monotonic(), None
        for i in range(self.count):
            if i != self.index:
                held, at = SLOT.unpack_from(self._map, SLOT.size * i)
                if now - at < FRESH and (least is None or held < least):
                    least = held
        return least

    def close(self) -> None:
        self._map.close()


class AcceptBalancer:
    """Stops accepting (`pause`) while this worker holds over `margin` jobs more than its
    lightest sibling, and starts again (`resume`) once within half of that."""

    def __init__(self, board: LoadBoard, held: Callable[[], int], margin: int,
                 pause: Callable[[], None], resume: Callable[[], None]):
        self.board, self.held, self.margin = board, held, margin
        self._pause, self._resume = pause, resume
        self.paused = False
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._tick()

    def stop(self) -> None:
        """No more looks; the caller closes or keeps the listeners as they are."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.board.close()

    def _tick(self) -> None:
        held = self.held()
        self.board.post(held)
        lightest = self.board.lightest_sibling()
        ahead = 0 if lightest is None else held - lightest
        if not self.paused and ahead > self.margin:
            self.paused = True
            self._pause()
        elif self.paused and ahead <= self.margin // 2:
            self.paused = False
            self._resume()
        self._timer = asyncio.get_running_loop().call_later(TICK, self._tick)
