"""Configuration and command line: `bwp check`, `bwp route`, `bwp serve` flags (Go ones too).

Real files, real subprocesses, real sockets.  The only addresses that ever see traffic are in
127.0.0.0/8 and ::1; 192.0.2.1 (TEST-NET) and the 2001:db8:: documentation prefix only appear in
configuration, never in a connect().
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import aiohttp
import pytest
from conftest import ROOT, Sink, free_port, run_cli

from bwp.config import (
    DEFAULT_LISTEN,
    Config,
    ConfigError,
    LimitsConfig,
    Route,
    UnixSocketConfig,
    apply_overrides,
    load_config,
    parse_config,
    parse_ip_routes,
    parse_listen,
)
from bwp.router import DestinationDenied, Router

ip = ipaddress.ip_address
net = ipaddress.ip_network


def _can_bind(host: str) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
    except OSError:
        return False
    return True


HAS_IPV6 = _can_bind("::1")
needs_ipv6 = pytest.mark.skipif(not HAS_IPV6, reason="no ::1 on this host")
TOKEN = "s3cret-token-0123456789abcdef"


def write(tmp_path: Path, text: str, name: str = "bwp.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text).lstrip("\n"))
    return p


def route_lines(stdout: str) -> list[str]:
    """The routing table section of `bwp check` output."""
    lines = stdout.splitlines()
    start = lines.index("routes (longest prefix first):") + 1
    out = []
    for line in lines[start:]:
        if not line.startswith("  "):
            break
        out.append(line.strip())
    return out


def sources(stdout: str) -> dict[str, str]:
    """`bwp route` output -> {label: source}."""
    out = {}
    for line in stdout.splitlines():
        m = re.match(r"^(.*?) -> source (\S+) \[", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


# ---------------------------------------------------------------- embedded defaults


def test_embedded_defaults_unit():
    cfg = load_config(None)
    assert [lst.address for lst in cfg.listen] == [DEFAULT_LISTEN] == ["127.0.0.1:7012"]
    assert cfg.listen[0].host == "127.0.0.1" and cfg.listen[0].port == 7012
    assert (cfg.pool.size, cfg.pool.queue_size) == (50, 10000)
    assert cfg.drain_timeout == 300
    assert cfg.routes == () and cfg.queues == {} and cfg.pidfile is None
    assert list(cfg.all_queues) == ["default"]
    # the Go daemon's HTTP client defaults
    assert cfg.client.connect_timeout == 3 and cfg.client.read_timeout == 10
    assert cfg.client.max_response_size == 256 * 1024 and cfg.client.follow_redirects is False
    assert cfg.destinations.deny == (net("169.254.0.0/16"), net("fe80::/10"))
    assert cfg.destinations.allow == () and cfg.auth.tokens == ()
    lim = cfg.limits
    assert (lim.max_body_size, lim.max_jobs_per_request, lim.max_clones, lim.max_json_depth) == (
        4 * 1024 * 1024, 1000, 1000, 64)
    assert (lim.max_headers, lim.max_header_size, lim.max_url_length) == (100, 8190, 8192)
    assert (lim.max_json_values, lim.max_queued_bytes, lim.max_delay) == (
        100_000, 256 * 1024 * 1024, 30 * 86400)
    assert cfg.history.max_bytes == 64 * 1024 * 1024 and "token" in cfg.redact.query
    assert (lim.read_timeout, lim.keepalive_timeout) == (30, 75)
    assert cfg.unix_socket == UnixSocketConfig(mode=0o660, owner=None, group=None)
    assert parse_config(None) == parse_config({}) == cfg


def test_check_embedded_defaults():
    code, out, err = run_cli("check")
    assert code == 0, err
    assert "(embedded defaults)" in out
    lines = out.splitlines()
    assert lines[lines.index("listeners:") + 1].strip() == "127.0.0.1:7012"
    assert "default: 50 workers, 10000 slots" in out
    assert "drain_timeout: 300s" in out
    assert route_lines(out) == ["0.0.0.0/0 -> auto (implicit)", "::/0 -> auto (implicit)"]
    assert "configuration ok" in out


def test_check_empty_file_means_defaults(tmp_path):
    p = write(tmp_path, "# nothing here\n")
    code, out, err = run_cli("check", "-c", str(p))
    assert code == 0, err
    assert str(p) in out
    assert "default: 50 workers, 10000 slots" in out and "127.0.0.1:7012" in out


def test_check_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    code, _, err = run_cli("check", "-c", str(missing))
    assert code == 1
    assert str(missing) in err and "cannot read" in err


# ---------------------------------------------------------------- a full valid file


def full_config(tmp_path: Path, port: int) -> Path:
    v6_routes = '  "::1/128": "::1"\n  "::/0": auto\n' if HAS_IPV6 else ""
    text = f"""\
listen:
  - 127.0.0.1:{port}
  - "[::1]:{port}"
  - {tmp_path}/bwp.sock
pidfile: {tmp_path}/bwp.pid
drain_timeout: 42
log_level: debug
pool:
  size: 5
  queue_size: 100
queues:
  slow: {{size: 2, queue_size: 30}}
  bulk.v2:
    size: 1
routes:
  0.0.0.0/0: auto
  127.0.0.0/8: 127.0.0.2
  127.0.0.128/25: 127.0.0.3
{v6_routes}client:
  connect_timeout: 1.5
  read_timeout: 4
  max_response_size: 1024
  user_agent: test-agent/1
  follow_redirects: true
  max_redirects: 3
  limit_per_host: 4
  log_4xx_bodies: true
  dns_cache_ttl: 0
limits:
  max_body_size: 65536
  max_jobs_per_request: 7
  max_json_depth: 9
  read_timeout: 2.5
unix_socket:
  mode: "0600"
  group: {os.getgid()}
destinations:
  deny: [169.254.0.0/16, "fe80::/10", 127.0.0.66/32]
  allow: [169.254.169.254/32]
auth:
  tokens: [{TOKEN}]
