"""Redaction of job URLs wherever they leave the process: status documents (GET /jobs, dead
letters, `wait` answers, the document POSTed to a callback URL, which may be someone else's)
and log lines.

The userinfo of a URL (`http://user:password@host/`) is always replaced by `***`; query
parameters are masked by name (`redact.query` in the config, case-insensitive).  The job itself
keeps its URL as given: only what is shown is redacted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import parse_qsl

MASK = "***"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def one_line(text: str) -> str:
    """Someone else's text for a log line: control characters escaped, so it cannot forge log
    lines (or send terminal escapes)."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


CACHE_LIMIT = 1024  # URLs repeat: most are redacted once


class Redactor:
    def __init__(self, query_params: Iterable[str] = ()):
        self.names = frozenset(name.lower() for name in query_params)
        self._cache: dict[str, str] = {}

    def __call__(self, url: str) -> str:
        shown = self._cache.get(url)
        if shown is None:
            if len(self._cache) >= CACHE_LIMIT:
                self._cache.clear()
            shown = self._cache[url] = self._redact(url)
        return shown

    def _redact(self, url: str) -> str:
        scheme, sep, rest = url.partition("://")
        if not sep:
            return url
        cut = len(rest)
        for c in "/?#":
            i = rest.find(c)
            if i != -1:
                cut = min(cut, i)
        authority, tail = rest[:cut], rest[cut:]
        if "@" in authority:
            authority = MASK + "@" + authority.rpartition("@")[2]
        if self.names and "?" in tail:
            tail = self._mask_query(tail)
        return f"{scheme}://{authority}{tail}"

    def _mask_query(self, tail: str) -> str:
        path, _, rest = tail.partition("?")
        query, hash_, fragment = rest.partition("#")
        parts = []
        for part in query.split("&"):
            name = part.partition("=")[0]
            decoded = parse_qsl(name, keep_blank_values=True)
            key = decoded[0][0] if decoded else name
            parts.append(f"{name}={MASK}" if key.lower() in self.names else part)
        return f"{path}?{'&'.join(parts)}{hash_}{fragment}"
