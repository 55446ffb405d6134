"""IP router: destination network -> local source address, plus the destination guard.

Both act on the address actually dialled, inside the socket factory the delivery client dials
through (bwp/http1.py), so a hostname that resolves somewhere unexpected (DNS rebinding) is
still routed and checked by what it resolved to.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

from .config import Config, IPAddress, IPNetwork, Route

# Linux: bind() picks no port until connect(), so binding a source address does not use up
# the ephemeral port range per source address (4-tuple reuse stays possible).
_IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
_CACHE_LIMIT = 4096
_THIS_HOST = {4: ipaddress.ip_network("0.0.0.0/8"), 6: ipaddress.ip_network("::/128")}
_LOOPBACK = {4: ipaddress.ip_address("127.0.0.1"), 6: ipaddress.ip_address("::1")}


class DestinationDenied(ConnectionRefusedError):
    """The resolved destination is on the deny list; raised before any packet is sent."""


class Router:
    """Longest-prefix match over IPv4 and IPv6 routes; `None` means the OS chooses."""

    def __init__(
        self,
        routes: Iterable[Route] = (),
        deny: Iterable[IPNetwork] = (),
        allow: Iterable[IPNetwork] = (),
        own_endpoints: Iterable[tuple[str, int]] = (),
    ):
        # Most specific first: the first match is the longest prefix, whatever the file order.
        self.routes = sorted(routes, key=lambda r: r.network.prefixlen, reverse=True)
        self.deny = tuple(deny)
        self.allow = tuple(allow)
        self._own_ports: set[int] = set()
        self._own_endpoints: set[tuple[IPAddress, int]] = set()
        self.set_own_listeners(own_endpoints)
        self._cache: dict[str, str | None] = {}

    @classmethod
    def from_config(cls, cfg: Config) -> Router:
        own: list[tuple[str, int]] = []
        for lst in cfg.listen:
            if lst.is_unix or not lst.host or not lst.port:
                continue
            if lst.host == "localhost":  # binds the loopback address(es) it resolves to
                own += [("127.0.0.1", lst.port), ("::1", lst.port)]
            elif _is_ip(lst.host):
                own.append((lst.host, lst.port))
        return cls(cfg.routes, cfg.destinations.deny, cfg.destinations.allow, own)

    def route(self, ip: IPAddress) -> Route | None:
        for r in self.routes:
            if r.network.version == ip.version and ip in r.network:
                return r
        return None

    def source_for(self, ip: str) -> str | None:
        """Source address for a destination IP string (cached: destinations repeat)."""
        try:
            return self._cache[ip]
        except KeyError:
            pass
        r = self.route(ipaddress.ip_address(ip))
        via = str(r.via) if r and r.via else None
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[ip] = via
        return via

    def set_own_listeners(self, endpoints: Iterable[tuple[str, int]]) -> None:
        """bwp's own listening addresses, as bound (getsockname): a job must never reach them."""
        self._own_ports, self._own_endpoints = set(), set()
        for host, port in endpoints:
            addr = _unmap(ipaddress.ip_address(host))
            if addr.is_unspecified:
                self._own_ports.add(port)
            else:
                self._own_endpoints.add((addr, port))

    def denied(self, ip: IPAddress, port: int) -> str | None:
        """Why dialling ip:port is refused, or None when it is allowed."""
        ip = _unmap(ip)  # ::ffff:a.b.c.d reaches a.b.c.d
        # Linux connects 0.0.0.0/8 and :: to this host (the bound source address, else
        # loopback): they are checked as the loopback address too, and reach every listener.
        here = _LOOPBACK[ip.version] if ip in _THIS_HOST[ip.version] else None
        if ((ip, port) in self._own_endpoints
                or (port in self._own_ports
                    and (here is not None or ip.is_loopback or _assigned_here(ip)))
                or (here is not None and any(port == p for _, p in self._own_endpoints))):
            return f"{ip} port {port} is one of bwp's own listeners"
        for addr in (ip,) if here is None else (ip, here):
            for net in self.deny:
                if net.version == addr.version and addr in net and not any(
                        a.version == addr.version and addr in a for a in self.allow):
                    return (f"{ip} is in denied network {net}" if addr is ip else
                            f"{ip} reaches this host ({addr}), in denied network {net}")
        return None

    def socket_factory(self, addr_info: tuple) -> socket.socket:
        """aiohappyeyeballs' socket_factory hook: one new outbound socket, bound per route."""
        family, type_, proto, _, sockaddr = addr_info
        host, port = sockaddr[0], sockaddr[1]
        reason = self.denied(ipaddress.ip_address(host), port)
        if reason:
            raise DestinationDenied(f"destination denied: {reason}")
        sock = socket.socket(family, type_, proto)
        via = self.source_for(host)
        if via is not None:
            try:
                sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((via, 0))
            except OSError:
                sock.close()
                raise
        return sock

    def describe(self) -> list[str]:
        lines = [str(r) for r in self.routes]
        if not any(r.network.prefixlen == 0 and r.network.version == 4 for r in self.routes):
            lines.append("0.0.0.0/0 -> auto (implicit)")
        if not any(r.network.prefixlen == 0 and r.network.version == 6 for r in self.routes):
            lines.append("::/0 -> auto (implicit)")
        return lines


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _assigned_here(ip: IPAddress) -> bool:
    """Whether `ip` is an address of this host (a wildcard listener answers on every one):
    bind() to it succeeds only then.  Sends nothing; only asked for a listener's port."""
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((str(ip), 0))
        except OSError:
            return False
    return True


def _unmap(ip: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address is the IPv4 address it carries."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return ip.ipv4_mapped
    return ip
