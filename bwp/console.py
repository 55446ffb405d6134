"""`bwp status | jobs | job | retry | cancel`: a running daemon, looked into through its API.

The CLI talks to the daemon the way a client does: over the config's first unix socket, else
its first TCP listener (a wildcard address is asked on loopback), with the config's first
token (or $BWP_TOKEN).  Human tables by default, `--json` for scripts.  Queue figures come from
/metrics, so with `processes: N` or a broker they are the daemon's merged view.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import sys
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from typing import Any

from .config import Config, Listener, parse_listen
from .jobs import LISTED

TOKEN_ENV = "BWP_TOKEN"
PAGE = 500  # jobs per request when listing or replaying everything
ONE_LINE_EACH = 20  # up to this many ids, a line per id; more: a progress line, then a count


class DaemonError(Exception):
    """The daemon could not be reached, or answered with an error."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


class Api:
    """Requests to a running bwp over one of its listeners."""

    def __init__(self, cfg: Config, listen: str | None = None, timeout: float = 30.0):
        self.listener = parse_listen(listen) if listen else _pick(cfg.listen)
        self.timeout = timeout
        token = os.environ.get(TOKEN_ENV) or (cfg.auth.tokens[0] if cfg.auth.tokens else "")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    @property
    def where(self) -> str:
        return self.listener.address

    def call(self, method: str, path: str, ok: Sequence[int] = (200,)) -> tuple[int, Any]:
        """(status, decoded JSON or text); DaemonError when unreachable or not in `ok`."""
        lst = self.listener
        if lst.path is not None:
            conn: http.client.HTTPConnection = _UnixConnection(lst.path, self.timeout)
        else:
            host = lst.host or "127.0.0.1"
            conn = http.client.HTTPConnection(
                {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host),
                lst.port, timeout=self.timeout)
        try:
            conn.request(method, path, headers=self.headers)
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise DaemonError(f"bwp at {self.where} does not answer (as bwp): {e!r}") from None
        finally:
            conn.close()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = raw.decode(errors="replace")
        if resp.status not in ok:
            why = body.get("error") if isinstance(body, dict) else str(body)[:200]
            raise DaemonError(f"{method} {path}: {resp.status} {why}")
        return resp.status, body


def _pick(listeners: Sequence[Listener]) -> Listener:
    for lst in listeners:
        if lst.is_unix:
            return lst
    return listeners[0]


# ----------------------------------------------------------------------------- status


def status(api: Api, broker: bool) -> dict[str, Any]:
    """What `bwp status` shows, as a document (`broker`: the config names one)."""
    # only here: every `bwp` command, the master of `processes` > 1 included, imports this
    # module, and prometheus-client is ~3 MiB of it
    from prometheus_client.parser import text_string_to_metric_families

    _, health = api.call("GET", "/healthz", ok=(200, 503))
    _, text = api.call("GET", "/metrics")
    if not isinstance(health, dict) or not isinstance(text, str):
        raise DaemonError(f"{api.where} does not answer as bwp does (/healthz, /metrics)")
    values: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            values.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value

    def per_queue(name: str) -> dict[str, float]:
        return {dict(k).get("queue", ""): v for k, v in values.get(name, {}).items()}

    build = next(iter(values.get("bwp_build_info", {})), ())
    started = min(values.get("bwp_start_time_seconds", {}).values(), default=None)
    queues = {}
    columns = {"length": "bwp_queue_length", "delayed": "bwp_queue_delayed",
               "busy": "bwp_busy_workers", "workers": "bwp_workers",
               "capacity": "bwp_queue_capacity", "oldest_due_seconds": "bwp_queue_oldest_due_seconds",
               "accepted": "bwp_jobs_accepted_total", "succeeded": "bwp_jobs_succeeded_total",
               "failed": "bwp_jobs_failed_total", "cancelled": "bwp_jobs_cancelled_total"}
    for key, metric in columns.items():
        for queue, value in per_queue(metric).items():
            queues.setdefault(queue, {})[key] = value
    doc: dict[str, Any] = {
        "daemon": api.where, "state": health.get("status"), "pid": health.get("pid"),
        "version": dict(build).get("version"),
        "processes": int(sum(values.get("bwp_processes", {}).values())) or None,
        "uptime_seconds": round(time.time() - started, 1) if started else None,
        "dead_letters": sum(values.get("bwp_dead_letters", {}).values()),
        "breakers_open": sorted(dict(k)["destination"] for k, v in
                                values.get("bwp_breaker_open", {}).items() if v > 0),
        "queues": queues,
    }
    if broker:
        doc["broker_up"] = bool(min(values.get("bwp_broker_up", {}).values(), default=0))
    return doc


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{d}d {h}h {m}m" if d else f"{h}h {m}m {s}s" if h else f"{m}m {s}s" if m else f"{s}s"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in header]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in cells)


