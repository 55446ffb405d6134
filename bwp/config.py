"""Configuration: typed dataclasses, loaded from YAML with line-accurate errors.

Precedence: embedded defaults < config file < command-line flags.  Every error names the
offending key (and, for a file, its line) so `bwp check` reads like `nginx -t`.
"""

from __future__ import annotations

import dataclasses
import grp
import ipaddress
import os
import pwd
import re
import socket
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from .signing import parse_secret

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_LISTEN = "127.0.0.1:7012"
DEFAULT_QUEUE = "default"
GO_USER_AGENT = "bwp/1.0 (+https://github.com/xtrafrancyz/bwp)"
_QUEUE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # fullmatch: `$` passes a final "\n"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


class ConfigError(Exception):
    """A config problem, located by key path and (for files) line number."""

    def __init__(self, key: str, message: str, line: int | None = None, source: str | None = None):
        self.key, self.message, self.line, self.source = key, message, line, source
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ""
        if self.source:
            where = f"{self.source}:{self.line}: " if self.line else f"{self.source}: "
        return f"{where}{self.key}: {self.message}" if self.key else f"{where}{self.message}"


@dataclass(frozen=True, slots=True)
class Listener:
    """One listening address: TCP (host, port) or a unix socket path."""

    address: str
    host: str | None = None
    port: int | None = None
    path: str | None = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    @property
    def is_loopback(self) -> bool:
        if self.path is not None:
            return True
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host or "0.0.0.0").is_loopback
        except ValueError:
            return False


@dataclass(frozen=True, slots=True)
class RetryConfig:
    """A queue's retry policy; the backoff arithmetic is aiohttp-retry's."""

    attempts: int = 0  # extra attempts after the first (the Go daemon never retried)
    backoff: float = 1.0  # seconds before the first retry, then times `factor`
    factor: float = 2.0
    max_backoff: float = 600.0  # caps the backoff and a server's Retry-After
    jitter: float = 0.0  # seconds of random spread added to each backoff
    statuses: tuple[int, ...] = (429,)  # retried besides 5xx
    server_errors: bool = True  # retry every 5xx
    timeouts: bool = True
    connection_errors: bool = True


@dataclass(frozen=True, slots=True)
class QueueConfig:
    name: str
    size: int = 50  # workers
    queue_size: int = 10000  # jobs waiting, delayed and retrying ones included
    retry: RetryConfig = field(default_factory=RetryConfig)
    local: bool = False  # with rabbitmq: this queue stays in this process (not shared)
    # Standard Webhooks keys (bwp/signing.py); each signs every request, () = unsigned
    signing_keys: tuple[bytes, ...] = field(default=(), repr=False)


@dataclass(frozen=True, slots=True)
class HistoryConfig:
    max_jobs: int = 10000  # finished jobs kept for GET /jobs/{id} and dead letters
    max_age: float = 3600.0  # seconds a finished job is kept
    max_bytes: int = 64 * 1024 * 1024  # body, url and headers kept by dead letters


@dataclass(frozen=True, slots=True)
class Route:
    network: IPNetwork
    via: IPAddress | None  # None = auto: the OS picks the source address

    def __str__(self) -> str:
        return f"{self.network} -> {self.via or 'auto'}"


