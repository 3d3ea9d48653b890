"""Which network addresses the service may connect to for ``$import`` inputs (no SSRF).

An http(s) input must name a host on ``EXPORTSVC_IMPORT_ALLOWED_HOSTS`` (``sources``
checks that); this module decides on the *addresses* it connects to, so an allowed name
that resolves (or is re-pointed, DNS rebinding) to an internal address is refused too:

- never: unspecified (``0.0.0.0``, ``::``), link-local (``169.254.0.0/16`` with the
  cloud metadata service, ``fe80::/10``), multicast and broadcast addresses;
- public (globally reachable) addresses: allowed;
- any other (loopback, private ranges, shared, reserved...): only inside
  ``EXPORTSVC_IMPORT_ALLOWED_NETWORKS``, or when the allowlist names that very address
  (an allowlist entry ``10.1.2.3:8443`` is the operator's explicit choice).

IPv4-mapped (``::ffff:a.b.c.d``), 6to4, Teredo and NAT64 (``64:ff9b::/96``) IPv6
addresses are judged by the IPv4 address they carry. :class:`GuardedResolver` applies
the rule to every address a name resolves to, at every connection (there is no DNS
cache), so the address checked is the address connected to.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class AddressRefused(Exception):
    """The address is not one import inputs may be read from."""


def parse_address(text: str) -> IPAddress | None:
    """``text`` as an IP address (brackets and an IPv6 zone dropped), else None."""
    try:
        return ipaddress.ip_address(text.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


Entry = tuple[str | IPAddress, int | None]
"""An allowlist entry: a host name (lower case) or an address, and a port or None (any)."""


def parse_entry(entry: str) -> Entry:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or a bare IPv6 address."""
    entry = entry.strip().lower()
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = rest.removeprefix(":")
    elif entry.count(":") == 1:
        host, _, port = entry.partition(":")
    else:
        host, port = entry, ""
    return parse_address(host) or host, int(port) if port else None


def on_allowlist(entry: Entry, host: str | IPAddress, port: int | None) -> bool:
    """Whether a URL's host (a lower-case name or an address) and explicit port match
    ``entry``. Addresses compare as addresses, so every spelling of one matches."""
    return entry[0] == host and entry[1] in (None, port)


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def refusal(address: IPAddress, allowed: Iterable[IPNetwork]) -> str | None:
    """Why ``address`` may not be connected to, or None when it may."""
    inner = _embedded_ipv4(address)
    if inner is not None:
        reason = refusal(inner, allowed)
        return f"{reason} (inside {address})" if reason else None
    if address.is_unspecified:
        return f"{address} is an unspecified address"
    if address.is_link_local:
        return f"{address} is a link-local address (cloud metadata lives there)"
    if address.is_multicast or address == ipaddress.IPv4Address("255.255.255.255"):
        return f"{address} is a multicast or broadcast address"
    if any(address.version == net.version and address in net for net in allowed):
        return None
    if address.is_global:
        return None
    kind = "loopback" if address.is_loopback else "private" if address.is_private else "reserved"
    return (
        f"{address} is a {kind} address; allow it with EXPORTSVC_IMPORT_ALLOWED_NETWORKS "
        "if inputs may really come from there"
    )


def parse_networks(entries: Iterable[str]) -> list[IPNetwork]:
    """CIDR strings (``10.0.0.0/8``, ``::1/128``, a bare address) as networks."""
    return [ipaddress.ip_network(entry.strip(), strict=False) for entry in entries]


class GuardedResolver(AbstractResolver):
    """The default resolver, refusing every answer that :func:`refusal` refuses: a name
    with any refused address is refused whole (no falling back to its other addresses)."""

    def __init__(self, allowed: Iterable[IPNetwork]) -> None:
        self._allowed = list(allowed)
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            address = parse_address(result["host"])
            reason = "not an IP address" if address is None else refusal(address, self._allowed)
            if reason is not None:
                raise AddressRefused(f"host {host!r} resolves to a refused address: {reason}")
        return results

    async def close(self) -> None:
        await self._inner.close()


__all__ = [
    "AddressRefused",
    "Entry",
    "GuardedResolver",
    "IPAddress",
    "IPNetwork",
    "on_allowlist",
    "parse_address",
    "parse_entry",
    "parse_networks",
    "refusal",
]
