"""Wires the parts together and runs one daemon process until it is told to stop."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import itertools
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator

import aiohttp
import uvloop

from .api import Api
from .balance import CROWDED_LOAD, AcceptBalancer, LoadBoard
from .client import HttpClient
from .config import Config
from .connections import ConnectionTable, connection_cap, raise_fd_limit, reserved_fds
from .httpserver import HttpServer
from .index import JobIndex, LocalIndex
from .jobs import Job
from .lifecycle import (
    BACKLOG,
    REPLACED_SIGNAL,
    ReloadFailed,
    ThrottledLog,
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
    stop_order,
    worker_slot,
    write_pidfile,
)
from .metrics import Metrics
from .peers import Peers, SiblingJobs
from .pool import Pool
from .redact import Redactor, one_line
from .router import Router
from .service import Jobs
from .signing import Signer
from .store import JobStore, make_store

log = logging.getLogger("bwp")
RELOAD_TIMEOUT = 60.0  # seconds a new process may take to serve
HAND_OVER_BATCH = 500  # jobs per POST to the successor
# jobs a worker may hold beyond its lightest sibling before it stops accepting (at least twice
# its workers: those run, they are not a backlog)
BALANCE_MARGIN = 200
CROWDED = 0.9  # a share of the connection cap: the balancer posts CROWDED_LOAD then
CONNECTION_GRACE = 0.5  # seconds between closing the listeners and closing idle connections
MASTER_CHECK_INTERVAL = 1.0  # seconds between a worker's looks at whether its master lives
SHUTDOWN_AFTER_DRAIN = 1.0  # seconds requests under way get once a stop's drain is over


def _batches(parts: list[tuple[list[Job], bytes]], max_jobs: int, max_bytes: int
             ) -> Iterator[list[tuple[list[Job], bytes]]]:
    """Consecutive parts, each batch within `max_jobs` jobs and `max_bytes` of JSON (a part
    over either goes alone: the successor's answer decides)."""
    batch: list[tuple[list[Job], bytes]] = []
    jobs = size = 0
    for part in parts:
        if batch and (jobs + len(part[0]) > max_jobs or size + len(part[1]) > max_bytes):
            yield batch
            batch, jobs, size = [], 0, 0
        batch.append(part)
        jobs, size = jobs + len(part[0]), size + len(part[1]) + 1
    if batch:
        yield batch


def id_generator() -> Callable[[], str]:
    """Job ids: a per-process random prefix and a counter (cheap, unique across restarts)."""
    prefix = base64.b32encode(os.urandom(5)).decode().lower()
    counter = itertools.count(1)
    return lambda: f"{prefix}-{next(counter):x}"


class Server:
    def __init__(self, cfg: Config, slot: WorkerSlot | None = None):
        # one of several worker processes: its share of workers and bounds, its siblings
        self.peers = Peers(slot.index, slot.peers) if slot and slot.count > 1 else None
        if slot is not None:
            cfg = cfg.share(slot.count)
        self.cfg = cfg
        queues = list(cfg.all_queues.values())
        self.metrics = Metrics(cfg.all_queues)
        self.redact = Redactor(cfg.redact.query)
        self.router = Router.from_config(cfg)
        workers = sum(q.size for q in queues)
        self.client = HttpClient(cfg.client, self.router, self.metrics, max_connections=workers,
                                 redact=self.redact, signers={
                                     q.name: Signer(q.signing_keys) for q in queues if q.signing_keys})
        self.store: JobStore = make_store(cfg, queues, self.metrics)
        h = cfg.history
        local_index = LocalIndex(h.max_jobs, h.max_age, self.redact, h.max_bytes)
        self.index: JobIndex = local_index
        shared = [q.name for q in queues if cfg.in_broker(q)]
        if shared:  # status, dedup and dead letters of the broker's queues: from every host
            from .rabbitmq import broker_of
            from .shared_index import SharedIndex

            self.index = SharedIndex(local_index, broker_of(self.store), shared, h.max_jobs,
                                     h.max_age, h.max_bytes)
        self.pool = Pool(queues, self.store, self.client.sender(), self.metrics, self.index)
        new_id = id_generator()
        local = Jobs(self.pool, self.index, self.metrics)
        board: LoadBoard | None = None
        jobs: Jobs = local
        if self.peers is not None:
            board = LoadBoard(self.peers.paths[0].rsplit(".", 2)[0] + ".load", self.peers.index,
                              len(self.peers.paths))  # beside the generation's sockets
            jobs = SiblingJobs(self.pool, self.index, self.metrics, self.peers, board, shared)
        self.api = Api(cfg, jobs, new_id)
        # answers our siblings on our private socket
        self.peer_api = Api(cfg, local, new_id, for_peers=True) if self.peers else None
        self.sockets: dict[str, socket.socket] = {}  # by configured address
        self._http: HttpServer | None = None  # the API's, on every listener
        self._listeners: list[asyncio.Server] = []
        self._peer_listener: asyncio.Server | None = None
        self._peer_http: HttpServer | None = None
        # with siblings: a worker far ahead of the lightest stops accepting (bwp/balance.py)
        self._balancer: AcceptBalancer | None = None
        self._reopening: asyncio.Future[None] | None = None
        self._listen_failed = ThrottledLog(log, logging.ERROR)
        if board is not None:
            self._balancer = AcceptBalancer(board, self._load, self.pool.full_queues,
                                            max(BALANCE_MARGIN, 2 * workers),
                                            self._stop_accepting, self._accept_again)

    async def start(self) -> None:
        """Bind every listener (all or nothing), then start workers and serving."""
        fd_limit = raise_fd_limit()  # before anything opens: the soft limit up to the hard one
        inherited = inherited_sockets()
        try:
            for lst in self.cfg.listen:
                self.sockets[lst.address] = bind_listener(lst, inherited, self.cfg.unix_socket)
        except OSError as e:
            for sock in [*self.sockets.values(), *inherited.values()]:
                sock.close()
            raise OSError(e.errno, f"cannot listen on {lst.address}: {e.strerror}") from None
        for address, sock in inherited.items():  # no longer configured: let it go
            log.info("not listening on %s any more", address)
            sock.close()
        # what was bound, not the config's text: a host name listener, port 0, a reload
        self.router.set_own_listeners(sock.getsockname()[:2] for sock in self.sockets.values()
                                  if sock.family in (socket.AF_INET, socket.AF_INET6))
        await self.client.start()
        await self.pool.start()
        await self.index.start()
        loop = asyncio.get_running_loop()
        lim = self.cfg.limits
        if self.peers is not None and self.peer_api is not None:
            path = self.peers.paths[self.peers.index]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # our predecessor in this slot died
            # siblings only: no cap (they hold a few connections each), nothing counted
            self._peer_http = HttpServer(self.peer_api.handle, lim, ConnectionTable(1 << 20, None))
            self._peer_listener = await loop.create_unix_server(self._peer_http, path)
        self._http = HttpServer(self.api.handle, lim, self._connection_table(fd_limit))
        await self._listen()
        if self._balancer is not None:
            self._balancer.start()
        log.info("serving on %s with queues %s", ", ".join(self.sockets),
                 ", ".join(f"{q.name}({q.size} workers, {q.queue_size} slots)"
                           for q in self.cfg.all_queues.values()))

    def _load(self) -> int:
        """What the balancer posts: the jobs due (a worker holding delayed ones is not busy),
        and far more once the API's connections near their cap, so that the siblings take
        the new ones."""
        table = self._http.table if self._http is not None else None
        crowded = table is not None and len(table.conns) >= CROWDED * table.limit
        return self.pool.due() + (CROWDED_LOAD if crowded else 0)

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self.sockets.values():
            # a balanced listener closes and opens again: it gets a copy of the socket
            own = sock if self._balancer is None else sock.dup()
            self._listeners.append(await loop.create_server(self._http, sock=own, backlog=BACKLOG))

    def _stop_accepting(self) -> None:
        for listener in self._listeners:
            listener.close()  # closes our copy of each listening socket only
        self._listeners.clear()

    def _accept_again(self) -> None:
        balancer = self._balancer
        assert balancer is not None

        async def listen() -> None:
            try:
                await self._listen()
            except OSError as e:  # no fd for the copy: the siblings accept meanwhile
                self._listen_failed("listen", "could not listen again (%s); trying at the "
                                    "next look", e)
                balancer.paused = True
            if balancer.paused:  # paused again meanwhile, or the copies could not be had
                self._stop_accepting()
        self._reopening = asyncio.ensure_future(listen())

    def _connection_table(self, fd_limit: int) -> ConnectionTable:
        """The API listeners' connections, capped below the open files limit (logged once)."""
        lim = self.cfg.limits
        workers = sum(q.size for q in self.cfg.all_queues.values())
        reserve = reserved_fds(workers, len(self.cfg.listen))
        cap = connection_cap(lim.max_connections, fd_limit, workers, len(self.cfg.listen))
        if lim.max_connections is None:
            log.info("at most %d API connections (limits.max_connections auto: open files limit "
                     "%d less %d for outbound sockets and files)", cap, fd_limit, reserve)
        elif cap > fd_limit - reserve:
            log.warning("at most %d API connections (limits.max_connections): the open files "
                        "limit is %d, so deliveries may lack sockets; 'auto' keeps %d for them",
                        cap, fd_limit, reserve)
        else:
            log.info("at most %d API connections (limits.max_connections; open files limit %d)",
                     cap, fd_limit)
        return ConnectionTable(cap, self.metrics)

    async def hand_over(self) -> None:
        """Give delayed and retrying jobs to the process that replaced us, through the
        listening socket we now share with it, so a long delay outlives a reload.  What the
        successor does not confirm stays here, to be drained or logged as abandoned."""
        lim = self.cfg.limits
        parts = [(jobs, json.dumps(sub).encode())
                 for jobs, sub in self.pool.hand_over(lim.max_clones)]
        if not parts:
            return
        lst = self.cfg.listen[0]
        if lst.is_unix:
            connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=lst.path or "")
            url = "http://bwp/post/http"
        else:
            host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(lst.host or "", lst.host)
            connector = aiohttp.TCPConnector()
            url = f"http://{f'[{host}]' if ':' in str(host) else host}:{lst.port}/post/http"
        headers = {"Content-Type": "application/json"}
        if self.cfg.auth.tokens:
            headers["Authorization"] = f"Bearer {self.cfg.auth.tokens[0]}"
        kept: list[Job] = []
        async with aiohttp.ClientSession(connector=connector) as session:
            async def post(batch: list[tuple[list[Job], bytes]]) -> int | None:
                """The successor's status for the batch (None: no answer); confirmed jobs
                are no longer ours."""
                body = b"[" + b",".join(data for _, data in batch) + b"]"
                try:
                    async with session.post(url, data=body, headers=headers) as resp:
                        if resp.status != 200:
                            log.error("hand-over of %d jobs refused: %d %s",
                                      sum(len(jobs) for jobs, _ in batch), resp.status,
                                      one_line((await resp.text())[:500]))
                            return resp.status
                except Exception as e:  # whatever it was, the jobs stay here
                    log.error("hand-over failed: %s", e)
                    return None
                self.pool.handed_over(job for jobs, _ in batch for job in jobs)
                return 200

            # within our own limits: the successor most likely runs the same config
            for batch in _batches(parts, min(HAND_OVER_BATCH, lim.max_jobs_per_request),
                                  lim.max_body_size * 9 // 10):
                status = await post(batch)
                if status is not None and 400 <= status < 500 and len(batch) > 1:
                    # one job the new config refuses (a lower limit) must not keep the rest
                    for part in batch:
                        if await post([part]) != 200:
                            kept += part[0]
                elif status != 200:
                    kept += [job for jobs, _ in batch for job in jobs]
        self.pool.keep(kept)
        for job in kept:
            log.warning("job %s stays in this process (%s)", job.id, self.redact(job.url))
        log.info("handed %d delayed/retrying jobs to the new process (%d kept here)",
                 sum(len(jobs) for jobs, _ in parts) - len(kept), len(kept))

    async def stop(self, replaced: bool = False) -> int:
        """Finish queued work within drain_timeout, then close. Returns how many jobs were
        abandoned (logged one per line; none with the journal: the unfinished stay there).

        `replaced` (a reload): a successor serves on our sockets, so ours close at once and
        it takes our delayed jobs.  A plain stop keeps listening while it drains, so health
        checks, /jobs and /metrics still answer (submits and /healthz with 503)."""
        self.api.stopping = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.drain_timeout
        assert self._http is not None
        if self._balancer is not None:
            self._balancer.stop()
            if self._reopening is not None:
                await self._reopening
            if self._balancer.paused and not replaced:
                try:
                    await self._listen()  # a stop listens on while it drains (below)
                except OSError as e:  # the siblings and the master hold the sockets
                    log.error("could not listen again to drain (%s)", e)
        if replaced:
            await self._close_listeners()
            await self.hand_over()  # only now: while we listened, we could have accepted more
            # answer what is under way and close every connection (kept-alive clients then
            # reconnect to the successor), then finish the queue
            await self._http.shutdown(max(0.0, deadline - loop.time()))
            abandoned = await self.pool.drain(max(0.0, deadline - loop.time()))
        else:
            abandoned = await self.pool.drain(max(0.0, deadline - loop.time()))
            await self._close_listeners()
            # what is still under way waits for jobs that will not finish here
            await self._http.shutdown(SHUTDOWN_AFTER_DRAIN)
        await self.index.close()
        await self.store.close()
        await self.client.close()
        if self._peer_listener is not None and self._peer_http is not None:
            self._peer_listener.close()
            await self._peer_http.shutdown(0)
        if self.peers is not None:
            await self.peers.close()
        return abandoned

    async def _close_listeners(self) -> None:
        self._stop_accepting()
        if self._balancer is not None:  # it listened on copies: the sockets themselves too
            for sock in self.sockets.values():
                sock.close()
        # A connection accepted just before the close has its request still on the way.
        await asyncio.sleep(CONNECTION_GRACE)


class Daemon:
    """One generation of bwp: serves until stopped or replaced by a reload."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        slot = worker_slot()
        self.server = Server(cfg, slot)
        self.done = asyncio.Event()
        self.replaced = False  # a successor serves on our sockets (our reload, or the master's)
        self._reloading = False
        self.main = slot is None  # a master's worker leaves process duties to it
        self._stop_signals = 0  # SIGTERM/SIGINT received (a master's worker counts them)

    async def run(self) -> int:
        cfg = self.cfg
        await self.server.start()
        # Start-up objects never become garbage: keep the collector from scanning them again.
        gc.freeze()
        if self.main:
            if cfg.pidfile:
                write_pidfile(cfg.pidfile, predecessor=parent_pid())
            sd_notify(f"MAINPID={os.getpid()}\nREADY=1")  # before the old process says MAINPID
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.on_stop, sig.name)
        for sig in (signal.SIGHUP, signal.SIGUSR2):
            loop.add_signal_handler(sig, self.on_reload, sig.name)
        watcher = None
        if not self.main:
            loop.add_signal_handler(REPLACED_SIGNAL, self.on_replaced)
            watcher = loop.create_task(self._watch_master(os.getppid()))

        notify_parent_ready()  # after the handlers: a signal from now on is handled

        await self.done.wait()
        if watcher is not None:
            watcher.cancel()
        if not self.replaced and self.main:
            sd_notify("STOPPING=1")
        abandoned = await self.server.stop(replaced=self.replaced)
        if cfg.pidfile and self.main:
            remove_pidfile(cfg.pidfile)  # only while it still names us
        log.info("stopped (%d jobs abandoned)", abandoned)
        return 0

    def on_stop(self, signame: str) -> None:
        if self.main:
            again = self.done.is_set()
        else:
            # A master's worker: a Ctrl-C (or supervisord's stopasgroup) reaches us and the
            # master, which passes it on: one stop, seen twice.  Once the master stops, its
            # order decides; before, each signal is a distinct one (bwp/arbiter.py).
            self._stop_signals += 1
            order = stop_order()
            again = order == "now" or (order is None and self._stop_signals > 1)
            if not again and self.done.is_set():  # draining already (a stop, or replaced)
                log.info("%s: draining already; the master's second stop signal exits at once",
                         signame)
                return
        if again:
            pending = [*self.server.pool.running, *self.server.store.remaining()]
            if self.server.store.durable:
                log.warning("%s again: exiting now; %d unfinished jobs stay in the %s", signame,
                            len(pending), "journal" if self.cfg.journal.path else "broker")
            else:
                log.error("%s again: exiting now, abandoning %d jobs", signame, len(pending))
                for job in pending:
                    log.error("abandoned job %s %s %s", job.id, job.method,
                              self.server.redact(job.url))
            if self.cfg.pidfile:
                remove_pidfile(self.cfg.pidfile)
            os._exit(1)
        log.info("%s: stopping; draining up to %gs", signame, self.cfg.drain_timeout)
        self.done.set()

    async def _watch_master(self, master: int) -> None:
        """A master killed outright (kill -9, the OOM killer) cannot stop its workers: one
        whose parent is gone drains and exits by itself rather than serve on unsupervised."""
        while os.getppid() == master:
            await asyncio.sleep(MASTER_CHECK_INTERVAL)
        log.warning("the master process %d is gone: stopping; draining up to %gs", master,
                    self.cfg.drain_timeout)
        self.done.set()

    def on_replaced(self) -> None:
        """From the --master: a new worker serves; hand our delayed jobs over and drain."""
        if self.done.is_set():
            return
        log.info("replaced by a new worker: handing over and draining up to %gs",
                 self.cfg.drain_timeout)
        self.replaced = True
        self.done.set()

    def on_reload(self, signame: str) -> None:
        if not self.main:
            log.warning("%s: ignored: reloads are the master process's job", signame)
            return
        if self._reloading or self.done.is_set():
            log.warning("%s: a reload or stop is already under way", signame)
            return
        self._reloading = True
        asyncio.get_running_loop().create_task(self._reload(signame))

    async def _reload(self, signame: str) -> None:
        from .lifecycle import ReloadStatus  # what `bwp reload` reads (next to the PID file)

        log.info("%s: reloading: starting a new process", signame)
        sd_notify("RELOADING=1")
        status = ReloadStatus(self.cfg.pidfile)
        status.started()
        try:
            proc = await asyncio.to_thread(spawn_serving, self.server.sockets, RELOAD_TIMEOUT,
                                           sys.argv[1:])
        except ReloadFailed as e:
            log.error("reload failed, this process keeps serving: %s", e)
            sd_notify("READY=1")
            status.failed(e)
            self._reloading = False
            return
        log.info("new process %d serves; this one stops accepting and drains", proc.pid)
        sd_notify(f"MAINPID={proc.pid}")
        status.succeeded([proc.pid])
        self.replaced = True
        self.done.set()


async def serve(cfg: Config) -> int:
    """Run until SIGTERM/SIGINT or a reload hands over, then drain and exit 0."""
    return await Daemon(cfg).run()


def run(cfg: Config) -> int:
    setup_logging(cfg.log_level, cfg.log_format)
    if worker_slot() is None:  # a master's worker: the master said it
        log_start(cfg, "single process")
    return uvloop.run(serve(cfg))
