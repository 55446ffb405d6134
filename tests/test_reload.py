"""Reloads as an operator meets them: started from any directory, and `bwp reload` (what the
systemd unit's ExecReload runs) telling at once, with the reason, when the new process failed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, Daemon
from test_lifecycle import alive, read_notifications, wait_until
from test_processes import worker_pids

# A `bwp/` folder in the working directory: what `python -m bwp` would run instead of bwp.
PLANTED = """import pathlib, sys
pathlib.Path({marker!r}).write_text("the planted bwp ran")
sys.exit(1)
"""


def bwp_command() -> list[str]:
    """bwp itself, whatever the working directory holds: the console script of this venv
    (`python -m bwp` would be shadowed by the folder these tests plant)."""
    script = Path(sys.executable).with_name("bwp")
    return [str(script)] if script.exists() else [sys.executable, "-P", "-m", "bwp"]


class ShadowedDaemon(Daemon):
    """`bwp serve` started from `cwd` (which holds a planted `bwp/` package)."""

    def __init__(self, tmp: Path, cwd: Path, config: dict, env: dict[str, str] | None = None):
        super().__init__(tmp, config, [], env)
        self.cwd = cwd

    async def start(self, wait: bool = True) -> ShadowedDaemon:
        cfg_path = self.tmp / f"bwp-{self.port}.yaml"
        cfg_path.write_text(yaml.safe_dump(self.config))
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = await asyncio.create_subprocess_exec(
            *bwp_command(), "serve", "-c", str(cfg_path), stdout=self.log, stderr=self.log,
            cwd=str(self.cwd), env={**os.environ, **self.env} if self.env else None)
        self.pids.add(self.proc.pid)
        if wait:
            await self.wait_ready()
        return self


def descendants(pids: set[int]) -> set[int]:
    """`pids` and every process below them (a master's workers), from /proc."""
    seen, todo = set(), list(pids)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError, ValueError):
                    todo += map(int, Path(f"/proc/{pid}/task/{task}/children").read_text().split())
    return seen


def track(d) -> None:
    """Before a teardown kills `d` by pid: learn the pids of all it started, so that a test
    failing half-way through a reload leaves no worker behind."""
    d.pidfile_pid()
    d.pids |= descendants(d.pids)


@pytest.fixture
async def daemon_tracked(make_daemon):
    made = []

    async def make(*args, **kw):
        d = await make_daemon(*args, **kw)
        made.append(d)
        return d

    yield make
    for d in made:
        track(d)


@pytest.fixture
def shadow(tmp_path) -> tuple[Path, Path]:
    """A working directory holding a `bwp/` package that writes a marker file and exits 1."""
    cwd, marker = tmp_path / "cwd", tmp_path / "planted-bwp-ran"
    (cwd / "bwp").mkdir(parents=True)
    for name in ("__init__.py", "__main__.py"):
        (cwd / "bwp" / name).write_text(PLANTED.format(marker=str(marker)))
    return cwd, marker


@pytest.fixture
async def make_shadowed(tmp_path, shadow):
    daemons: list[ShadowedDaemon] = []

    async def make(config: dict, **kw) -> ShadowedDaemon:
        d = ShadowedDaemon(tmp_path, shadow[0], config, **kw)
        daemons.append(d)
        return await d.start()

    yield make
    for d in daemons:
        track(d)
        await d.stop(signal.SIGKILL)
        d.kill_all()


async def health_pid(d) -> int:
    status, text = await d.get("/healthz")
    assert status == 200, text
    return json.loads(text)["pid"]


async def bwp_reload(*args: str, cwd: Path = ROOT) -> tuple[int, str, str, float]:
    """`bwp reload ARGS`: exit status, stdout, stderr, seconds it took."""
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *bwp_command(), "reload", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=str(cwd))
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 40)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out.decode(), err.decode(), time.monotonic() - t0