@dataclass(frozen=True, slots=True)
class ClientConfig:
    connect_timeout: float = 3.0
    read_timeout: float = 10.0
    max_response_size: int = 256 * 1024
    max_response_head: int = 64 * 1024  # status line, headers, 1xx, chunk framing, trailers
    user_agent: str = GO_USER_AGENT
    follow_redirects: bool = False
    max_redirects: int = 10
    limit_per_host: int = 0  # 0 = no per-host cap beyond the worker count
    log_4xx_bodies: bool = False
    dns_cache_ttl: int = 10
    # per destination (scheme, host, port), bwp/breaker.py
    rate_per_host: float = 0.0  # requests a second; 0 = no rate limit
    rate_burst: int = 0  # requests at once above the rate; 0 = one second's worth
    breaker_failures: int = 0  # failed attempts in a row that open the breaker; 0 = off
    breaker_cool_off: float = 30.0  # seconds an open breaker sends nothing, then one probe


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """What one client may send; see config/bwp.yaml for the status each limit answers."""

    # one POST /post/http, after decompression (the Go daemon's fasthttp refuses past 4 MiB)
    max_body_size: int = 4 * 1024 * 1024
    max_json_values: int = 100_000  # arrays, objects and scalars of one submission (~15 ms to parse)
    max_jobs_per_request: int = 1000  # after clones are expanded
    # body, url and headers of every job held (queued, delayed, retrying or running), all
    # queues together; a body shared by clones counts once
    max_queued_bytes: int = 256 * 1024 * 1024
    max_delay: float = 30 * 86400.0  # seconds ahead a `delay` or `at` may schedule a job
    max_clones: int = 1000  # of one root job
    max_headers: int = 100  # entries in one job's `headers`
    max_header_size: int = 8190  # characters of one job header, name plus value
    max_url_length: int = 8192  # characters of a job's url or callback
    max_json_depth: int = 64  # nesting of arrays/objects in one submission
    read_timeout: float = 30.0  # seconds to receive one request's body
    keepalive_timeout: float = 75.0  # seconds an idle connection is kept
    # seconds to deliver a whole request head, from connecting or from its first byte
    header_timeout: float = 10.0
    # API connections per process; None = "auto": the open files limit less a reserve for
    # outbound sockets and files (bwp/connections.py)
    max_connections: int | None = None
    # the incoming HTTP request's head, enforced by bwp/httpserver.py (aiohttp's defaults)
    max_request_line: int = 8190
    max_request_header_size: int = 8190
    max_request_headers: int = 128


# Keeps re-encoding a job's `json` (json.dumps recurses) well inside Python's recursion limit.
MAX_JSON_DEPTH = 500
MAX_DELAY = 10 * 365 * 86400.0  # what limits.max_delay may be raised to


@dataclass(frozen=True, slots=True)
class UnixSocketConfig:
    """Applied to every unix socket listener after bind."""

    # owner and group only: PHP-FPM joins the group (unix_socket.group); the Go daemon used 0777
    mode: int = 0o660
    owner: int | None = None  # uid; None = the daemon's own
    group: int | None = None  # gid; None = the daemon's own


@dataclass(frozen=True, slots=True)
class DestinationsConfig:
    deny: tuple[IPNetwork, ...] = (
        ipaddress.ip_network("169.254.0.0/16"),
        ipaddress.ip_network("fe80::/10"),
    )
    allow: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True, slots=True)
class RedactConfig:
    """What is masked in job URLs shown in status documents, callbacks and logs (userinfo
    always)."""

    query: tuple[str, ...] = ("access_token", "api_key", "apikey", "auth", "key", "password",
                              "secret", "signature", "sig", "token")


@dataclass(frozen=True, slots=True)
class AuthConfig:
    tokens: tuple[str, ...] = ()
    # Explicit opt-out for the "non-loopback listener needs tokens" rule.
    allow_anonymous_remote: bool = False


@dataclass(frozen=True, slots=True)
class JournalConfig:
    path: str | None = None  # a directory; None = off (accepted jobs live in memory only)
    compact_size: int = 64 * 1024 * 1024  # rewrite a file grown past this (and 2x its live size)


RABBITMQ_URL_ENV = "BWP_RABBITMQ_URL"
_PREFIX = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True, slots=True)
class RabbitConfig:
    url: str | None = None  # amqp[s]://user:password@host:port/vhost; None = queues are local
    prefix: str = "bwp"  # exchange and queue names: PREFIX.NAME, PREFIX.NAME_dead, ...
    connect_timeout: float = 30.0  # seconds a starting process waits for the broker
    heartbeat: int = 5  # seconds; a broker silent for ~4 of them is taken for gone (frozen)

    @property
    def shown_url(self) -> str:
        """The URL without its password (never printed or logged)."""
        u = urllib.parse.urlsplit(self.url or "")
        if u.password is None:
            return self.url or ""
        netloc = f"{u.username}:***@{u.hostname}" + (f":{u.port}" if u.port else "")
        return urllib.parse.urlunsplit(u._replace(netloc=netloc))