"""
    p = tmp_path / "full.yaml"
    p.write_text(text)
    return p


def test_full_config_unit(tmp_path):
    port = free_port()
    cfg = load_config(str(full_config(tmp_path, port)))
    assert cfg.source == str(tmp_path / "full.yaml")
    assert [lst.address for lst in cfg.listen] == [
        f"127.0.0.1:{port}", f"[::1]:{port}", f"{tmp_path}/bwp.sock"]
    assert cfg.listen[1].host == "::1" and cfg.listen[1].port == port
    assert cfg.listen[2].is_unix and cfg.listen[2].path == f"{tmp_path}/bwp.sock"
    assert all(lst.is_loopback for lst in cfg.listen)
    assert cfg.pidfile == f"{tmp_path}/bwp.pid" and cfg.drain_timeout == 42.0
    assert cfg.log_level == "debug"
    assert [(q.name, q.size, q.queue_size) for q in cfg.all_queues.values()] == [
        ("default", 5, 100), ("slow", 2, 30), ("bulk.v2", 1, 10000)]
    assert Route(net("127.0.0.128/25"), ip("127.0.0.3")) in cfg.routes
    assert Route(net("0.0.0.0/0"), None) in cfg.routes
    c = cfg.client
    assert (c.connect_timeout, c.read_timeout, c.max_response_size, c.user_agent) == (
        1.5, 4.0, 1024, "test-agent/1")
    assert (c.follow_redirects, c.max_redirects, c.limit_per_host, c.log_4xx_bodies,
            c.dns_cache_ttl) == (True, 3, 4, True, 0)
    assert cfg.limits == LimitsConfig(max_body_size=65536, max_jobs_per_request=7, max_json_depth=9,
                                      read_timeout=2.5)
    assert cfg.unix_socket == UnixSocketConfig(mode=0o600, owner=None, group=os.getgid())
    assert net("127.0.0.66/32") in cfg.destinations.deny
    assert cfg.destinations.allow == (net("169.254.169.254/32"),)
    assert cfg.auth.tokens == (TOKEN,)


def test_check_full_config(tmp_path):
    port = free_port()
    p = full_config(tmp_path, port)
    code, out, err = run_cli("check", "-c", str(p))
    assert code == 0, err
    assert str(p) in out
    lines = [line.strip() for line in out.splitlines()]
    i = lines.index("listeners:")
    assert lines[i + 1:i + 4] == [f"127.0.0.1:{port}", f"[::1]:{port}",
                                  f"{tmp_path}/bwp.sock (unix socket)"]
    assert f"pidfile: {tmp_path}/bwp.pid" in lines
    assert "drain_timeout: 42s" in lines
    i = lines.index("queues:")
    assert lines[i + 1:i + 4] == ["default: 5 workers, 100 slots, no retries",
                                  "slow: 2 workers, 30 slots, no retries",
                                  "bulk.v2: 1 workers, 10000 slots, no retries"]
    routes = route_lines(out)
    v4 = [r for r in routes if ":" not in r.split(" ")[0]]
    assert v4 == ["127.0.0.128/25 -> 127.0.0.3", "127.0.0.0/8 -> 127.0.0.2", "0.0.0.0/0 -> auto"]
    # longest prefix first across the whole table
    prefixes = [int(r.split(" ")[0].split("/")[1]) for r in routes if "implicit" not in r]
    assert prefixes == sorted(prefixes, reverse=True)
    if HAS_IPV6:
        v6 = [r for r in routes if ":" in r.split(" ")[0]]
        assert v6 == ["::1/128 -> ::1", "::/0 -> auto"]
        assert not any("implicit" in r for r in routes)
    else:
        assert "::/0 -> auto (implicit)" in routes
    assert "connect 1.5s, read 4s" in out and "followed (max 3)" in out
    assert "allow 169.254.169.254/32" in out and "127.0.0.66/32" in out
    assert "auth: 1 token(s)" in out
    assert "body 65536 bytes, 100000 JSON values, 7 jobs (clones expanded), 1000 clones per job, "\
           "JSON depth 9" in out
    assert "body read 2.5s, keep-alive 75s" in out
    assert f"unix sockets: mode 0600, owner (unchanged), group {os.getgid()}" in lines
    assert out.rstrip().endswith("configuration ok")


def test_check_route_order_in_file_is_irrelevant(tmp_path):
    nets = ["0.0.0.0/0: auto", "127.0.0.0/8: 127.0.0.2", "127.0.0.128/25: 127.0.0.3",
            "127.0.0.200/32: auto"]
    outs = set()
    for perm in [nets, nets[::-1], [nets[2], nets[0], nets[3], nets[1]]]:
        p = write(tmp_path, "routes:\n" + "".join(f"  {n}\n" for n in perm))
        code, out, err = run_cli("check", "-c", str(p))
        assert code == 0, err
        outs.add(tuple(route_lines(out)))
    assert outs == {("127.0.0.200/32 -> auto", "127.0.0.128/25 -> 127.0.0.3",
                     "127.0.0.0/8 -> 127.0.0.2", "0.0.0.0/0 -> auto",
                     "::/0 -> auto (implicit)")}


@pytest.mark.parametrize("extra", [
    f"auth:\n  tokens: [{TOKEN}]\n",
    "auth:\n  allow_anonymous_remote: true\n",
])
def test_check_non_loopback_listener_accepted_with_tokens(tmp_path, extra):
    port = free_port()
    p = write(tmp_path, f"listen:\n  - 127.0.0.1:{port}\n  - 0.0.0.0:{port}\n" + extra)
    code, out, err = run_cli("check", "-c", str(p))
    assert code == 0, err
    assert f"0.0.0.0:{port}" in out


# ---------------------------------------------------------------- every config error


ERRORS = [
    # (id, yaml, key named in the message, line, fragment of the message)
    ("unknown-top-key", "listen: 127.0.0.1:7012\ndrain_timeout: 5\nbogus: 1\n", "bogus", 3,
     "unknown key"),
    ("unknown-nested-key", "pool:\n  size: 3\n  sizee: 4\n", "pool.sizee", 3, "unknown key"),
    ("unknown-queue-key", "queues:\n  slow:\n    size: 2\n    workers: 3\n", "queues.slow.workers",
     4, "unknown key"),
    ("unknown-client-key", "client:\n  connect_timout: 3\n", "client.connect_timout", 2,
     "unknown key"),
    ("size-string", 'pool:\n  size: "ten"\n', "pool.size", 2, "integer"),
    ("size-bool", "pool:\n  size: true\n", "pool.size", 2, "boolean"),
    ("size-float", "pool:\n  size: 2.5\n", "pool.size", 2, "integer"),
    ("size-zero", "pool:\n  queue_size: 0\n", "pool.queue_size", 2, ">= 1"),
    ("pool-not-mapping", "drain_timeout: 1\npool: 5\n", "pool", 2, "mapping"),
    ("drain-negative", "drain_timeout: -1\n", "drain_timeout", 1, ">= 0"),
    ("drain-string", "drain_timeout: 5m\n", "drain_timeout", 1, "number"),
    ("client-timeout-string", "client:\n  read_timeout: soon\n", "client.read_timeout", 2, "number"),
    ("client-bool-int", "client:\n  follow_redirects: 1\n", "client.follow_redirects", 2,
     "true or false"),
    ("route-bad-prefix", "routes:\n  127.0.0.0/8: auto\n  10.0.0.0/33: auto\n",
     "routes.10.0.0.0/33", 3, "malformed network"),
    ("route-not-network", "routes:\n  somewhere: auto\n", "routes.somewhere", 2,
     "malformed network"),
    ("route-via-not-ip", "routes:\n  10.0.0.0/8: fast\n", "routes.10.0.0.0/8", 2, "'auto'"),
    ("route-via-not-string", "routes:\n  10.0.0.0/8: 5\n", "routes.10.0.0.0/8", 2, "'auto'"),
    ("route-via-not-local", "routes:\n  0.0.0.0/0: auto\n  10.0.0.0/8: 192.0.2.1\n",
     "routes.10.0.0.0/8", 3, "not an address of this host"),
    ("route-v4-via-v6-net", 'routes:\n  "::/0": 127.0.0.2\n', "routes.::/0", 2, "IPv4"),
    ("route-v6-via-v4-net", 'routes:\n  10.0.0.0/8: "::1"\n', "routes.10.0.0.0/8", 2, "IPv6"),
    ("route-twice", "routes:\n  10.0.0.0/8: auto\n  10.9.9.9/8: auto\n", "routes.10.9.9.9/8", 3,
     "listed twice"),
    ("routes-list", "routes:\n  - 10.0.0.0/8\n", "routes", 1, "mapping"),
    ("listen-no-port", "listen:\n  - 127.0.0.1:7012\n  - 127.0.0.1\n", "listen[1]", 3,
     "host:port"),
    ("listen-port-range", "listen:\n  - 127.0.0.1:99999\n", "listen[0]", 2, "out of range"),
    ("listen-bad-v6", 'listen:\n  - "[1:2:3:4:5:6:7:8:9]:7012"\n', "listen[0]", 2, "IPv6"),
    ("listen-relative-unix", "listen:\n  - run/bwp.sock\n", "listen[0]", 2, "absolute"),
    ("listen-not-string", "listen:\n  - 7012\n", "listen[0]", 2, "string"),
    ("listen-twice", "listen:\n  - 127.0.0.1:7012\n  - 127.0.0.1:7012\n", "listen", 3,
     "listed twice"),
    ("duplicate-top-key", "pool:\n  size: 1\ndrain_timeout: 3\npool:\n  size: 2\n", "pool", 4,
     "duplicate key"),
    ("duplicate-nested-key", "pool:\n  size: 1\n  queue_size: 9\n  size: 2\n", "pool.size", 4,
     "duplicate key"),
    ("invalid-yaml-flow", "pool: {size: 1\ndrain_timeout: 3\n", "invalid YAML", 2, ""),
    ("invalid-yaml-indent", "pool:\n  size: 1\n queue_size: 2\n", "invalid YAML", 3, ""),
    ("journal-unknown-key", "journal:\n  path: /tmp/x\n  fsync: false\n", "journal.fsync", 3,
     "unknown key"),
    ("journal-path-empty", 'journal:\n  path: " "\n', "journal.path", 2, "directory"),
    ("journal-compact-small", "journal:\n  path: /tmp/x\n  compact_size: 10\n",
     "journal.compact_size", 3, ">= 4096"),
    ("non-loopback-no-tokens", "listen:\n  - 127.0.0.1:7012\n  - 0.0.0.0:7012\n", "listen", 3,
     "auth.tokens"),
    ("any-address-no-tokens", 'listen: ":7012"\n', "listen", 1, "auth.tokens"),
    ("short-token", "auth:\n  tokens:\n    - " + TOKEN + "\n    - short\n", "auth.tokens[1]", 4,
     "at least 16"),
    ("token-with-space", 'auth:\n  tokens: ["0123456789 abcdefghij"]\n', "auth.tokens[0]", 2,
     "spaces"),
    ("tokens-not-list", f"auth:\n  tokens: {TOKEN}\n", "auth.tokens", 2, "list"),
    ("log-level", "log_level: loud\n", "log_level", 1, "debug, info"),
    ("queue-named-default", "queues:\n  default: {size: 1}\n", "queues.default", 2, "default"),
    ("queue-bad-name", 'queues:\n  "a b": {size: 1}\n', "queues.a b", 2, "queue names"),
    ("deny-malformed", "destinations:\n  deny: [169.254.0.0/16, nope]\n", "destinations.deny[1]", 2,
     "malformed network"),
    ("max-body-bool", "limits:\n  max_body_size: false\n", "limits.max_body_size", 2, "boolean"),
    ("limit-negative", "limits:\n  max_body_size: 100\n  max_clones: -1\n", "limits.max_clones", 3,
     ">= 1"),
    ("limit-string", 'limits:\n  read_timeout: "5s"\n', "limits.read_timeout", 2, "a number"),
    ("json-depth-too-deep", "limits:\n  max_json_depth: 5000\n", "limits.max_json_depth", 2, "<= 500"),
    ("limit-unknown", "limits:\n  max_jobs: 5\n", "limits.max_jobs", 2, "max_jobs_per_request"),
    ("socket-mode-unquoted", "unix_socket:\n  mode: 0660\n", "unix_socket.mode", 2, "quote it"),
    ("socket-mode-bad", 'unix_socket:\n  mode: "0980"\n', "unix_socket.mode", 2, "octal"),
    ("socket-owner-unknown", "unix_socket:\n  owner: no-such-user-bwp\n", "unix_socket.owner", 2,
     "no user named"),
    ("socket-group-negative", "unix_socket:\n  group: -3\n", "unix_socket.group", 2, "id >= 0"),
    ("rabbitmq-scheme", "rabbitmq:\n  url: http://u:hunter2@127.0.0.1/\n", "rabbitmq.url", 2,
     "amqp://"),
    ("rabbitmq-port", "rabbitmq:\n  url: amqp://u:hunter2@127.0.0.1:99999/\n", "rabbitmq.url", 2,
     "not a valid URL"),
    ("rabbitmq-no-host", "rabbitmq:\n  url: amqp:///vhost\n", "rabbitmq.url", 2, "host"),
    ("rabbitmq-prefix", 'rabbitmq:\n  prefix: "a b"\n', "rabbitmq.prefix", 2, "letters"),
    ("rabbitmq-unknown", "rabbitmq:\n  uri: amqp://127.0.0.1/\n", "rabbitmq.uri", 2,
     "unknown key"),
    ("queue-local-not-bool", "queues:\n  slow: {size: 1, local: 1}\n", "queues.slow.local", 2,
     "true or false"),
]


@pytest.mark.parametrize(("text", "key", "line", "fragment"),
                         [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_check_config_errors(tmp_path, text, key, line, fragment):
    p = write(tmp_path, text)
    code, out, err = run_cli("check", "-c", str(p))
    assert code == 1, (out, err)
    assert "configuration ok" not in out
    assert f"{p}:{line}: " in err, err  # file and line, like nginx -t
    assert key in err, err
    assert fragment in err, err
    assert "Traceback" not in err
    assert "hunter2" not in out + err  # a broker password is never shown


def test_check_shows_the_broker_and_its_topology_never_the_password(tmp_path):
    p = write(tmp_path, "rabbitmq:\n  url: amqp://bwp:hunter2@127.0.0.1:5673/v\n  prefix: site\n"
                        "queues:\n  slow: {size: 2, queue_size: 10, local: true}\n")
    code, out, err = run_cli("check", "-c", str(p))
    assert code == 0, err
    assert "hunter2" not in out + err
    assert "rabbitmq: amqp://bwp:***@127.0.0.1:5673/v, prefix 'site'" in out
    assert "queue site.default (quorum, x-max-length 10000" in out
    assert "site.delay.0 .. site.delay.21" in out and "stream site.status" in out
    assert "local queues (this process only): slow" in out
    assert "slow: 2 workers, 10 slots" in out and "(local)" in out


def test_rabbitmq_url_from_the_environment_and_its_password_never_shown(monkeypatch):
    monkeypatch.setenv("BWP_RABBITMQ_URL", "amqp://bwp:hunter2@127.0.0.1:5673/bwp")
    cfg = parse_config({"queues": {"slow": {"size": 2, "queue_size": 8, "local": True}}})
    assert cfg.rabbitmq.url == "amqp://bwp:hunter2@127.0.0.1:5673/bwp"
    assert cfg.rabbitmq.shown_url == "amqp://bwp:***@127.0.0.1:5673/bwp"
    assert cfg.in_broker(cfg.pool) and not cfg.in_broker(cfg.queues["slow"])
    # the file's url wins over the environment's
    cfg = parse_config({"rabbitmq": {"url": "amqp://127.0.0.1/", "prefix": "site-a"}})
    assert (cfg.rabbitmq.url, cfg.rabbitmq.prefix) == ("amqp://127.0.0.1/", "site-a")
    # processes: N divide the workers, but a shared queue's bound is the broker's, undivided
    shared = parse_config({"processes": 2, "pool": {"size": 10, "queue_size": 100},
                           "queues": {"slow": {"size": 4, "queue_size": 8, "local": True}}}
                          ).share(2)
    assert (shared.pool.size, shared.pool.queue_size) == (5, 100)
    assert (shared.queues["slow"].size, shared.queues["slow"].queue_size) == (2, 4)
    monkeypatch.delenv("BWP_RABBITMQ_URL")
    assert parse_config({}).rabbitmq.url is None and not parse_config({}).in_broker(cfg.pool)


def test_config_error_is_located_unit(tmp_path):
    p = write(tmp_path, "pool:\n  size: 1\n\nqueues:\n  slow:\n    size: nope\n")
    with pytest.raises(ConfigError) as ei:
        load_config(str(p))
    e = ei.value
    assert (e.key, e.line, e.source) == ("queues.slow.size", 6, str(p))
    assert str(e).startswith(f"{p}:6: queues.slow.size: ")


def test_top_level_not_a_mapping(tmp_path):
    p = write(tmp_path, "- 127.0.0.1:7012\n")
    code, _, err = run_cli("check", "-c", str(p))
    assert code == 1 and str(p) in err and "mapping" in err


def test_serve_refuses_bad_config(tmp_path):
    p = write(tmp_path, f"listen: 127.0.0.1:{free_port()}\npool:\n  sizee: 3\n")
    code, _, err = run_cli("serve", "-c", str(p), timeout=10)
    assert code == 1 and f"{p}:3: " in err and "pool.sizee" in err


# ---------------------------------------------------------------- parsing units


@pytest.mark.parametrize(("text", "host", "port", "path", "loopback"), [
    ("127.0.0.1:7012", "127.0.0.1", 7012, None, True),
    ("127.0.0.9:1", "127.0.0.9", 1, None, True),
    ("[::1]:7012", "::1", 7012, None, True),
    ("[::]:7012", "::", 7012, None, False),
    (":7012", "0.0.0.0", 7012, None, False),
    ("0.0.0.0:65535", "0.0.0.0", 65535, None, False),
    ("localhost:80", "localhost", 80, None, True),
    ("example.com:80", "example.com", 80, None, False),
    ("/run/bwp/bwp.sock", None, None, "/run/bwp/bwp.sock", True),
])
def test_parse_listen(text, host, port, path, loopback):
    lst = parse_listen(text)
    assert (lst.host, lst.port, lst.path, lst.is_loopback) == (host, port, path, loopback)
    assert lst.is_unix == (path is not None) and lst.address == text


@pytest.mark.parametrize("text", ["127.0.0.1", "127.0.0.1:0", "127.0.0.1:65536", "[::1]",
                                  "::1:7012", "[1.2.3.4]:80", "bwp.sock", "127.0.0.1:http", ""])
def test_parse_listen_errors(text):
    with pytest.raises(ConfigError) as ei:
        parse_listen(text, "listen[3]")
    assert ei.value.key == "listen[3]"


def test_parse_ip_routes_go_form():
    routes = parse_ip_routes(" 127.0.0.0/8 -> 127.0.0.2 ,127.0.0.128/25->127.0.0.3, "
                             "0.0.0.0/0 -> auto,")
    assert routes == (Route(net("127.0.0.0/8"), ip("127.0.0.2")),
                      Route(net("127.0.0.128/25"), ip("127.0.0.3")),
                      Route(net("0.0.0.0/0"), None))
    assert [str(r) for r in routes] == ["127.0.0.0/8 -> 127.0.0.2",
                                        "127.0.0.128/25 -> 127.0.0.3", "0.0.0.0/0 -> auto"]
    # host bits are tolerated, like Go's net.ParseCIDR
    assert parse_ip_routes("127.0.0.77/8 -> auto")[0].network == net("127.0.0.0/8")
    assert parse_ip_routes("") == ()
    if HAS_IPV6:
        assert parse_ip_routes("::1/128 -> ::1, ::/0 -> auto")[0] == Route(net("::1/128"), ip("::1"))


@pytest.mark.parametrize(("text", "fragment"), [
    ("garbage", "NETWORK -> ADDRESS"),
    ("127.0.0.0/8 127.0.0.2", "NETWORK -> ADDRESS"),
    ("127.0.0.0/33 -> auto", "malformed network"),
    ("not-a-net -> auto", "malformed network"),
    ("127.0.0.0/8 -> nonsense", "'auto'"),
    ("127.0.0.0/8 -> 192.0.2.1", "not an address of this host"),
    ("::/0 -> 127.0.0.2", "IPv4"),
    ("127.0.0.0/8 -> auto, 127.1.2.3/8 -> 127.0.0.2", "listed twice"),
])
def test_parse_ip_routes_errors(text, fragment):
    with pytest.raises(ConfigError) as ei:
        parse_ip_routes(text)
    assert ei.value.key == "--ip-routes"
    assert fragment in str(ei.value)


def test_apply_overrides():
    base = parse_config({"pool": {"size": 5, "queue_size": 50},
                         "routes": {"127.0.0.0/8": "127.0.0.2"}})
    assert apply_overrides(base) is base
    cfg = apply_overrides(base, pool_size=2)
    assert (cfg.pool.size, cfg.pool.queue_size) == (2, 50)
    cfg = apply_overrides(base, queue_size=7, pidfile="/tmp/x.pid",
                          listen=["127.0.0.1:1,127.0.0.1:2", "[::1]:3"])
    assert (cfg.pool.size, cfg.pool.queue_size, cfg.pidfile) == (5, 7, "/tmp/x.pid")
    assert [lst.address for lst in cfg.listen] == ["127.0.0.1:1", "127.0.0.1:2", "[::1]:3"]
    assert apply_overrides(base, ip_routes="0.0.0.0/0 -> auto").routes == (
        Route(net("0.0.0.0/0"), None),)
    assert apply_overrides(base, log_4xx_bodies=True).client.log_4xx_bodies is True
    for kw, key in [({"pool_size": 0}, "--pool-size"), ({"queue_size": -1}, "--queue-size"),
                    ({"ip_routes": "garbage"}, "--ip-routes"), ({"listen": ["nope"]}, "--listen")]:
        with pytest.raises(ConfigError) as ei:
            apply_overrides(base, **kw)
        assert ei.value.key == key
    # a non-loopback listener from the command line needs tokens just as one from the file
    with pytest.raises(ConfigError, match=r"auth\.tokens"):
        apply_overrides(base, listen=["0.0.0.0:7012"])
    with_tokens = parse_config({"auth": {"tokens": [TOKEN]}})
    assert apply_overrides(with_tokens, listen=["0.0.0.0:7012"]).listen[0].host == "0.0.0.0"


# ---------------------------------------------------------------- the router


def _r(network: str, via: str | None) -> Route:
    return Route(net(network), ip(via) if via else None)


ROUTES = [
    _r("0.0.0.0/0", "127.0.0.9"),
    _r("10.0.0.0/8", "127.0.0.2"),
    _r("10.1.0.0/16", "127.0.0.3"),
    _r("10.1.2.0/24", None),
    _r("2001:db8::/32", "::1"),
    _r("2001:db8:1::/48", None),
    _r("2001:db8:1:2::/64", "::2"),
]


@pytest.mark.parametrize("order", list(itertools.permutations(range(len(ROUTES))))[::997])
def test_router_longest_prefix_any_order(order):
    router = Router([ROUTES[i] for i in order])
    want = {
        "10.1.2.3": None,  # /24 auto beats /16 and /8
        "10.1.3.3": "127.0.0.3",
        "10.2.0.1": "127.0.0.2",
        "192.168.0.1": "127.0.0.9",
        "2001:db8:1:2::5": "::2",
        "2001:db8:1:3::5": None,
        "2001:db8:2::1": "::1",
        "2001:db9::1": None,  # no IPv6 default route: auto
    }
    for dest, via in want.items():
        assert router.source_for(dest) == via, dest
        r = router.route(ip(dest))
        assert (str(r.via) if r and r.via else None) == via
    assert router.route(ip("2001:db9::1")) is None
    # cached answers stay right
    assert router.source_for("10.1.3.3") == "127.0.0.3"
    assert [r.network.prefixlen for r in router.routes] == [64, 48, 32, 24, 16, 8, 0]


def test_router_v4_routes_never_match_v6():
    router = Router([_r("0.0.0.0/0", "127.0.0.2")])
    assert router.route(ip("::1")) is None and router.source_for("::1") is None
    assert router.source_for("127.0.0.1") == "127.0.0.2"
    assert router.describe() == ["0.0.0.0/0 -> 127.0.0.2", "::/0 -> auto (implicit)"]


def test_router_denied_defaults_and_allow():
    cfg = parse_config({})
    router = Router.from_config(cfg)
    assert router.denied(ip("169.254.169.254"), 80)
    assert "169.254.0.0/16" in router.denied(ip("169.254.1.1"), 443)
    assert router.denied(ip("fe80::1"), 80)
    assert router.denied(ip("febf::1"), 80)
    assert router.denied(ip("::ffff:169.254.169.254"), 80)  # mapped form, same address
    assert router.denied(ip("127.0.0.1"), 80) is None
    assert router.denied(ip("::1"), 80) is None
    assert router.denied(ip("169.255.0.1"), 80) is None
    assert router.denied(ip("fec0::1"), 80) is None

    cfg = parse_config({"destinations": {"deny": ["169.254.0.0/16", "fe80::/10", "127.0.0.64/26"],
                                         "allow": ["169.254.169.254/32", "fe80::1/128"]}})
    router = Router.from_config(cfg)
    assert router.denied(ip("169.254.169.254"), 80) is None
    assert router.denied(ip("169.254.169.253"), 80)
    assert router.denied(ip("fe80::1"), 80) is None and router.denied(ip("fe80::2"), 80)
    assert router.denied(ip("127.0.0.70"), 80) and router.denied(ip("127.0.0.1"), 80) is None

    # an empty deny list turns the guard off
    router = Router.from_config(parse_config({"destinations": {"deny": []}}))
    assert router.denied(ip("169.254.169.254"), 80) is None


def test_router_denies_own_listeners():
    p = free_port()
    cfg = parse_config({"listen": [f"127.0.0.1:{p}", f"[::1]:{p + 1}", "/tmp/bwp-x.sock"]})
    router = Router.from_config(cfg)
    assert "own listeners" in router.denied(ip("127.0.0.1"), p)
    assert router.denied(ip("::1"), p + 1)
    assert router.denied(ip("::ffff:127.0.0.1"), p)  # the same socket, reached over IPv6
    assert router.denied(ip("0.0.0.0"), p)  # connect() to 0.0.0.0 lands on this host
    assert router.denied(ip("::"), p + 1)
    assert router.denied(ip("127.0.0.1"), p + 1) is None
    assert router.denied(ip("127.0.0.1"), p + 2) is None
    assert router.denied(ip("0.0.0.0"), p + 2) is None
    # allow does not exempt bwp's own listeners
    cfg = parse_config({"listen": [f"127.0.0.1:{p}"],
                        "destinations": {"allow": ["127.0.0.0/8"]}})
    assert Router.from_config(cfg).denied(ip("127.0.0.1"), p)


def test_router_denies_own_wildcard_and_localhost_listeners():
    p = free_port()
    cfg = parse_config({"listen": [f"0.0.0.0:{p}", f"localhost:{p + 1}"],
                        "auth": {"tokens": [TOKEN]}})
    router = Router.from_config(cfg)
    for host in ("127.0.0.1", "127.0.0.5", "::1", "0.0.0.0", "::ffff:127.0.0.1"):
        assert router.denied(ip(host), p), host
    for host in ("127.0.0.1", "::1", "0.0.0.0"):
        assert router.denied(ip(host), p + 1), host
    assert router.denied(ip("127.0.0.1"), p + 2) is None


def _host_addresses() -> list[str]:
    """This host's non-loopback addresses, read from the kernel (no traffic, no DNS)."""
    try:
        out = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True,
                             timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    found = [line.split()[3].split("/")[0] for line in out.splitlines() if len(line.split()) > 3]
    return [a for a in found if not ipaddress.ip_address(a).is_loopback
            and not ipaddress.ip_address(a).is_link_local]