async def stop_by_pid(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    await wait_until(lambda: not alive(pid), what=f"pid {pid} to exit")


# ---------------------------------------------------------------- a `bwp/` folder in the cwd

async def test_reload_from_a_directory_holding_a_bwp_folder(make_shadowed, shadow, tmp_path):
    cwd, marker = shadow
    d = await make_shadowed({"pidfile": str(tmp_path / "bwp.pid")})
    old = d.proc.pid
    assert d.pidfile_pid() == old
    os.kill(old, signal.SIGHUP)
    await wait_until(lambda: d.pidfile_pid() not in (None, old)
                     or "reload failed" in d.output(), what="a new process")
    assert not marker.exists(), "the planted bwp/__main__.py ran"
    new = d.pidfile_pid()
    assert new != old, d.output()
    assert await asyncio.wait_for(d.proc.wait(), 15) == 0
    assert await health_pid(d) == new
    # the new process reloads in turn (it was itself started the safe way), from `bwp reload`
    code, out, err, _ = await bwp_reload("--pidfile", str(tmp_path / "bwp.pid"), "--timeout", "20",
                                         cwd=cwd)
    assert code == 0, err
    third = d.pidfile_pid()
    assert f"reloaded: pid {new} -> {third}" in out
    assert await health_pid(d) == third
    assert not marker.exists()
    await stop_by_pid(third)
    assert not alive(new)


async def test_processes_from_a_directory_holding_a_bwp_folder(make_shadowed, shadow, tmp_path):
    _, marker = shadow
    d = await make_shadowed({"processes": 2, "pidfile": str(tmp_path / "bwp.pid")})
    master = d.proc.pid
    # the workers answer before the master writes the PID file and takes SIGHUP (ignored till then)
    await wait_until(lambda: d.pidfile_pid() == master, what="PID file")
    first = await worker_pids(d)
    d.pids.update(first)
    assert len(first) == 2 and master not in first, d.output()
    os.kill(master, signal.SIGHUP)
    for pid in first:
        await wait_until(lambda p=pid: not alive(p), what="old worker exit")
    second = await worker_pids(d)
    d.pids.update(second)
    assert len(second) == 2 and not second & first, d.output()
    assert not marker.exists(), "the planted bwp/__main__.py ran"
    assert await d.stop() == 0


# ---------------------------------------------------------------- `bwp reload` tells why

def config_path(d) -> Path:
    return d.tmp / f"bwp-{d.port}.yaml"


def rewrite(d, **changes) -> None:
    config_path(d).write_text(yaml.safe_dump({**d.config, **changes}))


@pytest.mark.parametrize("how", ["--pidfile", "-c"])
async def test_reload_with_an_unknown_key_fails_fast_and_says_why(daemon_tracked, tmp_path, how):
    pidfile = str(tmp_path / "bwp.pid")
    d = await daemon_tracked({"pidfile": pidfile})
    old = d.proc.pid
    rewrite(d, bogus_key=1)
    # --pidfile: the daemon's new process reads the file; -c: `bwp reload` itself refuses it
    code, _, err, took = await bwp_reload(
        *(["--pidfile", pidfile] if how == "--pidfile" else ["-c", str(config_path(d))]),
        "--timeout", "20")
    assert code == 1 and took < 10, (code, took, err)
    assert "bogus_key: unknown key" in err
    if how == "--pidfile":
        assert f"pid {old} keeps serving" in err
        assert "reload failed, this process keeps serving" in d.output()
    assert await health_pid(d) == old and d.pidfile_pid() == old
    assert d.proc.returncode is None


async def test_reload_onto_a_port_in_use_fails_fast_and_says_why(daemon_tracked, tmp_path,
                                                                   notify_socket):
    path, notifications = notify_socket
    d = await daemon_tracked({"pidfile": str(tmp_path / "bwp.pid")}, env={"NOTIFY_SOCKET": path})
    old = d.proc.pid
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rewrite(d, listen=[*d.config["listen"], f"127.0.0.1:{port}"])
        code, out, err, took = await bwp_reload("-c", str(config_path(d)), "--timeout", "20")
    assert code == 1 and took < 10, (code, took, out, err)
    assert f"pid {old} keeps serving" in err
    assert f"cannot listen on 127.0.0.1:{port}" in err  # the new process's last words
    assert await health_pid(d) == old and d.pidfile_pid() == old
    # systemd saw a reload begin and end, and the main pid never moved
    assert read_notifications(notifications) == [
        (old, f"MAINPID={old}\nREADY=1"), (old, "RELOADING=1"), (old, "READY=1")]


async def test_a_new_process_dying_after_parsing_is_reported_with_its_last_line(
        daemon_tracked, tmp_path):
    d = await daemon_tracked({"pidfile": str(tmp_path / "bwp.pid")})
    old = d.proc.pid
    not_a_dir = tmp_path / "journal"
    not_a_dir.write_text("a file where the journal directory should be\n")
    rewrite(d, journal={"path": str(not_a_dir)})
    code, _, err, took = await bwp_reload("-c", str(config_path(d)), "--timeout", "20")
    assert code == 1 and took < 10, (code, took, err)
    # its last line, as the daemon's log has it too
    assert f"journal {not_a_dir}: File exists" in err
    assert f"journal {not_a_dir}: File exists" in d.output()
    assert await health_pid(d) == old and d.pidfile_pid() == old
    # and once the config is fixed, the same command reloads
    rewrite(d)
    code, out, err, _ = await bwp_reload("-c", str(config_path(d)), "--timeout", "20")
    assert code == 0, err
    new = d.pidfile_pid()
    assert f"reloaded: pid {old} -> {new}" in out and await health_pid(d) == new
    await stop_by_pid(new)


async def test_reload_command_with_processes(daemon_tracked, tmp_path):
    """Under a master the PID file never changes: the outcome comes from the record."""
    pidfile = str(tmp_path / "bwp.pid")
    d = await daemon_tracked({"processes": 2, "pidfile": pidfile})
    master = d.proc.pid
    await wait_until(lambda: d.pidfile_pid() == master, what="PID file")
    first = await worker_pids(d)
    d.pids.update(first)
    code, out, err, took = await bwp_reload("--pidfile", pidfile, "--timeout", "20")
    assert code == 0 and took < 10, (code, took, err)
    assert f"reloaded: pid {master} (master) now runs worker(s) " in out
    rewrite(d, bogus_key=1)
    code, _, err, took = await bwp_reload("--pidfile", pidfile, "--timeout", "20")
    assert code == 1 and took < 10, (code, took, err)
    assert "bogus_key: unknown key" in err and f"pid {master} keeps serving" in err
    second = await worker_pids(d)
    d.pids.update(second)
    assert len(second) == 2 and not second & first
    assert d.pidfile_pid() == master
    assert await d.stop() == 0


async def test_reload_from_one_process_to_several(daemon_tracked, tmp_path):
    d = await daemon_tracked({"pidfile": str(tmp_path / "bwp.pid")})
    old = d.proc.pid
    rewrite(d, processes=2)
    code, out, err, took = await bwp_reload("-c", str(config_path(d)), "--timeout", "20")
    assert code == 0 and took < 10, (code, took, err, d.output())
    master = d.pidfile_pid()
    assert master != old and f"reloaded: pid {old} -> {master}" in out
    assert await asyncio.wait_for(d.proc.wait(), 15) == 0
    workers = await worker_pids(d)
    d.pids.update(workers)
    assert len(workers) == 2 and master not in workers
    await stop_by_pid(master)
    for pid in workers:
        await wait_until(lambda p=pid: not alive(p), what="worker exit")


def test_the_unit_file_reloads_through_bwp_reload():
    unit = (ROOT / "systemd" / "bwp.service").read_text()
    lines = [line for line in unit.splitlines() if line.startswith("ExecReload=")]
    assert lines == ["ExecReload=/usr/local/bin/bwp reload -c /etc/bwp/bwp.yaml"]
    assert "Type=notify" in unit and "NotifyAccess=all" in unit


def test_the_new_process_runs_this_very_bwp(monkeypatch):
    """-P keeps the working directory off sys.path; a bwp that only the working directory
    provided (a source tree run as `python -m bwp` without installing) goes on PYTHONPATH."""
    import importlib.machinery

    from bwp import lifecycle

    argv, env = lifecycle.bwp_command(["serve", "-c", "x.yaml"])
    assert argv == [sys.executable, "-P", "-m", "bwp", "serve", "-c", "x.yaml"]
    assert env == {}  # installed (here: editable) bwp is found without help
    if sys.flags.safe_path:
        pytest.skip("this interpreter runs with -P: it has no working-directory entry")
    # as if this bwp came only from the working directory, sys.path[0] of `python -m bwp`
    standard = (importlib.machinery.BuiltinImporter, importlib.machinery.FrozenImporter,
                importlib.machinery.PathFinder)
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if f in standard])
    monkeypatch.setattr(sys, "path", [str(ROOT), *(p for p in sys.path if "site-packages" not in p
                                                   and Path(p or ".").resolve() != ROOT)])
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    _, env = lifecycle.bwp_command(["serve"])
    assert env == {"PYTHONPATH": f"{ROOT}{os.pathsep}/elsewhere"}
