"""The master process (`bwp serve --master`, or `processes` > 1): one long-lived main
process that owns the listening sockets, the PID file and sd_notify, and runs the daemon as
`processes` worker processes on those sockets (one shared accept queue each), replaced on reload.

For process supervisors that track the pid they started (supervisord, runit, containers) the
main pid never changes; with several workers, every core serves.  A reload starts a new set
of workers, waits until all of them serve, then tells the old ones to hand their delayed jobs
over and drain.  A worker that dies on its own is started again in its slot.

Stopping: the workers share the master's process group, so the terminal's Ctrl-C (and
supervisord's `stopasgroup`) signals each of them as well as the master, which passes the stop
on: every worker sees one stop twice, from two senders, within milliseconds.  So that the second
copy is not taken for the user's second signal (exit at once), a stopping master writes its
order to the workers (STOP_ORDER, in its private runtime directory) before it signals them:
"drain" on its first stop signal, "now" on its second.  A worker that is told to stop again
asks the order (stop_order()): "drain" is the stop under way, seen again; "now" exits at once.
Only the master counts the user's signals; each worker is told each order once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable

from .config import Config, ConfigError
from .lifecycle import (
    REPLACED_SIGNAL,
    STOP_ORDER,
    ReloadFailed,
    ReloadStatus,
    WorkerSlot,
    bind_listener,
    inherited_sockets,
    log_start,
    notify_parent_ready,
    parent_pid,
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
        self.workers: list[subprocess.Popen[bytes] | None] = []
        self.slots: list[WorkerSlot] = []
        self.retiring: list[subprocess.Popen[bytes]] = []  # old workers draining
        self.runtime = tempfile.mkdtemp(prefix="bwp-")  # 0700: the workers' private sockets
        self.generation = 0  # of the workers last started (or tried): their files' prefix
        self.serving = 0  # the generation of self.workers
        self.stopping = False
        self.forced = False  # a second stop signal: the workers exit at once
        self.told: set[subprocess.Popen[bytes]] = set()  # workers sent their SIGTERM
        self._busy = asyncio.Lock()  # one start/reload at a time

    def bind(self, cfg: Config, inherited: dict[str, socket.socket] | None = None) -> None:
        """Bind the listeners cfg names that we do not hold yet (or were handed by the
        process we replace, when a reload started us); drop the others."""
        inherited = inherited if inherited is not None else {}
        fresh: dict[str, socket.socket] = {}
        try:
            for lst in cfg.listen:
                fresh[lst.address] = (self.sockets.get(lst.address)
                                      or bind_listener(lst, inherited, cfg.unix_socket))
        except OSError:  # we keep serving on what we held; what is new goes
            for address, sock in fresh.items():
                if self.sockets.get(address) is not sock:
                    sock.close()
            for sock in inherited.values():
                sock.close()
            raise
        kept = {id(sock) for sock in fresh.values()}
        for sock in [*self.sockets.values(), *inherited.values()]:
            if id(sock) not in kept:
                sock.close()
        self.sockets = fresh

    async def spawn(self, slot: WorkerSlot) -> subprocess.Popen[bytes]:
        return await asyncio.to_thread(spawn_serving, self.sockets, START_TIMEOUT,
                                       self.worker_args, slot)

    async def spawn_all(self, n: int) -> list[subprocess.Popen[bytes] | None]:
        """A new generation of `n` workers, all serving, or none (raises ReloadFailed)."""
        self.generation += 1
        paths = tuple(os.path.join(self.runtime, f"{self.generation}.{i}.sock") for i in range(n))
        slots = [WorkerSlot(i, paths) for i in range(n)]
        started = await asyncio.gather(*(self.spawn(s) for s in slots), return_exceptions=True)
        failed = [r for r in started if isinstance(r, BaseException)]
        if failed:
            for proc in started:
                if isinstance(proc, subprocess.Popen):
                    proc.kill()
                    await asyncio.to_thread(proc.wait)
            raise failed[0] if isinstance(failed[0], ReloadFailed) else ReloadFailed(str(failed[0]))
        self.slots, self.serving = slots, self.generation
        return [p for p in started if isinstance(p, subprocess.Popen)]

    def sweep(self) -> None:
        """Remove the private sockets and load boards of generations no worker runs any more
        (a reload's old workers are gone, or a new generation failed to start): a daemon
        reloaded daily would otherwise gather three files a day."""
        keep = f"{self.serving}."
        for name in os.listdir(self.runtime):
            if name[:1].isdigit() and not name.startswith(keep):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.runtime, name))

    def pids(self) -> str:
        return ", ".join(str(p.pid) for p in self.workers if p is not None)

    async def run(self) -> int:
        self.bind(self.cfg, inherited_sockets())  # handed over when a reload started us
        try:
            self.workers = await self.spawn_all(self.cfg.processes)
            return await self._serve()
        finally:
            shutil.rmtree(self.runtime, ignore_errors=True)

    async def _serve(self) -> int:
        # the handlers first: whoever reads the PID file (or MAINPID) may signal at once
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.on_stop, sig)
        for sig in (signal.SIGHUP, signal.SIGUSR2):
            loop.add_signal_handler(sig, lambda s=sig: loop.create_task(self.reload(s.name)))
        if self.cfg.pidfile:
            write_pidfile(self.cfg.pidfile, predecessor=parent_pid())
        sd_notify(f"MAINPID={os.getpid()}\nREADY=1")
        log.info("master serving with worker(s) %s", self.pids())
        notify_parent_ready()  # when a reload of a single process started us: we serve
        while not (self.stopping and not any(self.workers) and not self.retiring):
            await asyncio.sleep(POLL)
            await self.reap()
        if self.cfg.pidfile:
            remove_pidfile(self.cfg.pidfile)
        if self.forced:  # as a single process told twice: what was under way did not finish
            log.warning("master stopped; the workers were told to exit at once")
            return 1
        log.info("master stopped")
        return 0

    def on_stop(self, sig: signal.Signals) -> None:
        """SIGTERM/SIGINT, to us alone or to our whole process group (Ctrl-C, supervisord's
        stopasgroup): the first drains, a second makes the workers exit at once."""
        if not self.stopping:
            log.info("%s: stopping the workers; they drain up to %gs", sig.name,
                     self.cfg.drain_timeout)
            sd_notify("STOPPING=1")
            self.stopping = True
            self.order("drain")
            # The old workers of a reload are spared: they drain already.
            for proc in self.workers:
                self.tell(proc)
            return
        log.warning("%s again: the workers exit now", sig.name)
        self.forced = True
        self.order("now")
        for proc in [*self.workers, *self.retiring]:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def order(self, order: str) -> None:
        """Write what we ask of the workers, before any of them is signalled (see above)."""
        path = os.path.join(self.runtime, STOP_ORDER)
        tmp = f"{path}.tmp"
        try:
            with open(tmp, "w") as f:
                f.write(f"{os.getpid()} {order}\n")
            os.replace(tmp, path)  # a worker reads the old order or the new, never half
        except OSError as e:  # then a worker counts signals itself: a group's may abandon
            log.error("cannot tell the workers to %s (%s): %s", order, path, e)

    def tell(self, proc: subprocess.Popen[bytes] | None) -> None:
        """The stop, once per worker: SIGTERM, which it reads with our order."""
        if proc is not None and proc not in self.told and proc.poll() is None:
            self.told.add(proc)
            proc.send_signal(signal.SIGTERM)

    async def reload(self, signame: str) -> None:
        if self.stopping or self._busy.locked():
            log.warning("%s: a reload or stop is already under way", signame)
            return
        async with self._busy:
            log.info("%s: reloading: starting new workers", signame)
            sd_notify("RELOADING=1")
            status = ReloadStatus(self.cfg.pidfile, master=True)  # for `bwp reload`
            status.started()
            try:
                cfg = self.load()
                self.bind(cfg)
                new = await self.spawn_all(cfg.processes)
            except (ConfigError, OSError, ReloadFailed) as e:
                reason = f"config error: {e}" if isinstance(e, ConfigError) else e
                log.error("reload failed, the current workers keep serving: %s", reason)
                if not self.stopping:
                    sd_notify("READY=1")
                if not self.retiring:  # else once they are gone
                    self.sweep()
                status.failed(reason)
                return
            old, self.workers, self.cfg = self.workers, new, cfg
            for proc in old:
                if proc is not None:
                    if not self.stopping:  # else it has had its SIGTERM
                        proc.send_signal(REPLACED_SIGNAL)
                    self.retiring.append(proc)
            if self.stopping:  # SIGTERM came while the new ones started: only the old got it
                for proc in new:
                    self.tell(proc)
                status.failed("the daemon is stopping")
                return
            log.info("worker(s) %s serve; the old ones drain", self.pids())
            sd_notify("READY=1")
            status.succeeded([p.pid for p in new if p is not None])

    async def reap(self) -> None:
        retired = len(self.retiring)
        self.retiring = [p for p in self.retiring if p.poll() is None]
        if retired and not self.retiring:
            self.sweep()
        for i, proc in enumerate(self.workers):
            if proc is None or proc.poll() is None:
                continue
            self.workers[i] = None
            if self.stopping:
                continue
            log.error("worker %d exited with status %s; starting another", proc.pid, proc.returncode)
            await asyncio.sleep(RESTART_DELAY)
            async with self._busy:
                # not replaced meanwhile, nor are we stopping now
                if not self.stopping and i < len(self.workers) and self.workers[i] is None:
                    try:
                        self.workers[i] = new = await self.spawn(self.slots[i])  # same slot, socket
                    except ReloadFailed as e:
                        log.error("cannot start a worker: %s", e)
                    else:
                        if self.stopping:  # SIGTERM came while it started
                            self.tell(new)


def master_args(argv: list[str]) -> list[str]:
    """The worker's command line: ours without the --master flag."""
    return [a for a in argv if a not in ("--master", "-master")]


def run_master(cfg: Config, load: Callable[[], Config]) -> int:
    """Run the master until stopped; `load` re-reads the config (file and flags) on reload."""
    setup_logging(cfg.log_level, cfg.log_format)
    log_start(cfg, f"master of {cfg.processes} worker process{'es' if cfg.processes > 1 else ''}")
    return asyncio.run(Arbiter(cfg, load, master_args(sys.argv[1:])).run())
