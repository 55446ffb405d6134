"""What each daemon puts on the wire for the same jobs: request line, headers and body as a
raw sink on 127.0.0.1 received them, side by side, header order ignored.

    python scripts/wire_compare.py --compare go=/path/to/bwp-go

bwp (this checkout) runs as `python -m bwp serve`; every --compare NAME=CMD is started as
`CMD -listen ADDR` (the Go daemon's flags).  Prints, per job, each daemon's request and where
they differ.  A check for compatibility by eye, not a test: the Go binary is not part of CI.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"

# (name, job without its url; the path is the name)
JOBS: list[tuple[str, dict]] = [
    ("get", {}),
    ("get-params", {"parameters": {"b": "2 3", "c": "ü"}}),
    ("head", {"method": "HEAD", "parameters": {"q": "1"}}),
    ("post-form", {"method": "POST", "parameters": {"a": "1", "name": "Иван"}}),
    ("post-body", {"method": "POST", "body": "aGVsbG8="}),
    ("post-empty", {"method": "POST"}),
    ("put-typed", {"method": "PUT", "body": "aGk=", "headers": {"Content-Type": "text/plain"}}),
    ("delete", {"method": "DELETE"}),
    ("options", {"method": "OPTIONS"}),
    ("headers", {"headers": {"X-Trace": "a/b", "Authorization": "Bearer t", "X-Utf8": "é"}}),
    ("user-agent", {"headers": {"User-Agent": "mine/1"}}),
]


class RawSink:
    """Accepts, reads one request (head + Content-Length body), answers 200, closes."""

    def __init__(self) -> None:
        self.sock = socket.create_server((HOST, 0))
        self.port = self.sock.getsockname()[1]
        self.got: dict[str, bytes] = {}
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                try:
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    head, _, body = data.partition(b"\r\n\r\n")
                    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                                   if line.lower().startswith(b"content-length:")), 0)
                    while len(body) < length:
                        body += conn.recv(65536)
                    conn.sendall(ANSWER)
                except OSError:
                    continue
            path = head.split(b" ")[1].decode(errors="replace") if b" " in head else "?"
            self.got[path.split("?")[0].lstrip("/")] = head + b"\r\n\r\n" + body


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def run(name: str, argv: list[str], port: int, sink: RawSink) -> dict[str, bytes]:
    sink.got.clear()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=str(ROOT), start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((HOST, port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(f"{name} did not start") from None
                time.sleep(0.05)
        for path, job in JOBS:
            conn = http.client.HTTPConnection(HOST, port, timeout=10)
            conn.request("POST", "/post/http", json.dumps(
                {"url": f"http://{HOST}:{sink.port}/{path}", **job}).encode(),
                {"Content-Type": "application/json"})
            conn.getresponse().read()
            conn.close()
        deadline = time.monotonic() + 5
        while len(sink.got) < len(JOBS) and time.monotonic() < deadline:
            time.sleep(0.05)
        return dict(sink.got)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def parts(raw: bytes | None) -> tuple[str, set[str], bytes] | None:
    if raw is None:
        return None
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("utf-8", "replace").split("\r\n")
    return lines[0], set(lines[1:]), body


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare", action="append", default=[], metavar="NAME=CMD")
    args = p.parse_args()
    sink = RawSink()
    results: dict[str, dict[str, bytes]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        config = Path(tmp) / "bwp.yaml"
        config.write_text(json.dumps({"listen": [f"{HOST}:{port}"]}))
        results["bwp"] = run("bwp", [sys.executable, "-m", "bwp", "serve", "-c", str(config)],
                             port, sink)
        for spec in args.compare:
            name, _, cmd = spec.partition("=")
            port = free_port()
            results[name] = run(name, [*shlex.split(cmd), "-listen", f"{HOST}:{port}"], port, sink)
    names = list(results)
    for path, job in JOBS:
        print(f"== {path}: {json.dumps(job, ensure_ascii=False)}")
        seen = {n: parts(results[n].get(path)) for n in names}
        base = seen["bwp"]
        for n in names:
            got = seen[n]
            if got is None:
                print(f"  {n}: (nothing arrived)")
                continue
            line, headers, body = got
            print(f"  {n}: {line} | {' | '.join(sorted(headers))} | body {body!r}")
            if n != "bwp" and base is not None and got != base:
                only_base, only_other = sorted(base[1] - headers), sorted(headers - base[1])
                print(f"    differs: line {'same' if line == base[0] else 'differs'}, "
                      f"only bwp {only_base}, only {n} {only_other}, "
                      f"body {'same' if body == base[2] else 'differs'}")


if __name__ == "__main__":
    main()