def test_router_wildcard_listener_denies_every_address_of_this_host():
    """0.0.0.0:P answers on the host's public/private addresses too: a job must not reach it
    there.  Only Router.denied is asked: nothing is sent anywhere."""
    p = free_port()
    router = Router.from_config(parse_config({"listen": [f"0.0.0.0:{p}", f"[::]:{p}"],
                                              "auth": {"tokens": [TOKEN]}}))
    addresses = _host_addresses()
    if not addresses:
        pytest.skip("no non-loopback address on this host")
    for host in addresses:
        assert router.denied(ip(host), p), host
        assert router.denied(ip(host), p + 1) is None, host
    # an address of some other host, same port: not ours, allowed (TEST-NET-3, never dialled)
    assert router.denied(ip("203.0.113.7"), p) is None


def test_router_socket_factory_binds_source():
    """A real connection over loopback: the peer sees the routed source address."""
    router = Router([_r("127.0.0.128/25", "127.0.0.3"), _r("127.0.0.0/8", "127.0.0.2")])
    for dest, want in [("127.0.0.1", "127.0.0.2"), ("127.0.0.200", "127.0.0.3")]:
        with socket.socket() as server:
            server.bind((dest, 0))
            server.listen(1)
            server.settimeout(5)
            port = server.getsockname()[1]
            sock = router.socket_factory(
                (socket.AF_INET, socket.SOCK_STREAM, 0, "", (dest, port)))
            with sock:
                sock.settimeout(5)
                sock.connect((dest, port))
                conn, peer = server.accept()
                conn.close()
            assert peer[0] == want


