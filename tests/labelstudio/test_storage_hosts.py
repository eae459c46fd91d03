"""REGCL_LABEL_STUDIO_STORAGE_HOSTS: the entries, which URLs they list, and which addresses a
listed host may resolve to (a resolver given per test stands in for DNS: the names are
made up, the addresses are the point)."""

from __future__ import annotations

import pytest

from regcl.errors import ConfigError
from service.labelstudio.errors import StorageHostRefusedError
from service.labelstudio.storage_hosts import StorageHosts, parse_storage_hosts


def _hosts(text: str, addresses: dict[str, list[str]] | None = None) -> StorageHosts:
    table = addresses or {}
    return StorageHosts.from_setting(text, lambda host, port: table.get(host, []))


def _address(hosts: StorageHosts, url: str) -> str:
    from urllib.parse import urlsplit

    entry = hosts.entry_for(url)
    parts = urlsplit(url)
    return hosts.address(entry, parts.hostname or "", parts.port or entry.port)


def test_entries_parse_with_their_defaults():
    entries = parse_storage_hosts(" *.s3.amazonaws.com, http://minio.internal:9000,"
                                  "https://[fd00::5]:8443,, 127.0.0.1:9000 ")
    assert [e.text for e in entries] == ["https://*.s3.amazonaws.com",
                                         "http://minio.internal:9000", "https://[fd00::5]:8443",
                                         "https://127.0.0.1:9000"]
    assert entries[0].wildcard and entries[0].port == 443
    assert str(entries[3].address) == "127.0.0.1"


@pytest.mark.parametrize("text", ["ftp://x.example", "https://x.example/path", "*.",
                                  "https://user@x.example", "*.10.0.0.1", "http://x:port",
                                  "a.*.example"])
def test_malformed_entries_name_the_setting(text):
    with pytest.raises(ConfigError, match="REGCL_LABEL_STUDIO_STORAGE_HOSTS"):
        parse_storage_hosts(text)


@pytest.mark.parametrize("url, listed", [
    ("https://bucket.s3.amazonaws.com/k.png?X-Amz-Signature=1", True),
    ("https://a.b.s3.amazonaws.com/k.png", True),
    ("https://s3.amazonaws.com/bucket/k.png", False),  # the bare suffix is not a subdomain
    ("http://bucket.s3.amazonaws.com/k.png", False),  # https unless the entry says http
    ("https://bucket.s3.amazonaws.com:8443/k.png", False),
    ("https://evil.example/bucket.s3.amazonaws.com", False),
    ("https://bucket.s3.amazonaws.com.evil.example/k.png", False),
    ("https://x@bucket.s3.amazonaws.com/k.png", False),
    ("http://minio.internal:9000/b/k.png", True),
    ("http://MINIO.internal:9000/b/k.png", True),
    ("http://minio.internal/b/k.png", False),
    ("https://minio.internal:9000/b/k.png", False),
])
def test_urls_are_listed_by_scheme_host_and_port(url, listed):
    hosts = _hosts("*.s3.amazonaws.com,http://minio.internal:9000")
    if listed:
        assert hosts.entry_for(url)
    else:
        with pytest.raises(StorageHostRefusedError, match="does not list"):
            hosts.entry_for(url)


@pytest.mark.parametrize("address", ["127.0.0.1", "169.254.169.254", "10.1.2.3"])
def test_redirects_to_internal_addresses_are_refused_unless_listed(address):
    unlisted = _hosts("*.s3.amazonaws.com")
    with pytest.raises(StorageHostRefusedError, match=address.replace(".", r"\.")):
        unlisted.entry_for(f"http://{address}/latest/meta-data/")
    listed = _hosts(f"http://{address}:80")  # the entry names the address: allowed
    assert _address(listed, f"http://{address}/k.png") == address


@pytest.mark.parametrize("resolved, allowed", [
    (["52.216.1.2"], True),
    (["127.0.0.1"], False),
    (["169.254.169.254"], False),
    (["10.1.2.3"], False),  # a wildcard entry reaches public addresses only
    (["100.64.0.7"], False),
    (["52.216.1.2", "10.1.2.3"], False),  # every address must pass
    (["::ffff:127.0.0.1"], False),
    (["fd00:ec2::254"], False),
    ([], False),
])
def test_a_wildcard_entry_reaches_public_addresses_only(resolved, allowed):
    hosts = _hosts("*.s3.amazonaws.com", {"bucket.s3.amazonaws.com": resolved})
    if allowed:
        assert _address(hosts, "https://bucket.s3.amazonaws.com/k") == resolved[0]
    else:
        with pytest.raises(StorageHostRefusedError):
            _address(hosts, "https://bucket.s3.amazonaws.com/k")


@pytest.mark.parametrize("resolved, allowed", [
    (["10.1.2.3"], True),  # the entry names the host: its private address is fine
    (["192.168.5.5"], True),
    (["127.0.0.1"], False),  # a name that resolves to loopback or metadata: never
    (["169.254.169.254"], False),
    (["0.0.0.0"], False),
])
def test_an_exact_entry_reaches_private_but_not_loopback_or_metadata(resolved, allowed):
    hosts = _hosts("http://minio.internal:9000", {"minio.internal": resolved})
    if allowed:
        assert _address(hosts, "http://minio.internal:9000/b/k") == resolved[0]
    else:
        with pytest.raises(StorageHostRefusedError, match="resolves to"):
            _address(hosts, "http://minio.internal:9000/b/k")
