"""Wires the parts together and runs one daemon process until it is told to stop."""

from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import os
import signal
import socket
from collections.abc import Callable

import uvloop
from aiohttp import web

from .api import Api
from .client import HttpClient
from .config import Config
from .history import History
from .lifecycle import bind_listener, remove_pidfile, sd_notify, write_pidfile
from .metrics import Metrics
from .pool import MemoryStore, Pool
from .router import Router

log = logging.getLogger("bwp")


def id_generator() -> Callable[[], str]:
    """Job ids: a per-process random prefix and a counter (cheap, unique across restarts)."""
    prefix = base64.b32encode(os.urandom(5)).decode().lower()
    counter = itertools.count(1)
    return lambda: f"{prefix}-{next(counter):x}"


class Server:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        queues = list(cfg.all_queues.values())
        self.metrics = Metrics(cfg.all_queues)
        self.router = Router.from_config(cfg)
        workers = sum(q.size for q in queues)
        self.client = HttpClient(cfg.client, self.router, self.metrics, max_connections=workers)
        self.store = MemoryStore(queues)
        self.history = History(cfg.history.max_jobs, cfg.history.max_age)
        self.pool = Pool(queues, self.store, self.client.send, self.metrics, self.history)
        self.api = Api(cfg, self.pool, self.history, self.metrics, id_generator())
        self.sockets: list[socket.socket] = []
        self._runner: web.AppRunner | None = None
        self._sites: list[web.SockSite] = []

    async def start(self) -> None:
        """Bind every listener (all or nothing), then start workers and serving."""
        try:
            for lst in self.cfg.listen:
                self.sockets.append(bind_listener(lst))
        except OSError as e:
            for s in self.sockets:
                s.close()
            raise OSError(e.errno, f"cannot listen on {lst.address}: {e.strerror}") from None
        await self.client.start()
        self.pool.start()
        self._runner = web.AppRunner(self.api.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        for sock in self.sockets:
            site = web.SockSite(self._runner, sock)
            await site.start()
            self._sites.append(site)
        log.info("serving on %s with queues %s", ", ".join(lst.address for lst in self.cfg.listen),
                 ", ".join(f"{q.name}({q.size} workers, {q.queue_size} slots)"
                           for q in self.cfg.all_queues.values()))

    async def stop_accepting(self) -> None:
        """Close the listening sockets; connections already accepted are still answered."""
        self.pool.draining = True
        for site in self._sites:
            await site.stop()
        self._sites.clear()

    async def drain_and_close(self) -> int:
        """Finish queued work within drain_timeout; log every abandoned job. Returns the count."""
        abandoned = await self.pool.drain(self.cfg.drain_timeout)
        for job in abandoned:
            log.error("abandoned job %s %s %s (queue %s, %d attempts)", job.id, job.method,
                      job.url, job.queue, job.attempts)
        self.store.close()
        await self.client.close()
        if self._runner is not None:
            await self._runner.cleanup()
        return len(abandoned)


async def serve(cfg: Config) -> int:
    """Run until SIGTERM/SIGINT, then drain and exit 0 (a second signal exits at once)."""
    server = Server(cfg)
    await server.start()
    if cfg.pidfile:
        write_pidfile(cfg.pidfile)
    sd_notify(f"READY=1\nMAINPID={os.getpid()}")

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_stop(signame: str) -> None:
        if stop.is_set():
            pending = [*server.pool.running, *server.store.remaining()]
            log.error("%s again: exiting now, abandoning %d jobs", signame, len(pending))
            for job in pending:
                log.error("abandoned job %s %s %s", job.id, job.method, job.url)
            if cfg.pidfile:
                remove_pidfile(cfg.pidfile)
            os._exit(1)
        log.info("%s: stopping; draining up to %.0fs", signame, cfg.drain_timeout)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop, sig.name)
    for sig in (signal.SIGHUP, signal.SIGUSR2):
        loop.add_signal_handler(sig, log.warning, "%s: reload is not available in this version",
                                sig.name)

    await stop.wait()
    sd_notify("STOPPING=1")
    await server.stop_accepting()
    abandoned = await server.drain_and_close()
    if cfg.pidfile:
        remove_pidfile(cfg.pidfile)
    log.info("stopped (%d jobs abandoned)", abandoned)
    return 0


def run(cfg: Config) -> int:
    logging.basicConfig(
        level=cfg.log_level.upper(),
        format="%(asctime)s bwp[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    return uvloop.run(serve(cfg))
