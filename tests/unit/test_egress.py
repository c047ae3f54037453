"""EgressPolicy: which targets the http task may reach (QUIESCE_HTTP_ALLOWED_HOSTS)."""

from __future__ import annotations

import contextlib
import random

import pytest

from service.egress import EgressPolicy, EgressRefused

OPEN = EgressPolicy([])

NON_PUBLIC = [
    "http://127.0.0.1/",
    "http://127.1.2.3:8080/x",
    "http://10.1.2.3/",
    "http://172.16.0.1/",
    "http://192.168.0.10/",
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata: link-local
    "http://0.0.0.0/",
    "http://100.64.0.1/",  # carrier-grade NAT
    "http://[::1]/",
    "http://[fe80::1]/",
    "http://[fc00::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:10.0.0.1]/",
    "http://[::]/",
]


def refused(policy: EgressPolicy, url: str) -> bool:
    try:
        policy.check_url(url)
    except EgressRefused:
        return True
    return False


@pytest.mark.parametrize(
    "url", ["https://example.com/hook", "http://api.example.com:8080/x", "http://8.8.8.8/"]
)
def test_unset_allows_public_hosts(url: str) -> None:
    assert not refused(OPEN, url)


@pytest.mark.parametrize("url", NON_PUBLIC)
def test_unset_refuses_non_public_literal_addresses(url: str) -> None:
    with pytest.raises(EgressRefused, match="non-public"):
        OPEN.check_url(url)


def test_check_url_returns_the_lowercased_host() -> None:
    assert OPEN.check_url("https://API.Example.COM/path") == "api.example.com"


@pytest.mark.parametrize(
    "url", ["ftp://example.com/", "file:///etc/passwd", "gopher://example.com/", "example.com"]
)
def test_only_http_and_https_are_allowed(url: str) -> None:
    with pytest.raises(EgressRefused, match="only http and https"):
        OPEN.check_url(url)


def test_a_url_without_a_host_is_refused() -> None:
    with pytest.raises(EgressRefused, match="no host"):
        OPEN.check_url("http:///path")


def test_listed_addresses_and_networks_open_exactly_those() -> None:
    policy = EgressPolicy(["10.0.0.0/8", "127.0.0.1", "fd00::/8"])
    assert not refused(policy, "http://10.1.2.3/")
    assert not refused(policy, "http://127.0.0.1:9000/")
    assert not refused(policy, "http://[fd12::1]/")
    assert not refused(policy, "http://[::ffff:10.9.9.9]/")  # the IPv4 it carries is listed
    assert refused(policy, "http://127.0.0.2/")
    assert refused(policy, "http://192.168.0.1/")
    assert refused(policy, "http://[::1]/")


def test_when_set_unlisted_public_hosts_are_refused() -> None:
    policy = EgressPolicy(["api.example.com", "*.hooks.example.org", "203.0.113.0/24"])
    assert not refused(policy, "https://api.example.com/x")
    assert not refused(policy, "https://API.EXAMPLE.COM/x")
    assert not refused(policy, "https://a.hooks.example.org/")
    assert not refused(policy, "https://a.b.hooks.example.org/")
    assert not refused(policy, "http://203.0.113.7/")
    for url in (
        "https://example.com/",
        "https://other.example.com/",
        "https://hooks.example.org/",  # *.domain does not match the domain itself
        "https://evilhooks.example.org/",
        "https://api.example.com.evil.net/",
        "http://8.8.8.8/",
        "http://127.0.0.1/",
    ):
        with pytest.raises(EgressRefused, match="QUIESCE_HTTP_ALLOWED_HOSTS"):
            policy.check_url(url)


def test_a_listed_hostname_may_be_internal() -> None:
    policy = EgressPolicy(["billing.internal", "*.svc.cluster.local"])
    assert not refused(policy, "http://billing.internal/")
    assert not refused(policy, "http://api.ns.svc.cluster.local/")


async def test_pin_refuses_a_name_that_resolves_to_loopback() -> None:
    with pytest.raises(EgressRefused, match="non-public address"):
        await OPEN.pin("http://localhost:8000/")
    # Numeric forms that only the resolver turns into 127.0.0.1.
    with pytest.raises(EgressRefused):
        await OPEN.pin("http://2130706433/")


async def test_pin_allows_a_listed_name_or_network() -> None:
    await EgressPolicy(["localhost"]).pin("http://localhost:8000/")
    await EgressPolicy(["127.0.0.0/8"]).pin("http://127.0.0.1:8000/")


