"""Summarise a py-spy `record -f raw` file (collapsed stacks): where the samples go.

    python scripts/profile_top.py ingest.raw [N]

Prints the shares of samples by package (of the frame on top of the stack), and the top N
functions by self samples (top of the stack) and by total samples (anywhere on the stack).
Line numbers are dropped so one function is one row. The frames every stack of a daemon starts
with (module, main, the event loop's run) are cut off; a sample whose top frame is the loop's
run is time spent in the event loop's own C code (uvloop: epoll, socket reads and writes,
callback dispatch), reported as EVENT_LOOP.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")
LOOP_ENTRY = "Runner.run (asyncio/runners.py)"
EVENT_LOOP = "[event loop C code: uvloop I/O, syscalls, callback dispatch]"
NO_FRAME = "[no Python frame]"


@dataclass
class Profile:
    samples: int
    self_: Counter[str]
    total: Counter[str]
    packages: Counter[str]

    def top(self, n: int) -> str:
        def share(counter: Counter[str], limit: int) -> list[str]:
            return [f"{100 * c / self.samples:5.1f}  {f}" for f, c in counter.most_common(limit)]

        return "\n".join([
            f"{self.samples} samples", "", "self %  package (top of stack)", *share(self.packages, 12),
            "", "self %  function (top of stack)", *share(self.self_, n),
            "", "total %  function (anywhere on the stack)", *share(self.total, n)])


def _short(frame: str) -> str:
    """'send (/venv/lib/python3.11/site-packages/bwp/client.py:80)' -> 'send (bwp/client.py)'."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    return f"{m['func']} ({'/'.join(Path(m['file']).parts[-2:])})"


def _package(frame: str) -> str:
    if frame.startswith("["):
        return frame
    m = _FRAME.match(frame)
    path = m["file"] if m else frame
    first = path.split("/")[0]
    return first if "/" in path else f"stdlib {first}" if first.endswith(".py") else first


def _frames(stack: str) -> list[str]:
    """The frames after the daemon's boilerplate; the loop's own time as EVENT_LOOP."""
    frames = [_short(f) for f in stack.split(";") if f.strip()]
    if LOOP_ENTRY in frames:
        frames = frames[frames.index(LOOP_ENTRY) + 1:] or [EVENT_LOOP]
    return frames or [NO_FRAME]


def load(path: Path) -> Profile:
    profile = Profile(0, Counter(), Counter(), Counter())
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = _frames(stack)
        profile.samples += count
        profile.self_[frames[-1]] += count
        profile.packages[_package(frames[-1])] += count
        for f in set(frames):
            profile.total[f] += count
    return profile


def main() -> None:
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    print(load(Path(sys.argv[1])).top(n))


if __name__ == "__main__":
    main()
