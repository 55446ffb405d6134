"""Command line: `bwp serve | check | route | reload`, and (bwp/console.py) `status | jobs |
job | retry | cancel`, which look into a running daemon.

`bwp serve` also takes the Go daemon's single-dash flags (`-listen -pidfile -pool-size
-pool-queue-size -ip-routes -log4xxResponses`), and a bare `bwp -listen ...` means serve, so
existing unit files keep working.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence

from . import __version__, console
from .config import LOG_LEVELS, Config, ConfigError, apply_overrides, load_config
from .connections import connection_cap, fd_limit_at_start, reserved_fds
from .lifecycle import pid_alive, read_pidfile
from .router import Router


def _go_bool(text: str) -> bool:
    """Go's flag package takes `-log4xxResponses=true` (strconv.ParseBool) as well as the bare flag."""
    if text in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if text in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bwp", description="Background HTTP request dispatcher")
    p.add_argument("--version", action="version", version=f"bwp {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-c", "--config", metavar="FILE",
                        help="YAML config file (embedded defaults when omitted)")

    serve = sub.add_parser("serve", help="run the daemon in the foreground")
    with_config(serve)
    serve.add_argument("--listen", "-listen", action="append", metavar="ADDR",
                       help="host:port, [v6]:port or /unix/path; repeat or comma-separate")
    serve.add_argument("--pidfile", "-pidfile", metavar="FILE")
    serve.add_argument("--pool-size", "-pool-size", type=int, metavar="N",
                       help="workers of the default queue")
    serve.add_argument("--queue-size", "-pool-queue-size", "--pool-queue-size", type=int,
                       metavar="N", help="bound of the default queue")
    serve.add_argument("--ip-routes", "-ip-routes", metavar="STR",
                       help="'172.16.0.0/12 -> 172.16.1.1, 0.0.0.0/0 -> auto'")
    serve.add_argument("--log-4xx-responses", "-log4xxResponses", nargs="?", const=True,
                       default=False, type=_go_bool, metavar="BOOL",
                       help="log the body of >= 400 answers")
    serve.add_argument("--log-level", choices=LOG_LEVELS, help="overrides log_level")
    serve.add_argument("--master", action="store_true",
                       help="keep one main process (stable pid, for supervisord and the like) "
                            "that runs the daemon as a worker and replaces it on reload")

    check = sub.add_parser("check", help="validate the config and print what it means")
    with_config(check)

    reload = sub.add_parser("reload", help="graceful restart of the running daemon")
    with_config(reload)
    reload.add_argument("--pidfile", "-pidfile", metavar="FILE",
                        help="the daemon's PID file (default: the config's pidfile)")
    reload.add_argument("--timeout", type=float, default=75.0, metavar="S",
                        help="seconds to wait for the outcome (default 75: the daemon itself "
                             "gives a new process 60 s to serve)")

    route = sub.add_parser("route", help="show the source address used for destinations")
    with_config(route)
    route.add_argument("--ip-routes", "-ip-routes", metavar="STR",
                       help="use this routing table instead of the file's")
    route.add_argument("dest", nargs="+", help="IP address or hostname")
    console.add_commands(sub, with_config)
    return p


def _load(args: argparse.Namespace) -> Config:
    cfg = load_config(args.config)
    return apply_overrides(
        cfg,
        listen=getattr(args, "listen", None) if args.command == "serve" else None,
        pidfile=getattr(args, "pidfile", None) if args.command == "serve" else None,
        pool_size=getattr(args, "pool_size", None),
        queue_size=getattr(args, "queue_size", None),
        ip_routes=getattr(args, "ip_routes", None),
        log_4xx_bodies=getattr(args, "log_4xx_responses", False),
        log_level=getattr(args, "log_level", None),
    )


