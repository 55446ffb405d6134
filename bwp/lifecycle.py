"""Process lifecycle plumbing: PID file, sd_notify, listening sockets."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

from .config import Listener, UnixSocketConfig

log = logging.getLogger("bwp.lifecycle")

BACKLOG = 2048


def setup_logging(level: str) -> None:
    """One line per event, with the pid, so a reload can be followed in journalctl."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s bwp[%(process)d] %(levelname)s %(name)s: %(message)s",
    )


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

LISTEN_FDS_ENV = "BWP_LISTEN_FDS"  # JSON {"address": fd}
READY_FD_ENV = "BWP_READY_FD"
PARENT_PID_ENV = "BWP_PARENT_PID"
WORKER_ENV = "BWP_WORKER"  # set for the worker of a `--master` process
REPLACED_SIGNAL = signal.SIGUSR1  # master -> old worker: a new worker serves, hand over and drain


class ReloadFailed(Exception):
    pass


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
    """Tell the process we replace that we serve (no-op when not started by a reload)."""
    fd = os.environ.pop(READY_FD_ENV, None)
    os.environ.pop(PARENT_PID_ENV, None)
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


def spawn_serving(sockets: dict[str, socket.socket], timeout: float, args: list[str],
                  worker: WorkerSlot | None = None) -> subprocess.Popen[bytes]:
    """Start `bwp ARGS` with our listening sockets; return once it serves.

    Blocking (fork/exec and a wait on a pipe): call it in a thread.
    """
    read_fd, write_fd = os.pipe()
    fds = {address: s.fileno() for address, s in sockets.items()}
    env = {**os.environ, LISTEN_FDS_ENV: json.dumps(fds), READY_FD_ENV: str(write_fd),
           PARENT_PID_ENV: str(os.getpid())}
    if worker is not None:
        env[WORKER_ENV] = json.dumps({"index": worker.index, "peers": worker.peers})
    argv = [sys.executable, "-m", "bwp", *args]
    try:
        proc = subprocess.Popen(argv, env=env, pass_fds=(*fds.values(), write_fd))
    except OSError as e:
        os.close(read_fd)
        os.close(write_fd)
        raise ReloadFailed(f"cannot start {argv[0]}: {e}") from None
    os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], timeout)
        message = os.read(read_fd, 64) if ready else b""
    finally:
        os.close(read_fd)
    if message.startswith(b"ready"):
        return proc
    if not ready:
        proc.kill()
        proc.wait()
        raise ReloadFailed(f"new process {proc.pid} did not serve within {timeout:g}s")
    code = proc.wait()  # pipe closed without "ready": it exited
    raise ReloadFailed(f"new process {proc.pid} exited with status {code} (see its log above)")
