"""Which hosts the ``http`` task (and anything else that calls out for a client) may reach.

``QUIESCE_HTTP_ALLOWED_HOSTS`` is a comma-separated list of hostnames
(``api.example.com``), wildcard domains (``*.example.com``, which does not match
``example.com`` itself), IP addresses and CIDR blocks.

* When it is set, a target must match an entry.
* Either way, a target whose address is loopback, link-local, private or otherwise
  not globally routable is refused unless the entry that matched names it
  explicitly: its hostname, its wildcard domain, or an IP/CIDR containing it.
  So with the variable unset, any public host may be reached and nothing internal
  can be; listing ``10.0.0.0/8`` or ``billing.internal`` opens exactly that.

Names are checked when a run is admitted (a refused target is a 400); just before a
request is sent its host is resolved, every address checked, and the connection made
to a checked address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class EgressRefused(ValueError):
    """The target is not allowed; the message says why."""


@dataclass(frozen=True)
class Target:
    """Where to send a checked request: the URL (its host replaced by the checked
    address), and the headers and httpx extensions that keep it the same request."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)
    extensions: dict[str, Any] = field(default_factory=dict)


class EgressPolicy:
    def __init__(self, entries: Iterable[str]) -> None:
        self._names: set[str] = set()
        self._suffixes: list[str] = []
        self._networks: list[IPNetwork] = []
        for entry in entries:
            try:
                self._networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                if entry.startswith("*."):
                    self._suffixes.append(entry[1:].lower())
                else:
                    self._names.add(entry.lower())
        self._restricted = bool(self._names or self._suffixes or self._networks)

    def check_url(self, url: str) -> str:
        """Check scheme and host; return the host. Raises EgressRefused."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise EgressRefused("only http and https URLs are allowed")
        host = (parts.hostname or "").lower()
        if not host:
            raise EgressRefused("the URL has no host")
        literal = _as_address(host)
        if literal is not None:
            self._check_address(host, literal)
        elif self._restricted and not self._name_listed(host):
            raise EgressRefused(f"host {host!r} is not in QUIESCE_HTTP_ALLOWED_HOSTS")
        return host

    async def pin(self, url: str) -> Target:
        """Resolve the URL's host, check every address it has, and pin the request to
        one of them. Raises EgressRefused.

        Connecting to the address that was checked (with the original Host header, and
        the hostname for TLS) closes the gap a DNS answer that changes between the
        check and the connection (DNS rebinding) would otherwise open.
        """
        host = self.check_url(url)
        if _as_address(host) is not None:
            return Target(url=url)
        parsed = httpx.URL(url)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except OSError as exc:
            raise EgressRefused(f"cannot resolve {host!r}: {exc}") from None
        addresses = [a for info in infos if (a := _as_address(str(info[4][0]))) is not None]
        if not addresses:
            raise EgressRefused(f"cannot resolve {host!r}: no address")
        for address in addresses:
            self._check_address(host, address)
        return Target(
            url=str(parsed.copy_with(host=str(addresses[0]))),
            headers={"host": parsed.netloc.decode("ascii")},
            extensions={"sni_hostname": host} if parsed.scheme == "https" else {},
        )

    def _name_listed(self, host: str) -> bool:
        return host in self._names or any(host.endswith(suffix) for suffix in self._suffixes)

    def _check_address(self, host: str, address: IPAddress) -> None:
        in_network = any(address in network for network in self._networks)
        if self._restricted and not (in_network or self._name_listed(host)):
            raise EgressRefused(f"host {host!r} is not in QUIESCE_HTTP_ALLOWED_HOSTS")
        if not address.is_global and not in_network and not self._name_listed(host):
            raise EgressRefused(
                f"{host!r} resolves to the non-public address {address}; "
                "list it in QUIESCE_HTTP_ALLOWED_HOSTS to allow it"
            )


def _as_address(host: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    # ::ffff:127.0.0.1 reaches 127.0.0.1: judge it as the IPv4 address it carries.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