def print_status(doc: dict[str, Any]) -> None:
    print(f"bwp {doc['version'] or '?'} at {doc['daemon']}: {doc['state']}, pid {doc['pid']}, "
          f"{doc['processes'] or '?'} process(es), up {_duration(doc['uptime_seconds'])}")
    if "broker_up" in doc:
        print(f"broker: {'connected' if doc['broker_up'] else 'NOT CONNECTED'}")
    print(f"dead letters: {int(doc['dead_letters'])}")
    print(f"breakers open: {', '.join(doc['breakers_open']) or 'none'}")
    rows = []
    for name, q in doc["queues"].items():
        rows.append([name, int(q.get("length", 0)), int(q.get("delayed", 0)),
                     f"{int(q.get('busy', 0))}/{int(q.get('workers', 0))}",
                     int(q.get("capacity", 0)), _duration(q.get("oldest_due_seconds")),
                     int(q.get("accepted", 0)), int(q.get("succeeded", 0)),
                     int(q.get("failed", 0)), int(q.get("cancelled", 0))])
    print(_table(["QUEUE", "LENGTH", "DELAYED", "BUSY", "CAPACITY", "OLDEST", "ACCEPTED",
                  "SUCCEEDED", "FAILED", "CANCELLED"], rows))


# ----------------------------------------------------------------------------- jobs


def job_pages(api: Api, state: str, queue: str | None, limit: int | None) -> Iterator[dict[str, Any]]:
    """The listing of `state`, page by page (at most `limit` jobs; None: all)."""
    offset = 0
    while limit is None or offset < limit:
        n = PAGE if limit is None else min(PAGE, limit - offset)
        query = {"state": state, "offset": offset, "limit": n, **({"queue": queue} if queue else {})}
        _, page = api.call("GET", "/jobs?" + urllib.parse.urlencode(query))
        yield from page["jobs"]
        offset += len(page["jobs"])
        if len(page["jobs"]) < n or offset >= page["total"]:
            return


def print_jobs(jobs: Sequence[dict[str, Any]]) -> None:
    rows = [[j["id"], j["state"], j["queue"], j["attempts"],
             j["status"] if j["status"] is not None else (j["error"] or "")[:40],
             j["finished"] or j["next_attempt"] or j["created"], j["method"], j["url"]]
            for j in jobs]
    print(_table(["ID", "STATE", "QUEUE", "ATTEMPTS", "LAST", "WHEN", "METHOD", "URL"], rows))


def print_job(doc: dict[str, Any]) -> None:
    for key in ("id", "state", "queue", "attempts", "method", "url", "created", "next_attempt",
                "finished", "status", "error"):
        print(f"{key + ':':14}{'-' if doc.get(key) is None else doc[key]}")
    result = doc.get("result")
    if result and result.get("status") is not None:
        print(f"{'result:':14}{result['status']}, {result['size']} bytes in "
              f"{result['duration']:.3f}s{' (truncated)' if result['truncated'] else ''}")
        for name, value in (result.get("headers") or {}).items():
            print(f"{'':14}{name}: {value}")
        if result.get("body"):
            print(f"{'':14}{result['body'][:300]!r}")


def _job_path(job_id: str) -> str:
    return "/jobs/" + urllib.parse.quote(job_id, safe="")


