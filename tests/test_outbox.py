"""bwp/outbox.py: writes held for a burst go out in order, at BURST at once, else after the
loop's ready callbacks.  (From the wire, every test of the API and the client goes through it.)"""

from __future__ import annotations

import asyncio

from bwp.outbox import BURST, Outbox


class Recorder:
    def __init__(self, name: int, sent: list[int]):
        self.name, self.sent = name, sent

    def send_now(self) -> None:
        self.sent.append(self.name)


async def test_a_burst_is_written_at_once_and_the_rest_after_the_ready_callbacks():
    sent: list[int] = []
    outbox = Outbox()
    for i in range(BURST + 3):
        outbox.add(Recorder(i, sent))
        if i == BURST - 2:
            assert sent == []  # held
    assert sent == list(range(BURST))  # the burst, in order, without waiting
    await asyncio.sleep(0)
    assert sent == list(range(BURST + 3))
    outbox.add(Recorder(99, sent))  # a later pass schedules its own
    await asyncio.sleep(0)
    assert sent[-1] == 99 and len(sent) == BURST + 4
