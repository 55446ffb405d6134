"""Writes made during one pass of the event loop go out in bursts, not one by one.

The API's answers are made by handlers that run one after the other, and the outbound requests
by workers that do; a write at once is a send after every handler's work.  A send to a peer
process that sleeps wakes it (an interrupt; on a VM, an exit), and the next send, some tens of
microseconds of Python later, finds it asleep again: on this 2-core VM those wake-ups cost as
much system time as the rest of an API answer.  Sent back to back, a burst wakes the peer once
and it reads them all.

A burst is written when it has BURST senders, or else once the loop's ready callbacks have run
(call_soon: the next pass, after its poll).  Waiting always for the pass's end cost a delivery
a whole pass under load (queue-full dispatch 0.78x), and bursts of 4 woke the peers nearly as
often as single sends (docs/performance.md, "Writes in bursts").
"""

from __future__ import annotations

import asyncio
from typing import Protocol

BURST = 32  # senders whose bytes are written together at once


class Sender(Protocol):
    def send_now(self) -> None:
        """Write what it holds to its transport (nothing if it holds nothing or is closed)."""


class Outbox:
    """The senders holding bytes to write, in the order they were added."""

    __slots__ = ("_scheduled", "_senders")

    def __init__(self) -> None:
        self._senders: list[Sender] = []
        self._scheduled = False

    def add(self, sender: Sender) -> None:
        senders = self._senders
        senders.append(sender)
        if len(senders) >= BURST:
            self._send_all()
        elif not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._send_later)

    def _send_later(self) -> None:
        self._scheduled = False
        self._send_all()

    def _send_all(self) -> None:
        senders, self._senders = self._senders, []
        for sender in senders:
            sender.send_now()