def _each(api: Api, ids: Sequence[str], method: str, suffix: str, ok_word: str,
          as_json: bool) -> int:
    """One request per id (retry or cancel), progress on stderr for long runs; exit 1 if any
    failed."""
    failed, done, results = 0, 0, []
    started, shown = time.monotonic(), 0.0
    long_run = len(ids) > ONE_LINE_EACH
    for job_id in ids:
        try:
            _, body = api.call(method, _job_path(job_id) + suffix)
            results.append({"id": job_id, "ok": True, "answer": body})
            done += 1
            if not as_json and not long_run:
                print(f"{job_id}: {ok_word}")
        except DaemonError as e:
            failed += 1
            results.append({"id": job_id, "ok": False, "error": str(e)})
            print(f"{job_id}: {e}", file=sys.stderr)
        now = time.monotonic()
        if long_run and (now - shown >= 1.0 or done + failed == len(ids)):
            shown = now
            rate = (done + failed) / max(now - started, 1e-6)
            print(f"\r{done + failed}/{len(ids)} ({failed} failed, {rate:.0f}/s)", end="",
                  file=sys.stderr, flush=True)
    if long_run:
        print(file=sys.stderr)
    if as_json:
        print(json.dumps(results))
    elif long_run:
        print(f"{done} {ok_word}, {failed} failed")
    return 1 if failed else 0


# ----------------------------------------------------------------------------- commands


def add_commands(sub: argparse._SubParsersAction, with_config: Any) -> None:  # type: ignore[type-arg]
    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_text)
        with_config(sp)
        sp.add_argument("--listen", metavar="ADDR", help="ask this listener instead of the "
                        "config's (host:port or /unix/path)")
        sp.add_argument("--json", action="store_true", help="machine-readable output")
        return sp

    command("status", "queues, workers, processes and uptime of the running daemon")
    jobs = command("jobs", "list dead letters (default) or pending jobs")
    jobs.add_argument("--state", default="failed", choices=LISTED)
    jobs.add_argument("--queue", metavar="Q", help="only this queue's jobs")
    jobs.add_argument("--limit", type=int, default=100, metavar="N",
                      help="at most N jobs (default 100; 0: all)")
    job = command("job", "one job's status")
    job.add_argument("id")
    retry = command("retry", "replay dead letters under their ids")
    retry.add_argument("ids", nargs="*", metavar="ID")
    retry.add_argument("--all-failed", action="store_true", help="every dead letter")
    retry.add_argument("--queue", metavar="Q", help="with --all-failed: only this queue's")
    cancel = command("cancel", "cancel jobs that have not started")
    cancel.add_argument("ids", nargs="+", metavar="ID")


COMMANDS = ("status", "jobs", "job", "retry", "cancel")


def run(cfg: Config, args: argparse.Namespace) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `bwp jobs | head`: end quietly, as cat does
    try:
        api = Api(cfg, args.listen)
        return _run(api, args, broker=cfg.rabbitmq.url is not None)
    except DaemonError as e:
        print(f"bwp {args.command}: {e}", file=sys.stderr)
        return 1


def _run(api: Api, args: argparse.Namespace, broker: bool) -> int:
    out = json.dumps if args.json else None
    if args.command == "status":
        doc = status(api, broker)
        print(out(doc)) if out else print_status(doc)
        return 0
    if args.command == "jobs":
        jobs = list(job_pages(api, args.state, args.queue, args.limit or None))
        print(out(jobs)) if out else print_jobs(jobs)
        return 0
    if args.command == "job":
        _, doc = api.call("GET", _job_path(args.id))
        print(out(doc)) if out else print_job(doc)
        return 0
    if args.command == "retry":
        if bool(args.ids) == args.all_failed:
            print("bwp retry: give job ids or --all-failed", file=sys.stderr)
            return 2
        # all listed first: a replayed job leaves the list, which would shift the pages
        ids = args.ids or [j["id"] for j in job_pages(api, "failed", args.queue, None)]
        if not ids:
            print("[]" if args.json else "no dead letters")
            return 0
        return _each(api, ids, "POST", "/retry", "replayed", args.json)
    return _each(api, args.ids, "DELETE", "", "cancelled", args.json)
