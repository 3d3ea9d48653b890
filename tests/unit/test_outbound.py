"""The address rule for import inputs (``exportsvc.outbound``): pure, no network."""

from __future__ import annotations

import ipaddress

import pytest

from exportsvc.outbound import on_allowlist, parse_address, parse_entry, parse_networks, refusal


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("8.8.8.8", None),
        ("2001:4860:4860::8888", None),
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("169.254.169.254", "link-local"),
        ("::ffff:169.254.169.254", "link-local"),
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 of 169.254.169.254
        ("2002:a9fe:a9fe::", "link-local"),  # 6to4 of it
        ("fe80::1", "link-local"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.0.1", "private"),
        ("fd00::1", "private"),
        ("100.64.0.1", "reserved"),
        ("224.0.0.1", "multicast"),
        ("255.255.255.255", "broadcast"),
    ],
)
def test_address_rule(address: str, reason: str | None) -> None:
    parsed = parse_address(address)
    assert parsed is not None
    found = refusal(parsed, [])
    assert (found is None) if reason is None else (found is not None and reason in found)


def test_allowed_networks_open_private_ranges_but_never_link_local() -> None:
    allowed = parse_networks(["10.0.0.0/8", "169.254.0.0/16", "::1"])
    for address in ("10.9.9.9", "::1"):
        parsed = parse_address(address)
        assert parsed is not None and refusal(parsed, allowed) is None
    for address in ("169.254.169.254", "192.168.0.1"):
        parsed = parse_address(address)
        assert parsed is not None and refusal(parsed, allowed) is not None


@pytest.mark.parametrize(
    ("entry", "host", "port", "matches"),
    [
        ("files.example.org", "files.example.org", None, True),
        ("files.example.org", "files.example.org", 8443, True),
        ("Files.Example.org:8443", "files.example.org", 8443, True),
        ("files.example.org:8443", "files.example.org", 443, False),
        ("files.example.org:8443", "files.example.org", None, False),
        ("files.example.org", "evil.example.org", None, False),
        ("10.0.0.5", "10.0.0.5", None, True),
        ("[::ffff:10.0.0.5]:80", "::ffff:a00:5", 80, True),  # one address, two spellings
        ("::1", "::1", 8080, True),
        ("[::1]:8080", "::1", 8081, False),
    ],
)
def test_allowlist_entries(entry: str, host: str, port: int | None, matches: bool) -> None:
    url_host = parse_address(host) or host
    assert on_allowlist(parse_entry(entry), url_host, port) is matches


def test_an_entry_names_an_address_or_a_host() -> None:
    assert parse_entry("[2001:db8::1]:443") == (ipaddress.ip_address("2001:db8::1"), 443)
    assert parse_entry("localhost:8080") == ("localhost", 8080)