@dataclass(frozen=True, slots=True)
class Config:
    listen: tuple[Listener, ...] = ()
    pidfile: str | None = None
    drain_timeout: float = 300.0
    log_level: str = "info"
    log_format: str = "text"  # or json: one object a line
    pool: QueueConfig = field(default_factory=lambda: QueueConfig(DEFAULT_QUEUE))
    queues: Mapping[str, QueueConfig] = field(default_factory=dict)
    routes: tuple[Route, ...] = ()
    client: ClientConfig = field(default_factory=ClientConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    unix_socket: UnixSocketConfig = field(default_factory=UnixSocketConfig)
    destinations: DestinationsConfig = field(default_factory=DestinationsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    journal: JournalConfig = field(default_factory=JournalConfig)
    rabbitmq: RabbitConfig = field(default_factory=RabbitConfig)
    redact: RedactConfig = field(default_factory=RedactConfig)
    processes: int = 1  # worker processes on the same listeners (more than 1: a master runs them)
    source: str | None = None  # the file it came from, for messages

    def share(self, n: int) -> Config:
        """One of `n` worker processes' part: workers and queue bounds (jobs and bytes) divided,
        rounded up."""
        if n == 1:
            return self

        def part(q: QueueConfig) -> QueueConfig:
            if self.in_broker(q):  # one bound for everyone: the broker keeps it
                return dataclasses.replace(q, size=-(-q.size // n))
            return dataclasses.replace(q, size=-(-q.size // n), queue_size=-(-q.queue_size // n))

        limits = dataclasses.replace(self.limits,
                                     max_queued_bytes=-(-self.limits.max_queued_bytes // n))
        return dataclasses.replace(self, pool=part(self.pool), limits=limits,
                                   queues={name: part(q) for name, q in self.queues.items()})

    def in_broker(self, q: QueueConfig) -> bool:
        """Whether the queue lives in RabbitMQ, shared with other hosts."""
        return self.rabbitmq.url is not None and not q.local

    @property
    def all_queues(self) -> dict[str, QueueConfig]:
        """The default queue followed by the named ones."""
        return {DEFAULT_QUEUE: self.pool, **self.queues}


# ---------------------------------------------------------------- parsing helpers


def parse_listen(value: str, key: str = "listen") -> Listener:
    """`host:port`, `[v6]:port`, `:port` (all addresses) or an absolute unix socket path."""
    text = value.strip()
    if text.startswith("/"):
        return Listener(text, path=text)
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:([0-9]+)|([^:\[\]\s]*):([0-9]+)", text)
    if not m:
        raise ConfigError(key, f"{value!r} is not host:port, [ipv6]:port or an absolute unix path")
    host = m.group(1) if m.group(1) is not None else (m.group(3) or "0.0.0.0")
    port = int(m.group(2) or m.group(4))
    if not 0 < port < 65536:
        raise ConfigError(key, f"port {port} out of range 1-65535")
    if m.group(1) is not None:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(key, f"{host!r} is not an IPv6 address") from None
    return Listener(text, host=host, port=port)


def parse_network(text: str, key: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError as e:
        raise ConfigError(key, f"malformed network {text!r}: {e}") from None


def check_local_address(addr: IPAddress, key: str) -> None:
    """A `via` address must be assigned to this host: binding to it is the reliable test."""
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((str(addr), 0))
    except OSError as e:
        raise ConfigError(key, f"{addr} is not an address of this host ({e.strerror})") from None


def make_route(network_text: str, via_text: str, key: str) -> Route:
    network = parse_network(network_text, key)
    via_text = via_text.strip()
    if via_text == "auto":
        return Route(network, None)
    try:
        via = ipaddress.ip_address(via_text)
    except ValueError:
        raise ConfigError(key, f"via {via_text!r} is neither an IP address nor 'auto'") from None
    if via.version != network.version:
        raise ConfigError(key, f"via {via} is IPv{via.version} but {network} is IPv{network.version}")
    check_local_address(via, key)
    return Route(network, via)


def parse_ip_routes(text: str, key: str = "--ip-routes") -> tuple[Route, ...]:
    """The Go daemon's form: `172.16.0.0/12 -> 172.16.1.1, 0.0.0.0/0 -> auto`."""
    routes = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "->" not in part:
            raise ConfigError(key, f"{part!r} is not 'NETWORK -> ADDRESS|auto'")
        net, via = part.split("->", 1)
        routes.append(make_route(net, via, key))
    return _unique_routes(routes, key)


def _unique_routes(routes: Iterable[Route], key: str) -> tuple[Route, ...]:
    seen: dict[IPNetwork, Route] = {}
    for r in routes:
        if r.network in seen:
            raise ConfigError(key, f"network {r.network} is listed twice")
        seen[r.network] = r
    return tuple(seen.values())


# ---------------------------------------------------------------- YAML with line marks


def _marks(node: yaml.Node, path: str, out: dict[str, int]) -> None:
    """Record the line of every key path ('pool.size', 'listen[1]') and reject duplicate keys."""
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for k, v in node.value:
            sub = f"{path}.{k.value}" if path else str(k.value)
            if k.value in seen:
                raise ConfigError(sub, "duplicate key", k.start_mark.line + 1)
            seen.add(k.value)
            out[sub] = k.start_mark.line + 1
            _marks(v, sub, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            sub = f"{path}[{i}]"
            out[sub] = v.start_mark.line + 1
            _marks(v, sub, out)


class _Section:
    """Typed access to one mapping of the config, raising located ConfigErrors."""

    def __init__(self, data: Any, key: str, marks: dict[str, int]):
        self.key, self.marks = key, marks
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise self.error("", f"must be a mapping, got {_typename(data)}")
        self.data: dict[str, Any] = data

    def path(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else name

    def error(self, name: str, message: str) -> ConfigError:
        path = self.path(name) if name else self.key
        return ConfigError(path, message, self.marks.get(path))

    def reject_unknown(self, known: Iterable[str]) -> None:
        known = set(known)
        for name in self.data:
            if name not in known:
                raise self.error(str(name), f"unknown key (expected one of: {', '.join(sorted(known))})")

    def get(self, name: str, kind: type | tuple[type, ...], default: Any) -> Any:
        value = self.data.get(name, default)
        if value is default:
            return value
        # bool is an int subclass: never accept it where a number is meant
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise self.error(name, f"must be {_kindname(kind)}, got a boolean")
        if not isinstance(value, kind):
            raise self.error(name, f"must be {_kindname(kind)}, got {_typename(value)}")
        return value

    def number(self, name: str, default: float, *, minimum: float = 0, maximum: float | None = None,
               integer: bool = False) -> Any:
        value = self.get(name, int if integer else (int, float), default)
        if value < minimum:
            raise self.error(name, f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self.error(name, f"must be <= {maximum}, got {value}")
        return value if integer else float(value)

    def section(self, name: str) -> _Section:
        return _Section(self.data.get(name), self.path(name), self.marks)


def _typename(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _kindname(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             list: "a list", dict: "a mapping"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _retry(sec: _Section) -> RetryConfig:
    sec.reject_unknown(f.name for f in dataclasses.fields(RetryConfig))
    d = RetryConfig()
    statuses = sec.get("statuses", list, list(d.statuses))
    for i, code in enumerate(statuses):
        if type(code) is not int or not 400 <= code <= 599:
            key = f"{sec.path('statuses')}[{i}]"
            raise ConfigError(key, "must be an HTTP status 400-599", sec.marks.get(key))
    return RetryConfig(
        attempts=sec.number("attempts", d.attempts, integer=True),
        backoff=sec.number("backoff", d.backoff),
        factor=sec.number("factor", d.factor, minimum=1),
        max_backoff=sec.number("max_backoff", d.max_backoff),
        jitter=sec.number("jitter", d.jitter),
        statuses=tuple(statuses),
        server_errors=sec.get("server_errors", bool, d.server_errors),
        timeouts=sec.get("timeouts", bool, d.timeouts),
        connection_errors=sec.get("connection_errors", bool, d.connection_errors),
    )


def _queue(sec: _Section, name: str) -> QueueConfig:
    sec.reject_unknown(("size", "queue_size", "retry", "local", "signing"))
    return QueueConfig(
        name,
        size=sec.number("size", 50, minimum=1, integer=True),
        queue_size=sec.number("queue_size", 10000, minimum=1, integer=True),
        retry=_retry(sec.section("retry")),
        local=sec.get("local", bool, False),
        signing_keys=_signing(sec.section("signing")),
    )


def _signing(sec: _Section) -> tuple[bytes, ...]:
    """`signing: {secrets: [whsec_..., ...]}`: the keys (a message never shows a secret)."""
    sec.reject_unknown(("secrets",))
    keys = []
    for i, secret in enumerate(sec.get("secrets", list, [])):
        key = f"{sec.path('secrets')}[{i}]"
        if not isinstance(secret, str):
            raise ConfigError(key, f"must be a string, got {_typename(secret)}", sec.marks.get(key))
        try:
            keys.append(parse_secret(secret))
        except ValueError as e:
            raise ConfigError(key, str(e), sec.marks.get(key)) from None
    return tuple(keys)


def _rabbitmq(sec: _Section) -> RabbitConfig:
    """The broker: the file's url, else BWP_RABBITMQ_URL (so the password can stay out of the
    file); a message about a bad URL never shows it."""
    sec.reject_unknown(("url", "prefix", "connect_timeout", "heartbeat"))
    url = sec.get("url", str, None)
    if url is None:
        url = os.environ.get(RABBITMQ_URL_ENV) or None
    prefix = sec.get("prefix", str, RabbitConfig().prefix)
    if not _PREFIX.fullmatch(prefix):
        raise sec.error("prefix", "must be 1-64 letters, digits, '_', '-' or '.'")
    if url is not None:
        try:
            u = urllib.parse.urlsplit(url)
            port = u.port
        except ValueError:
            raise sec.error("url", "is not a valid URL") from None
        if u.scheme not in ("amqp", "amqps") or not u.hostname:
            raise sec.error("url", "must be amqp://[user:password@]host[:port][/vhost] "
                                   "(or amqps://)")
        if port == 0 or "\n" in url or " " in url:
            raise sec.error("url", "is not a valid URL")
    d = RabbitConfig()
    return RabbitConfig(url, prefix, sec.number("connect_timeout", d.connect_timeout, minimum=0.1),
                        sec.number("heartbeat", d.heartbeat, minimum=1, integer=True))


def _networks(sec: _Section, name: str, default: tuple[IPNetwork, ...]) -> tuple[IPNetwork, ...]:
    items = sec.get(name, list, None)
    if items is None:
        return default
    out = []
    for i, item in enumerate(items):
        key = f"{sec.path(name)}[{i}]"
        if not isinstance(item, str):
            raise ConfigError(key, f"must be a network string, got {_typename(item)}", sec.marks.get(key))
        try:
            out.append(parse_network(item, key))
        except ConfigError as e:
            e.line = sec.marks.get(key)
            raise
    return tuple(out)


def _limits(sec: _Section) -> LimitsConfig:
    sec.reject_unknown(f.name for f in dataclasses.fields(LimitsConfig))
    d = LimitsConfig()

    def count(name: str, minimum: int = 1, maximum: float | None = None) -> int:
        return sec.number(name, getattr(d, name), minimum=minimum, maximum=maximum, integer=True)

    def seconds(name: str) -> float:
        return sec.number(name, getattr(d, name), minimum=0.001)

    max_connections = sec.data.get("max_connections", "auto")
    if max_connections == "auto":
        max_connections = None
    elif type(max_connections) is not int or max_connections < 1:
        raise sec.error("max_connections", f"must be an integer >= 1 or 'auto', got "
                                           f"{max_connections!r}")

    return LimitsConfig(
        max_body_size=count("max_body_size", minimum=2),
        max_json_values=count("max_json_values"),
        max_jobs_per_request=count("max_jobs_per_request"),
        max_queued_bytes=count("max_queued_bytes", minimum=1024),
        max_delay=sec.number("max_delay", d.max_delay, maximum=MAX_DELAY),
        max_clones=count("max_clones"),
        max_headers=count("max_headers", minimum=0),
        max_header_size=count("max_header_size"),
        max_url_length=count("max_url_length", minimum=len("http://a")),
        max_json_depth=count("max_json_depth", maximum=MAX_JSON_DEPTH),
        read_timeout=seconds("read_timeout"),
        keepalive_timeout=seconds("keepalive_timeout"),
        header_timeout=seconds("header_timeout"),
        max_connections=max_connections,
        max_request_line=count("max_request_line", minimum=64),
        max_request_header_size=count("max_request_header_size", minimum=64),
        max_request_headers=count("max_request_headers"),
    )


def _unix_socket(sec: _Section) -> UnixSocketConfig:
    sec.reject_unknown(("mode", "owner", "group"))
    mode = UnixSocketConfig().mode
    value = sec.get("mode", (str, int), None)
    if value is not None:
        # Quoted only: unquoted, YAML reads 0660 as octal but 660 as decimal.
        if isinstance(value, int):
            raise sec.error("mode", f'quote it, like "0660" (unquoted, YAML reads it as the number {value})')
        if not re.fullmatch(r"0?[0-7]{3}", value):
            raise sec.error("mode", f'{value!r} is not an octal file mode like "0660"')
        mode = int(value, 8)
    return UnixSocketConfig(
        mode,
        owner=_account(sec, "owner", "user", lambda name: pwd.getpwnam(name).pw_uid),
        group=_account(sec, "group", "group", lambda name: grp.getgrnam(name).gr_gid),
    )


def _account(sec: _Section, name: str, kind: str, lookup: Callable[[str], int]) -> int | None:
    """A user or group given by name or numeric id, as its id (looked up now, so a typo is a
    config error rather than a start-up failure)."""
    value = sec.get(name, (str, int), None)
    if value is None:
        return None
    if isinstance(value, int) or (value.isascii() and value.isdigit()):
        if int(value) < 0:
            raise sec.error(name, f"must be a {kind} name or an id >= 0")
        return int(value)
    try:
        return lookup(value)
    except KeyError:
        raise sec.error(name, f"no {kind} named {value!r} on this host") from None


_TOP_KEYS = ("listen", "pidfile", "drain_timeout", "log_level", "log_format", "processes", "pool",
             "queues", "routes", "client", "limits", "unix_socket", "destinations", "auth",
             "history", "journal", "rabbitmq", "redact")


def parse_config(data: Any, marks: dict[str, int] | None = None) -> Config:
    """Build a Config from already-loaded YAML data (a mapping or None)."""
    marks = marks or {}
    top = _Section(data, "", marks)
    top.reject_unknown(_TOP_KEYS)

    listen_raw = top.get("listen", (list, str), [DEFAULT_LISTEN])
    if isinstance(listen_raw, str):
        listen_raw = [listen_raw]
    listeners = []
    for i, item in enumerate(listen_raw):
        key = f"listen[{i}]"
        if not isinstance(item, str):
            raise ConfigError(key, f"must be a string, got {_typename(item)}", marks.get(key))
        try:
            listeners.append(parse_listen(item, key))
        except ConfigError as e:
            e.line = marks.get(key)
            raise

    pidfile = top.get("pidfile", str, None)
    level = top.get("log_level", str, "info")
    if level not in LOG_LEVELS:
        raise top.error("log_level", f"must be one of {', '.join(LOG_LEVELS)}")
    log_format = top.get("log_format", str, "text")
    if log_format not in LOG_FORMATS:
        raise top.error("log_format", f"must be one of {', '.join(LOG_FORMATS)}")

    queues_sec = top.section("queues")
    queues = {}
    for name in queues_sec.data:
        if not isinstance(name, str) or not _QUEUE_NAME.fullmatch(name) or name == DEFAULT_QUEUE:
            raise queues_sec.error(str(name), "queue names are 1-64 of [A-Za-z0-9_.-] and not "
                                              f"'{DEFAULT_QUEUE}' (that is `pool`)")
        queues[name] = _queue(queues_sec.section(name), name)

    routes_sec = top.section("routes")
    routes = []
    for net, via in routes_sec.data.items():
        key = routes_sec.path(str(net))
        if not isinstance(via, str):
            raise ConfigError(key, "must be an IP address or 'auto'", marks.get(key))
        try:
            route = make_route(str(net), via, key)
        except ConfigError as e:
            e.line = marks.get(key)
            raise
        if any(r.network == route.network for r in routes):  # e.g. 10.0.0.0/8 and 10.1.2.3/8
            raise ConfigError(key, f"network {route.network} is listed twice", marks.get(key))
        routes.append(route)

    c = top.section("client")
    c.reject_unknown(f.name for f in dataclasses.fields(ClientConfig))
    d = ClientConfig()
    client = ClientConfig(
        connect_timeout=c.number("connect_timeout", d.connect_timeout, minimum=0.001),
        read_timeout=c.number("read_timeout", d.read_timeout, minimum=0.001),
        max_response_size=c.number("max_response_size", d.max_response_size, integer=True),
        max_response_head=c.number("max_response_head", d.max_response_head, minimum=1024, integer=True),
        user_agent=c.get("user_agent", str, d.user_agent),
        follow_redirects=c.get("follow_redirects", bool, d.follow_redirects),
        max_redirects=c.number("max_redirects", d.max_redirects, minimum=1, integer=True),
        limit_per_host=c.number("limit_per_host", d.limit_per_host, integer=True),
        log_4xx_bodies=c.get("log_4xx_bodies", bool, d.log_4xx_bodies),
        dns_cache_ttl=c.number("dns_cache_ttl", d.dns_cache_ttl, integer=True),
        rate_per_host=c.number("rate_per_host", d.rate_per_host),
        rate_burst=c.number("rate_burst", d.rate_burst, integer=True),
        breaker_failures=c.number("breaker_failures", d.breaker_failures, integer=True),
        breaker_cool_off=c.number("breaker_cool_off", d.breaker_cool_off, minimum=0.1),
    )

    dst = top.section("destinations")
    dst.reject_unknown(("deny", "allow"))
    destinations = DestinationsConfig(
        deny=_networks(dst, "deny", DestinationsConfig().deny),
        allow=_networks(dst, "allow", ()),
    )

    au = top.section("auth")
    au.reject_unknown(("tokens", "allow_anonymous_remote"))
    tokens = au.get("tokens", list, [])
    for i, t in enumerate(tokens):
        key = f"auth.tokens[{i}]"
        if not isinstance(t, str) or len(t) < 16 or not t.isprintable() or " " in t:
            raise ConfigError(key, "tokens are strings of at least 16 printable characters "
                                   "without spaces", marks.get(key))
    auth = AuthConfig(tuple(tokens), au.get("allow_anonymous_remote", bool, False))

    hi = top.section("history")
    hi.reject_unknown(f.name for f in dataclasses.fields(HistoryConfig))
    dh = HistoryConfig()
    history = HistoryConfig(max_jobs=hi.number("max_jobs", dh.max_jobs, integer=True),
                            max_age=hi.number("max_age", dh.max_age),
                            max_bytes=hi.number("max_bytes", dh.max_bytes, integer=True))

    jo = top.section("journal")
    jo.reject_unknown(("path", "compact_size"))
    journal_path = jo.get("path", str, None)
    if journal_path is not None and not journal_path.strip():
        raise jo.error("path", "must name a directory (leave the key out to turn the journal off)")
    journal = JournalConfig(
        path=None if journal_path is None else os.path.abspath(journal_path),
        compact_size=jo.number("compact_size", JournalConfig().compact_size, minimum=4096,
                               integer=True))

    red = top.section("redact")
    red.reject_unknown(("query",))
    names = red.get("query", list, list(RedactConfig().query))
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name:
            key = f"redact.query[{i}]"
            raise ConfigError(key, "must be a query parameter name", marks.get(key))

    processes = top.get("processes", (int, str), 1)
    if processes == "auto":
        processes = os.cpu_count() or 1
    elif isinstance(processes, str) or not 1 <= processes <= 64:
        raise top.error("processes", f"must be 1-64 or 'auto', got {processes!r}")

    cfg = Config(
        listen=tuple(listeners),
        pidfile=pidfile,
        drain_timeout=top.number("drain_timeout", 300.0),
        log_level=level,
        log_format=log_format,
        pool=_queue(top.section("pool"), DEFAULT_QUEUE),
        queues=queues,
        routes=_unique_routes(routes, "routes"),
        client=client,
        limits=_limits(top.section("limits")),
        unix_socket=_unix_socket(top.section("unix_socket")),
        destinations=destinations,
        auth=auth,
        history=history,
        journal=journal,
        rabbitmq=_rabbitmq(top.section("rabbitmq")),
        redact=RedactConfig(tuple(names)),
        processes=processes,
    )
    validate(cfg, marks)
    return cfg


def validate(cfg: Config, marks: dict[str, int] | None = None) -> None:
    """Cross-key rules, re-checked after command-line overrides."""
    marks = marks or {}
    if not cfg.listen:
        raise ConfigError("listen", "at least one listener is required", marks.get("listen"))
    seen = set()
    for i, lst in enumerate(cfg.listen):
        line = marks.get(f"listen[{i}]", marks.get("listen"))  # the entry's own line
        if lst.address in seen:
            raise ConfigError("listen", f"{lst.address} is listed twice", line)
        seen.add(lst.address)
        if not lst.is_loopback and not cfg.auth.tokens and not cfg.auth.allow_anonymous_remote:
            raise ConfigError(
                "listen", f"{lst.address} is reachable from other hosts but auth.tokens is empty: "
                "set auth.tokens (or auth.allow_anonymous_remote: true to accept the risk)",
                line)


def load_config(path: str | None) -> Config:
    """Read a YAML file (or embedded defaults when path is None)."""
    if path is None:
        return parse_config({})
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError("", f"cannot read config: {e.strerror}", source=path) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
        marks: dict[str, int] = {}
        if node is not None:
            _marks(node, "", marks)
        cfg = parse_config(data, marks)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else None
        raise ConfigError("", f"invalid YAML: {getattr(e, 'problem', e)}", line, path) from None
    except ConfigError as e:
        e.source = path
        raise
    return dataclasses.replace(cfg, source=os.path.abspath(path))


def apply_overrides(
    cfg: Config,
    *,
    listen: list[str] | None = None,
    pidfile: str | None = None,
    pool_size: int | None = None,
    queue_size: int | None = None,
    ip_routes: str | None = None,
    log_4xx_bodies: bool = False,
    log_level: str | None = None,
) -> Config:
    """Command-line flags win over the file."""
    changes: dict[str, Any] = {}
    if listen:
        parts = [p for item in listen for p in item.split(",") if p.strip()]
        changes["listen"] = tuple(parse_listen(p, "--listen") for p in parts)
    if pidfile:
        changes["pidfile"] = pidfile
    if pool_size is not None or queue_size is not None:
        if pool_size is not None and pool_size < 1:
            raise ConfigError("--pool-size", "must be >= 1")
        if queue_size is not None and queue_size < 1:
            raise ConfigError("--queue-size", "must be >= 1")
        changes["pool"] = dataclasses.replace(
            cfg.pool,
            size=cfg.pool.size if pool_size is None else pool_size,
            queue_size=cfg.pool.queue_size if queue_size is None else queue_size,
        )
    if ip_routes is not None:
        changes["routes"] = parse_ip_routes(ip_routes)
    if log_4xx_bodies:
        changes["client"] = dataclasses.replace(cfg.client, log_4xx_bodies=True)
    if log_level is not None:
        if log_level not in LOG_LEVELS:
            raise ConfigError("--log-level", f"must be one of {', '.join(LOG_LEVELS)}")
        changes["log_level"] = log_level
    if not changes:
        return cfg
    cfg = dataclasses.replace(cfg, **changes)
    validate(cfg)
    return cfg
