"""Standard Webhooks signatures on outgoing requests (https://www.standardwebhooks.com/).

Three headers let a destination check that a request comes from this sender and is fresh:
`webhook-id` (the job's id: the same on every attempt, so a receiver can drop repeats),
`webhook-timestamp` (seconds, this attempt) and `webhook-signature`, `v1,<base64 of
HMAC-SHA256(key, "id.timestamp.body")>` for each of the queue's secrets, space-separated: a
receiver that knows any one of them accepts, which is how a secret is rotated.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Iterable

SECRET_PREFIX = "whsec_"
MIN_KEY, MAX_KEY = 24, 64  # bytes, as the specification asks
HEADERS = frozenset(("webhook-id", "webhook-timestamp", "webhook-signature"))


def parse_secret(text: str) -> bytes:
    """The key of a `whsec_<base64>` secret; ValueError saying what is wrong (never the
    secret itself)."""
    if not text.startswith(SECRET_PREFIX):
        raise ValueError(f"must start with {SECRET_PREFIX!r} followed by the key in base64")
    try:
        key = base64.b64decode(text[len(SECRET_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"is not {SECRET_PREFIX} followed by valid base64") from None
    if not MIN_KEY <= len(key) <= MAX_KEY:
        raise ValueError(f"key must be {MIN_KEY}-{MAX_KEY} bytes, got {len(key)}")
    return key


class Signer:
    """Signs requests with every one of a queue's keys."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Iterable[bytes]) -> None:
        self._keys = tuple(keys)

    def headers(self, msg_id: str, body: bytes | None, now: float | None = None) -> dict[str, str]:
        timestamp = str(int(time.time() if now is None else now))
        content = b"%s.%s.%s" % (msg_id.encode(), timestamp.encode(), body or b"")
        signatures = " ".join(
            "v1," + base64.b64encode(hmac.digest(key, content, hashlib.sha256)).decode()
            for key in self._keys)
        return {"webhook-id": msg_id, "webhook-timestamp": timestamp,
                "webhook-signature": signatures}


def signed(headers: dict[str, str] | None, signer: Signer, msg_id: str,
           body: bytes | None) -> dict[str, str]:
    """The job's headers with the signature's: a job's own header of the same name (any
    case) gives way, so a signature can never be forged through a submit."""
    out = {k: v for k, v in (headers or {}).items() if k.lower() not in HEADERS}
    out.update(signer.headers(msg_id, body))
    return out