async def test_pin_connects_to_the_checked_address_under_the_original_name() -> None:
    target = await EgressPolicy(["localhost"]).pin("https://localhost:8443/a?b=1")
    assert target.url in ("https://127.0.0.1:8443/a?b=1", "https://[::1]:8443/a?b=1")
    assert target.headers == {"host": "localhost:8443"}
    assert target.extensions == {"sni_hostname": "localhost"}  # TLS still checks the name
    literal = await EgressPolicy(["127.0.0.1"]).pin("http://127.0.0.1/")
    assert (literal.url, literal.headers, literal.extensions) == ("http://127.0.0.1/", {}, {})


async def test_pin_checks_the_name_first() -> None:
    policy = EgressPolicy(["api.example.com"])
    with pytest.raises(EgressRefused, match="QUIESCE_HTTP_ALLOWED_HOSTS"):
        await policy.pin("http://localhost/")


# --- IPv6 forms that carry an IPv4 address --------------------------------------------

#: (url, why) — each refused with the policy unset, judged by the IPv4 it carries or,
#: for prefixes whose embedded address cannot be trusted, by the prefix itself.
EMBEDDED_REFUSED = [
    ("http://[::ffff:127.0.0.1]/", "IPv4-mapped loopback"),
    ("http://[::ffff:0:10.0.0.1]/", "IPv4-translated private"),
    ("http://[64:ff9b::127.0.0.1]/", "NAT64 loopback"),
    ("http://[64:ff9b::a9fe:a9fe]/", "NAT64 cloud metadata (169.254.169.254)"),
    ("http://[64:ff9b::192.168.1.1]/", "NAT64 private"),
    ("http://[64:ff9b:1::127.0.0.1]/", "local-use NAT64 loopback"),
    ("http://[64:ff9b:1::8.8.8.8]/", "local-use NAT64: position not verifiable"),
    ("http://[2002:7f00:1::1]/", "6to4 loopback"),
    ("http://[2002:a00:1::]/", "6to4 private"),
    ("http://[2002:808:808::1]/", "6to4: deprecated relay"),
    ("http://[::127.0.0.1]/", "IPv4-compatible loopback"),
    ("http://[::10.0.0.1]/", "IPv4-compatible private"),
    ("http://[::8.8.8.8]/", "IPv4-compatible: deprecated"),
    # Teredo client 127.0.0.1, stored XOR-ed as 128.255.255.254.
    ("http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/", "Teredo loopback client"),
    ("http://[2001:0:4136:e378:8000:63bf:f7f7:f7f7]/", "Teredo: deprecated relay"),
]


@pytest.mark.parametrize(("url", "why"), EMBEDDED_REFUSED)
def test_ipv6_forms_carrying_a_refused_ipv4_are_refused(url: str, why: str) -> None:
    with pytest.raises(EgressRefused, match="non-public"):
        OPEN.check_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://[::ffff:8.8.8.8]/",  # only another spelling of a public address
        "http://[64:ff9b::8.8.8.8]/",  # what DNS64 answers for a public host
        "http://[2606:4700:4700::1111]/",  # an ordinary public IPv6 address
    ],
)
def test_ipv6_forms_of_a_public_ipv4_are_allowed(url: str) -> None:
    assert not refused(OPEN, url)


#: Teredo: server 65.54.227.120, client 192.0.2.45 or 127.0.0.1 (stored XOR-ed).
TEREDO_CLIENT = "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/"
TEREDO_LOOPBACK = "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/"
#: (policy entries, url, allowed): listing a carrier prefix opens it only for the IPv4
#: addresses that would be allowed on their own; listing the IPv4 opens its spellings.
LISTED = [
    (["127.0.0.0/8"], "http://[64:ff9b::127.0.0.1]/", True),
    (["127.0.0.0/8"], "http://[::ffff:0:127.0.0.1]/", True),
    (["64:ff9b::/96"], "http://[64:ff9b::127.0.0.1]/", False),  # judged as 127.0.0.1
    (["127.0.0.0/8"], "http://[2002:7f00:1::1]/", False),  # the 6to4 prefix is not listed
    (["2002::/16"], "http://[2002:7f00:1::1]/", False),  # 127.0.0.1 is not listed
    (["2002::/16", "127.0.0.0/8"], "http://[2002:7f00:1::1]/", True),
    (["2002::/16", "8.8.8.0/24"], "http://[2002:808:808::1]/", True),
    (["::/96", "10.0.0.0/8"], "http://[::10.0.0.1]/", True),
    (["::/96"], "http://[::10.0.0.1]/", False),
    (["64:ff9b:1::/48", "8.8.8.0/24"], "http://[64:ff9b:1::8.8.8.8]/", True),
    (["64:ff9b:1::/48", "8.8.8.0/24"], "http://[64:ff9b:1::127.0.0.1]/", False),
    (["2001::/32", "65.54.227.120", "192.0.2.45"], TEREDO_CLIENT, True),
    (["2001::/32", "65.54.227.120"], TEREDO_LOOPBACK, False),
    (["::1"], "http://[::1]/", True),  # ::1 is loopback, not an IPv4-compatible address
]


