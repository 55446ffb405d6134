"""Process lifecycle plumbing: PID file, sd_notify, listening sockets."""

from __future__ import annotations

import contextlib
import errno
import importlib.machinery
import json
import logging
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import __version__
from .config import Config, Listener, UnixSocketConfig

log = logging.getLogger("bwp.lifecycle")

BACKLOG = 2048


# what a log call may add about a job (extra=...), shown as fields by log_format: json
JOB_FIELDS = ("job", "queue", "url", "method", "status", "duration", "attempt", "error")


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, pid, logger, message and the job's fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "pid": record.process, "logger": record.name,
            "message": record.getMessage()}
        for name in JOB_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def setup_logging(level: str, log_format: str = "text") -> None:
    """One line per event, with the pid, so a reload can be followed in journalctl; or one
    JSON object a line for a log pipeline."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(
        "%(asctime)s bwp[%(process)d] %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


class ThrottledLog:
    """At most one line a second per key; the next one says how many it held back."""

    INTERVAL = 1.0

    def __init__(self, logger: logging.Logger, level: int):
        self.logger, self.level = logger, level
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def __call__(self, key: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -self.INTERVAL) < self.INTERVAL:
            self._held[key] = self._held.get(key, 0) + 1
            return
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            message, args = message + " (and %d more like it since the last line)", (*args, held)
        self.logger.log(self.level, message, *args)


def log_start(cfg: Config, role: str) -> None:
    """The first line of a process: what runs, from which config, keeping jobs where."""
    logging.getLogger("bwp").info(
        "bwp %s starting (%s): config %s, journal %s, rabbitmq %s, log level %s", __version__,
        role, cfg.source or "(embedded defaults)",
        cfg.journal.path if cfg.journal.path else "off",
        f"{cfg.rabbitmq.shown_url} (prefix {cfg.rabbitmq.prefix})" if cfg.rabbitmq.url else "off",
        cfg.log_level)


class PidfileError(Exception):
    pass


def read_pidfile(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_pidfile(path: str, predecessor: int | None = None) -> None:
    """Write our pid; a stale file (dead pid) or our predecessor's is replaced, a live other
    process refuses."""
    old = read_pidfile(path)
    if old and old not in (os.getpid(), predecessor) and pid_alive(old):
        raise PidfileError(f"pidfile {path} names running process {old}: is bwp already running?")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)  # atomic: readers never see a half-written file


def remove_pidfile(path: str) -> None:
    """Remove the file only if it still names us (a newer process may own it now)."""
    if read_pidfile(path) == os.getpid():
        with contextlib.suppress(OSError):
            os.unlink(path)


def sd_notify(message: str) -> None:
    """Send one datagram to systemd's NOTIFY_SOCKET, if set; never fails the caller."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(message.encode())
    except OSError as e:
        log.warning("sd_notify %r failed: %s", message, e)


def bind_listener(lst: Listener, inherited: dict[str, socket.socket],
                  unix: UnixSocketConfig) -> socket.socket:
    """The socket for a configured address: handed over by our predecessor, or bound anew."""
    sock = inherited.pop(lst.address, None)
    if sock is not None:
        if lst.path is not None:
            _set_access(lst.path, unix)  # a reload applies a changed mode or owner too
        return sock
    if lst.path is not None:
        return _bind_unix(lst.path, unix)
    infos = socket.getaddrinfo(lst.host, lst.port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    family, type_, proto, _, sockaddr = infos[0]

    def setup(sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)

    return _listening(socket.socket(family, type_, proto), setup)


def _listening(sock: socket.socket, setup: Callable[[socket.socket], None]) -> socket.socket:
    """Run `setup` (options, bind) and listen; the socket is closed if any step fails."""
    try:
        setup(sock)
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _bind_unix(path: str, unix: UnixSocketConfig) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            if _unix_socket_live(path):
                raise OSError(errno.EADDRINUSE, f"{path} is in use by a running process")
            os.unlink(path)  # left behind by a crashed process
    os.makedirs(os.path.dirname(path), exist_ok=True)

    def setup(sock: socket.socket) -> None:
        sock.bind(path)
        _set_access(path, unix)  # before listen(): nobody connects under the wrong mode

    return _listening(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), setup)