def test_router_socket_factory_refuses_denied():
    p = free_port()
    router = Router.from_config(parse_config({"listen": [f"127.0.0.1:{p}"]}))
    for dest, port in [("169.254.169.254", 80), ("127.0.0.1", p)]:
        with pytest.raises(DestinationDenied):
            router.socket_factory((socket.AF_INET, socket.SOCK_STREAM, 0, "", (dest, port)))
    if HAS_IPV6:
        with pytest.raises(DestinationDenied):
            router.socket_factory((socket.AF_INET6, socket.SOCK_STREAM, 0, "", ("fe80::1", 80, 0, 0)))


# ---------------------------------------------------------------- bwp route


ROUTES_FLAG = "127.0.0.0/8 -> 127.0.0.2, 127.0.0.128/25 -> 127.0.0.3"
ROUTES_FLAG_REVERSED = "127.0.0.128/25 -> 127.0.0.3, 127.0.0.0/8 -> 127.0.0.2"


@pytest.mark.parametrize("routes", [ROUTES_FLAG, ROUTES_FLAG_REVERSED])
def test_route_with_ip_routes_flag(routes):
    code, out, err = run_cli("route", "--ip-routes", routes,
                             "127.0.0.200", "127.0.0.5", "::1", "localhost")
    assert code == 0, err
    got = sources(out)
    assert got["127.0.0.200"] == "127.0.0.3"
    assert got["127.0.0.5"] == "127.0.0.2"
    assert got["::1"] == "auto"
    assert got["localhost (127.0.0.1)"] == "127.0.0.2"
    assert "127.0.0.200 -> source 127.0.0.3 [via route 127.0.0.128/25]" in out
    assert "::1 -> source auto [no route matches]" in out


