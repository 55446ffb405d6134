"""Process lifecycle plumbing: PID file, sd_notify, listening sockets."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat

from .config import Listener

log = logging.getLogger("bwp.lifecycle")

BACKLOG = 2048
UNIX_SOCKET_MODE = 0o666  # PHP-FPM runs as another user; the Go daemon used 0777


class PidfileError(Exception):
    pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_pidfile(path: str) -> None:
    """Write our pid; a stale file (dead pid) is replaced, a live other process refuses."""
    try:
        with open(path) as f:
            old = int(f.read().strip() or 0)
    except (OSError, ValueError):
        old = 0
    if old and old != os.getpid() and _pid_alive(old):
        raise PidfileError(f"pidfile {path} names running process {old}: is bwp already running?")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)  # atomic: readers never see a half-written file


def remove_pidfile(path: str) -> None:
    """Remove the file only if it still names us (a newer process may own it now)."""
    try:
        with open(path) as f:
            if int(f.read().strip() or 0) != os.getpid():
                return
        os.unlink(path)
    except (OSError, ValueError):
        pass


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


def bind_listener(lst: Listener) -> socket.socket:
    """Create, bind and listen one socket for a configured address."""
    if lst.path is not None:
        return _bind_unix(lst.path)
    infos = socket.getaddrinfo(lst.host, lst.port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    family, type_, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _bind_unix(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            if _unix_socket_live(path):
                raise OSError(errno.EADDRINUSE, f"{path} is in use by a running process")
            os.unlink(path)  # left behind by a crashed process
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, UNIX_SOCKET_MODE)
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _unix_socket_live(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True