def _set_access(path: str, unix: UnixSocketConfig) -> None:
    if unix.owner is not None or unix.group is not None:
        os.chown(path, -1 if unix.owner is None else unix.owner, -1 if unix.group is None else unix.group)
    os.chmod(path, unix.mode)  # after chown, which may clear mode bits


def _unix_socket_live(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


# ---------------------------------------------------------------- reload: hand sockets over
#
# As gunicorn and Go's grace do, the old process starts its successor with the very same
# listening sockets (inherited fds), so the kernel's accept queue is shared and nothing in
# it is lost when the old process closes its copies.  The successor reports on a pipe once
# it serves; only then does the old one stop accepting and drain.
#
# Until it serves, the successor's stderr is a pipe to the old process, which copies it line
# by line to its own stderr (the journal sees everything, in order) and keeps the last lines:
# a successor that dies is noticed at once (its end of the ready pipe closes) and its last
# words become the reason of the failure.  Once it serves, the successor puts the old
# process's stderr back as its own (BWP_STDERR_FD), so its logging outlives its predecessor.

LISTEN_FDS_ENV = "BWP_LISTEN_FDS"  # JSON {"address": fd}
READY_FD_ENV = "BWP_READY_FD"
STDERR_FD_ENV = "BWP_STDERR_FD"  # the stderr to take back once serving
PARENT_PID_ENV = "BWP_PARENT_PID"
WORKER_ENV = "BWP_WORKER"  # set for the worker of a `--master` process
REPLACED_SIGNAL = signal.SIGUSR1  # master -> old worker: a new worker serves, hand over and drain
OUTPUT_TAIL = 20  # lines of a new process's output kept as the reason it failed
POLL = 0.1  # seconds between looks at a starting process
MAX_LINE = 2000  # characters of one kept output line


class ReloadFailed(Exception):
    """A new process did not come to serve; `output` holds its last lines of output."""

    def __init__(self, message: str, output: Sequence[str] = ()):
        super().__init__(message)
        self.output = list(output)


def inherited_sockets() -> dict[str, socket.socket]:
    """Listening sockets handed over by the process we replace, by configured address."""
    raw = os.environ.pop(LISTEN_FDS_ENV, "")
    if not raw:
        return {}
    out = {}
    for address, fd in json.loads(raw).items():
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        out[address] = sock
    return out


def parent_pid() -> int | None:
    """The pid of the process we replace, when started by a reload."""
    value = os.environ.get(PARENT_PID_ENV)
    return int(value) if value else None


def notify_parent_ready() -> None:
    """Tell the process we replace that we serve (no-op when not started by a reload).

    First our stderr goes back to where our predecessor's goes: until now it was a pipe
    to our predecessor, which exits soon."""
    fd = os.environ.pop(READY_FD_ENV, None)
    os.environ.pop(PARENT_PID_ENV, None)
    stderr = os.environ.pop(STDERR_FD_ENV, None)
    if stderr is not None:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        try:
            os.dup2(int(stderr), 2)
        except OSError as e:
            log.warning("cannot take back stderr: %s", e)
        finally:
            os.close(int(stderr))
    if fd is None:
        return
    try:
        os.write(int(fd), b"ready\n")
    finally:
        os.close(int(fd))


@dataclass(frozen=True, slots=True)
class WorkerSlot:
    """Where a master's worker process stands among its siblings."""

    index: int
    peers: tuple[str, ...]  # every sibling's private unix socket, ours at `index`

    @property
    def count(self) -> int:
        return len(self.peers)


def worker_slot() -> WorkerSlot | None:
    """Set when started by a master process, which owns the PID file, sd_notify and reloads."""
    raw = os.environ.get(WORKER_ENV)
    if not raw:
        return None
    d = json.loads(raw)
    return WorkerSlot(d["index"], tuple(d["peers"]))


def _finds_this_package(path: list[str]) -> bool:
    """Whether an interpreter with `path` as sys.path (and our import hooks: an editable
    install's finder) imports this very bwp package."""
    here = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))
    for finder in sys.meta_path:
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is None:
            continue
        try:
            spec = find_spec("bwp", path if finder is importlib.machinery.PathFinder else None)
        except Exception:
            continue
        if spec is not None:
            return bool(spec.origin) and os.path.realpath(os.path.dirname(spec.origin)) == here
    return False