def test_route_with_go_single_dash_flag():
    code, out, err = run_cli("route", "-ip-routes", ROUTES_FLAG, "127.0.0.130")
    assert code == 0, err
    assert sources(out) == {"127.0.0.130": "127.0.0.3"}


def test_route_with_config_file(tmp_path):
    v6 = '  "::1/128": "::1"\n' if HAS_IPV6 else ""
    p = write(tmp_path, f"routes:\n  127.0.0.128/25: 127.0.0.3\n{v6}  127.0.0.0/8: 127.0.0.2\n")
    code, out, err = run_cli("route", "-c", str(p), "127.0.0.200", "127.0.0.5", "::1", "[::1]",
                             "localhost", "::2")
    assert code == 0, err
    got = sources(out)
    assert got["127.0.0.200"] == "127.0.0.3" and got["127.0.0.5"] == "127.0.0.2"
    assert got["localhost (127.0.0.1)"] == "127.0.0.2"
    assert got["::1"] == ("::1" if HAS_IPV6 else "auto")
    assert got["[::1] (::1)"] == got["::1"]
    assert got["::2"] == "auto"
    # --ip-routes replaces the file's table
    code, out, _ = run_cli("route", "-c", str(p), "--ip-routes", "0.0.0.0/0 -> auto", "127.0.0.200")
    assert code == 0 and sources(out) == {"127.0.0.200": "auto"}


