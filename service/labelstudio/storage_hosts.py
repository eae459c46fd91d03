"""The storage hosts Label Studio may send regcl to (``REGCL_LABEL_STUDIO_STORAGE_HOSTS``), and
the addresses regcl may connect to there.

A project on S3, GCS or Azure import storage answers an image request with a redirect (303)
to a presigned URL on the storage host. regcl follows it only when the host is listed:
entries, comma-separated, ``[scheme://]host[:port]`` or ``[scheme://]*.suffix[:port]``, the
scheme ``https`` unless the entry says ``http://``, the port the scheme's unless given. A
wildcard matches hosts ending in ``.suffix`` (not the suffix itself). Example:
``*.s3.amazonaws.com,*.storage.googleapis.com,http://minio.internal:9000``.

Then the host's addresses are checked before connecting (:meth:`StorageHosts.address`):

- an address the entry names (the entry is that IP address) is allowed whatever it is;
- loopback, link-local (cloud metadata endpoints such as ``169.254.169.254``), unspecified,
  multicast and reserved addresses are refused otherwise: a name that resolves to them is the
  classic way to turn a fetch against its host, so such a storage must be listed by address;
- private addresses (``10/8``, ``172.16/12``, ``192.168/16``, ``100.64/10``, ``fc00::/7``) are
  allowed for an entry that names the host exactly (MinIO inside the network), never for a
  wildcard entry (a public cloud's name that resolves inside the network is refused);
- every address the name resolves to must pass, and the connection goes to the checked
  address (:mod:`.task_images` connects to it by IP with the name as ``Host`` and TLS server
  name), so DNS cannot change between the check and the connection.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from regcl.errors import ConfigError
from service.labelstudio.errors import StorageHostRefusedError

__all__ = ["Resolver", "StorageEntry", "StorageHosts", "parse_storage_hosts"]

_DEFAULT_PORTS = {"http": 80, "https": 443}
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Sequence[str]]
"""(host, port) → the addresses it resolves to (as text)."""

METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200"))
"""Cloud metadata endpoints (AWS, ECS, AWS IPv6, Alibaba): refused like link-local ones."""


def system_resolver(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to (``getaddrinfo``)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def _ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


@dataclass(frozen=True)
class StorageEntry:
    """One entry: scheme, host (lower case; the suffix after ``*.`` for a wildcard), port."""

    scheme: str
    host: str
    port: int
    wildcard: bool

    @property
    def text(self) -> str:
        host = f"*.{self.host}" if self.wildcard else self.host
        host = f"[{host}]" if ":" in host else host
        default = _DEFAULT_PORTS[self.scheme] == self.port
        return f"{self.scheme}://{host}" + ("" if default else f":{self.port}")

    @property
    def address(self) -> IPAddress | None:
        """The IP address this entry names, if it is one."""
        return None if self.wildcard else _ip(self.host)

    def matches(self, scheme: str, host: str, port: int) -> bool:
        if scheme != self.scheme or port != self.port:
            return False
        if self.wildcard:
            return host.endswith("." + self.host)
        return host == self.host or (self.address is not None and _ip(host) == self.address)


def _parse_entry(text: str) -> StorageEntry:
    raw = text if "://" in text else f"https://{text}"
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{text!r} is not [scheme://]host[:port]: {exc}") from None
    if parts.scheme not in _DEFAULT_PORTS:
        raise ValueError(f"{text!r}: the scheme must be http or https")
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError(f"{text!r}: an entry is [scheme://]host[:port] (or *.suffix), with "
                         "no path, query or user")
    host = (parts.hostname or "").lower()
    wildcard = host.startswith("*.")
    name = host[2:] if wildcard else host
    if not name or "*" in name or (wildcard and _ip(name) is not None):
        raise ValueError(f"{text!r}: no host (a wildcard is '*.' followed by a domain suffix)")
    return StorageEntry(parts.scheme, name, port or _DEFAULT_PORTS[parts.scheme], wildcard)


def parse_storage_hosts(text: str) -> tuple[StorageEntry, ...]:
    """The entries of ``REGCL_LABEL_STUDIO_STORAGE_HOSTS`` (ConfigError naming the setting)."""
    entries = []
    for item in text.split(","):
        if item.strip():
            try:
                entries.append(_parse_entry(item.strip()))
            except ValueError as exc:
                raise ConfigError(f"REGCL_LABEL_STUDIO_STORAGE_HOSTS: {exc}") from None
    return tuple(entries)


def _refused_kind(ip: IPAddress) -> str | None:
    """Why an address may not be reached unless named, or None."""
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_unspecified or ip.is_multicast or ip.is_reserved:
        return "an unspecified, multicast or reserved address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return _refused_kind(ip.ipv4_mapped)
    return None


def _is_private(ip: IPAddress) -> bool:
    return ip.is_private or ip in ipaddress.ip_network("100.64.0.0/10")


class StorageHosts:
    """The listed storage hosts (see the module doc). ``resolver``: name → addresses (the
    system's by default; tests give their own)."""

    def __init__(self, entries: Sequence[StorageEntry],
                 resolver: Resolver = system_resolver) -> None:
        self.entries = tuple(entries)
        self.resolver = resolver

    @classmethod
    def from_setting(cls, text: str, resolver: Resolver = system_resolver) -> StorageHosts:
        return cls(parse_storage_hosts(text), resolver)

    def entry_for(self, url: str) -> StorageEntry:
        """The entry that lists ``url``'s host, else StorageHostRefusedError naming it."""
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = None
        scheme, host = parts.scheme, (parts.hostname or "").lower()
        where = f"{scheme}://{host}" + (f":{port}" if port else "")
        if scheme in _DEFAULT_PORTS and host and parts.username is None \
                and parts.password is None:
            port = port or _DEFAULT_PORTS[scheme]
            for entry in self.entries:
                if entry.matches(scheme, host, port):
                    return entry
        listed = ", ".join(e.text for e in self.entries) or "nothing"
        raise StorageHostRefusedError(
            f"Label Studio sent the image to {where}, which REGCL_LABEL_STUDIO_STORAGE_HOSTS "
            f"does not list (it lists {listed}); refused. Add the storage host to that "
            "setting to allow it.")

    def address(self, entry: StorageEntry, host: str, port: int) -> str:
        """The address to connect to for ``host`` (listed by ``entry``): every address it
        resolves to is checked; StorageHostRefusedError names the first refused one."""
        literal = _ip(host)
        if literal is not None:
            found = [literal]
        else:
            try:
                found = [ip for ip in map(_ip, self.resolver(host, port)) if ip is not None]
            except OSError as exc:
                raise StorageHostRefusedError(f"storage host {host!r} does not resolve: "
                                              f"{exc}") from None
            if not found:
                raise StorageHostRefusedError(f"storage host {host!r} has no address")
        for ip in found:
            if entry.address is not None and ip == entry.address:
                continue
            why = _refused_kind(ip)
            if why is None and entry.wildcard and _is_private(ip):
                why = "a private address (a wildcard entry reaches public addresses only)"
            if why is not None:
                raise StorageHostRefusedError(
                    f"storage host {host!r} resolves to {ip}, {why}; refused (list it by "
                    f"address, e.g. '{entry.scheme}://{ip}:{port}', if it really is the "
                    "storage)" if literal is None else
                    f"storage address {ip} is {why}; refused unless "
                    "REGCL_LABEL_STUDIO_STORAGE_HOSTS names it")
        return str(found[0])
