"""Politeness per destination (scheme, host, port): a rate limit and a circuit breaker.

The rate limit is a token bucket: `rate` requests a second, `burst` at once; a request over
it waits in its worker for its turn (give a slow destination its own queue so that it holds
only that queue's workers).

The breaker opens after `failures` attempts in a row fail (no answer, a timeout, a 5xx or a
429): for `cool_off` seconds nothing is sent there, and jobs due meanwhile are held until
then without spending an attempt. Then one request goes through as a probe: an answer closes
the breaker, another failure opens it again. Each process (and host) keeps its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from .jobs import Outcome

log = logging.getLogger("bwp.breaker")

Key = tuple[str, str, int]  # scheme, host, port
MAX_TRACKED = 10_000  # destinations remembered before the idle ones are forgotten
PROBE_WAIT = 2.0  # seconds a job due while the probe is out waits before it asks again


def destination(key: Key) -> str:
    scheme, host, port = key
    return f"{scheme}://{host}:{port}"


def failed(out: Outcome) -> bool:
    """Whether an attempt says the destination is unwell (not: it refused this request)."""
    return out.status is None or out.status >= 500 or out.status == 429


class _Circuit:
    __slots__ = ("failures", "open_until", "probing")

    def __init__(self) -> None:
        self.failures = 0
        self.open_until = 0.0  # time.time(); 0: closed
        self.probing = False


class Breakers:
    """One circuit per destination; `changed(destination, is_open)` is told of every trip and
    reset."""

    def __init__(self, failures: int, cool_off: float,
                 changed: Callable[[str, bool], None] = lambda name, is_open: None) -> None:
        self.failures, self.cool_off, self.changed = failures, cool_off, changed
        self._circuits: dict[Key, _Circuit] = {}

    def hold(self, key: Key) -> float | None:
        """None: send now; else the time.time() to try again (the breaker is open, or its
        probe is still out)."""
        c = self._circuits.get(key)
        if c is None or not c.open_until:
            return None
        now = time.time()
        if now < c.open_until:
            return c.open_until
        if c.probing:  # its verdict first; not sooner than 1 s: each hold is a reschedule
            return now + min(PROBE_WAIT, self.cool_off)
        c.probing = True  # this request is the probe
        return None

    def record(self, key: Key, out: Outcome) -> None:
        """The outcome of a request that hold() let through."""
        c = self._circuits.get(key)
        if out.denied or out.local:  # not sent (or cut short): says nothing of the destination
            if c is not None:
                c.probing = False  # the next request probes instead
            return
        if not failed(out):
            if c is not None:
                del self._circuits[key]
                if c.open_until:
                    log.info("%s answers again: breaker closed", destination(key))
                    self.changed(destination(key), False)
            return
        if c is None:
            if len(self._circuits) >= MAX_TRACKED:
                self._forget_closed()
            c = self._circuits[key] = _Circuit()
        c.failures += 1
        if c.probing or (not c.open_until and c.failures >= self.failures):
            was_open = bool(c.open_until)
            c.open_until, c.probing = time.time() + self.cool_off, False
            log.warning("%s: %d failed attempts in a row (last: %s): breaker open, nothing is "
                        "sent there for %gs", destination(key), c.failures, out.reason,
                        self.cool_off)
            if not was_open:
                self.changed(destination(key), True)

    def open(self) -> list[str]:
        return [destination(k) for k, c in self._circuits.items() if c.open_until]

    def _forget_closed(self) -> None:
        self._circuits = {k: c for k, c in self._circuits.items() if c.open_until}


class _Bucket:
    __slots__ = ("at", "tokens")

    def __init__(self, tokens: float, at: float) -> None:
        self.tokens, self.at = tokens, at


class RateLimits:
    """A token bucket per destination.  Tokens may go below zero: each waiter reserves its
    turn, so waiters go in order without polling."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, float(burst)
        self._buckets: dict[Key, _Bucket] = {}

    async def turn(self, key: Key) -> None:
        now = time.monotonic()
        b = self._buckets.get(key)
        if b is None:
            if len(self._buckets) >= MAX_TRACKED:
                self._forget_full(now)
            b = self._buckets[key] = _Bucket(self.burst, now)
        else:
            b.tokens = min(self.burst, b.tokens + (now - b.at) * self.rate)
            b.at = now
        b.tokens -= 1
        if b.tokens < 0:
            await asyncio.sleep(-b.tokens / self.rate)

    def _forget_full(self, now: float) -> None:
        burst, rate = self.burst, self.rate
        self._buckets = {k: b for k, b in self._buckets.items()
                         if b.tokens + (now - b.at) * rate < burst}