def test_route_defaults_are_auto():
    code, out, err = run_cli("route", "127.0.0.1", "::1")
    assert code == 0, err
    assert sources(out) == {"127.0.0.1": "auto", "::1": "auto"}


def test_route_unresolvable_host():
    # a label over 63 characters fails inside the process: no DNS query leaves the host
    bad = "x" * 64 + ".test"
    code, out, _ = run_cli("route", "--ip-routes", ROUTES_FLAG, "127.0.0.5", bad, "127.0.0.200")
    assert code == 1
    assert bad in out and "resolve" in out
    # the other destinations are still answered
    assert sources(out) == {"127.0.0.5": "127.0.0.2", "127.0.0.200": "127.0.0.3"}


def test_route_bad_config_and_flag(tmp_path):
    p = write(tmp_path, "routes:\n  127.0.0.0/8: 192.0.2.1\n")
    code, _, err = run_cli("route", "-c", str(p), "127.0.0.1")
    assert code == 1 and f"{p}:2: " in err and "192.0.2.1" in err
    code, _, err = run_cli("route", "--ip-routes", "garbage", "127.0.0.1")
    assert code == 1 and "--ip-routes" in err


# ---------------------------------------------------------------- bwp serve: flags


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, *args: str, ports: list[int], timeout: float = 10.0):
    """Run `python -m bwp ARGS...` until every port answers /healthz; SIGKILL by pid at the end."""
    log_path = tmp_path / f"serve-{ports[0]}.log"
    with open(log_path, "wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bwp", *args, stdout=log, stderr=log, cwd=str(ROOT))
        try:
            deadline = time.monotonic() + timeout
            async with aiohttp.ClientSession() as s:
                for port in ports:
                    while True:
                        if proc.returncode is not None:
                            raise AssertionError(f"bwp exited {proc.returncode}: "
                                                 f"{log_path.read_text(errors='replace')}")
                        if time.monotonic() > deadline:
                            raise AssertionError("bwp did not become ready: "
                                                 f"{log_path.read_text(errors='replace')}")
                        with contextlib.suppress(aiohttp.ClientError, OSError):
                            async with s.get(f"http://127.0.0.1:{port}/healthz") as r:
                                if r.status == 200:
                                    break
                        await asyncio.sleep(0.05)
            yield proc
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                await asyncio.wait_for(proc.wait(), 10)


