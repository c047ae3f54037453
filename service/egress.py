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

IPv6 addresses that carry an IPv4 address are judged by what they carry, because
that is where a translator or tunnel delivers the request:

* IPv4-mapped ``::ffff:a.b.c.d``, IPv4-translated ``::ffff:0:a.b.c.d`` and the
  well-known NAT64 prefix ``64:ff9b::/96`` are only other spellings of the IPv4
  address: each is allowed or refused exactly as that IPv4 address would be (so a
  DNS64 answer for a public host works in an IPv6-only cluster).
* IPv4-compatible ``::a.b.c.d``, local-use NAT64 ``64:ff9b:1::/48`` (its operator
  chooses where the IPv4 address sits), 6to4 ``2002::/16`` and Teredo ``2001::/32``
  (whose client address is XOR-ed) are deprecated or cannot be verified: they are
  refused unless an entry lists them, and even then the IPv4 addresses they carry
  must be allowed too. This does not depend on the Python version's idea of
  ``is_global``, which changed between patch releases for these prefixes.

A URL is parsed with the same parser that sends the request (httpx), so the host
checked is the host connected to. An IP literal must be written canonically (a
dotted quad such as ``192.0.2.1``, or IPv6 in brackets): octal (``0177.0.0.1``),
hex (``0x7f.1``), short (``127.1``) and integer (``2130706433``) spellings are read
differently by different resolvers and are refused, as is any host whose last label
is a number, a host with characters a DNS name cannot hold, an IPv6 zone id, and a
port outside 1-65535.

Names are checked when a run is admitted (a refused target is a 400); just before a
request is sent its host is resolved, every address checked, and the connection made
to a checked address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_V6 = ipaddress.IPv6Network
#: Spellings of an IPv4 address: judged as that address alone.
_SPELLINGS: Final = (
    (_V6("::ffff:0:0/96"), "IPv4-mapped"),
    (_V6("::ffff:0:0:0/96"), "IPv4-translated"),
    (_V6("64:ff9b::/96"), "NAT64"),
)
#: Carriers of an IPv4 address that cannot be trusted: refused unless listed.
_CARRIERS: Final = (
    (_V6("64:ff9b:1::/48"), "local-use NAT64"),
    (_V6("2002::/16"), "6to4"),
    (_V6("2001::/32"), "Teredo"),
    (_V6("::/96"), "IPv4-compatible"),
)
#: ``::`` and ``::1`` sit inside ``::/96`` but are not IPv4-compatible addresses.
_NOT_COMPATIBLE: Final = _V6("::/127")
#: A DNS name as httpx sends it (IDNA-encoded, lower case), optionally fully qualified.
_NAME_RE: Final = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*\.?")
#: WHATWG URL's "ends in a number": such a host is read as an IPv4 address by browsers
#: and by ``inet_aton`` (which getaddrinfo uses), in several incompatible ways.
_NUMERIC_LABEL_RE: Final = re.compile(r"[0-9]+|0x[0-9a-f]*")
_AMBIGUOUS: Final = (
    "the host {host} is an ambiguous IPv4 address: write it as a dotted quad of decimal"
    " numbers without leading zeros (e.g. 192.0.2.1)"
)


class EgressRefused(ValueError):
    """The target is not allowed; the message says why."""


@dataclass(frozen=True)
class Target:
    """Where to send a checked request: the URL (its host replaced by the checked
    address), and the headers and httpx extensions that keep it the same request."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)
    extensions: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Judged:
    """One address that decides whether a target may be reached."""

    address: IPAddress
    #: May be reached without being listed (when the policy is not restricted).
    public: bool
    #: How it was found, for the refusal message ("" for the target address itself).
    via: str = ""


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
        """Check scheme and host; return the host (IDNA-encoded, lower case, IPv6
        without brackets). Raises EgressRefused, and nothing else."""
        parsed = _parse(url)
        host = parsed.raw_host.decode("ascii").lower()
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
        if self._name_listed(host):
            return  # the operator named this host: whatever it resolves to is theirs
        for judged in _judge(address):
            listed = any(judged.address in network for network in self._networks)
            if self._restricted and not listed:
                raise EgressRefused(f"host {host!r} is not in QUIESCE_HTTP_ALLOWED_HOSTS")
            if not (judged.public or listed):
                raise EgressRefused(
                    f"{host!r} resolves to the non-public address {judged.address}"
                    f"{judged.via}; list it in QUIESCE_HTTP_ALLOWED_HOSTS to allow it"
                )


def _parse(url: str) -> httpx.URL:
    """Parse ``url`` as httpx will when it sends the request; refuse what is ambiguous."""
    try:
        parsed = httpx.URL(url)
        port = parsed.port
    except (httpx.InvalidURL, ValueError, TypeError) as exc:  # UnicodeError is a ValueError
        if str(exc).startswith("Invalid IPv4 address"):  # httpx: four numbers, not canonical
            raise EgressRefused(_AMBIGUOUS.format(host="of the URL")) from None
        raise EgressRefused(f"the URL cannot be parsed: {exc}") from None
    if parsed.scheme not in ("http", "https"):
        raise EgressRefused("only http and https URLs are allowed")
    try:
        host = parsed.raw_host.decode("ascii").lower()
    except UnicodeDecodeError:
        raise EgressRefused("the URL's host is not ASCII after IDNA encoding") from None
    if not host:
        raise EgressRefused("the URL has no host")
    if port is not None and not 1 <= port <= 65535:
        raise EgressRefused(f"the URL's port {port} is outside 1-65535")
    if ":" in host:  # httpx checked the brackets' content is an IPv6 address
        if "%" in host:
            raise EgressRefused(f"an IPv6 zone id is not allowed in {host!r}")
        return parsed
    if not _NAME_RE.fullmatch(host):
        raise EgressRefused(f"the host {host!r} is not a valid DNS name or IP address")
    last_label = host.removesuffix(".").rsplit(".", 1)[-1]
    if _NUMERIC_LABEL_RE.fullmatch(last_label):
        canonical = _canonical_ipv4(host)
        if canonical != host:
            raise EgressRefused(_AMBIGUOUS.format(host=repr(host)))
    return parsed


def _canonical_ipv4(host: str) -> str | None:
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        return None


def _as_address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _judge(address: IPAddress) -> list[_Judged]:
    """The addresses that decide whether ``address`` may be reached: itself, or the
    IPv4 address it spells, or itself as non-public plus every IPv4 address it carries."""
    if isinstance(address, ipaddress.IPv4Address):
        return [_Judged(address, address.is_global)]
    for network, form in _SPELLINGS:
        if address in network:
            ipv4 = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
            return [_Judged(ipv4, ipv4.is_global, f" (carried by the {form} address {address})")]
    for network, form in _CARRIERS:
        if address in network and address not in _NOT_COMPATIBLE:
            carried = _carried_ipv4(address)
            via = f" (carried by the {form} address {address})"
            return [
                _Judged(address, public=False, via=f" ({form})"),
                *(_Judged(ipv4, ipv4.is_global, via) for ipv4 in carried),
            ]
    return [_Judged(address, address.is_global)]


def _carried_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    if address.sixtofour is not None:
        return [address.sixtofour]
    if address.teredo is not None:
        return list(address.teredo)  # (server, client), the client already un-XOR-ed
    # IPv4-compatible, and local-use NAT64 as most deploy it (a /96: the last 32 bits).
    return [ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)]