def cmd_check(cfg: Config) -> int:
    print(f"config: {cfg.source or '(embedded defaults)'}")
    print("listeners:")
    for lst in cfg.listen:
        print(f"  {lst.address}{' (unix socket)' if lst.is_unix else ''}")
    print(f"pidfile: {cfg.pidfile or '(none)'}")
    print(f"drain_timeout: {cfg.drain_timeout:g}s")
    print(f"log: {cfg.log_level}, {cfg.log_format}")
    print(f"processes: {cfg.processes}" + (" (a master process runs them; workers and queue bounds "
                                           "below are divided among them)" if cfg.processes > 1 else ""))
    print("queues:")
    for q in cfg.all_queues.values():
        r = q.retry
        retry = (f"{r.attempts} retries, backoff {r.backoff:g}s x{r.factor:g} up to "
                 f"{r.max_backoff:g}s" if r.attempts else "no retries")
        where = (" (in RabbitMQ: the slots are shared by every host)" if cfg.in_broker(q)
                 else " (local)" if cfg.rabbitmq.url else "")
        signed = (f", signed (Standard Webhooks, {len(q.signing_keys)} "
                  f"secret{'s' if len(q.signing_keys) > 1 else ''})" if q.signing_keys else "")
        print(f"  {q.name}: {q.size} workers, {q.queue_size} slots, {retry}{signed}{where}")
    print("routes (longest prefix first):")
    for line in Router.from_config(cfg).describe():
        print(f"  {line}")
    c = cfg.client
    print(f"client: connect {c.connect_timeout:g}s, read {c.read_timeout:g}s, "
          f"body cap {c.max_response_size} bytes, head cap {c.max_response_head} bytes, redirects "
          f"{'followed (max ' + str(c.max_redirects) + ')' if c.follow_redirects else 'not followed'}")
    print(f"destinations: deny {', '.join(map(str, cfg.destinations.deny)) or '-'}; "
          f"allow {', '.join(map(str, cfg.destinations.allow)) or '-'}")
    lim = cfg.limits
    print("limits:")
    print(f"  submission: body {lim.max_body_size} bytes, {lim.max_json_values} JSON values, "
          f"{lim.max_jobs_per_request} jobs (clones expanded), {lim.max_clones} clones per job, "
          f"JSON depth {lim.max_json_depth}")
    print(f"  queued: {lim.max_queued_bytes} bytes of jobs in all, delays up to {lim.max_delay:.0f}s")
    print(f"  per job: {lim.max_headers} headers of {lim.max_header_size} characters, "
          f"url {lim.max_url_length} characters")
    workers = sum(q.size for q in cfg.share(cfg.processes).all_queues.values())
    if lim.max_connections is None:  # what a daemon started from here gets (soft raised to hard)
        fds, listeners = fd_limit_at_start(), len(cfg.listen)
        conns = (f"{connection_cap(None, fds, workers, listeners)} connections per process (auto: "
                 f"open files limit {fds} here, less {reserved_fds(workers, listeners)} for "
                 "outbound sockets and files)")
    else:
        conns = f"{lim.max_connections} connections per process"
    print(f"  connection: {conns}, request head {lim.header_timeout:g}s, "
          f"body read {lim.read_timeout:g}s, keep-alive {lim.keepalive_timeout:g}s, "
          f"request line {lim.max_request_line} bytes, {lim.max_request_headers} headers of "
          f"{lim.max_request_header_size} bytes")
    u = cfg.unix_socket
    print(f"unix sockets: mode {u.mode:04o}, owner {'(unchanged)' if u.owner is None else u.owner}, "
          f"group {'(unchanged)' if u.group is None else u.group}")
    print(f"auth: {len(cfg.auth.tokens)} token(s)")
    print(f"redact: URL userinfo, query parameters {', '.join(cfg.redact.query) or '-'}")
    h = cfg.history
    print(f"history: {h.max_jobs} finished jobs, {h.max_age:g}s, dead letters holding up to "
          f"{h.max_bytes} bytes")
    if cfg.rabbitmq.url:
        from .rabbitmq import describe  # only now: it loads aio-pika

        print("\n".join(describe(cfg)))
    else:
        print("rabbitmq: off (every queue is this process's own)")
    j = cfg.journal
    print(f"journal: {j.path} (compacted past {j.compact_size} bytes)" if j.path
          else "journal: off (accepted jobs live in memory only)")
    print("configuration ok")
    return 0