async def metrics(port: int) -> dict[str, float]:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
        assert r.status == 200
        text = await r.text()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


async def post_job(port: int, url: str) -> None:
    async with aiohttp.ClientSession() as s, s.post(
            f"http://127.0.0.1:{port}/post/http", json={"url": url}) as r:
        assert r.status == 200, await r.text()


async def stop(proc: asyncio.subprocess.Process) -> int:
    os.kill(proc.pid, signal.SIGTERM)
    return await asyncio.wait_for(proc.wait(), 15)


def pool_of(m: dict[str, float], queue: str = "default") -> tuple[float, float]:
    return m[f'bwp_workers{{queue="{queue}"}}'], m[f'bwp_queue_capacity{{queue="{queue}"}}']


@pytest.mark.parametrize("bare", [False, True], ids=["serve", "bare"])
async def test_go_style_flags(tmp_path, bare):
    port = free_port()
    pidfile = tmp_path / "run" / "bwp.pid"  # the directory is created, as the Go daemon did
    sink = await Sink(host="127.0.0.200").start()
    try:
        args = [] if bare else ["serve"]
        args += ["-listen", f"127.0.0.1:{port}", "-pool-size", "3", "-pool-queue-size", "7",
                 "-pidfile", str(pidfile), "-ip-routes", ROUTES_FLAG]
        async with serving(tmp_path, *args, ports=[port]) as proc:
            assert pool_of(await metrics(port)) == (3, 7)
            assert pidfile.read_text().strip() == str(proc.pid)
            # the routing table is in force: 127.0.0.200 is in 127.0.0.128/25 -> 127.0.0.3
            await post_job(port, sink.url("/routed"))
            got = await sink.wait_for(1)
            assert got[0].path_qs == "/routed" and got[0].peer == "127.0.0.3"
            assert await stop(proc) == 0
            assert not pidfile.exists()
    finally:
        await sink.stop()