@pytest.mark.parametrize(("entries", "url", "allowed"), LISTED)
def test_listing_opens_an_ipv6_form_only_with_the_ipv4_it_carries(
    entries: list[str], url: str, allowed: bool
) -> None:
    assert refused(EgressPolicy(entries), url) is not allowed


@pytest.mark.parametrize(("url", "why"), EMBEDDED_REFUSED[:4])
async def test_pin_refuses_them_too(url: str, why: str) -> None:
    with pytest.raises(EgressRefused, match="non-public"):
        await OPEN.pin(url)


# --- ambiguous IPv4 spellings and unsafe URLs -----------------------------------------

AMBIGUOUS_IPV4 = [
    "http://0177.0.0.1/",  # octal
    "http://0x7f.1/",  # hex, short
    "http://0x7f000001/",  # hex integer
    "http://127.1/",  # short
    "http://127.0.1/",
    "http://2130706433/",  # decimal integer
    "http://017700000001/",  # octal integer
    "http://127.0.0.1./",  # trailing dot
    "http://1.2.3.0x4/",
    "http://08.8.8.8/",  # a leading zero
    "http://256.1.1.1/",
    "http://example.123/",  # a numeric last label makes the whole host an IPv4 address
    "http://0x/",
]


@pytest.mark.parametrize("url", AMBIGUOUS_IPV4)
def test_ambiguous_ipv4_spellings_are_refused(url: str) -> None:
    with pytest.raises(EgressRefused, match="ambiguous IPv4 address"):
        OPEN.check_url(url)
    # Listing the address does not make another spelling of it acceptable.
    with pytest.raises(EgressRefused, match="ambiguous IPv4 address"):
        EgressPolicy(["127.0.0.0/8"]).check_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://1password.com/",
        "http://123.example.com/",
        "http://0x.example.com/",
        "http://example.com./",
        "http://8.8.8.8/",
        "http://ex\u00e4mple.com/",  # IDN, checked in its IDNA form
    ],
)
def test_names_that_only_contain_numbers_are_still_names(url: str) -> None:
    assert not refused(OPEN, url)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://a%20b/", "not a valid DNS name"),
        ("http://exa mple.com/", "not a valid DNS name"),
        ("http://a..b/", "not a valid DNS name"),
        ("http://[fe80::1%25eth0]/", "zone id"),
        ("http://example.com:0/", "outside 1-65535"),
        ("http://example.com:65536/", "outside 1-65535"),
        ("http://a:99999999999999999999/", "outside 1-65535"),
        ("http://[zz]/", "cannot be parsed"),
        ("http://a:b/", "cannot be parsed"),
        ("http://\x00/", "cannot be parsed"),
        ("http://\uff41.com/", "cannot be parsed"),  # full-width letter
        ("http://\udcff/", "cannot be parsed"),  # a lone surrogate
        ("http://[", "not a valid DNS name"),
        ("http://@/", "no host"),
    ],
)
def test_urls_that_cannot_be_parsed_safely_are_refused(url: str, problem: str) -> None:
    with pytest.raises(EgressRefused, match=problem):
        OPEN.check_url(url)


def test_the_host_checked_is_the_host_httpx_connects_to() -> None:
    # urllib and httpx disagree on backslashes; the request goes where httpx says.
    assert OPEN.check_url("http://a.b\\@example.com/") == "example.com"
    assert OPEN.check_url("http://[::FFFF:8.8.8.8]/") == "::ffff:8.8.8.8"


def test_check_url_raises_nothing_but_egress_refused() -> None:
    """Whatever a client sends, admission answers 400, never 500: a seeded sample of
    URL-shaped junk built from the characters that matter to URL parsers."""
    rng = random.Random(7)
    pieces = [
        "http://",
        "https://",
        "[",
        "]",
        ":",
        "@",
        "%",
        "%25",
        "/",
        "\\",
        ".",
        "0x",
        "0",
        "7",
        "127",
        "ff",
        "::",
        "ffff",
        "64:ff9b",
        "2002",
        "#",
        "?",
        " ",
        "\x00",
        "\u00e4",
        "\uff10",
        "\udcff",
        "xn--",
        "-",
        "_",
        "65536",
        "a",
        "example.com",
    ]
    for _ in range(5000):
        url = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))
        with contextlib.suppress(EgressRefused):
            OPEN.check_url(url)
