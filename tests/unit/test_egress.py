"""EgressPolicy: which targets the http task may reach (QUIESCE_HTTP_ALLOWED_HOSTS)."""

from __future__ import annotations

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