def bwp_command(args: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The command line that runs this very bwp with ARGS, and what its environment needs.

    `python -m bwp` would put the working directory first on sys.path, so a `bwp/` folder
    there (a clone's parent, any folder of that name, a planted `bwp/__main__.py`) would run
    instead; -P (Python 3.11) leaves it out.  An installed or editable-installed bwp is found
    without it; a source tree run as `python -m bwp` from the tree is put on PYTHONPATH."""
    argv = [sys.executable, "-P", "-m", "bwp", *args]
    # what the child's sys.path lacks: the working directory / script directory of ours
    path = sys.path if sys.flags.safe_path else sys.path[1:]
    if _finds_this_package(path):
        return argv, {}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    extra = os.environ.get("PYTHONPATH")
    return argv, {"PYTHONPATH": root + (os.pathsep + extra if extra else "")}


class _Tee:
    """A starting process's output: copied to `fd` line by line, the last lines kept."""

    def __init__(self, fd: int):
        self.fd = fd
        self.partial = b""
        self.lines: deque[str] = deque(maxlen=OUTPUT_TAIL)

    def feed(self, data: bytes) -> None:
        *complete, self.partial = (self.partial + data).split(b"\n")
        if len(self.partial) > 65536:  # a line without end: pass it on in pieces
            complete.append(self.partial)
            self.partial = b""
        for line in complete:
            self._emit(line)

    def close(self) -> None:
        if self.partial:
            self._emit(self.partial)
            self.partial = b""

    def _emit(self, line: bytes) -> None:
        data = memoryview(line + b"\n")
        with contextlib.suppress(OSError):
            while data:
                data = data[os.write(self.fd, data):]
        text = line.decode(errors="replace").rstrip()
        if text:
            self.lines.append(text[:MAX_LINE])


def _own_stderr() -> int | None:
    """A duplicate of where our output should go: our stderr, or, while we are a reload's
    new process that does not serve yet, the stderr we are to take back."""
    pending = os.environ.get(STDERR_FD_ENV)
    try:
        return os.dup(int(pending) if pending else 2)
    except (OSError, ValueError):
        return None


def _describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


STOP_ORDER = "stop"  # in the runtime directory: "<master pid> drain|now", once stopping


def stop_order() -> str | None:
    """For a master's worker: "drain" or "now" once its master stops (see above); None while
    it does not, when the master that wrote it is not our parent (gone), or when we are no
    master's worker."""
    slot = worker_slot()
    if slot is None or not slot.peers:
        return None
    try:  # the runtime directory holds the workers' private sockets (spawn_all)
        with open(os.path.join(os.path.dirname(slot.peers[0]), STOP_ORDER)) as f:
            pid, order = f.read().split()
        if int(pid) != os.getppid():
            return None
    except (OSError, ValueError):
        return None
    return order if order in ("drain", "now") else None


def spawn_serving(sockets: dict[str, socket.socket], timeout: float, args: list[str],
                  worker: WorkerSlot | None = None) -> subprocess.Popen[bytes]:
    """Start `bwp ARGS` with our listening sockets; return once it serves.

    Raises ReloadFailed, with the new process's last output lines, as soon as it has
    exited (or after `timeout`, having killed it).  Blocking: call it in a thread.
    """
    argv, extra_env = bwp_command(args)
    fds = {address: s.fileno() for address, s in sockets.items()}
    read_fd, write_fd = os.pipe()
    stderr = _own_stderr()  # ours to tee to, and the child's to take back
    out_r, out_w = os.pipe() if stderr is not None else (None, None)
    env = {**os.environ, **extra_env, LISTEN_FDS_ENV: json.dumps(fds), READY_FD_ENV: str(write_fd),
           PARENT_PID_ENV: str(os.getpid())}
    env.pop(STDERR_FD_ENV, None)
    if stderr is not None:
        env[STDERR_FD_ENV] = str(stderr)
    if worker is not None:
        env[WORKER_ENV] = json.dumps({"index": worker.index, "peers": worker.peers})
    passed = (*fds.values(), write_fd, *((stderr,) if stderr is not None else ()))
    try:
        proc = subprocess.Popen(argv, env=env, pass_fds=passed, stderr=out_w)
    except OSError as e:
        for fd in (read_fd, out_r, stderr):
            if fd is not None:
                os.close(fd)
        raise ReloadFailed(f"cannot start {argv[0]}: {e}") from None
    finally:
        os.close(write_fd)
        if out_w is not None:
            os.close(out_w)
    tee = _Tee(stderr) if stderr is not None else None
    out = out_r

    def read_output(wait: float) -> None:
        """Copy what the child writes within `wait` seconds; `out` is None once it closed."""
        nonlocal out
        if out is not None and tee is not None and select.select([out], [], [], wait)[0]:
            chunk = os.read(out, 65536)
            if chunk:
                tee.feed(chunk)
            else:
                os.close(out)
                out = None

    def drain(seconds: float) -> None:
        until = time.monotonic() + seconds
        while out is not None and (left := until - time.monotonic()) > 0:
            read_output(left)

    deadline = time.monotonic() + timeout
    message: bytes | None = None  # what it said on the ready pipe: b"" when it closed it
    try:
        while (left := deadline - time.monotonic()) > 0:
            watch = [read_fd] if out is None else [read_fd, out]
            ready = select.select(watch, [], [], min(left, POLL))[0]
            if out is not None and out in ready:
                read_output(0)
            if read_fd in ready:
                message = os.read(read_fd, 64)
                break
            if proc.poll() is not None:
                break
        if message is not None and message.startswith(b"ready"):
            drain(2.0)  # it took its stderr back before it said so: the end is there
            return proc
        code: int | None = None
        if message is not None or proc.poll() is not None:  # it has exited, or is exiting
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = proc.wait(5.0)
        if code is None:
            proc.kill()
            proc.wait()
            reason = (f"did not serve within {timeout:g}s" if message is None
                      else "closed its ready pipe without serving")
        else:
            reason = _describe_exit(code)
        drain(2.0)
        raise ReloadFailed(f"new process {proc.pid} {reason}{_last(tee)}",
                           tee.lines if tee is not None else ())
    finally:
        os.close(read_fd)
        if out is not None:
            os.close(out)
        if tee is not None:
            tee.close()
        if stderr is not None:
            os.close(stderr)


def _last(tee: _Tee | None) -> str:
    if tee is None:
        return " (see its log above)"
    tee.close()
    return f": {tee.lines[-1]}" if tee.lines else " without any output"


# ---------------------------------------------------------------- reload: the outcome, for `bwp reload`
#
# A signal carries no answer, so the process that reloads writes how it went to a small JSON
# file next to the PID file (PIDFILE.reload): {"attempt", "pid", "state": "reloading" | "ok" |
# "failed", "new": [pids] (ok), "master": bool, "error", "output": [last lines]} (failed).
# `bwp reload` reads it before it signals and waits for a final record of another attempt.

def reload_status_path(pidfile: str) -> str:
    return f"{pidfile}.reload"


class ReloadStatus:
    """The record of one reload of this process; nothing is written without a PID file."""

    def __init__(self, pidfile: str | None, master: bool = False):
        self.path = reload_status_path(pidfile) if pidfile else None
        self.attempt = f"{os.getpid()}-{time.time_ns()}"
        self.master = master

    def started(self) -> None:
        self._write("reloading")

    def succeeded(self, pids: Sequence[int]) -> None:
        self._write("ok", new=list(pids))

    def failed(self, error: BaseException | str) -> None:
        self._write("failed", error=str(error), output=getattr(error, "output", []))

    def _write(self, state: str, **fields: object) -> None:
        if self.path is None:
            return
        doc = {"attempt": self.attempt, "pid": os.getpid(), "master": self.master,
               "state": state, **fields}
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
            with open(fd, "w") as f:
                json.dump(doc, f)
                f.write("\n")
            os.replace(tmp, self.path)  # readers never see half a record
        except OSError as e:
            log.warning("cannot record the reload's outcome in %s: %s", self.path, e)
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def read_reload_status(path: str) -> dict | None:
    """The last reload record, None when there is none; PermissionError when unreadable."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (FileNotFoundError, NotADirectoryError, ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None