def cmd_route(cfg: Config, dests: Sequence[str]) -> int:
    router = Router.from_config(cfg)
    status = 0
    for dest in dests:
        try:
            addrs = [str(ipaddress.ip_address(dest.strip("[]")))]
        except ValueError:
            try:
                infos = socket.getaddrinfo(dest, None, type=socket.SOCK_STREAM)
            except (socket.gaierror, UnicodeError) as e:
                print(f"{dest}: cannot resolve: {getattr(e, 'strerror', None) or e}")
                status = 1
                continue
            addrs = list(dict.fromkeys(info[4][0] for info in infos))
        for addr in addrs:
            ip = ipaddress.ip_address(addr)
            r = router.route(ip)
            source = str(r.via) if r and r.via else "auto"
            matched = f"via route {r.network}" if r else "no route matches"
            label = dest if dest == addr else f"{dest} ({addr})"
            print(f"{label} -> source {source} [{matched}]")
    return status


def cmd_reload(cfg: Config, pidfile: str | None, timeout: float) -> int:
    """Signal the daemon and wait for the outcome of the reload, which the daemon records
    next to its PID file (PIDFILE.reload, see bwp/lifecycle.py): 0 once the new process (or,
    under a master, the new workers) serves; 1 with the reason when it failed and the old
    process keeps serving, or when nothing was heard within `timeout`."""
    from .lifecycle import read_reload_status, reload_status_path

    path = pidfile or cfg.pidfile
    if not path:
        print("bwp reload: no PID file: set `pidfile` in the config or pass --pidfile",
              file=sys.stderr)
        return 1
    old = read_pidfile(path)
    if old is None or not pid_alive(old):
        print(f"bwp reload: no running bwp (PID file {path})", file=sys.stderr)
        return 1
    status_path = reload_status_path(path)

    def status() -> dict | None:
        try:
            return read_reload_status(status_path)
        except PermissionError:
            return None  # not ours to read: the PID file alone has to tell

    before = status()
    try:
        os.kill(old, signal.SIGHUP)
    except OSError as e:
        print(f"bwp reload: cannot signal pid {old}: {e.strerror}", file=sys.stderr)
        return 1
    deadline = time.monotonic() + timeout
    while True:
        st = status()
        if st is not None and st != before and st.get("pid") == old and st.get("state") in ("ok",
                                                                                       "failed"):
            break
        new = read_pidfile(path)
        if new is not None and new != old and pid_alive(new) and not (
                st is not None and st.get("pid") == old and st.get("state") == "reloading"):
            # no word from the old process (its record unreadable to us): the PID file tells
            print(f"reloaded: pid {old} -> {new}")
            return 0
        if not pid_alive(old):
            st = status()
            if st is not None and st != before and st.get("state") in ("ok", "failed"):
                break
            print(f"bwp reload: pid {old} exited during the reload; see its log", file=sys.stderr)
            return 1
        if time.monotonic() >= deadline:
            print(f"bwp reload: no outcome within {timeout:g}s: pid {old} may still be starting "
                  "its successor (its log says more)", file=sys.stderr)
            return 1
        time.sleep(0.05)
    if st["state"] == "ok":
        pids = ", ".join(str(p) for p in st.get("new") or [])
        if st.get("master"):
            print(f"reloaded: pid {old} (master) now runs worker(s) {pids}")
        else:
            print(f"reloaded: pid {old} -> {pids}")
        return 0
    print(f"bwp reload: failed, pid {old} keeps serving: {st.get('error')}", file=sys.stderr)
    output = st.get("output") or []
    if output and (len(output) > 1 or output[-1] not in str(st.get("error"))):
        print("bwp reload: the new process's last output:", file=sys.stderr)
        for line in output:
            print(f"  {line}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv.insert(0, "serve")  # the Go daemon had no subcommands
    args = _parser().parse_args(argv)
    try:
        cfg = _load(args)
    except ConfigError as e:
        print(f"bwp: config error: {e}", file=sys.stderr)
        return 1
    if args.command == "check":
        return cmd_check(cfg)
    if args.command == "route":
        return cmd_route(cfg, args.dest)
    if args.command == "reload":
        return cmd_reload(cfg, args.pidfile, args.timeout)
    if args.command in console.COMMANDS:
        return console.run(cfg, args)
    # the daemon's imports are not needed by check/route/reload
    from .lifecycle import PidfileError, ReloadFailed, worker_slot
    from .store import StoreError

    try:
        if worker_slot() is None and (args.master or cfg.processes > 1):
            from .arbiter import run_master

            return run_master(cfg, lambda: _load(args))
        from .server import run

        return run(cfg)
    except (OSError, PidfileError, ReloadFailed, StoreError) as e:
        print(f"bwp: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
