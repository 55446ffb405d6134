"""`bwp serve --master`: one long-lived main process that owns the listening sockets, the
PID file and sd_notify, and runs the daemon as a worker process it replaces on reload.

For process supervisors that track the pid they started (supervisord, runit, containers):
the main pid never changes.  A reload starts a new worker on the same sockets (a shared
accept queue), waits until it serves, then tells the old worker to drain and exit.  A
worker that dies on its own is started again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable

from .config import Config, ConfigError
from .lifecycle import (
    REPLACED_SIGNAL,
    ReloadFailed,
    bind_listener,
    remove_pidfile,
    sd_notify,
    setup_logging,
    spawn_serving,
    write_pidfile,
)

log = logging.getLogger("bwp.master")
START_TIMEOUT = 60.0
RESTART_DELAY = 1.0  # after a worker died on its own
POLL = 0.2


class Arbiter:
    def __init__(self, cfg: Config, load: Callable[[], Config], worker_args: list[str]):
        self.cfg, self.load, self.worker_args = cfg, load, worker_args
        self.sockets: dict[str, socket.socket] = {}
        self.worker: subprocess.Popen[bytes] | None = None
        self.retiring: list[subprocess.Popen[bytes]] = []  # old workers draining
        self.stopping = False
        self._busy = asyncio.Lock()  # one start/reload at a time

    def bind(self, cfg: Config) -> None:
        """Bind the listeners cfg names that we do not hold yet; drop the others."""
        fresh = {}
        for lst in cfg.listen:
            fresh[lst.address] = (self.sockets.pop(lst.address, None)
                                  or bind_listener(lst, {}, cfg.unix_socket))
        for sock in self.sockets.values():
            sock.close()
        self.sockets = fresh

    async def spawn(self) -> subprocess.Popen[bytes]:
        return await asyncio.to_thread(spawn_serving, self.sockets, START_TIMEOUT,
                                       self.worker_args, True)

    async def run(self) -> int:
        self.bind(self.cfg)
        self.worker = await self.spawn()
        if self.cfg.pidfile:
            write_pidfile(self.cfg.pidfile)
        sd_notify(f"MAINPID={os.getpid()}\nREADY=1")
        log.info("master serving with worker %d", self.worker.pid)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.on_stop, sig)
        for sig in (signal.SIGHUP, signal.SIGUSR2):
            loop.add_signal_handler(sig, lambda s=sig: loop.create_task(self.reload(s.name)))
        while not (self.stopping and self.worker is None and not self.retiring):
            await asyncio.sleep(POLL)
            await self.reap()
        if self.cfg.pidfile:
            remove_pidfile(self.cfg.pidfile)
        log.info("master stopped")
        return 0

    def on_stop(self, sig: signal.Signals) -> None:
        if not self.stopping:
            log.info("%s: stopping the workers", sig.name)
            sd_notify("STOPPING=1")
        self.stopping = True
        for proc in [self.worker, *self.retiring]:
            if proc is not None and proc.poll() is None:
                proc.send_signal(sig)  # a second signal reaches them too: exit at once

    async def reload(self, signame: str) -> None:
        if self.stopping or self._busy.locked():
            log.warning("%s: a reload or stop is already under way", signame)
            return
        async with self._busy:
            log.info("%s: reloading: starting a new worker", signame)
            sd_notify("RELOADING=1")
            try:
                cfg = self.load()
                self.bind(cfg)
                new = await self.spawn()
            except (ConfigError, OSError, ReloadFailed) as e:
                log.error("reload failed, the current worker keeps serving: %s", e)
                sd_notify("READY=1")
                return
            old, self.worker, self.cfg = self.worker, new, cfg
            if old is not None:
                old.send_signal(REPLACED_SIGNAL)
                self.retiring.append(old)
            log.info("worker %d serves; worker %s drains", new.pid, old.pid if old else "-")
            sd_notify("READY=1")

    async def reap(self) -> None:
        self.retiring = [p for p in self.retiring if p.poll() is None]
        if self.worker is None or self.worker.poll() is None:
            return
        code, pid = self.worker.returncode, self.worker.pid
        self.worker = None
        if self.stopping:
            return
        log.error("worker %d exited with status %s; starting another", pid, code)
        await asyncio.sleep(RESTART_DELAY)
        async with self._busy:
            try:
                self.worker = await self.spawn()
            except ReloadFailed as e:
                log.error("cannot start a worker: %s", e)


def master_args(argv: list[str]) -> list[str]:
    """The worker's command line: ours without the --master flag."""
    return [a for a in argv if a not in ("--master", "-master")]


def run_master(cfg: Config, load: Callable[[], Config]) -> int:
    """Run the master until stopped; `load` re-reads the config (file and flags) on reload."""
    setup_logging(cfg.log_level)
    return asyncio.run(Arbiter(cfg, load, master_args(sys.argv[1:])).run())