async def test_go_style_equals_form_and_bool_flag(tmp_path):
    port = free_port()
    pidfile = tmp_path / "bwp.pid"
    async with serving(tmp_path, f"-listen=127.0.0.1:{port}", "-pool-size=4",
                       "-pool-queue-size=9", f"-pidfile={pidfile}",
                       "-ip-routes=127.0.0.0/8 -> auto", "-log4xxResponses=true",
                       ports=[port]) as proc:
        assert pool_of(await metrics(port)) == (4, 9)
        assert pidfile.read_text().strip() == str(proc.pid)


async def test_gnu_style_flags(tmp_path):
    port = free_port()
    async with serving(tmp_path, "serve", f"--listen=127.0.0.1:{port}", "--pool-size", "2",
                       "--queue-size=11", "--log-4xx-responses", ports=[port]):
        assert pool_of(await metrics(port)) == (2, 11)


async def test_comma_separated_and_repeated_listen(tmp_path):
    p1, p2, p3 = free_port(), free_port(), free_port()
    while len({p1, p2, p3}) < 3:
        p2, p3 = free_port(), free_port()
    async with serving(tmp_path, "-listen", f"127.0.0.1:{p1}, 127.0.0.1:{p2}",
                       "-listen", f"127.0.0.1:{p3}", ports=[p1, p2, p3]):
        async with aiohttp.ClientSession() as s:
            for p in (p1, p2, p3):
                async with s.get(f"http://127.0.0.1:{p}/healthz") as r:
                    assert r.status == 200
        assert pool_of(await metrics(p2)) == (50, 10000)  # embedded defaults


async def test_flags_override_file(tmp_path):
    file_port, port = free_port(), free_port()
    p = write(tmp_path, f"""
        listen: [127.0.0.1:{file_port}]
        pool: {{size: 5, queue_size: 50}}
        queues:
          slow: {{size: 1, queue_size: 3}}
        routes:
          127.0.0.0/8: 127.0.0.3
    """)
    sink = await Sink(host="127.0.0.1").start()
    try:
        async with serving(tmp_path, "serve", "-c", str(p), "--listen", f"127.0.0.1:{port}",
                           "--pool-size", "2", "--ip-routes", "127.0.0.0/8 -> 127.0.0.2",
                           ports=[port]):
            m = await metrics(port)
            assert pool_of(m) == (2, 50)  # size from the flag, queue_size from the file
            assert pool_of(m, "slow") == (1, 3)
            # the file's listener was replaced by the flag's
            with pytest.raises((aiohttp.ClientError, OSError)):
                async with aiohttp.ClientSession() as s, s.get(
                        f"http://127.0.0.1:{file_port}/healthz",
                        timeout=aiohttp.ClientTimeout(total=2)):
                    pass
            await post_job(port, sink.url("/x"))
            got = await sink.wait_for(1)
            assert got[0].peer == "127.0.0.2"  # the flag's routes, not the file's
    finally:
        await sink.stop()


@pytest.mark.parametrize(("args", "named"), [
    (["--ip-routes", "garbage"], "--ip-routes"),
    (["-ip-routes", "127.0.0.0/8 -> 192.0.2.1"], "--ip-routes"),
    (["--pool-size", "0"], "--pool-size"),
    (["-pool-queue-size", "0"], "--queue-size"),
    (["-listen", "127.0.0.1"], "--listen"),
    (["-listen", "0.0.0.0:{port}"], "auth.tokens"),
])
@pytest.mark.parametrize("bare", [False, True], ids=["serve", "bare"])
def test_bad_flag_values(tmp_path, args, named, bare):
    port = free_port()
    args = [a.format(port=port) for a in args]
    if not any(a.startswith(("-listen", "--listen")) for a in args):
        args += ["-listen", f"127.0.0.1:{port}"]
    code, out, err = run_cli(*([] if bare else ["serve"]), *args, timeout=10)
    assert code == 1, (out, err)
    assert named in err and "Traceback" not in err


def test_bad_flag_overrides_good_file(tmp_path):
    p = write(tmp_path, f"listen: 127.0.0.1:{free_port()}\n")
    code, _, err = run_cli("serve", "-c", str(p), "--ip-routes", "garbage", timeout=10)
    assert code == 1 and "--ip-routes" in err and "garbage" in err


def test_unusable_flag_syntax_is_a_usage_error():
    code, _, err = run_cli("serve", "--pool-size", "many", timeout=10)
    assert code != 0 and "--pool-size" in err
    code, _, err = run_cli("serve", "-log4xxResponses=maybe", timeout=10)
    assert code != 0 and "maybe" in err
    code, _, err = run_cli("check", "--no-such-flag", timeout=10)
    assert code != 0


def test_help_lists_go_flags():
    code, out, _ = run_cli("serve", "--help")
    assert code == 0
    for flag in ("-listen", "-pidfile", "-pool-size", "-pool-queue-size", "-ip-routes",
                 "--queue-size", "-c"):
        assert flag in out


def test_config_dataclass_is_frozen():
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.drain_timeout = 1  # type: ignore[misc]


def test_shipped_config_documents_the_defaults():
    cfg = load_config(str(ROOT / "config" / "bwp.yaml"))
    assert cfg.limits == LimitsConfig() and cfg.unix_socket == UnixSocketConfig()


def test_the_compose_example_is_valid(monkeypatch):
    """config/compose: the hosts' config passes `bwp check` with the broker URL the compose
    file gives them, and the compose file itself validates where docker-compose is installed."""
    compose = ROOT / "config" / "compose"
    url = "amqp://bwp:bwp-secret@rabbitmq:5672/bwp"
    text = (compose / "compose.yaml").read_text()
    assert f"BWP_RABBITMQ_URL: {url}" in text
    monkeypatch.setenv("BWP_RABBITMQ_URL", url)
    cfg = load_config(str(compose / "bwp.yaml"))
    assert cfg.rabbitmq.url == url and cfg.in_broker(cfg.pool)
    assert f"stop_grace_period: {int(cfg.drain_timeout) + 15}s" in text
    tool = shutil.which("docker-compose")
    if tool is not None:
        r = subprocess.run([tool, "-f", str(compose / "compose.yaml"), "config", "-q"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
